"""Shared fixtures. Servers (QEMU, Ceph RGW) are started by the fixtures that need them, once per
session or module, so the suite stays fast as it grows."""

from __future__ import annotations

import os
import sys
import secrets
import tempfile
from pathlib import Path

import pytest

from fleece.repository.backends import Backend, LocalBackend

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/vm.py and friends

# New repositories are encrypted by default, so every `fleece` the suite runs unlocks with this password
# (the default a user gets is what the suite exercises; format 1 is tested with `init --no-encryption`).
# Its slots use scrypt's floor (FLEECE_KDF_TIME=0: ~50 ms) instead of the 0.5 s a real password gets.
TEST_PASSWORD = "fleece test suite password"
os.environ.setdefault("FLEECE_PASSWORD", TEST_PASSWORD)
os.environ.setdefault("FLEECE_KDF_TIME", "0")
# write-only hosts pin the repository's public key (repository/pins.py): keep the suite's pins out of ~
os.environ.setdefault("FLEECE_STATE_DIR", tempfile.mkdtemp(prefix="fleece-test-state-"))


# -- S3: a real Ceph RGW, started once per session -------------------------------------------------------

@pytest.fixture(scope="session")
def rgw(tmp_path_factory: pytest.TempPathFactory):
    """A single-node Ceph RGW (memstore) on loopback; its endpoint and keys go into the AWS environment
    variables, so boto3 — and every ``fleece`` subprocess — finds it through the standard chain."""
    import s3_server

    d = tmp_path_factory.mktemp("rgw")
    info = s3_server.start(d)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")}
    os.environ.update({"AWS_ACCESS_KEY_ID": info["access_key"], "AWS_SECRET_ACCESS_KEY": info["secret_key"],
                       "AWS_ENDPOINT_URL_S3": info["endpoint"]})
    try:
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3_server.stop(d)


# -- libvirt: a private libvirtd (tools/libvirtd), started once per session -------------------------------

@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory):
    """A private root libvirtd in its own mount namespace (tools/libvirtd); its ``uri`` reaches it.

    Skips with one line where it cannot run (no root, python3-libvirt missing) — except under CI, where
    tools/setup installed everything: a libvirtd that does not start there is a failure, not a skip.
    """
    try:
        import libvirt_env
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"python3-libvirt is not importable under CI: {e}")
        pytest.skip(f"python3-libvirt is not installed (tools/setup installs it): {e}")
    d = tmp_path_factory.mktemp("libvirtd")
    try:
        info = libvirt_env.start(d)
    except libvirt_env.Unavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"the private libvirtd does not start under CI: {e}")
        pytest.skip(f"private libvirtd unavailable: {e}")
    yield info
    libvirt_env.stop(d)


@pytest.fixture(scope="session")
def s3_bucket(rgw: dict) -> str:
    from fleece.repository.backends import open_backend

    open_backend("s3://fleece-tests", create_bucket=True).close()
    return "fleece-tests"


def s3_url(bucket: str) -> str:
    """A fresh, empty repository location in the test bucket."""
    return f"s3://{bucket}/{secrets.token_hex(6)}"


def _local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "repo", create=True)


def _s3_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from fleece.repository.backends.s3 import S3Backend

    bucket = request.getfixturevalue("s3_bucket")
    b = S3Backend(bucket, secrets.token_hex(6))
    b.multipart_threshold, b.part_size = 8 << 20, 5 << 20  # exercise multipart with small objects
    return b


def _wrapped_local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    from fleece.repository.backends import open_backend

    # The stack a repository really gets: Retrying ▸ RateLimited ▸ Counting ▸ LocalBackend (a limit high
    # enough not to slow the suite, low enough that the limiter really waits for big objects).
    return open_backend(str(tmp_path / "repo"), create=True, bwlimit=8 << 30)


BACKEND_FACTORIES = {"local": _local_backend, "local+wrapped": _wrapped_local_backend, "s3": _s3_backend}


@pytest.fixture(params=[pytest.param("local"), pytest.param("local+wrapped"),
                        pytest.param("s3", marks=pytest.mark.s3)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend, fresh and empty (and the local one inside the wrappers a repository is opened
    with): the conformance suite runs once per entry."""
    b = BACKEND_FACTORIES[request.param](request, tmp_path)
    yield b
    b.close()


@pytest.fixture
def unique() -> str:
    return secrets.token_hex(4)


def is_root() -> bool:
    return os.geteuid() == 0


# -- QEMU ------------------------------------------------------------------------------------------------

MiB = 1 << 20
ODD_SIZE = 20 * MiB + 4608  # not a multiple of 64 KiB (nor of 4 KiB): exercises the last partial granule


@pytest.fixture
def make_vm(tmp_path_factory: pytest.TempPathFactory):
    """Factory for real guest-less VMs; every VM is killed and its files removed at the end of the test."""
    from vm import TestVM

    made: list[TestVM] = []

    def make(disks: dict[str, int] | None = None, name: str = "testvm", start: bool = True,
             formats: dict[str, str] | None = None, node_opts: dict[str, str] | None = None,
             buses: dict[str, str] | None = None) -> TestVM:
        vm = TestVM(tmp_path_factory.mktemp("vm"), disks or {"vda": 32 * MiB, "vdb": ODD_SIZE}, name=name,
                    formats=formats, node_opts=node_opts, buses=buses)
        made.append(vm)
        if start:
            vm.start()
        return vm

    yield make
    for vm in made:
        vm.cleanup()


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    d = tmp_path / "scratch"
    d.mkdir()
    return d


@pytest.fixture
def tmpfs(tmp_path: Path):
    """Mount a small tmpfs (root only): a filesystem that really fills up."""
    import subprocess

    if not is_root():
        pytest.skip("mounting a tmpfs needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"tmpfs{len(mounts)}"
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
        mounts.append(d)
        return d

    yield mount
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], check=False)
