"""Evaluation: retrieval metrics (nDCG@10, Recall, MRR) and answer scores."""
