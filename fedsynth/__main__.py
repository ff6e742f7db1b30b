"""`python -m fedsynth` runs the CLI."""

from fedsynth.cli import main

main()
