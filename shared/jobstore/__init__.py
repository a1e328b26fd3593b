"""The job store: the one owner of a job's record in Redis (see README.md)."""
