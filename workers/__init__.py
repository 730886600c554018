"""Entry points and loops of the worker processes (RAG workers, generation processes)."""
