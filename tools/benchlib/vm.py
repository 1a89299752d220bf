"""A guest-less QEMU VM around existing disk images, for benchmarks (the tests have their own harness
with ground-truth bookkeeping; benchmarks only need speed and the same guest-write path)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleece.exporter.qmp import Monitor

from .disk import Op


class BenchVM:
    def __init__(self, work: Path, disks: dict[str, Path], name: str = "benchvm") -> None:
        self.work = work
        self.disks = disks
        self.name = name
        self.qmp = str(work / "qmp.sock")
        guest_qmp = str(work / "guest.sock")
        args = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
                "-name", name, "-qmp", f"unix:{self.qmp},server=on,wait=off",
                "-qmp", f"unix:{guest_qmp},server=on,wait=off"]
        for d, path in disks.items():
            args += ["-blockdev", f"driver=file,filename={path},node-name=file-{d}",
                     "-blockdev", f"driver=qcow2,file=file-{d},node-name=node-{d}",
                     "-device", f"virtio-blk-pci,drive=node-{d},id={d}"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=open(work / "qemu.log", "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (os.path.exists(self.qmp) and os.path.exists(guest_qmp)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {(work / 'qemu.log').read_text()}")
            time.sleep(0.05)
        self.guest = Monitor(guest_qmp, timeout=600)

    def apply(self, disk: str, ops: list[Op]) -> None:
        src = self.work / "op.bin"
        qdev = f"/machine/peripheral/{disk}/virtio-backend"
        for op in ops:
            if op.kind == "write":
                assert op.data is not None
                src.write_bytes(op.data)
                cmd = f"write -q -s {src} {op.offset} {op.length}"
            else:
                cmd = f"write -q -z {op.offset} {op.length}"
            reply = self.guest.hmp(f'qemu-io -d {qdev} "{cmd}"')
            if reply.strip():
                raise RuntimeError(reply)
        self.guest.hmp(f'qemu-io -d {qdev} "flush"')

    @contextmanager
    def live_export(self, disk: str) -> Iterator[str]:
        """A read-only NBD export of the live disk (for nbdcopy / plain-read baselines): yields a URI."""
        sock = str(self.work / "baseline-nbd.sock")
        self.guest.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
        self.guest.cmd("block-export-add", {"type": "nbd", "id": "baseline", "node-name": f"node-{disk}",
                                            "name": "baseline", "writable": False})
        try:
            yield f"nbd+unix:///baseline?socket={sock}"
        finally:
            self.guest.cmd_and_wait("block-export-del", {"id": "baseline", "mode": "hard"},
                                    event="BLOCK_EXPORT_DELETED", match={"id": "baseline"})
            self.guest.cmd("nbd-server-stop")

    def quit(self) -> None:
        try:
            self.guest.cmd("quit")
        except Exception:  # noqa: BLE001
            pass
        self.guest.close()
        self.proc.wait(60)
