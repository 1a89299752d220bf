"""The benchmarks' VM: the tests' launcher (``tests/vm.py``, the one guest-less VM launcher of this tree)
around existing disk images, without ground truth, plus the two things only benchmarks need — replaying
a change and a plain NBD export of the live disk for the baselines.

Sharing the launcher means a benchmark measures exactly the VM the tests verify (same command line,
same guest-write path); only the bookkeeping differs (no reference images: the disks are gigabytes).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .disk import Op

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from vm import TestVM  # noqa: E402 - tests/vm.py, found through the line above


def virtual_size(image: Path) -> int:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], check=True,
                          capture_output=True, text=True)
    return int(json.loads(info.stdout)["virtual-size"])


class BenchVM(TestVM):
    """Started on construction; *disks* maps device ids to existing qcow2 images (used in place)."""

    def __init__(self, work: Path, disks: dict[str, Path], name: str = "benchvm") -> None:
        # Guest writes of whole files take a while on TCG: a long monitor timeout.
        super().__init__(work, {d: virtual_size(p) for d, p in disks.items()}, name=name, images=disks,
                         truth=False, guest_timeout=600)
        self.start()

    @property
    def qmp(self) -> str:
        """fleece's monitor socket."""
        return self.qmp_path

    def apply(self, disk: str, ops: list[Op]) -> None:
        """Replay a change through the guest's write path, then flush it to the image."""
        for op in ops:
            if op.kind == "write":
                assert op.data is not None
                self.write(disk, op.offset, op.data)
            else:
                self.zero(disk, op.offset, op.length)
        self.flush(disk)

    @contextmanager
    def live_export(self, disk: str) -> Iterator[str]:
        """A read-only NBD export of the live disk (for nbdcopy / plain-read baselines): yields a URI."""
        assert self.guest is not None
        sock = str(self.dir / "baseline-nbd.sock")
        self.guest.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        self.guest.cmd("block-export-add", {"type": "nbd", "id": "baseline", "node-name": f"node-{disk}",
                                            "name": "baseline", "writable": False})
        try:
            yield f"nbd+unix:///baseline?socket={sock}"
        finally:
            self.guest.cmd_and_wait("block-export-del", {"id": "baseline", "mode": "hard"},
                                    event="BLOCK_EXPORT_DELETED", match={"id": "baseline"})
            self.guest.cmd("nbd-server-stop")

    def quit(self, timeout: float = 60) -> None:
        super().quit(timeout)
