"""Click commands, one module per command family. Modules must not import heavy libraries at import time."""

from pipeline.commands.answers import eval_answers_cmd
from pipeline.commands.config import config_cmd
from pipeline.commands.corpus import eval_retrieval_cmd, ingest_cmd
from pipeline.commands.results import merge_cmd, status_cmd
from pipeline.commands.run import run_cmd
from pipeline.commands.serve import serve_cmd
from pipeline.commands.slurm import serve_store_cmd, submit_cmd

COMMANDS: list = [
    config_cmd, run_cmd, serve_cmd, ingest_cmd, eval_retrieval_cmd, status_cmd, merge_cmd, submit_cmd, serve_store_cmd,
    eval_answers_cmd]
