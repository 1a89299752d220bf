"""The storage side under hostile conditions: waits that Ctrl-C must cut short, configuration mistakes
and credentials in URLs reported as such, a silent S3 endpoint, a local repository that is partly
unreadable. No Ceph here: error endpoints are a closed port or a local listener that never answers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from checks import FLEECE, assert_clean, fleece
from conftest import MiB, is_root
from faults import Fault, Faulty
from fleece.repository import RepoConfig, Repository
from fleece.repository.backends import LocalBackend, RateLimited, Retrying, compose, layer, open_backend
from fleece.repository.errors import Interrupted, TransientBackendError, UsageError
from vm import random_bytes

CLOSED = "http://127.0.0.1:1"


def in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run *fn* in a daemon thread; the dict gets its ``result`` or ``error`` and its ``took`` seconds."""
    out: dict[str, object] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["took"] = time.monotonic() - started

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# -- 1. cancellable waits -----------------------------------------------------------------------------------

def test_cancel_wakes_a_put_waiting_for_the_bandwidth_limit_and_later_puts_work(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "repo", create=True)
    stack = compose(local, bwlimit=1)  # Retrying ▸ RateLimited (1 byte/s) ▸ Counting ▸ LocalBackend
    burst = layer(stack, RateLimited).bucket.burst
    t, out = in_thread(lambda: stack.put("data/aa/big", b"x" * (2 * burst)))  # the 2nd piece waits ~18 h
    time.sleep(0.3)
    assert t.is_alive(), out
    cancelled = time.monotonic()
    stack.cancel()
    t.join(5)
    assert not t.is_alive(), "the put still waits for its tokens after cancel()"
    assert time.monotonic() - cancelled < 1.0
    assert isinstance(out.get("error"), Interrupted), out
    assert not local.exists("data/aa/big")

    # The same stack afterwards (a failed run's clean-up): waits normally, not interrupted and not
    # charged for the cancelled piece (that would be another 18 h at this rate).
    t, out = in_thread(lambda: stack.put("data/aa/small", b"y"))
    t.join(5)
    assert not t.is_alive() and "error" not in out, out
    assert local.get("data/aa/small") == b"y"


def test_cancel_wakes_a_retry_pause_and_the_operation_is_not_retried_again(tmp_path: Path) -> None:
    local = LocalBackend(tmp_path / "repo", create=True)
    faulty = Faulty(local, Fault("get", error=lambda: TransientBackendError("503", object="config", status=503),
                                 times=None))
    stack = Retrying(faulty, 5, backoff=600, backoff_cap=600, deadline=None)  # 10 min pauses, real clock
    stack.delay = lambda attempt: 600.0  # type: ignore[method-assign]  # no lucky short jitter
    t, out = in_thread(lambda: stack.get("config"))
    time.sleep(0.3)
    stack.cancel()
    t.join(5)
    assert not t.is_alive(), "the get still sleeps in its back-off after cancel()"
    assert isinstance(out.get("error"), Interrupted), out
    assert faulty.ops("get") == ["config"]
    local.put("config", b"c")
    faulty.faults.clear()
    assert stack.get("config") == b"c"  # later operations work


