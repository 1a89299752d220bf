"""The real test guest (tests/guest.py, tools/guest) boots from its disk, reads it and writes to it."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

import guest


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    """Kernel + initramfs, built once (cached across sessions in .cache/guest)."""
    return guest.build()


def test_guest_boots_from_its_disk_and_writes_to_it(guest_dir: Path, tmp_path: Path) -> None:
    seed = os.urandom(256 << 10)
    img = guest.make_rootfs(tmp_path / "root.qcow2", guest.MARKER_INIT, files={"/data/seed": seed})
    drive = ["-drive", f"file={img},format=qcow2,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0,id=vda"]
    with guest.Guest(tmp_path, drive) as g:
        g.wait_for("FLEECE-GUEST-UP", timeout=60)
        boot = time.monotonic() - g.started
        g.wait_for(f"FLEECE-SEED {hashlib.sha256(seed).hexdigest()}", timeout=30)
        g.wait_for("FLEECE-GUEST-WROTE", timeout=30)
    print(f"guest boot: {boot:.1f} s to FLEECE-GUEST-UP")
    boots = guest.read_file(img, "/data/boots").decode()
    assert boots.count("boot ") == 1, boots  # the guest's write reached the qcow2
    assert boot < 30, f"the guest took {boot:.1f} s to boot (expected a few seconds under TCG)"
