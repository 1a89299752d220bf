"""A private libvirtd for tests (via tools/libvirtd), guest-less TCG domains, and simulated guest writes.

    d = start(tmp / "libvirtd")            # Libvirtd(uri, dir, pid, log, seconds); raises Unavailable
    conn = libvirt.open(d.uri)
    dom = define_domain(conn, "vm1", [("vda", img1, "virtio"), ("sda", img2, "scsi")])
    dom.create()
    guest_write(dom, "vda", "write -P 0x33 0 1M")
    ...
    stop(d.dir)                            # destroys the domains, stops the daemon

Stdlib + python3-libvirt only. Nothing here knows fleece: it is the ground the libvirt tests stand on.

Guest writes are HMP ``qemu-io`` commands on the disk's *device* (``qemu-io -d QOM-PATH``), so they take
the path a real guest write takes — through whatever filter the backup job put above the disk node.
A node name (``libvirt-1-format``) is accepted by qemu-io too, but writes there go straight into the
format node, *below* any copy-before-write filter, and silently change the frozen view (see
docs/libvirt-pull-mode.md). QEMU 7.2 prints qemu-io's results and errors on its stdout, not in
the HMP reply; libvirt sends that to DIR/log/qemu/NAME.log, which :func:`guest_write` reads back.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "libvirtd"
BUSES = {"virtio": "virtio", "scsi": "scsi", "sata": "sata"}


class Unavailable(RuntimeError):
    """The private libvirtd cannot start here (not root, packages missing, …): the message says why."""


@dataclass
class Libvirtd:
    uri: str
    dir: Path
    pid: int
    log: Path  # libvirtd's own log, with the QMP traffic (qemu_monitor at debug level)
    seconds: float | None  # how long start took (None: it was already running)

    def qemu_log(self, domain: str) -> Path:
        """QEMU's stdout/stderr of *domain*, where qemu-io prints its results."""
        return self.dir / "log" / "qemu" / f"{domain}.log"


def start(directory: Path, timeout: float = 60, qemu_user: bool = False) -> Libvirtd:
    """Start (or report) the private daemon in *directory*; raise :class:`Unavailable` with one line.
    *qemu_user*: QEMU runs as libvirt-qemu (uid 64055) with dynamic_ownership, as Debian's libvirtd does."""
    if not SCRIPT.exists():
        raise Unavailable(f"{SCRIPT} is missing")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run([str(SCRIPT), "start", "--dir", str(directory), "--timeout", str(timeout),
                            *(["--qemu-user"] if qemu_user else [])],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"tools/libvirtd start: {e}") from None
    if p.returncode != 0:
        raise Unavailable(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"exit {p.returncode}")
    j = json.loads(p.stdout)
    return Libvirtd(j["uri"], Path(j["dir"]), j["pid"], Path(j["log"]), j.get("seconds"))


def stop(directory: Path) -> None:
    """Destroy the daemon's domains and stop it (DIR stays, logs included)."""
    p = subprocess.run([str(SCRIPT), "stop", "--dir", str(directory)], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"tools/libvirtd stop failed: {p.stderr.strip()}")


def daemon_dir(conn: libvirt.virConnect) -> Path:
    """The DIR of the private daemon *conn* talks to (from the URI's ``socket=DIR/sock/libvirt-sock``)."""
    q = urllib.parse.parse_qs(urllib.parse.urlparse(conn.getURI()).query)
    return Path(q["socket"][0]).parent.parent


