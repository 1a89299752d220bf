"""A real Linux guest for the tests, whose root filesystem is the disk under test.

``tests/vm.py``'s TestVM has no guest OS: its "guest writes" are qemu-io commands. Some tests need the real
thing — a kernel that boots from the disk (over NBD, from a restored image, through fleece's filters) and
reads and writes it through virtio-blk. This module provides it:

* :func:`build` makes (once, cached in ``.cache/guest``) Debian's cloud kernel and a busybox initramfs
  with the virtio modules (``tools/guest build``); the initramfs mounts ``/dev/vda`` as ext4 and
  switch_roots to its ``/sbin/init``. Kernel command-line flag ``fleece.ro=1`` mounts it read-only.
* :func:`make_rootfs` makes a small ext4 disk (busybox + an init script + files) for it to boot.
* :class:`Guest` runs QEMU (TCG) on that kernel with the disk arguments a test gives, a serial console
  in a file and a QMP socket; :meth:`Guest.wait_for` waits for console lines.
* ``make_rootfs(..., agent=True)`` adds Debian's qemu-guest-agent; an init that runs :data:`AGENT_START`
  starts it on the ``org.qemu.guest_agent.0`` port a ``Guest(..., agent=True)`` provides (host end:
  :attr:`Guest.qga_path`), with the fsfreeze hook ``/etc/fleece-hook`` if the rootfs has one.

Console lines starting with ``FLEECE-`` are the protocol: ``FLEECE-GUEST-FAIL <reason>`` comes from the
initramfs (it then powers off, so nothing hangs), the others from :data:`MARKER_INIT`.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from pathlib import Path

from fleece.exporter.qmp import Monitor

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "guest"
GUEST_DIR = Path(os.environ.get("FLEECE_GUEST_DIR") or ROOT / ".cache" / "guest")
QEMU = "qemu-system-x86_64"
FAIL = "FLEECE-GUEST-FAIL"

# The default /sbin/init. Kernel command-line flag fleece.churn=1 makes it a guest that keeps writing.
MARKER_INIT = r"""#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo FLEECE-GUEST-UP
[ -f /data/seed ] && echo "FLEECE-SEED $(sha256sum /data/seed | cut -d' ' -f1)"
if echo "boot $(cat /proc/sys/kernel/random/boot_id)" >>/data/boots && sync; then
  echo "FLEECE-BOOTS $(wc -l </data/boots)"
  echo FLEECE-GUEST-WROTE
else
  echo FLEECE-GUEST-READONLY
fi
if grep -qw 'fleece.churn=1' /proc/cmdline; then
  n=0
  while :; do  # 64 KiB of random data every ~0.2 s, cycling over the first 4 MiB of /data/churn
    dd if=/dev/urandom of=/data/churn bs=65536 count=1 seek=$((n % 64)) conv=notrunc 2>/dev/null && sync
    n=$((n + 1))
    [ $((n % 5)) -eq 0 ] && echo "FLEECE-CHURN $n"
    sleep 0.2
  done
fi
while :; do sleep 3600; done
"""


# Shell lines that start qemu-guest-agent on its virtio-serial port (no udev in the guest: the port is found
# by name in sysfs; devtmpfs made its /dev node). FLEECE-AGENT-UP once it runs, FLEECE-GUEST-FAIL if not.
AGENT_START = r"""
port=""
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename "$p")
done
[ -n "$port" ] || { echo "FLEECE-GUEST-FAIL no org.qemu.guest_agent.0 port"; poweroff -f; }
hook=""
[ -x /etc/fleece-hook ] && hook="-F/etc/fleece-hook"
mkdir -p /var/run /tmp/qga
/usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /tmp/qga $hook >/dev/console 2>&1 &
echo FLEECE-AGENT-UP
"""


class GuestError(RuntimeError):
    """The guest failed: QEMU exited, the initramfs reported FLEECE-GUEST-FAIL, or a wait timed out."""


@functools.cache
def build(directory: Path = GUEST_DIR) -> Path:
    """Build the kernel + initramfs (idempotent: a warm call takes ~0.5 s, a cold one a few seconds plus a
    ~28 MB download from the Debian mirror) and return the directory holding them."""
    r = subprocess.run([str(TOOL), "build", str(directory)], capture_output=True, text=True)
    if r.returncode != 0:
        raise GuestError(f"tools/guest build failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


def make_rootfs(path: Path, init: str, size_mib: int = 32, fmt: str = "qcow2",
                files: dict[str, bytes | str] | None = None, agent: bool = False,
                modes: dict[str, int] | None = None) -> Path:
    """An ext4 root filesystem image at *path* (qcow2 or raw) with busybox, ``/sbin/init`` = *init* and
    *files* (guest path → content, e.g. ``{"/data/seed": b"..."}``; *modes* their permissions, e.g. an
    executable hook); *agent* adds qemu-guest-agent."""
    assert fmt in ("qcow2", "raw"), fmt
    path = Path(path)
    build()
    with tempfile.TemporaryDirectory(prefix="fleece-rootfs-") as t:
        tmp = Path(t)
        (tmp / "init").write_text(init)
        tree = tmp / "tree"
        tree.mkdir()
        for name, content in (files or {}).items():
            f = tree / name.lstrip("/")
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(content.encode() if isinstance(content, str) else content)
            f.chmod((modes or {}).get(name, 0o644))
        raw = path if fmt == "raw" else tmp / "root.raw"
        r = subprocess.run([str(TOOL), "rootfs", *(["--agent"] if agent else []), str(raw), str(size_mib),
                            str(tmp / "init"), str(tree)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise GuestError(f"tools/guest rootfs failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        if fmt == "qcow2":
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                           check=True)
    return path


def read_file(image: Path, guest_path: str, fmt: str | None = None) -> bytes:
    """A file from an ext4 image (qcow2 is converted to raw first), read with debugfs — no mount needed.
    *fmt* defaults to the image's suffix (``.qcow2`` or else raw)."""
    image = Path(image)
    fmt = fmt or ("qcow2" if image.suffix == ".qcow2" else "raw")
    with tempfile.TemporaryDirectory(prefix="fleece-debugfs-") as t:
        raw = image
        if fmt != "raw":
            raw = Path(t) / "disk.raw"
            subprocess.run(["qemu-img", "convert", "-q", "-U", "-f", fmt, "-O", "raw", str(image), str(raw)],
                           check=True)
        r = subprocess.run(["debugfs", "-R", f"cat {guest_path}", str(raw)], capture_output=True)
    # debugfs exits 0 even when the file is missing; anything on stderr beyond its banner is an error
    errors = [ln for ln in r.stderr.decode(errors="replace").splitlines() if not ln.startswith("debugfs ")]
    if r.returncode != 0 or errors:
        raise GuestError(f"debugfs cat {guest_path} on {image}: {' '.join(errors) or r.returncode}")
    return r.stdout


