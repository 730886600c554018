"""GPU detection and the GPU memory sizing of managed SGLang servers.

Detection honours ``CUDA_VISIBLE_DEVICES`` (through torch) and two environment overrides for machines without
the job's GPUs (tests, ``serve --dry-run`` on a login node): ``RAG_PIPELINE_GPU_COUNT`` and
``RAG_PIPELINE_GPU_MEMORY_MB``. torch is imported only inside :func:`visible_gpu_count` /
:func:`gpu_memory_mb`, and only when a GPU device node exists.

Sizing: SGLang reserves ``--mem-fraction-static`` of a GPU for weights and KV cache; the rest must hold SGLang's
own headroom (:func:`sglang_reserve_mb`) and, on the same GPU, the RAG worker's CUDA context and embedding model
(:func:`embedding_reserve_mb`). :func:`static_fraction` is the arithmetic, :func:`mem_fraction_static` the value
the SGLang plan passes. Every size is in MiB.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

GPU_COUNT_ENV = "RAG_PIPELINE_GPU_COUNT"
"""Environment override of the detected GPU count (``torch.cuda.device_count()``): for tests of the managed
SGLang path with a stand-in server and for ``serve --dry-run`` on a machine without the job's GPUs."""
GPU_MEMORY_ENV = "RAG_PIPELINE_GPU_MEMORY_MB"
"""Environment override of the GPU memory (MiB) used to size ``--mem-fraction-static`` (same purpose)."""
CUDA_CONTEXT_MB = 500
"""GPU memory of one process's CUDA context with PyTorch, MiB (typically 300-500 MiB on recent GPUs with
CUDA's lazy module loading; an estimate, the largest of the usual range)."""
EMBEDDING_SEQ_TOKENS = 256
"""all-MiniLM-L6-v2's max_seq_length (tokens): longer texts are truncated."""
DEFAULT_PER_TOKEN_FLOATS = 1536 + 12 * EMBEDDING_SEQ_TOKENS
"""all-MiniLM-L6-v2's activation floats per token (FFN intermediate 1536 + 12 heads x 256 attention scores),
used when the model's config.json cannot be read."""
MIN_STATIC_FRACTION = 0.2
"""Smallest ``--mem-fraction-static`` accepted: below it the GPU is too small for SGLang and the embedding model."""


def _gpu_device_files() -> bool:
    """True if the kernel exposes an NVIDIA (/dev/nvidia0...) or AMD ROCm (/dev/kfd) compute device."""
    dev = Path("/dev")
    return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists()


def visible_gpu_count() -> int:
    """GPUs this process may use: ``torch.cuda.device_count()`` (honours ``CUDA_VISIBLE_DEVICES``).

    ``RAG_PIPELINE_GPU_COUNT`` replaces the detection when set (tests, dry runs). Without an NVIDIA/AMD
    device node torch is not imported (~200 MB) and the count is 0; without torch it is 0 too.

    Raises:
        ConfigError: ``RAG_PIPELINE_GPU_COUNT`` is not an integer >= 0.
    """
    override = os.environ.get(GPU_COUNT_ENV)
    if override is not None:
        if not override.strip().isdigit():
            raise ConfigError(f"environment {GPU_COUNT_ENV}={override!r}: expected a GPU count >= 0")
        return int(override)
    if not _gpu_device_files():
        return 0
    try:
        import torch
    except ImportError:
        log.info("torch is not installed: assuming no GPU")
        return 0
    return int(torch.cuda.device_count())


