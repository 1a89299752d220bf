"""Rebuild images from the repository alone: a qcow2 chain per disk, or one flat image."""

from .restore import RestoreRequest, RestoreResult, run_restore
from .targets import RestoreError

__all__ = ["RestoreError", "RestoreRequest", "RestoreResult", "run_restore"]
