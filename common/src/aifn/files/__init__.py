"""Batch files, local or ``gs://``: event-driven, as a job, or ``python -m aifn.files``."""