def detect_gpus(requested: int) -> int:
    """Number of GPUs to use.

    Args:
        requested: ``servers.gpus``; ``-1`` = every visible GPU, ``0`` = none, ``N`` = the first N visible.

    Returns:
        The count, never more than :func:`visible_gpu_count`.

    Raises:
        ConfigError: ``requested`` < -1, or more GPUs requested than visible (naming
            ``CUDA_VISIBLE_DEVICES``): servers would otherwise land on GPUs the job does not own.
    """
    if requested < -1:
        raise ConfigError(f"[servers] gpus: expected -1 (auto) or a count >= 0, got {requested}")
    if requested == 0:
        return 0
    visible = visible_gpu_count()
    if requested == -1:
        return visible
    if requested > visible:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"[servers] gpus: {requested} GPUs requested but {visible} visible"
            + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
            + "; use --gpus -1 for all visible GPUs or ask the scheduler for more"
        )
    return requested


def physical_gpu_ids(n: int) -> list[str]:
    """Physical ids of the first ``n`` visible GPUs, as a child's ``CUDA_VISIBLE_DEVICES`` must name them.

    With ``CUDA_VISIBLE_DEVICES=4,5`` visible GPU 0 is physical ``4`` and visible 1 is ``5`` (entries may
    also be GPU/MIG UUIDs, passed through); without the variable visible i is physical ``i``.

    Returns:
        ``n`` id strings, in visible order.

    Raises:
        ConfigError: ``CUDA_VISIBLE_DEVICES`` lists fewer than ``n`` entries (only possible with the
            ``RAG_PIPELINE_GPU_COUNT`` override: CUDA itself never sees more devices than listed).
    """
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n)]
    ids = [x.strip() for x in env.split(",") if x.strip()]
    if len(ids) < n:
        raise ConfigError(f"CUDA_VISIBLE_DEVICES={env!r} lists {len(ids)} GPU(s), {n} needed")
    return ids[:n]


