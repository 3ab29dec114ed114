"""`python -m pyctrd_cache`: the `pyctrd-cache` command."""

import sys

from .cli import main

sys.exit(main())
