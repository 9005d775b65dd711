"""`python -m libra.ops` is the `libra` command."""

from .cli import main

main()
