"""The package version, in one place (read by setup via pyproject and by build_info)."""

__version__ = "0.1.0"
