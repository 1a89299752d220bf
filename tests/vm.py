"""A real, guest-less QEMU VM for the tests, plus ground truth — the one VM launcher of this tree.

``tools/demo.py`` and the benchmarks (``tools/benchlib/vm.py``) start their VMs with this class too, so
the demo shows and the benchmarks measure exactly the configuration the tests verify. It lives here, not
in the installed ``fleece`` package (it is no product code), next to ``s3_server.py``, which the tools
already share with the tests the same way (``sys.path`` + ``import vm``).

The VM runs ``qemu-system-x86_64 -M q35 -accel tcg -nodefaults`` with qcow2 disks (on virtio-blk unless a
disk asks for another bus: see ``BUSES``) and two QMP monitors: one for fleece, one for the simulated
guest. Guest writes are HMP ``qemu-io`` commands sent through the device's QOM path (the path a real
guest write takes, through any filter fleece inserted), from the second monitor — never from the thread
that reads NBD (FIELD-NOTES §3: that deadlocks).

Every write is applied to a reference raw file too, so the reference always equals what the guest sees
(``truth=False`` turns that off: benchmarks write gigabytes into existing images and check nothing).
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fleece.repository.errors import QmpConnectError
from fleece.exporter.qmp import Monitor

QEMU = "qemu-system-x86_64"


@dataclass
class Disk:
    id: str
    size: int
    image: Path
    reference: Path | None  # None: no ground truth kept (TestVM(truth=False))
    cluster_size: int = 65536
    fmt: str = "qcow2"
    bus: str = "virtio-blk"  # one of BUSES
    qom: str = ""  # QOM path of an anonymous device (drive-if-* buses), read from query-block at start

    @property
    def qdev(self) -> str:
        """The QOM path ``qemu-io -d`` needs: the device that owns the BlockBackend (query-block's ``qdev``).

        virtio-blk's BlockBackend hangs off its ``virtio-backend`` child and usb-storage's off the
        internal scsi-hd on its own SCSI bus; scsi-hd, ide-hd, nvme and nvme-ns own theirs.
        """
        if self.qom:
            return self.qom
        if self.bus == "virtio-blk":
            return f"/machine/peripheral/{self.id}/virtio-backend"
        if self.bus == "usb":
            return f"/machine/peripheral/{self.id}/{self.id}.0/legacy[0]"
        return f"/machine/peripheral/{self.id}"


# How a test disk is attached. ``drive-if-virtio``/``drive-if-ide`` are ``-drive if=…`` without any id:
# QEMU names the drive (virtio0, virtio1, …; ide0-hd0, ide1-hd0, … on q35) and the test disk must carry
# that name. ``drive-if-none`` is ``-drive if=none,id=<disk>`` on a virtio-blk-pci without a device id.
# The ``drive-*`` buses keep QEMU's auto-generated node names (``#block123``, new on every start).
BUSES = ("virtio-blk", "scsi", "ide", "nvme", "nvme-ns", "usb", "drive-if-virtio", "drive-if-ide", "drive-if-none")


class TestVM:
    """Start with :meth:`start`; write with :meth:`write`/:meth:`zero`; compare with :meth:`snapshot_refs`."""

    __test__ = False  # not a pytest test class

    def __init__(self, workdir: Path, disks: dict[str, int], name: str = "testvm",
                 formats: dict[str, str] | None = None, node_opts: dict[str, str] | None = None,
                 buses: dict[str, str] | None = None, images: dict[str, Path] | None = None,
                 truth: bool = True, guest_timeout: float = 30) -> None:
        """*disks*: id → virtual size. *images*: ids that use an existing image file (never created
        nor removed here) instead of a new one in *workdir*. *truth*: keep the reference raw images."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.qmp_path = str(self.dir / "qmp.sock")
        self.guest_qmp_path = str(self.dir / "guest-qmp.sock")
        self.guest_timeout = guest_timeout
        formats = formats or {}
        images = images or {}
        self.disks = {d: Disk(d, size, Path(images.get(d) or self.dir / f"{d}.{formats.get(d, 'qcow2')}"),
                              self.dir / f"{d}.ref.raw" if truth else None, fmt=formats.get(d, "qcow2"))
                      for d, size in disks.items()}
        # extra options of a disk's format node, e.g. "detect-zeroes=unmap,discard=unmap" (Proxmox's default)
        # or "read-only=on" (with a drive-* bus they go into -drive: "readonly=on")
        self.node_opts = node_opts or {}
        for d, bus in (buses or {}).items():  # virtio-blk unless told otherwise
            assert bus in BUSES, f"unknown bus {bus!r} (one of {', '.join(BUSES)})"
            self.disks[d].bus = bus
        self.uuid: str | None = None  # QEMU's -uuid, when a test sets one before start()
        self.extra_args: list[str] = []  # more QEMU options (set before start())
        self.proc: subprocess.Popen[bytes] | None = None
        self.guest: Monitor | None = None
        self._lock = threading.Lock()
        self._tmp = Path(tempfile.mkdtemp(prefix="guestdata-", dir=self.dir))

    # -- lifecycle --------------------------------------------------------------------------------------

    def create_disks(self) -> None:
        for d in self.disks.values():
            if not d.image.exists():
                opts = ["-o", f"cluster_size={d.cluster_size}"] if d.fmt == "qcow2" else []
                subprocess.run(["qemu-img", "create", "-q", "-f", d.fmt, *opts, str(d.image), str(d.size)],
                               check=True)
            if d.reference is not None and not d.reference.exists():
                with open(d.reference, "wb") as f:
                    f.truncate(d.size)

    def start(self) -> None:
        self.create_disks()
        args = [QEMU, "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-name", self.name,
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-qmp", f"unix:{self.guest_qmp_path},server=on,wait=off"]
        if self.uuid:
            args += ["-uuid", self.uuid]
        args += self.extra_args
        args += self._controller_args()
        for d in self.disks.values():
            if d.bus.startswith("drive-"):
                args += self._drive_args(d)
                continue
            args += ["-blockdev", f"driver=file,filename={d.image},node-name=file-{d.id}",
                     "-blockdev", f"driver={d.fmt},file=file-{d.id},node-name=node-{d.id}"
                     + (f",{self.node_opts[d.id]}" if d.id in self.node_opts else ""),
                     *self._device_args(d)]
        for p in (self.qmp_path, self.guest_qmp_path):
            Path(p).unlink(missing_ok=True)
        log = open(self.dir / "qemu.log", "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not (Path(self.qmp_path).exists() and Path(self.guest_qmp_path).exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start: {(self.dir / 'qemu.log').read_text()[-2000:]}")
            time.sleep(0.05)
        while True:  # the socket file exists from bind(): on a busy machine QEMU may not listen() yet
            try:
                self.guest = Monitor(self.guest_qmp_path, timeout=self.guest_timeout)
                break
            except QmpConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._find_anonymous_devices()

    def _controller_args(self) -> list[str]:
        buses = {d.bus for d in self.disks.values()}
        return ((["-device", "virtio-scsi-pci,id=scsi0"] if "scsi" in buses else [])
                + (["-device", "qemu-xhci,id=xhci0"] if "usb" in buses else []))

    def _device_args(self, d: Disk) -> list[str]:
        node = f"node-{d.id}"
        if d.bus == "scsi":  # bus= given: every usb-storage brings a SCSI bus of its own
            return ["-device", f"scsi-hd,drive={node},id={d.id},bus=scsi0.0"]
        if d.bus == "ide":  # q35's ahci has ide.0..ide.5, one unit each; -drive if=ide fills them from ide.0
            port = 5 - [x.id for x in self.disks.values() if x.bus == "ide"].index(d.id)
            return ["-device", f"ide-hd,drive={node},id={d.id},bus=ide.{port}"]
        if d.bus == "nvme":  # the controller's own namespace
            return ["-device", f"nvme,drive={node},serial={d.id[:20]},id={d.id}"]
        if d.bus == "nvme-ns":  # a namespace device on a controller of its own
            return ["-device", f"nvme,id={d.id}-ctrl,serial={d.id[:20]}",
                    "-device", f"nvme-ns,drive={node},id={d.id},bus={d.id}-ctrl"]
        if d.bus == "usb":
            return ["-device", f"usb-storage,drive={node},id={d.id}"]
        return ["-device", f"virtio-blk-pci,drive={node},id={d.id}"]

    def _drive_args(self, d: Disk) -> list[str]:
        opts = f"file={d.image},format={d.fmt}" + (f",{self.node_opts[d.id]}" if d.id in self.node_opts else "")
        if d.bus == "drive-if-none":
            return ["-drive", f"{opts},if=none,id={d.id}", "-device", f"virtio-blk-pci,drive={d.id}"]
        return ["-drive", f"{opts},if={d.bus.removeprefix('drive-if-')}"]

    def _find_anonymous_devices(self) -> None:
        """Devices without an id have a QOM path only QEMU knows (``/machine/peripheral-anon/device[N]``)."""
        drives = [d for d in self.disks.values() if d.bus.startswith("drive-")]
        if not drives:
            return
        assert self.guest is not None
        qdev = {b["device"]: b["qdev"] for b in self.guest.cmd("query-block") if b.get("device")}
        for d in drives:
            if d.id not in qdev:
                raise RuntimeError(f"no drive {d.id} in this VM: QEMU named its drives {sorted(qdev)}; "
                                   f"a {d.bus} disk must carry QEMU's name")
            d.qom = qdev[d.id]

    def monitor(self) -> Monitor:
        """A connection on fleece's monitor (for inspecting QEMU state from a test)."""
        return Monitor(self.qmp_path)

    def quit(self, timeout: float = 30) -> None:
        """Clean shutdown: persistent bitmaps are written to the qcow2s."""
        if self.guest is not None:
            try:
                self.guest.cmd("quit")
            except Exception:  # noqa: BLE001 - QEMU may close the socket before answering
                pass
            self.guest.close()
            self.guest = None
        if self.proc is not None:
            self.proc.wait(timeout)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL QEMU: bitmaps created in this run are lost, stored ones become inconsistent."""
        if self.guest is not None:
            self.guest.close()
            self.guest = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def status(self) -> str:
        assert self.guest is not None
        return self.guest.cmd("query-status")["status"]

    # -- guest writes -----------------------------------------------------------------------------------

    def _qemu_io(self, disk: Disk, command: str) -> None:
        """Run qemu-io on the device; QEMU 7.2 prints I/O errors to its stdout (our log), so look there too."""
        assert self.guest is not None
        log = self.dir / "qemu.log"
        before = log.stat().st_size
        reply = self.guest.hmp(f'qemu-io -d {disk.qdev} "{command}"')
        if reply.strip():
            raise RuntimeError(f"qemu-io {command!r} on {disk.id}: {reply.strip()}")
        with open(log, "rb") as f:
            f.seek(before)
            printed = f.read().decode(errors="replace")
        if any(w in printed.lower() for w in ("failed", "error", "permission denied", "could not")):
            raise RuntimeError(f"guest I/O error: qemu-io {command!r} on {disk.id}: {printed.strip()}")

    def _mirror(self, disk: Disk, offset: int, data: bytes) -> None:
        if disk.reference is not None:
            with open(disk.reference, "r+b") as f:
                f.seek(offset)
                f.write(data)

    def write(self, disk_id: str, offset: int, data: bytes) -> None:
        """The guest writes *data* at *offset* (through the device, like a real guest)."""
        disk = self.disks[disk_id]
        assert 0 <= offset and offset + len(data) <= disk.size
        with self._lock:
            src = self._tmp / "chunk"
            src.write_bytes(data)
            self._qemu_io(disk, f"write -q -s {src} {offset} {len(data)}")
            self._mirror(disk, offset, data)

    def write_image(self, disk_id: str, offset: int, data: bytes) -> None:
        """Before :meth:`start`: write into the image file itself (a disk the guest cannot write, e.g. one
        attached read-only, gets its content this way)."""
        assert self.proc is None, "the VM is running: write through the guest"
        disk = self.disks[disk_id]
        assert 0 <= offset and offset + len(data) <= disk.size
        self.create_disks()
        with self._lock:
            src = self._tmp / "chunk"
            src.write_bytes(data)
            subprocess.run(["qemu-io", "-f", disk.fmt, "-c", f"write -q -s {src} {offset} {len(data)}",
                            str(disk.image)], check=True, capture_output=True)
            self._mirror(disk, offset, data)

    def flush(self, disk_id: str) -> None:
        with self._lock:
            self._qemu_io(self.disks[disk_id], "flush")

    def _zeroing(self, disk_id: str, command: str, offset: int, length: int) -> None:
        """A guest operation after which the range reads as zeros: *command* is qemu-io's, without the range."""
        disk = self.disks[disk_id]
        with self._lock:
            self._qemu_io(disk, f"{command} {offset} {length}")
            self._mirror(disk, offset, bytes(length))

    def zero(self, disk_id: str, offset: int, length: int) -> None:
        """The guest zeroes a range (``write -z``: a WRITE_ZEROES request, often unallocating)."""
        self._zeroing(disk_id, "write -q -z", offset, length)

    def zero_data(self, disk_id: str, offset: int, length: int) -> None:
        """An ordinary write of zero bytes (on a ``detect-zeroes`` disk QEMU turns it into WRITE_ZEROES)."""
        self._zeroing(disk_id, "write -q -P 0", offset, length)

    def discard(self, disk_id: str, offset: int, length: int) -> None:
        """The guest discards (TRIMs) a cluster-aligned range; on a qcow2 without backing file and with
        ``discard=unmap`` it reads back as zeros (test_integrity checks the model against the image)."""
        assert offset % self.disks[disk_id].cluster_size == 0 and length % self.disks[disk_id].cluster_size == 0
        self._zeroing(disk_id, "discard -q", offset, length)

    def resize(self, disk_id: str, size: int) -> None:
        disk = self.disks[disk_id]
        assert self.guest is not None
        where = {"device": disk_id} if disk.bus.startswith("drive-") else {"node-name": f"node-{disk_id}"}
        self.guest.cmd("block_resize", {**where, "size": size})
        disk.size = size
        if disk.reference is not None:
            with open(disk.reference, "r+b") as f:
                f.truncate(size)

    # -- ground truth -----------------------------------------------------------------------------------

    def snapshot_refs(self, tag: str) -> dict[str, Path]:
        """Copy every reference image (the truth at this instant) and return the copies."""
        out = {}
        with self._lock:
            for d in self.disks.values():
                assert d.reference is not None, "this VM keeps no ground truth (truth=False)"
                dst = self.dir / f"{d.id}.{tag}.raw"
                shutil.copyfile(d.reference, dst)
                out[d.id] = dst
        return out

    def read_disk_stopped(self, disk_id: str) -> bytes:
        """The disk's content as QEMU sees it (VM must be shut down): an independent check of the refs."""
        disk = self.disks[disk_id]
        out = self.dir / f"{disk_id}.readback.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", disk.fmt, "-O", "raw", str(disk.image), str(out)],
                       check=True)
        data = out.read_bytes()
        out.unlink()
        return data


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_bytes(n: int, seed: int) -> bytes:
    """Deterministic, incompressible test data (different per seed)."""
    return random.Random(seed).randbytes(n)


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible data, like files on a real disk."""
    line = f"seed {seed}: the quick brown fox jumps over the lazy dog 0123456789\n".encode()
    return (line * (n // len(line) + 1))[:n]


