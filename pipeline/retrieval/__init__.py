"""Retrieval: query embedding, dense search in Chroma, BM25, hybrid fusion."""
