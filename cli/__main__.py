"""`python -m cli`: the `gptoss` command."""

from cli.main import main

main()
