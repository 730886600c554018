"""Exceptions raised by library code. The CLI turns each into one message and a non-zero exit."""


class RagPipelineError(Exception):
    """Base of every user-facing error; ``exit_code`` is the process exit status the CLI uses."""

    exit_code = 1


class ConfigError(RagPipelineError):
    """Invalid configuration: unknown key, wrong type, missing file."""

    exit_code = 2


class InputError(RagPipelineError):
    """Bad user input (file, line, field named in the message)."""

    exit_code = 2


class ServerError(RagPipelineError):
    """An LLM server could not be started, reached or verified."""

    exit_code = 3


class StoreError(RagPipelineError):
    """The vector store could not be opened, read or written."""

    exit_code = 4


class RunError(RagPipelineError):
    """The run could not complete (a worker died for good, rank0 failed, ...)."""

    exit_code = 5


class Interrupted(RagPipelineError):
    """The run was stopped by SIGINT/SIGTERM/SIGUSR1 after committing finished rows (resumable)."""

    exit_code = 130


class OutputError(RagPipelineError):
    """The output directory cannot be used: not a directory, under a regular file, read-only, disk full.
    Committed rows are kept; fix the cause and run again to resume."""

    exit_code = 2


class OutageError(RagPipelineError):
    """Every LLM endpoint stayed down longer than ``run.max_outage_s``; committed rows are kept (resumable).

    Exit code 75 is ``EX_TEMPFAIL`` of sysexits.h: a temporary failure, the user is invited to retry.
    """

    exit_code = 75
