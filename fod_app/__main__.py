"""Entry point: ``python -m fod_app``."""

import sys

from .cli import main

sys.exit(main())
