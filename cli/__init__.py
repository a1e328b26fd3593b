"""The `gptoss` command line: one entry to run each process, the whole stack, and a client."""
