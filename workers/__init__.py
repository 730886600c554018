"""Code that runs inside the RAG-worker and generation processes."""
