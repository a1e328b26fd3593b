"""`python -m scheduler`: run the scheduler process."""

from scheduler.main import main

main()
