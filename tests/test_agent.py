"""exporter/agent.py against a misbehaving fake agent (tests/fake_agent.py): every path of the freeze.

The rules under test: always thaw what may be frozen (errors in the body, Ctrl-C, a freeze that timed
out), never thaw a freeze that is not ours, never fail for the agent (the point falls back to crash with a
reason), and the wire protocol survives stale answers. The real agent in a real guest: test_quiesce.py.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

from fake_agent import FakeAgent
from fleece.exporter import agent as agent_mod
from fleece.exporter.agent import GuestAgent, QgaFreezer, quiesced
from fleece.repository.errors import AgentError


@pytest.fixture
def fake(tmp_path):
    a = FakeAgent(tmp_path / "qga.sock")
    yield a
    a.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(agent_mod, "THAW_RETRY_PAUSE", 0.05)


def no_guard(monkeypatch):
    """Unit tests check the in-process thaw; the guard (a child that thaws after a SIGKILL) has its own."""
    monkeypatch.setattr(agent_mod.ThawGuard, "start", classmethod(lambda cls, f: None))


def test_freeze_and_thaw_around_the_body(fake, monkeypatch) -> None:
    no_guard(monkeypatch)
    with quiesced(QgaFreezer(fake.path, 2)) as q:
        assert fake.frozen
        assert q.consistency == "quiesced" and q.filesystems == 2
    assert not fake.frozen
    assert q.thawed is True and q.frozen_ms is not None and q.freeze_ms is not None
    assert [c for c in fake.log if c != "guest-sync-delimited"] == [
        "guest-fsfreeze-status", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert q.to_json()["consistency"] == "quiesced" and "reason" not in q.to_json()


@pytest.mark.parametrize("exc", [RuntimeError("backup failed"), KeyboardInterrupt("signal 15")])
def test_the_body_failing_still_thaws(fake, monkeypatch, exc) -> None:
    no_guard(monkeypatch)
    with pytest.raises(type(exc)):
        with quiesced(QgaFreezer(fake.path, 2)):
            assert fake.frozen
            raise exc
    assert not fake.frozen and fake.log[-1] == "guest-fsfreeze-thaw"


def test_no_socket_is_a_crash_point_with_the_reason(tmp_path, monkeypatch) -> None:
    no_guard(monkeypatch)
    with quiesced(QgaFreezer(str(tmp_path / "nothing.sock"), 2)) as q:
        pass
    assert q.consistency == "crash" and "cannot reach the guest agent" in q.reason and "--qga" in q.reason
    assert q.thawed is None  # nothing was sent that could freeze: nothing to thaw


def test_silent_agent_times_out_into_a_crash_point(fake, monkeypatch) -> None:
    """A chardev with no agent behind it accepts and never answers: the sync times out, the point is
    crash-consistent, and no thaw is needed (no freeze was ever sent)."""
    no_guard(monkeypatch)
    fake.silent = True
    t0 = time.monotonic()
    with quiesced(QgaFreezer(fake.path, 0.5)) as q:
        pass
    assert 0.4 < time.monotonic() - t0 < 3
    assert q.consistency == "crash" and "did not answer" in q.reason and q.thawed is None


def test_refused_freeze_is_not_thawed(fake, monkeypatch) -> None:
    """The agent rolls back a freeze it refuses: thawing after it could thaw someone else's freeze."""
    no_guard(monkeypatch)
    fake.refuse.add("guest-fsfreeze-freeze")
    with quiesced(QgaFreezer(fake.path, 2)) as q:
        pass
    assert q.consistency == "crash" and "refused guest-fsfreeze-freeze" in q.reason
    assert "guest-fsfreeze-thaw" not in fake.log


def test_someone_elses_freeze_is_left_alone(fake, monkeypatch) -> None:
    no_guard(monkeypatch)
    fake.frozen = True  # another tool froze the guest
    with quiesced(QgaFreezer(fake.path, 2)) as q:
        pass
    assert q.consistency == "crash" and "already frozen" in q.reason
    assert fake.frozen and "guest-fsfreeze-freeze" not in fake.log and "guest-fsfreeze-thaw" not in fake.log


def test_freeze_that_times_out_is_thawed_once_it_completes(fake, monkeypatch) -> None:
    """The agent answers the freeze late (a slow fsfreeze hook): the point is crash-consistent, and the
    thaw — queued behind the freeze in the agent — still runs, its late freeze answer dropped by the sync."""
    no_guard(monkeypatch)
    fake.hang.add("guest-fsfreeze-freeze")
    threading.Timer(0.8, fake.release).start()  # the freeze completes while the thaw is being attempted
    with quiesced(QgaFreezer(fake.path, 0.5)) as q:
        assert q.consistency == "crash" and "did not answer freeze" in q.reason
    assert q.thawed is True
    assert not fake.frozen, "a late freeze was left frozen"
    assert fake.log.index("guest-fsfreeze-freeze") < len(fake.log) - 1 - fake.log[::-1].index("guest-fsfreeze-thaw")


