"""`python -m api`: run the API process."""

from api.main import main

main()
