"""`python -m obsdiff` runs the `obsdiff` command (the form `torchrun -m obsdiff` needs)."""

from obsdiff.cli import main

main()
