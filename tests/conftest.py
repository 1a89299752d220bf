"""Shared fixtures. Servers (QEMU, Ceph RGW) are started by the fixtures that need them, once per
session or module, so the suite stays fast as it grows."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from repository.backends import Backend, LocalBackend

ROOT = Path(__file__).resolve().parent.parent


def _local_backend(tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "repo", create=True)


BACKEND_FACTORIES = {"local": _local_backend}


@pytest.fixture(params=sorted(BACKEND_FACTORIES))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend, fresh and empty: the conformance suite runs once per entry."""
    b = BACKEND_FACTORIES[request.param](tmp_path)
    yield b
    b.close()


@pytest.fixture
def unique() -> str:
    return secrets.token_hex(4)


def is_root() -> bool:
    return os.geteuid() == 0
