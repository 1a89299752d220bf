"""The qemu-nbd restore target: what happens when qemu-nbd does not exit when asked."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest

from checks import interrupted_while_starting
from fleece.restore import targets
from fleece.restore.targets import QemuNbdTarget, create_qcow2


def test_qemu_nbd_that_ignores_sigterm_is_killed_and_image_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    image = tmp_path / "x.qcow2"
    create_qcow2(image, 8 << 20, {})
    target = QemuNbdTarget(image, tmp_path, 2)
    data = os.urandom(1 << 20)
    w = target.writer()
    w.pwrite(data, 3 << 20)
    monkeypatch.setattr(targets, "TERM_WAIT", 0.5)
    monkeypatch.setattr(target.proc, "terminate", lambda: None)  # as if SIGTERM were ignored
    with caplog.at_level(logging.WARNING):
        target.close()
    assert target.proc.returncode == -9
    assert "killed it" in caplog.text
    raw = tmp_path / "x.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    got = raw.read_bytes()
    assert got[3 << 20:4 << 20] == data
    assert got.count(0) == len(got) - (1 << 20) + data.count(0)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_qemu_nbd_target_with_and_without_direct_io(tmp_path: Path, tmpfs, where: str) -> None:
    """O_DIRECT where the filesystem takes it, the page cache where it does not; the bytes are the same."""
    d = tmp_path if where == "disk" else tmpfs("64M")
    image = d / "x.qcow2"
    create_qcow2(image, 8 << 20, {})
    try:  # the test's own probe, independent of the code under test
        os.close(os.open(image, os.O_RDWR | os.O_DIRECT))
        direct = True
    except OSError:
        direct = False
    target = QemuNbdTarget(image, tmp_path, 2)
    assert target.direct == direct
    assert ("--cache=none" in target.proc.args) == direct
    data = os.urandom(1 << 20)
    w = target.writer()
    w.pwrite(data[:4096 + 17], 5)  # unaligned for O_DIRECT: qemu must bounce it
    w.pwrite(data, 2 << 20)
    target.close()
    raw = tmp_path / "x.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    got = raw.read_bytes()
    assert got[5:5 + 4096 + 17] == data[:4096 + 17] and got[2 << 20:3 << 20] == data


def test_writer_retries_a_socket_that_is_bound_but_not_yet_listening(tmp_path: Path) -> None:
    """qemu-nbd binds its socket a moment before it listens: a connect in between is refused and must be
    retried (libnbd's Error.errno is the errno's *name*; comparing it with the number never matched, and a
    restore died with "internal error: ... Connection refused"). A real nbdkit serves behind the socket
    once it starts listening."""
    import socket
    import threading
    import time

    real = tmp_path / "nbdkit.sock"
    server = subprocess.Popen(["nbdkit", "-f", "-U", str(real), "memory", "1M"])
    try:
        deadline = time.monotonic() + 10
        while not real.exists():
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)
        late = tmp_path / "late.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(late))  # bound, not listening: connects are refused

        def listen_later() -> None:
            time.sleep(0.3)
            listener.listen(1)
            conn, _ = listener.accept()
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(real))

            def pump(a: socket.socket, b: socket.socket) -> None:
                while data := a.recv(65536):
                    b.sendall(data)
                b.shutdown(socket.SHUT_WR)

            threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
            pump(conn, upstream)

        threading.Thread(target=listen_later, daemon=True).start()
        started = time.monotonic()
        w = targets.NbdWriter(str(late))
        assert time.monotonic() - started >= 0.25  # it really was refused first, and retried
        w.pwrite(b"x" * 4096, 8192)
        assert w.h.pread(4096, 8192) == b"x" * 4096
        w.h.shutdown()
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_an_interruption_while_qemu_nbd_starts_stops_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM before qemu-nbd's socket appears: the half-made target has no owner to close it, so it must
    stop its qemu-nbd itself — the parent-death signal fires only after fleece has exited (CI caught a
    qemu-nbd alive after an interrupted restore's exit)."""
    image = tmp_path / "x.qcow2"
    create_qcow2(image, 8 << 20, {})
    interrupted_while_starting(tmp_path, monkeypatch, "qemu-nbd", lambda: QemuNbdTarget(image, tmp_path, 2))