def test_aborting_a_writer_cuts_short_an_upload_waiting_for_the_bandwidth_limit(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True, bwlimit=1, config=RepoConfig(pack_target=MiB))
    writer = repo.writer()
    for i in range(3):  # incompressible: a full pack ships and its upload waits for tokens
        writer.add(random_bytes(MiB, 40 + i))
    time.sleep(0.5)
    t, out = in_thread(writer.abort)
    t.join(5)
    assert not t.is_alive(), "BlobWriter.abort() waits for an upload sleeping in the rate limiter"
    assert "error" not in out, out
    assert not list(repo.backend.list("data/"))
    repo.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_a_bandwidth_limited_backup_within_seconds(make_vm, tmp_path, scratch, signum) -> None:
    vm = make_vm({"vda": 8 * MiB})
    vm.write("vda", 0, random_bytes(4 * MiB, 7))  # at 1 KiB/s this takes over an hour to upload
    proc = subprocess.Popen([FLEECE, "backup", "--qmp", vm.qmp_path, "--repo", str(tmp_path / "repo"), "--scratch",
                             str(scratch), "--bwlimit", "1K", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not vm.guest.cmd("query-block-exports"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the backup never exported its fleece"
            time.sleep(0.02)
        time.sleep(2)  # the pull is done; the upload waits for tokens
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, (proc.returncode, stderr)
    assert took < 5, f"the backup took {took:.1f} s to stop after the signal"
    assert json.loads(stdout)["error"]["kind"] == "interrupted", stdout
    assert "Traceback" not in stderr, stderr
    assert_clean(vm.guest)


# -- 2. configuration mistakes are usage errors --------------------------------------------------------------

def _aws_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEECE_"))}
    return {**env, "AWS_ACCESS_KEY_ID": "AKIAFLEECETEST", "AWS_SECRET_ACCESS_KEY": "not-a-secret", **extra}


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    return lines[0]


@pytest.mark.parametrize("env,args,says", [
    ({"AWS_PROFILE": "nosuch"}, ["--s3-endpoint", CLOSED], "AWS profile 'nosuch' not found: fix or unset AWS_PROFILE"),
    ({"AWS_CONFIG_FILE": "/etc/passwd"}, ["--s3-endpoint", CLOSED],
     "cannot parse the AWS configuration file /etc/passwd"),
    ({"AWS_ENDPOINT_URL_S3": "not a url"}, [], "AWS_ENDPOINT_URL_S3='not a url' is not an S3 endpoint URL"),
    ({"FLEECE_S3_ATTEMPTS": "abc"}, ["--s3-endpoint", CLOSED], "FLEECE_S3_ATTEMPTS='abc' must be a whole number"),
    ({"FLEECE_S3_ATTEMPTS": "-1"}, ["--s3-endpoint", CLOSED], "FLEECE_S3_ATTEMPTS='-1' must be a whole number"),
], ids=["profile", "config-file", "endpoint-env", "attempts-abc", "attempts-negative"])
def test_s3_configuration_mistakes_are_usage_errors(env: dict[str, str], args: list[str], says: str) -> None:
    for cmd in (["list"], ["verify"]):
        p = fleece(*cmd, "--repo", "s3://bkt", *args, env=_aws_env(**env), timeout=60)
        assert p.returncode == 2, (p.returncode, p.stderr)
        line = one_error_line(p)
        assert says in line and "internal error" not in line, line
    p = fleece("list", "--repo", "s3://bkt", *args, "--json", env=_aws_env(**env), timeout=60)
    assert p.returncode == 2 and json.loads(p.stdout)["error"]["kind"] == "usage", p.stdout


@pytest.mark.parametrize("bucket", ["BAD_Bucket!", "a b", "bkt*", "b" * 256, "b%41"])
def test_an_invalid_bucket_name_is_refused_before_any_request(bucket: str) -> None:
    """Only names no S3 server accepts (botocore's own rule): legacy names with capitals or underscores
    still exist on AWS and relaxed Ceph setups, and the server itself refuses the rest."""
    with pytest.raises(UsageError, match="invalid S3 bucket name .*letters, digits, dots, hyphens"):
        open_backend(f"s3://{bucket}/p", endpoint=CLOSED)
    p = fleece("list", "--repo", f"s3://{bucket}", "--s3-endpoint", CLOSED, env=_aws_env(), timeout=60)
    assert p.returncode == 2 and "invalid S3 bucket name" in one_error_line(p), p.stderr
    assert "attempt" not in p.stderr  # nothing was sent, so nothing was retried


def test_valid_bucket_names_pass() -> None:
    from fleece.repository.backends.s3 import check_bucket

    for name in ("bkt", "fleece-tests", "my.backups-01", "a" * 63):
        assert check_bucket(name) == name


# -- 3. credentials in URLs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,env,secret", [
    (["--repo", "s3://bkt/p", "--s3-endpoint", "http://admin:PassInUrl999@127.0.0.1:1"], {}, "PassInUrl999"),
    (["--repo", "s3://AKIA:RepoUrlSecret@bkt/p"], {}, "RepoUrlSecret"),
    (["--repo", "s3://AKIAONLYUSER@bkt/p"], {}, "AKIAONLYUSER"),
    (["--repo", "s3://bkt/p"], {"AWS_ENDPOINT_URL_S3": "http://admin:EnvUrlSecret@127.0.0.1:1"}, "EnvUrlSecret"),
    (["--repo", "s3://bkt/p", "--s3-endpoint", "http://admin:Pass/Slash9@127.0.0.1:1"], {}, "Slash9"),
], ids=["endpoint", "repo", "repo-user-only", "endpoint-env", "endpoint-password-with-slash"])
def test_credentials_in_a_url_are_refused_and_never_printed(args: list[str], env: dict[str, str],
                                                            secret: str) -> None:
    for cmd in ("list", "verify"):
        for extra in ([], ["--json"]):
            p = fleece(cmd, *args, *extra, env=_aws_env(**env), timeout=60)
            assert p.returncode == 2, (p.returncode, p.stderr)
            assert secret not in p.stdout + p.stderr, p.stdout + p.stderr
            text = json.loads(p.stdout)["error"]["message"] if extra else one_error_line(p)
            assert "credentials in the URL are not supported: use AWS_ACCESS_KEY_ID" in text, text


@pytest.mark.parametrize("url", ["ftp://user:FtpSecret1@host/x", "file://user:FileSecret1@host/x"])
def test_other_repository_urls_never_echo_their_userinfo(url: str) -> None:
    with pytest.raises(UsageError) as e:
        open_backend(url)
    assert "Secret1" not in str(e.value) and "***@host" in str(e.value)


# -- 4. a silent S3 endpoint ---------------------------------------------------------------------------------

@pytest.fixture
def silent_endpoint() -> Iterator[tuple[str, list[socket.socket]]]:
    """An endpoint that accepts connections and never says a word; yields (URL, accepted connections)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()
    for c in accepted:
        c.close()


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFLEECETEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")


def test_s3_timeouts_are_explicit_and_botocore_does_not_retry(aws_keys, silent_endpoint) -> None:
    from fleece.repository.backends.s3 import S3Backend

    url, accepted = silent_endpoint
    default = S3Backend("bkt", endpoint=url).client.meta.config
    assert (default.connect_timeout, default.read_timeout) == (10, 60)
    assert default.retries["total_max_attempts"] == 1

    s3 = S3Backend("bkt", endpoint=url, connect_timeout=0.5, read_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransientBackendError, match="ReadTimeoutError"):
        s3.head("config")
    took = time.monotonic() - started
    assert 0.4 < took < 0.95, took  # one read timeout, not two (botocore's own retry)
    assert len(accepted) == 1


def test_retrying_gives_up_on_a_silent_endpoint_at_its_deadline(aws_keys, silent_endpoint) -> None:
    from fleece.repository.backends.s3 import S3Backend

    url, accepted = silent_endpoint
    s3 = S3Backend("bkt", endpoint=url, connect_timeout=0.3, read_timeout=0.3)
    stack = Retrying(s3, attempts=100, deadline=2.0, backoff=0.05, backoff_cap=0.1)
    started = time.monotonic()
    with pytest.raises(TransientBackendError, match=r"gave up after \d+ attempts in 2 s: check that the storage"):
        stack.head("config")
    took = time.monotonic() - started
    assert 1.5 < took < 3.5, took
    assert 2 <= len(accepted) < 100


def test_the_retry_deadline_bounds_attempts_by_time(tmp_path: Path) -> None:
    """With a clock that jumps: pauses and attempts stop once the next pause would end past the deadline."""
    now = [0.0]
    local = LocalBackend(tmp_path / "repo", create=True)

    def slow_failure() -> TransientBackendError:
        now[0] += 60  # every attempt takes a read timeout
        return TransientBackendError("read timeout", object="config")

    faulty = Faulty(local, Fault("get", error=slow_failure, times=None))
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    stack = Retrying(faulty, 8, deadline=300, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(TransientBackendError, match=r"gave up after [45] attempts in \d+ s") as e:
        stack.get("config")
    assert len(faulty.ops("get")) < 8 and now[0] <= 300 + 60, (faulty.ops("get"), now[0])
    assert e.value.object == "config"
    # The default stack has the deadline.
    assert layer(open_backend(str(tmp_path / "repo")), Retrying).deadline == 300


# -- 5. an unreadable local repository ----------------------------------------------------------------------

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A world-readable directory tree ``nobody`` can reach (pytest's own tmp dirs are private to root)."""
    if not is_root():
        pytest.skip("needs root to run fleece as another user")
    d = Path(tempfile.mkdtemp(prefix="fleece-shared-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, FLEECE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": "/tmp"})


def test_listing_an_unreadable_directory_fails_with_its_name(shared_repo: Path) -> None:
    root = shared_repo / "unit"
    b = LocalBackend(root, create=True)
    b.put("points/vm/p1", b"m")
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    (root / "points" / "vm").chmod(0o700)
    script = ("import sys\nfrom fleece.repository.backends import LocalBackend\n"
              "from fleece.repository.errors import PermanentBackendError\n"
              "try:\n    print(list(LocalBackend(sys.argv[1]).list(sys.argv[2])))\n"
              "except PermanentBackendError as e:\n    print('ERR', e.code, e.object, e.message)\n")
    python = str(Path(FLEECE).parent / "python")
    for prefix in ("points/", "points/vm/", ""):
        p = subprocess.run([*NOBODY, python, "-c", script, str(root), prefix], capture_output=True, text=True)
        assert p.stdout.startswith("ERR EACCES points/vm cannot list points/vm in"), (prefix, p.stdout, p.stderr)


@pytest.fixture(scope="module")
def two_points(shared_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with two points of VM ``testvm``, readable by everyone."""
    from vm import TestVM

    vm = TestVM(tmp_path_factory.mktemp("vm"), {"vda": 4 * MiB}, name="testvm")
    vm.start()
    try:
        repo = shared_repo / "repo"
        scratch = tmp_path_factory.mktemp("scratch")
        for seed in (1, 2):
            vm.write("vda", 0, random_bytes(65536, seed))
            p = fleece("backup", "--qmp", vm.qmp_path, "--repo", str(repo), "--scratch", str(scratch))
            assert p.returncode == 0, p.stderr
    finally:
        vm.cleanup()
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    return repo


@pytest.mark.parametrize("hidden", ["points/testvm", "points"])
def test_commands_fail_when_part_of_the_repository_is_unreadable(two_points: Path, shared_repo: Path,
                                                                 hidden: str) -> None:
    repo = str(two_points)
    p = as_nobody("verify", "--repo", repo)
    assert p.returncode == 0 and "2 point(s) checked" in p.stdout, (p.stdout, p.stderr)  # the set-up works
    out = shared_repo / f"out-{hidden.replace('/', '-')}"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    # the VM's directory: points/testvm in format 1, points/<keyed token> in an encrypted repository
    vm_dir = "points/" + Repository.open(repo).envelope.vm_key("testvm")
    hidden_path = vm_dir if hidden == "points/testvm" else hidden
    (two_points / hidden_path).chmod(0o700)
    try:
        for args in (["verify", "--repo", repo], ["list", "--repo", repo], ["list", "--repo", repo, "--vm", "testvm"],
                     ["restore", "--repo", repo, "--vm", "testvm", "--out", str(out)]):
            p = as_nobody(*args)
            assert p.returncode == 1, (args, p.returncode, p.stdout, p.stderr)
            line = one_error_line(p)
            assert "Permission denied" in line and "points" in line, (args, line)
            assert "all ok" not in p.stdout and "no points" not in p.stdout + p.stderr, (args, p.stdout)
            j = as_nobody(*args, "--json")
            err = json.loads(j.stdout)["error"]
            assert (j.returncode, err["code"]) == (1, "EACCES"), (args, j.stdout)
            assert err["object"] in ({hidden_path} if hidden == "points/testvm" else {"points", vm_dir}), err
    finally:
        (two_points / hidden_path).chmod(0o755)
    assert not list(out.iterdir())
