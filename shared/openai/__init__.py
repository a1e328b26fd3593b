"""OpenAI's wire format: the requests and answers of the OpenAI-compatible endpoints, shared by the
API and the scheduler's batch feeder (which reads and answers a batch line exactly as the endpoint would)."""
