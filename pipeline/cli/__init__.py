"""The `rag-pipeline` command line: a thin click layer over the library.

Importing this module must stay cheap: no torch, chromadb or sentence_transformers (tested).
Library errors (:class:`pipeline.errors.RagPipelineError`) become one clear message and the
error's exit code; no traceback for user errors.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import __version__
from pipeline.cli.options import (
    CONFIG_FLAGS,
    build_config,
    config_file_option,
    config_option,
    handle_errors,
)


class _LazyGroup(click.Group):
    """Registers the commands of the pipeline.cli modules on first use, so `import pipeline.cli` stays cheap."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for cmd in _commands():
                self.add_command(cmd)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        self._load()
        return super().get_command(ctx, cmd_name)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Like click's, but a usage error (bad flag value, unknown option) is ONE line on stderr, exit 2."""
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # the help text
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _commands() -> list[click.Command]:
    """Every command, one module per command family (none imports a heavy library at import time)."""
    from pipeline.cli.answers import eval_answers_cmd
    from pipeline.cli.config import config_cmd
    from pipeline.cli.corpus import eval_retrieval_cmd, ingest_cmd
    from pipeline.cli.model import fetch_model_cmd
    from pipeline.cli.report import report_cmd
    from pipeline.cli.results import merge_cmd, status_cmd
    from pipeline.cli.run import run_cmd
    from pipeline.cli.serve import serve_cmd
    from pipeline.cli.slurm import serve_store_cmd, submit_cmd

    return [config_cmd, run_cmd, serve_cmd, ingest_cmd, eval_retrieval_cmd, status_cmd, merge_cmd, submit_cmd,
            serve_store_cmd, eval_answers_cmd, report_cmd, fetch_model_cmd]


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="rag-pipeline")
@click.option("-v", "--verbose", count=True,
              help="More logging: -v debug lines of rag-pipeline, -vv of every library too (default: info).")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only (progress lines stay).")
def main(verbose: int, quiet: bool) -> None:
    """rag-pipeline: offline, multi-GPU batch retrieval-augmented generation.

    JSONL records + a document corpus in, one Parquet row per record out.
    """
    from pipeline.logs import setup

    setup(-1 if quiet else min(verbose, 2))


if __name__ == "__main__":
    main()


__all__ = ["CONFIG_FLAGS", "build_config", "config_file_option", "config_option", "handle_errors", "main"]
