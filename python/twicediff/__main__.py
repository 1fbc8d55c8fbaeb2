"""``python -m twicediff``: the command line of :mod:`twicediff.cli`."""
import sys

from .cli import main

sys.exit(main())
