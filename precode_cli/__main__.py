"""`python -m precode_cli` runs the same app as the `precode` console script."""

from precode_cli.app import main

main()