def qemu_image(path: Path, size: int, *writes: str) -> Path:
    """A fresh qcow2 of *size* bytes, with qemu-io *writes* (``"write -P 0x11 0 1M"``) applied offline."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True, capture_output=True)
    return path


def define_domain(conn: libvirt.virConnect, name: str, disks: list[tuple[str, Path, str]], uuid: str | None = None,
                  *, memory_mib: int = 64, detect_zeroes: str | None = None, discard: str = "unmap",
                  serial: Path | None = None, cdrom: bool = False, agent: bool = False,
                  boot: tuple[Path, Path, str] | None = None) -> libvirt.virDomain:
    """Define (not start) a persistent TCG domain with no guest OS: SeaBIOS finds nothing to boot and idles.

    *disks* are ``(target, image path, bus[, format])`` (format default qcow2) with bus ``virtio``, ``scsi`` (a virtio-scsi controller is
    added) or ``sata``. *detect_zeroes* (``on``/``unmap``) and *discard* go on every disk's ``<driver>``.
    No graphics, no video, no network, no balloon; the serial port goes to *serial* or nowhere.
    *cdrom* adds an empty SATA cdrom (sdc, no media); *agent* a qemu-guest-agent channel (nothing answers,
    unless a guest runs the agent). *boot* ``(kernel, initrd, cmdline)`` boots a real guest kernel instead
    (tests/guest.py's, q35).
    """
    drv = f" discard={quoteattr(discard)}" if discard else ""
    if detect_zeroes:
        drv += f" detect_zeroes={quoteattr(detect_zeroes)}"
    devs = []
    for target, path, bus, *fmt in disks:
        if bus not in BUSES:
            raise ValueError(f"bus {bus!r}: one of {sorted(BUSES)}")
        devs.append(f"""<disk type='file' device='disk'>
      <driver name='qemu' type={quoteattr(fmt[0] if fmt else 'qcow2')}{drv}/>
      <source file={quoteattr(str(path))}/>
      <target dev={quoteattr(target)} bus={quoteattr(BUSES[bus])}/>
    </disk>""")
    if any(d[2] == "scsi" for d in disks):
        devs.append("<controller type='scsi' index='0' model='virtio-scsi'/>")
    if cdrom:
        devs.append("<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
                    "<target dev='sdc' bus='sata'/><readonly/></disk>")
    if agent:
        devs.append("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
    devs.append(f"<serial type='file'><source path={quoteattr(str(serial))}/></serial>" if serial
                else "<serial type='null'/>")
    os_xml = "<os><type arch='x86_64'>hvm</type></os>"
    if boot:
        kernel, initrd, cmdline = boot
        os_xml = (f"<os><type arch='x86_64' machine='q35'>hvm</type><kernel>{escape(str(kernel))}</kernel>"
                  f"<initrd>{escape(str(initrd))}</initrd><cmdline>{escape(cmdline)}</cmdline></os>")
    xml = f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{uuid or uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  {os_xml}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {chr(10).join('    ' + d for d in devs).strip()}
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>"""
    return conn.defineXML(xml)


def device_qom(dom: libvirt.virDomain, target: str) -> str:
    """The QOM path of the device that owns *target*'s BlockBackend (query-block's ``qdev``): what
    ``qemu-io -d`` needs. virtio-blk's hangs off ``/machine/peripheral/virtio-disk0/virtio-backend``,
    scsi-hd's is the device itself (``scsi0-0-0-0``)."""
    root = ET.fromstring(dom.XMLDesc(0))
    alias = None
    for d in root.iterfind("./devices/disk"):
        t = d.find("target")
        if t is not None and t.get("dev") == target:
            a = d.find("alias")
            alias = a.get("name") if a is not None else None
    if alias is None:
        raise KeyError(f"{dom.name()}: no running disk {target}")
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    for b in reply["return"]:
        q = b.get("qdev", "")
        if q == alias or q == f"/machine/peripheral/{alias}" or q.startswith(f"/machine/peripheral/{alias}/"):
            return q
    raise KeyError(f"{dom.name()}: query-block has no device for {target} ({alias})")


def hmp(dom: libvirt.virDomain, command: str) -> str:
    return libvirt_qemu.qemuMonitorCommand(dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)


def guest_write(dom: libvirt.virDomain, target: str, command: str, *, node: str | None = None) -> str:
    """Run one qemu-io *command* (``write -P 0x33 0 1M``, ``write -z 1M 1M``, ``discard 0 64k``,
    ``read -P 0x33 0 1M``) on disk *target* through its device, as a guest would; return what qemu-io
    printed. *node* addresses a block node instead (bypasses any filter: only for experiments).

    Raises RuntimeError when qemu-io reports a failure (an I/O error, a pattern mismatch on read -P).
    """
    log = daemon_dir(dom.connect()) / "log" / "qemu" / f"{dom.name()}.log"
    before = log.stat().st_size if log.exists() else 0
    where = node if node else f"-d {device_qom(dom, target)}"
    reply = hmp(dom, f'qemu-io {where} "{command}"')
    if reply.strip():
        raise RuntimeError(f"qemu-io {command!r} on {target}: {reply.strip()}")
    printed = ""
    for _ in range(50):  # QEMU's stdout is a file: the text is there once the HMP command returned
        with open(log, "rb") as f:
            f.seek(before)
            printed = f.read().decode(errors="replace")
        if printed.strip():
            break
        time.sleep(0.01)
    low = printed.lower()
    if "failed" in low or "error" in low:
        raise RuntimeError(f"qemu-io {command!r} on {target}: {printed.strip()}")
    return printed


class Modelled:
    """A domain and what its guest sees — *model*, a bytearray per disk target — kept in step with every
    simulated guest write, so a test can take the truth at any instant (:meth:`snapshot`)."""

    dom: libvirt.virDomain
    model: dict[str, bytearray]

    def write(self, t: str, off: int, length: int, byte: int) -> None:
        guest_write(self.dom, t, f"write -P {byte:#x} {off} {length}")
        self.model[t][off:off + length] = bytes([byte]) * length

    def zero(self, t: str, off: int, length: int) -> None:
        guest_write(self.dom, t, f"write -z {off} {length}")
        self.model[t][off:off + length] = bytes(length)

    def snapshot(self) -> dict[str, bytes]:
        return {t: bytes(m) for t, m in self.model.items()}