def test_thaw_retries_on_a_fresh_connection(fake, monkeypatch) -> None:
    no_guard(monkeypatch)
    fake.drop.add("guest-fsfreeze-thaw")  # the first thaw loses its connection
    with quiesced(QgaFreezer(fake.path, 2)) as q:
        pass
    assert q.thawed is True and not fake.frozen
    assert fake.log.count("guest-fsfreeze-thaw") == 2


def test_thaw_that_keeps_failing_is_an_error(fake, monkeypatch, caplog) -> None:
    no_guard(monkeypatch)
    fake.refuse.add("guest-fsfreeze-thaw")
    with quiesced(QgaFreezer(fake.path, 2)) as q:
        pass
    assert q.consistency == "quiesced" and q.thawed is False  # the point itself is good
    assert fake.log.count("guest-fsfreeze-thaw") == agent_mod.THAW_ATTEMPTS
    assert any(r.levelname == "ERROR" and "may be frozen" in r.getMessage() for r in caplog.records)


def test_zero_filesystems_is_not_quiesced(tmp_path, monkeypatch) -> None:
    no_guard(monkeypatch)
    a = FakeAgent(tmp_path / "q0.sock", filesystems=0)
    try:
        with quiesced(QgaFreezer(a.path, 2)) as q:
            pass
    finally:
        a.close()
    assert q.consistency == "crash" and "no filesystem" in q.reason


def test_sync_drops_stale_answers(fake) -> None:
    """A late answer to an abandoned command must not be taken for the next command's."""
    fake.hang.add("guest-fsfreeze-status")
    ga = GuestAgent(fake.path, 0.3)
    try:
        ga.sync()
        with pytest.raises(AgentError) as e:
            ga.call("guest-fsfreeze-status", "status")  # abandoned; its "thawed" arrives later
        assert e.value.maybe_frozen and e.value.stage == "status"
        fake.release()
        ga.timeout = 2
        ga.sync()
        fake.frozen = True
        assert ga.call("guest-fsfreeze-status", "status") == "frozen"
    finally:
        ga.close()


def test_the_guard_thaws_after_its_parent_dies(fake) -> None:
    """What a SIGKILLed run leaves: the guard's pipe closes after "arm" without "done", and it thaws."""
    freezer = QgaFreezer(fake.path, 2)
    guard = agent_mod.ThawGuard.start(freezer)
    assert guard is not None
    freezer.freeze(guard.arm)
    freezer.reset()
    assert fake.frozen
    guard.proc.stdin.close()  # as the kernel does when the parent dies
    assert guard.proc.wait(30) == 0
    assert not fake.frozen


def test_a_disarmed_guard_does_nothing(fake) -> None:
    guard = agent_mod.ThawGuard.start(QgaFreezer(fake.path, 2))
    guard.arm()
    fake.frozen = True  # someone else's freeze
    guard.disarm()
    assert guard.proc.returncode == 0
    assert fake.frozen and fake.log == []


def test_a_guard_never_armed_leaves_someone_elses_freeze(fake) -> None:
    """Killed before anything that freezes was sent: the freeze in place is not ours."""
    guard = agent_mod.ThawGuard.start(QgaFreezer(fake.path, 2))
    fake.frozen = True
    guard.proc.stdin.close()
    assert guard.proc.wait(30) == 0
    assert fake.frozen and fake.log == []


def test_a_thaw_that_fails_is_handed_to_the_guard(fake, tmp_path, monkeypatch) -> None:
    """Every thaw of ours fails (an agent still busy with a long freeze, here: refusing): the guard is not
    told "done", thaws once the agent lets it, and keeps the VM locked until then (no new run freezes or
    pauses a guest it may still thaw)."""
    from fleece.exporter.lock import VmLock
    from fleece.repository.errors import BackupBusyError

    key = f"vm-under-test-{tmp_path}"
    fake.refuse.add("guest-fsfreeze-thaw")
    with VmLock(key, "the test VM"):
        with quiesced(QgaFreezer(fake.path, 2)) as q:
            pass
    assert q.thawed is False and fake.frozen
    deadline = time.monotonic() + 10
    while True:  # our lock is gone, the guard's copy holds it, and the lock file names the guard soon
        with pytest.raises(BackupBusyError) as e:
            VmLock(key, "the test VM").acquire()
        if "thaw guard" in e.value.message:
            break
        assert time.monotonic() < deadline, e.value.message
        time.sleep(0.05)
    fake.refuse.discard("guest-fsfreeze-thaw")
    deadline = time.monotonic() + 30
    while fake.frozen:
        assert time.monotonic() < deadline, "the guard did not take over the thaw"
        time.sleep(0.1)
    while True:  # the guard exits once it thawed, and the lock with it
        try:
            VmLock(key, "the test VM").acquire()
            break
        except BackupBusyError:
            assert time.monotonic() < deadline, "the guard kept the VM locked after it thawed"
            time.sleep(0.1)


