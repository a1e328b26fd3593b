"""`python -m workers`: run a worker process."""

from workers.main import main

main()
