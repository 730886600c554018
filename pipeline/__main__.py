"""`python -m pipeline` = the `rag-pipeline` command."""

from pipeline.cli import main

main()
