"""``python -m digitgen``: the ``digitgen`` command."""

from digitgen.cli import main

main()
