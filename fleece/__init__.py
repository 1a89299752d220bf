"""The ``fleece`` command: argument parsing, progress and ``--json`` output. No backup logic lives here."""

__version__ = "0.1.0"
