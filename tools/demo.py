"""The main job, end to end, on the embedded default (a local repository):

start a throw-away, guest-less QEMU VM with one qcow2 disk → the "guest" writes real files → full backup →
more writes (new files, an overwrite, a zeroed range) → incremental backup → restore both points as a
qcow2 chain and as a flat image → ``qemu-img compare`` each with the ground truth → summary → clean up.

Everything goes through the real ``fleece`` command; guest writes are HMP ``qemu-io`` on the device,
mirrored into a reference raw image that is the ground truth. The VM is the tests' own (``tests/vm.py``):
the demo runs exactly what the end-to-end tests verify.
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
sys.path.insert(0, str(ROOT / "tests"))

from vm import TestVM  # noqa: E402 - the one guest-less VM launcher (tests/vm.py)

FLEECE = str(ROOT / ".venv" / "bin" / "fleece")
MiB = 1 << 20
DISK = 256 * MiB


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
    if not any(os.environ.get(v) for v in ("FLEECE_PASSWORD", "FLEECE_PASSWORD_FILE", "FLEECE_PASSWORD_COMMAND",
                                           "FLEECE_KEY_FILE")):
        # New repositories are encrypted: the demo's gets a random password, in a file only we can read.
        password = work / "password"
        fd = os.open(password, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(18).hex().encode() + b"\n")
        os.close(fd)
        os.environ["FLEECE_PASSWORD_FILE"] = str(password)
    try:
        print(f"1. starting a throw-away VM 'demo-vm' with a {mib(DISK)} qcow2 disk (work dir {work})")
        vm = TestVM(work / "vm", {"vda": DISK}, name="demo-vm")
        vm.start()
        data = files_blob(48 * MiB)
        print(f"2. the guest writes {mib(len(data))} of real files (docs, Python sources, binaries)")
        for off in range(0, len(data), 8 * MiB):
            vm.write("vda", 16 * MiB + off, data[off:off + 8 * MiB])
        t1 = vm.snapshot_refs("full")["vda"]

        print("3. full backup into a local repository")
        t = time.monotonic()
        full = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(work))
        full_s = time.monotonic() - t

        more = files_blob(6 * MiB, skip=2000)
        print(f"4. the guest writes {mib(len(more))} of new files, overwrites 1 MiB, zeroes 8 MiB (a trim)")
        vm.write("vda", 120 * MiB, more)
        vm.write("vda", 20 * MiB, os.urandom(MiB))
        vm.zero("vda", 40 * MiB, 8 * MiB)
        t2 = vm.snapshot_refs("inc")["vda"]

        print("5. incremental backup")
        t = time.monotonic()
        inc = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(work))
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
        # Encrypted at rest: no object holds a line of the guest's files, nor the VM's name.
        needles = [data[i:i + 48] for i in range(0, len(data), MiB) if len(set(data[i:i + 48])) > 8] + [b"demo-vm"]
        leaks = [f for f in repo.rglob("*") if f.is_file() and any(n in f.read_bytes() for n in needles)]
        ok &= not leaks
        print("\nsummary")
        print(f"  full:        {full_s:5.2f} s, changed {mib(full['disks']['vda']['dirty_bytes'])}, "
              f"stored {mib(full['disks']['vda']['stored_bytes'])}, guest paused {full['pause_ms']:.1f} ms")
        print(f"  incremental: {inc_s:5.2f} s, changed {mib(inc['disks']['vda']['dirty_bytes'])} "
              f"({mib(inc['disks']['vda']['zero_bytes'])} of it zeroed: sent as nothing), "
              f"stored {mib(inc['disks']['vda']['stored_bytes'])}")
        print(f"  repository:  {mib(stored)} on disk for 2 points of a {mib(DISK)} disk; verify --read-data: "
              f"{'ok' if verify['ok'] else 'DAMAGED'}")
        print(f"  encryption:  {'no object holds guest data or the VM name' if not leaks else f'LEAK in {leaks[0]}'}"
              f" (password from {os.environ.get('FLEECE_PASSWORD_FILE', 'your FLEECE_* variables')})")
        print(f"  restores:    {'all 4 identical to the ground truth' if ok else 'MISMATCH'}")
        return 0 if ok else 1
    finally:
        if vm is not None:
            if vm.guest is not None:
                vm.quit()  # a clean shutdown (with --keep, the disk keeps its bitmaps)
            vm.cleanup()
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
