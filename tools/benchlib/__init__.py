"""Helpers shared by the benchmark scripts in tools/ (not part of the installed package)."""
