"""``python -m memwarden.cli``: the same as the ``memwarden`` command."""

from memwarden.cli import main

main()
