"""rag-pipeline: offline multi-GPU batch retrieval-augmented generation (main-process side)."""

__version__ = "0.1.0"