def test_a_guard_outside_systemd_falls_back_to_a_plain_child(fake, monkeypatch, caplog) -> None:
    """INVOCATION_ID says "a systemd service" but there is no systemd to make a scope (as here): the
    guard still starts, as our child, and works."""
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    guard = agent_mod.ThawGuard.start(QgaFreezer(fake.path, 2))
    assert guard is not None
    QgaFreezer(fake.path, 2).freeze(guard.arm)
    guard.proc.stdin.close()
    assert guard.proc.wait(30) == 0 and not fake.frozen
    if shutil.which("systemd-run"):
        assert "did not start in a systemd scope; trying without" in caplog.text, caplog.text


class Scripted:
    """A freezer that fails at a chosen moment, for the "who thaws" rules."""

    what = "scripted"

    def __init__(self, fail_before_arm: bool) -> None:
        self.fail_before_arm = fail_before_arm
        self.thaws = 0

    def freeze(self, arm) -> int:
        if not self.fail_before_arm:
            arm()
        raise KeyboardInterrupt("signal 15")

    def thaw(self) -> int:
        self.thaws += 1
        return 1

    def reset(self) -> None:
        pass

    def guard_args(self):
        return None


@pytest.mark.parametrize("before_arm", [True, False])
def test_an_interrupt_thaws_only_what_may_be_ours(before_arm) -> None:
    f = Scripted(before_arm)
    with pytest.raises(KeyboardInterrupt):
        with quiesced(f):
            pass
    assert f.thaws == (0 if before_arm else 1)


def test_garbage_on_the_channel_is_an_agent_error_not_a_crash(tmp_path) -> None:
    """A guest may write anything to its port: a 0xFF line that is not an object, then endless bytes
    without a line end — an AgentError at once (no unbounded buffer), never another exception."""
    import socket

    path = str(tmp_path / "garbage.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.recv(4096)
        try:
            c.sendall(b"\xff3\n\xff[1, 2]\n\xff" + b"x" * (3 << 20))
        except BrokenPipeError:  # the client gave up: what the test wants
            pass
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ga = GuestAgent(path, 10)
    t0 = time.monotonic()
    try:
        with pytest.raises(AgentError, match="without a line end") as e:
            ga.sync()
        assert time.monotonic() - t0 < 5 and e.value.maybe_frozen
    finally:
        ga.close()
        srv.close()


def test_sync_ignores_an_earlier_syncs_late_answer(fake) -> None:
    """Both answers start with 0xFF: only the id tells ours from an abandoned sync's."""
    fake.hang.add("guest-sync-delimited")
    ga = GuestAgent(fake.path, 0.3)
    try:
        with pytest.raises(AgentError) as e:
            ga.sync()
        assert e.value.stage == "sync"
        fake.release()
        ga.timeout = 2
        ga.sync()
        assert ga.call("guest-fsfreeze-status", "status") == "thawed"
    finally:
        ga.close()


def test_a_lock_held_by_a_dead_runs_child_is_waited_out_a_live_holder_is_refused(tmp_path) -> None:
    """The lock file names a run that is gone (dead, or a zombie) while a child it started still holds the
    flock (its guard): the next run waits until that child exits. A live holder is refused at once."""
    import fcntl
    import subprocess

    from fleece.exporter.lock import VmLock
    from fleece.repository.errors import BackupBusyError

    key = f"vm-under-test-{tmp_path}"
    lock = VmLock(key, "the test VM")
    fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    dead = subprocess.Popen(["true"])  # not reaped yet: a zombie, as a killed run is until its parent waits
    time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{dead.pid}\n".encode(), 0)
    holder = subprocess.Popen(["sleep", "0.6"], pass_fds=[fd])  # the dead run's guard, finishing
    os.close(fd)
    t0 = time.monotonic()
    lock.acquire()
    assert 0.4 < time.monotonic() - t0 < 5, "it neither waited for the holder nor got the lock after it"
    lock.release()
    holder.wait()
    dead.wait()

    live = subprocess.Popen(["sleep", "5"])
    fd = os.open(lock.path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{live.pid}\n".encode(), 0)
    t0 = time.monotonic()
    with pytest.raises(BackupBusyError, match=f"pid {live.pid}"):
        VmLock(key, "the test VM").acquire()
    assert time.monotonic() - t0 < 1
    os.close(fd)
    live.kill()
    live.wait()
