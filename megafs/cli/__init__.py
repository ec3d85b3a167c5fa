"""The ``megafs`` command line."""

from megafs.cli.main import main

__all__ = ["main"]
