"""`python -m fedsynth` runs the CLI."""

from .cli import main

main()