class Guest:
    """QEMU (q35, TCG, 256 MiB) booting the guest kernel; the disk comes from *drive_args*, e.g.
    ``["-drive", "file=nbd+unix:///vda?socket=S,format=raw,if=none,id=d0",
    "-device", "virtio-blk-pci,drive=d0,id=vda"]`` — the first virtio-blk disk is the guest's /dev/vda.

    The serial console goes to ``workdir/console.log``, QEMU's own output to ``workdir/qemu.log``, and with
    *qmp* a QMP server listens on :attr:`qmp_path` (``workdir/qmp.sock``; mind the 107-byte limit of a
    unix socket path). ``-no-reboot`` plus ``panic=-1``: a panicking or powered-off guest ends QEMU, so
    :meth:`wait_for` fails at once instead of at its timeout. *agent* adds a virtio-serial port named
    ``org.qemu.guest_agent.0`` whose host end is the socket :attr:`qga_path` (``workdir/qga.sock``).
    """

    def __init__(self, workdir: Path, drive_args: list[str], extra_append: str = "", qmp: bool = True,
                 agent: bool = False) -> None:
        d = build()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_path = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.qmp_path: str | None = str(self.workdir / "qmp.sock") if qmp else None
        self.console_path.unlink(missing_ok=True)
        args = [QEMU, "-machine", "q35", "-accel", "tcg", "-m", "256", "-nodefaults", "-display", "none",
                "-no-reboot", "-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initrd.gz"),
                "-append", f"console=ttyS0 quiet panic=-1 {extra_append}".strip(),
                "-serial", f"file:{self.console_path}"]
        if self.qmp_path:
            Path(self.qmp_path).unlink(missing_ok=True)
            args += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.qga_path: str | None = str(self.workdir / "qga.sock") if agent else None
        if self.qga_path:
            Path(self.qga_path).unlink(missing_ok=True)
            args += ["-device", "virtio-serial-pci,id=vser0",
                     "-chardev", f"socket,path={self.qga_path},server=on,wait=off,id=qga0",
                     "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
        args += drive_args
        with open(self.qemu_log, "ab") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self.started = time.monotonic()

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.console_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _failure(self, why: str) -> GuestError:
        qemu = self.qemu_log.read_text(errors="replace")[-1500:] if self.qemu_log.exists() else ""
        return GuestError(f"{why}\n--- console (tail) ---\n{self.console()[-3000:]}"
                          + (f"\n--- qemu ---\n{qemu}" if qemu.strip() else ""))

    def wait_for(self, text: str, timeout: float = 60) -> str:
        """Poll the console until *text* appears in it; return the whole console. Raise GuestError (with the
        console's tail) if the initramfs reports FLEECE-GUEST-FAIL, QEMU exits, or *timeout* passes."""
        deadline = time.monotonic() + timeout
        while True:
            exited = self.proc.poll() is not None  # read the console after this, so its last words count
            out = self.console()
            if FAIL in out:
                raise self._failure(f"the guest failed while waiting for {text!r}")
            if text in out:
                return out
            if exited:
                raise self._failure(f"QEMU exited (status {self.proc.returncode}) before {text!r}")
            if time.monotonic() > deadline:
                raise self._failure(f"no {text!r} on the console within {timeout} s")
            time.sleep(0.05)

    def stop(self, timeout: float = 15) -> None:
        """Quit QEMU (QMP ``quit`` flushes and closes the disks cleanly; SIGTERM does too, and is the
        fallback; SIGKILL the last resort) and wait for it."""
        if self.proc.poll() is None and not self._quit():
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _quit(self) -> bool:
        """Send QMP ``quit``; False if there is no QMP to send it on."""
        if not self.qmp_path or not Path(self.qmp_path).exists():
            return False
        try:
            m = Monitor(self.qmp_path, timeout=5, connect_timeout=5)
        except Exception:  # noqa: BLE001 - not listening (yet): SIGTERM instead
            return False
        try:
            m.cmd("quit")
        except Exception:  # noqa: BLE001 - QEMU may close the socket before answering
            pass
        finally:
            m.close()
        return True

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
