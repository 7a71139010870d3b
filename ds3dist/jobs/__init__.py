"""Offline jobs run by `python -m ds3dist.launch`: the launch schema and batch generation."""

from ds3dist.jobs.batch import run_batch_job
from ds3dist.jobs.errors import JobError

__all__ = ["JobError", "run_batch_job"]
