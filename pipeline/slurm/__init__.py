"""Slurm: array submission, the job script, requeue and merge jobs."""
