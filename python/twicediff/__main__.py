"""``python -m twicediff``: the command line of :mod:`twicediff.app.cli`."""
import sys

from .app.cli import main

sys.exit(main())
