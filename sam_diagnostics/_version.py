"""The package version, in a module of its own so nothing inside the package imports its face."""

__version__ = "0.1.0"
