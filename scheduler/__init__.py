"""The scheduler process: admission and routing of jobs from `incoming` to the worker queues."""
