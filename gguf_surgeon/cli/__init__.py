"""The command line. Only this package imports click or rich."""

from .common import main

__all__ = ["main"]
