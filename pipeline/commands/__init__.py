"""Click commands, one module per command family. Modules must not import heavy libraries at import time."""

from pipeline.commands.run import run_cmd

COMMANDS: list = [run_cmd]
