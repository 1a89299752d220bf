"""Assertions shared by the end-to-end tests: bit-exact points, and QEMU left as it was found."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

from fleece.exporter.qmp import Monitor
from fleece.repository import Manifest, Repository

FLEECE = str(Path(__file__).resolve().parent.parent / ".venv" / "bin" / "fleece")


def fleece(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the installed ``fleece`` command as a user would (output captured, never raising)."""
    return subprocess.run([FLEECE, *args], capture_output=True, text=True, env=env, timeout=timeout)


#: every variable that gives fleece a secret (tests that choose the secret remove them all first)
PASSWORD_VARS = ("FLEECE_PASSWORD", "FLEECE_PASSWORD_FILE", "FLEECE_PASSWORD_COMMAND", "FLEECE_KEY_FILE",
                 "FLEECE_NEW_PASSWORD", "FLEECE_NEW_PASSWORD_FILE", "FLEECE_NEW_PASSWORD_COMMAND")


SUITE_PASSWORD = object()  # env_with's default: the password tests/conftest.py gives the whole suite


def env_with(password: str | bytes | None | object = SUITE_PASSWORD, **extra: str | bytes) -> dict[str, str | bytes]:
    """The test environment without any FLEECE credential variable, then *password* (as FLEECE_PASSWORD;
    default: the suite's; ``None``: none) and *extra* set: each call says exactly which secret it gives."""
    if password is SUITE_PASSWORD:
        from conftest import TEST_PASSWORD

        password = TEST_PASSWORD
    env: dict[str, str | bytes] = {k: v for k, v in os.environ.items() if k not in PASSWORD_VARS}
    if password is not None:
        env["FLEECE_PASSWORD"] = password  # type: ignore[assignment]
    env.update(extra)
    return env


def ok(p: subprocess.CompletedProcess[str]) -> dict:
    """The JSON document of a run that must have succeeded."""
    assert p.returncode == 0, f"exit {p.returncode}: {p.stdout[-800:]} {p.stderr[-1500:]}"
    return json.loads(p.stdout)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def identical(image: Path, ref: Path, fmt: str | None = None) -> None:
    """``qemu-img compare`` of a restored image (format probed unless given) with a raw reference."""
    p = qemu_img("compare", *(["-f", fmt] if fmt else []), "-F", "raw", str(image), str(ref))
    assert p.returncode == 0, f"{image} != {ref}: {p.stdout} {p.stderr}"


def materialize(repo: Repository, manifest: Manifest, disk: str) -> bytes:
    """The whole virtual disk at *manifest*, read back through the repository API alone."""
    size = manifest.disks[disk].virtual_size
    out = bytearray(size)
    pieces = repo.resolve(manifest, disk)
    blobs = dict(repo.iter_blobs(p.blob for p in pieces if p.blob is not None))
    for p in pieces:
        if p.blob is not None:
            out[p.offset:p.offset + p.length] = blobs[p.blob][p.skip:p.skip + p.length]
        # ZERO pieces and unlisted ranges stay zero
    return bytes(out)


def assert_point_matches(repo: Repository, manifest: Manifest, refs: dict[str, Path]) -> None:
    """Byte-for-byte over every disk: the point equals the ground truth taken at its freeze."""
    assert set(manifest.disks) == set(refs), (set(manifest.disks), set(refs))
    for disk, ref in refs.items():
        got = materialize(Repository.open(repo.url), Repository.open(repo.url).manifest(manifest.vm, manifest.id),
                          disk)
        want = ref.read_bytes()
        assert len(got) == len(want), f"{disk}: size {len(got)} != {len(want)}"
        if got != want:
            diff = next(i for i in range(len(got)) if got[i] != want[i])
            raise AssertionError(f"{disk} of point {manifest.id} differs from the truth first at byte {diff} "
                                 f"(sha {hashlib.sha256(got).hexdigest()[:12]} != {hashlib.sha256(want).hexdigest()[:12]})")


def fleece_bitmaps(mon: Monitor) -> dict[str, list[tuple[str, bool]]]:
    """Named bitmaps per disk of a test VM (node ``node-<id>``): [(name, recording)], even under a filter."""
    out = {}
    for node in mon.cmd("query-named-block-nodes", {"flat": True}):
        if node["node-name"].startswith("node-"):
            out[node["node-name"][5:]] = sorted((b["name"], b["recording"])
                                                for b in node.get("dirty-bitmaps", []) if "name" in b)
    return out


def assert_clean(mon: Monitor) -> None:
    """No fleece exports, nodes, filters or objects left; every device on its own node; the VM running."""
    assert mon.cmd("query-block-exports") == []
    nodes = [n["node-name"] for n in mon.cmd("query-named-block-nodes", {"flat": True})]
    assert not [n for n in nodes if n.startswith("fleece-")], nodes
    for dev in mon.cmd("query-block"):
        if dev.get("inserted"):
            assert not dev["inserted"]["node-name"].startswith("fleece-")
    assert mon.cmd("query-status")["status"] == "running"
    objects = [o["name"] for o in mon.cmd("qom-list", {"path": "/objects"})]
    assert not [o for o in objects if o.startswith("fleece-")], objects
    jobs = mon.cmd("query-block-jobs")
    assert jobs == []


def children(pid: int) -> list[int]:
    """Child pids of every thread of *pid* (/proc), e.g. the qemu-nbd a restore started."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def comm(pid: int) -> str:
    """A process's command name, or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def interrupted_while_starting(tmp_path: Path, monkeypatch: Any, binary: str, start: Callable[[], object]) -> None:
    """Interrupt *start* (which launches *binary*) as fleece's SIGTERM handler does (a KeyboardInterrupt in
    the main thread) while *binary* is still starting, and assert no such process is left: nothing owns a
    half-started helper to stop it later. *binary* is replaced on PATH by one that never becomes ready."""
    bin_dir = tmp_path / "slow-bin"
    bin_dir.mkdir()
    pid_file = tmp_path / f"{binary}.pid"
    fake = bin_dir / binary
    fake.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    fake.chmod(0o700)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            start()
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError(f"{binary} never became ready, yet the start returned")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return  # stopped and reaped before the interruption left the start
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"the interrupted start left its {binary} (pid {pid}) running")
