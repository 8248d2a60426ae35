"""``python -m lirpa_patch_cli`` is the ``lirpa-patch`` command."""

from .main import main

main()
