"""The worker process: loads a model once and runs generation jobs from its RQ queue."""
