"""Run orchestration in the main process: scheduling, the worker set, rows and commits, progress."""
