"""``python -m cbam_insert``: the ``cbam-insert`` command."""

from .cli import main

main()
