"""The package version, in a module of its own: the manifest writers need it, and importing it from
the package root would run the root's lazy API loader (an import cycle)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml's version