def gpu_memory_mb() -> int | None:
    """Memory of visible GPU 0 in MiB (``torch.cuda.get_device_properties(0).total_memory``), or
    ``RAG_PIPELINE_GPU_MEMORY_MB``; None when unknown (no GPU, no torch).

    Raises:
        ConfigError: ``RAG_PIPELINE_GPU_MEMORY_MB`` is not an integer > 0.
    """
    override = os.environ.get(GPU_MEMORY_ENV)
    if override is not None:
        if not override.strip().isdigit() or int(override) <= 0:
            raise ConfigError(f"environment {GPU_MEMORY_ENV}={override!r}: expected MiB > 0")
        return int(override)
    if not _gpu_device_files():
        return None
    try:
        import torch

        if torch.cuda.device_count() < 1:
            return None
        return int(torch.cuda.get_device_properties(0).total_memory // 2**20)
    except (ImportError, RuntimeError):
        return None


def embedding_footprint_mb(weights_bytes: int, per_token_floats: int, batch_size: int) -> float:
    """GPU memory of an embedding model in use, MiB: ``CUDA_CONTEXT_MB`` + weights + one batch's activations.

    Args:
        weights_bytes: size of the loaded weights (fp32: the size of the ``*.safetensors`` files), bytes.
        per_token_floats: activation floats one token needs at once (FFN intermediate + heads * seq), fp32.
        batch_size: texts per encode call; each is counted at ``EMBEDDING_SEQ_TOKENS`` tokens.
    """
    activations = batch_size * EMBEDDING_SEQ_TOKENS * per_token_floats * 4
    return CUDA_CONTEXT_MB + (weights_bytes + activations) / 2**20


def embedding_reserve_mb(batch_size: int) -> float:
    """GPU memory the RAG worker (and rank0's ingest) needs beside a server on the same GPU, MiB.

    :func:`embedding_footprint_mb` of the installed embedding model: weights = the size of its
    ``*.safetensors`` files; per token, per layer, the FFN intermediate (``intermediate_size``) and the
    attention scores (``num_attention_heads * 256``), read from its config.json (BERT-style layers;
    all-MiniLM-L6-v2's values when the file cannot be read).

    Args:
        batch_size: ``embedding.batch_size`` (texts per encode call; 0 = the CUDA default,
            :data:`pipeline.retrieval.embedding.CUDA_BATCH_SIZE`).
    """
    from pipeline.retrieval.embedding import model_path, resolve_batch_size

    batch_size = resolve_batch_size(batch_size, "cuda")
    mdir = model_path()
    weights = sum(f.stat().st_size for f in mdir.glob("*.safetensors"))
    try:
        conf = json.loads((mdir / "config.json").read_text())
        per_token = int(conf["intermediate_size"]) + int(conf["num_attention_heads"]) * EMBEDDING_SEQ_TOKENS
    except (OSError, ValueError, KeyError):
        per_token = DEFAULT_PER_TOKEN_FLOATS
    return embedding_footprint_mb(weights, per_token, batch_size)


def sglang_reserve_mb(gpu_mb: float, tp_size: int) -> float:
    """SGLang's own headroom outside ``--mem-fraction-static`` (activations, CUDA graphs), MiB.

    SGLang 0.5.23's default (python/sglang/srt/arg_groups/memory_hook.py): 512 + 1.5 * 2048 activation
    tokens + tp_size / 8 * 1024, and at least 10 GiB on GPUs with more than 60 GiB.

    Args:
        gpu_mb: memory of one GPU, MiB.
        tp_size: GPUs per server (tensor parallel).
    """
    reserve = 512 + 1.5 * 2048 + tp_size / 8 * 1024
    if gpu_mb > 60 * 1024:
        reserve = max(reserve, 10 * 1024)
    return reserve


def static_fraction(gpu_mb: float, reserve_mb: float) -> float:
    """``(gpu_mb - reserve_mb) / gpu_mb`` rounded down to 0.001: the share of a GPU SGLang may take.

    Raises:
        ConfigError: less than ``MIN_STATIC_FRACTION`` is left (the GPU is too small for both).
    """
    frac = int((gpu_mb - reserve_mb) / gpu_mb * 1000) / 1000
    if frac < MIN_STATIC_FRACTION:
        raise ConfigError(
            f"a GPU of {gpu_mb} MiB leaves a fraction {frac} for SGLang after {reserve_mb:.0f} MiB of headroom and "
            "embedding model: set servers.mem_fraction_static, or embedding.device = 'cpu'"
        )
    return frac


def mem_fraction_static(cfg: Config) -> float | None:
    """``--mem-fraction-static`` for the managed SGLang servers, or None when it cannot be computed.

    ``servers.mem_fraction_static`` if set; else :func:`static_fraction` of the GPU memory ``G``
    (:func:`gpu_memory_mb`) after :func:`sglang_reserve_mb` and :func:`embedding_reserve_mb`: SGLang's default
    leaves only its own headroom, so the RAG worker's CUDA context and embedding model (and rank0's ingest)
    on the same GPU would run out of memory. None when ``G`` is unknown (the flag is then not passed).

    Raises:
        ConfigError: a configured value outside (0, 1), or a GPU too small for both (< 0.2 left).
    """
    s = cfg.servers
    if s.mem_fraction_static:
        if not 0 < s.mem_fraction_static < 1:
            raise ConfigError(f"[servers] mem_fraction_static: expected 0 < value < 1, got {s.mem_fraction_static}")
        return s.mem_fraction_static
    gpu_mb = gpu_memory_mb()
    if gpu_mb is None:
        return None
    reserve = sglang_reserve_mb(gpu_mb, s.tp_size) + embedding_reserve_mb(cfg.embedding.batch_size)
    return static_fraction(gpu_mb, reserve)


__all__ = [
    "CUDA_CONTEXT_MB",
    "EMBEDDING_SEQ_TOKENS",
    "GPU_COUNT_ENV",
    "GPU_MEMORY_ENV",
    "detect_gpus",
    "embedding_footprint_mb",
    "embedding_reserve_mb",
    "gpu_memory_mb",
    "mem_fraction_static",
    "physical_gpu_ids",
    "sglang_reserve_mb",
    "static_fraction",
    "visible_gpu_count",
]
