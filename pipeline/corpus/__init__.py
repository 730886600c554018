"""Corpus ingestion: document sources, chunking, the ingest ledger and the store writer."""
