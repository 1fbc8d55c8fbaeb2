"""Deprecated alias of :mod:`twicediff.ops` (the op wrappers' earlier home), kept for one release."""
from .ops import *  # noqa: F401,F403
from .ops import __all__  # noqa: F401
