"""The main job, end to end, on the embedded default (a local repository):

start a throw-away, guest-less QEMU VM with one qcow2 disk → the "guest" writes real files → full backup →
more writes (new files, an overwrite, a zeroed range) → incremental backup → restore both points as a
qcow2 chain and as a flat image → ``qemu-img compare`` each with the ground truth → summary → clean up.

Everything goes through the real ``fleece`` command; guest writes are HMP ``qemu-io`` on the device,
mirrored into a reference raw image that is the ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fleece.exporter.qmp import Monitor  # noqa: E402

FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20
DISK = 256 * MiB


class DemoVM:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.image = work / "demo-disk.qcow2"
        self.reference = work / "demo-disk.truth.raw"
        self.qmp = str(work / "qmp.sock")
        self.guest_qmp = str(work / "guest.sock")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image), str(DISK)], check=True)
        with open(self.reference, "wb") as f:
            f.truncate(DISK)
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
             "-name", "demo-vm", "-qmp", f"unix:{self.qmp},server=on,wait=off",
             "-qmp", f"unix:{self.guest_qmp},server=on,wait=off",
             "-blockdev", f"driver=file,filename={self.image},node-name=file0",
             "-blockdev", "driver=qcow2,file=file0,node-name=disk0",
             "-device", "virtio-blk-pci,drive=disk0,id=vda"],
            stdin=subprocess.DEVNULL, stdout=open(work / "qemu.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.guest_qmp) or not os.path.exists(self.qmp):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"QEMU did not start: {(work / 'qemu.log').read_text()}")
            time.sleep(0.05)
        self.guest = Monitor(self.guest_qmp)

    def write(self, offset: int, data: bytes) -> None:
        src = self.work / "chunk.bin"
        src.write_bytes(data)
        self.guest.hmp(f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -q -s {src} {offset} {len(data)}"')
        with open(self.reference, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def zero(self, offset: int, length: int) -> None:
        self.guest.hmp(f'qemu-io -d /machine/peripheral/vda/virtio-backend "write -q -z {offset} {length}"')
        with open(self.reference, "r+b") as f:
            f.seek(offset)
            f.write(bytes(length))

    def truth(self, tag: str) -> Path:
        copy = self.work / f"truth-{tag}.raw"
        shutil.copyfile(self.reference, copy)
        return copy

    def stop(self) -> None:
        try:
            self.guest.cmd("quit")
        except Exception:  # noqa: BLE001
            pass
        self.guest.close()
        self.proc.wait(30)


def files_blob(limit: int, skip: int = 0) -> bytes:
    """Real file contents (what a guest's filesystem holds): /usr/share text and /usr/lib binaries."""
    out = bytearray()
    for root in ("/usr/share/doc", "/usr/lib/python3.11", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                p = os.path.join(dirpath, fn)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                if skip > 0:
                    skip -= 1
                    continue
                out += Path(p).read_bytes()[: limit - len(out)]
                if len(out) >= limit:
                    return bytes(out)
    return bytes(out)


def fleece(*args: str) -> dict:
    print("  $ fleece " + " ".join(args), flush=True)
    p = subprocess.run([FLEECE, *args, "--json"], capture_output=True, text=True)
    for line in p.stderr.splitlines():
        print(f"    {line}")
    if p.returncode != 0:
        raise SystemExit(f"fleece {args[0]} failed (exit {p.returncode})")
    return json.loads(p.stdout)


def compare(image: Path, truth: Path, fmt: str) -> bool:
    p = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw", str(image), str(truth)],
                       capture_output=True, text=True)
    verdict = "identical" if p.returncode == 0 else f"DIFFERENT: {p.stdout.strip()}"
    print(f"    qemu-img compare {image.relative_to(image.parent.parent)} vs truth: {verdict}")
    return p.returncode == 0


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description="fleece demo: back up a throw-away VM and restore it")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (VM disk, repository, restores)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleece-demo-", dir="/var/tmp"))
    repo = work / "repository"
    vm = None
    ok = True
    try:
        print(f"1. starting a throw-away VM 'demo-vm' with a {mib(DISK)} qcow2 disk (work dir {work})")
        vm = DemoVM(work)
        data = files_blob(48 * MiB)
        print(f"2. the guest writes {mib(len(data))} of real files (docs, Python sources, binaries)")
        for off in range(0, len(data), 8 * MiB):
            vm.write(16 * MiB + off, data[off:off + 8 * MiB])
        t1 = vm.truth("full")

        print("3. full backup into a local repository")
        t = time.monotonic()
        full = fleece("backup", "--qmp", vm.qmp, "--repo", str(repo), "--scratch", str(work))
        full_s = time.monotonic() - t

        more = files_blob(6 * MiB, skip=2000)
        print(f"4. the guest writes {mib(len(more))} of new files, overwrites 1 MiB, zeroes 8 MiB (a trim)")
        vm.write(120 * MiB, more)
        vm.write(20 * MiB, os.urandom(MiB))
        vm.zero(40 * MiB, 8 * MiB)
        t2 = vm.truth("inc")

        print("5. incremental backup")
        t = time.monotonic()
        inc = fleece("backup", "--qmp", vm.qmp, "--repo", str(repo), "--scratch", str(work))
        inc_s = time.monotonic() - t
        fleece("list", "--repo", str(repo))

        print("6. restore both points from the repository alone, as qcow2 chains and as flat images")
        restores = work / "restored"
        for point, truth, tag in ((full, t1, "full"), (inc, t2, "incremental")):
            for mode in ("chain", "flat"):
                out = restores / f"{tag}-{mode}"
                extra = ["--flat"] if mode == "flat" else []
                t = time.monotonic()
                fleece("restore", "--repo", str(repo), "--vm", "demo-vm", "--point", point["id"], "--out", str(out),
                       *extra)
                print(f"    restored in {time.monotonic() - t:.2f} s")
                ok &= compare(out / "vda.qcow2", truth, "qcow2")
        verify = fleece("verify", "--repo", str(repo), "--read-data")
        ok &= verify["ok"]

        stored = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
        print("\nsummary")
        print(f"  full:        {full_s:5.2f} s, changed {mib(full['disks']['vda']['dirty_bytes'])}, "
              f"stored {mib(full['disks']['vda']['stored_bytes'])}, guest paused {full['pause_ms']:.1f} ms")
        print(f"  incremental: {inc_s:5.2f} s, changed {mib(inc['disks']['vda']['dirty_bytes'])} "
              f"({mib(inc['disks']['vda']['zero_bytes'])} of it zeroed: sent as nothing), "
              f"stored {mib(inc['disks']['vda']['stored_bytes'])}")
        print(f"  repository:  {mib(stored)} on disk for 2 points of a {mib(DISK)} disk; verify --read-data: "
              f"{'ok' if verify['ok'] else 'DAMAGED'}")
        print(f"  restores:    {'all 4 identical to the ground truth' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        if vm is not None:
            vm.stop()
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
