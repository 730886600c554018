"""Options and helpers shared by every command: config flags, ``--config``, error handling.

Lives apart from :mod:`pipeline.cli` so that the command modules never import the CLI entry point (which
imports them): no import cycle, and ``python -m pipeline.cli`` loads each module once.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.errors import RagPipelineError

# CLI parameter name -> config key, for every command. Checked against the config by a test.
CONFIG_FLAGS: dict[str, str] = {}


def config_option(*param_decls: str, key: str, **attrs: Any) -> Callable:
    """A click option whose value overrides config field ``key`` ("section.field") when given.

    The option's default is ``None`` so that "not given" falls through to the config file and defaults. When the
    field declares choices (:func:`pipeline.config.choices`) the option's type is ``click.Choice`` of them; the
    caller passes no ``type`` then.

    Raises:
        KeyError: ``key`` names no config field.
        RuntimeError: a ``type`` given for a field with choices, or one CLI parameter mapped to two fields.
    """
    from pipeline.config import choices

    allowed = choices(key)
    if allowed:
        if "type" in attrs:
            raise RuntimeError(f"{param_decls[0]}: {key} declares its choices in pipeline.config; pass no type")
        attrs["type"] = click.Choice(allowed)
    attrs.setdefault("default", None)
    attrs.setdefault("show_default", False)

    def deco(fn: Callable) -> Callable:
        opt = click.option(*param_decls, **attrs)(fn)
        name = opt.__click_params__[-1].name  # type: ignore[attr-defined]
        if CONFIG_FLAGS.setdefault(name, key) != key:
            raise RuntimeError(f"CLI parameter {name!r} maps to both {CONFIG_FLAGS[name]!r} and {key!r}")
        return opt

    return deco


def config_file_option(fn: Callable) -> Callable:
    """Adds ``--config FILE`` (a TOML file layered over configs/default.toml)."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML config file (overrides configs/default.toml; CLI flags override it).",
    )(fn)


def build_config(config_file: str | None, params: dict[str, Any]):
    """Effective config from --config and the flags of the current command (those in CONFIG_FLAGS)."""
    from pipeline.config import load_config

    overrides = {CONFIG_FLAGS[k]: v for k, v in params.items() if k in CONFIG_FLAGS and v is not None}
    return load_config(config_file, overrides)


def handle_errors(fn: Callable) -> Callable:
    """Turn library errors into `Error: ...` on stderr and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RagPipelineError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper
