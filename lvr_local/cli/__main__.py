"""`python -m lvr_local.cli`: the `lvr` command."""

from lvr_local.cli import main

main()
