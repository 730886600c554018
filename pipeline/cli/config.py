"""`rag-pipeline config`: the effective configuration, every key with its one-line documentation."""

from __future__ import annotations

import json

import click

from pipeline.cli.options import config_file_option, handle_errors


def render_toml(cfg) -> str:
    """The configuration as commented TOML (a valid --config file)."""
    from pipeline.config import field_docs

    docs = field_docs()
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"# {docs[f'{section}.{key}']}")
            lines.append(f"{key} = {json.dumps(value)}" if not isinstance(value, bool) else f"{key} = {str(value).lower()}")
        lines.append("")
    return "\n".join(lines)


@click.command("config")
@config_file_option
@handle_errors
def config_cmd(config_file: str | None) -> None:
    """Print the effective configuration (defaults < configs/default.toml < --config) as commented TOML."""
    from pipeline.config import load_config

    click.echo(render_toml(load_config(config_file)))
