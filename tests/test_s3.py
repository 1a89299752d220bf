"""fleece against a real S3 server (Ceph RGW): disaster recovery from the bucket alone, faults on the
wire, the server going away mid-backup, and bad credentials. No mocks anywhere."""

from __future__ import annotations

import json
import os
import secrets

import pytest

import s3_server
from checks import assert_clean, assert_point_matches, fleece, fleece_bitmaps, identical
from conftest import MiB, s3_url
from fleece.exporter.backup import BackupRequest, run_backup
from faulty_proxy import FaultyProxy
from fleece.repository import RepoConfig, Repository
from fleece.repository.backends.s3 import S3Backend
from fleece.repository.errors import BackendError, ObjectNotFound, PermanentBackendError
from fleece.restore import RestoreRequest, run_restore
from test_backup import Recorder, seed
from vm import random_bytes, text_bytes

pytestmark = pytest.mark.s3


def test_disaster_recovery_from_the_bucket_alone(make_vm, s3_bucket, rgw, tmp_path, scratch) -> None:
    vm = make_vm()
    seed(vm)
    url = s3_url(s3_bucket)
    refs, ids = [], []
    for step in range(3):
        if step:
            vm.write("vda", step * 5 * MiB, random_bytes(2 * MiB, step))
            vm.write("vdb", step * MiB, text_bytes(MiB, step))
            vm.zero("vda", 24 * MiB + step * MiB, MiB)
        refs.append(vm.snapshot_refs(f"s3-{step}"))  # no writes run during these backups
        p = fleece("backup", "--qmp", vm.qmp_path, "--repo", url, "--scratch", str(scratch), "--json")
        assert p.returncode == 0, p.stderr
        doc = json.loads(p.stdout)
        ids.append(doc["id"])
        assert doc["backend_requests"]["PUT"] >= 2  # packs, index, manifest went over S3
    vm.kill()  # the host is gone

    # A new host: empty HOME, no cache, nothing of the old host's files; just the bucket, its S3 keys and
    # the repository's password (the repository is encrypted, as every new one is by default).
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "newhost"),
           "AWS_ACCESS_KEY_ID": rgw["access_key"], "AWS_SECRET_ACCESS_KEY": rgw["secret_key"],
           "AWS_ENDPOINT_URL_S3": rgw["endpoint"], "FLEECE_PASSWORD": os.environ["FLEECE_PASSWORD"]}
    no_key = fleece("list", "--repo", url, "--json", env={k: v for k, v in env.items() if k != "FLEECE_PASSWORD"})
    assert no_key.returncode == 1 and json.loads(no_key.stdout)["error"]["kind"] == "key", no_key.stdout
    listing = fleece("list", "--repo", url, "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    assert [p["id"] for p in json.loads(listing.stdout)["points"]] == ids
    for index, extra in ((2, []), (1, ["--flat"])):
        out = tmp_path / f"restore-{index}"
        p = fleece("restore", "--repo", url, "--vm", "testvm", "--point", ids[index], "--out", str(out), *extra,
                   env=env)
        assert p.returncode == 0, p.stderr
        for disk in ("vda", "vdb"):
            identical(out / f"{disk}.qcow2", refs[index][disk])
    v = fleece("verify", "--repo", url, "--read-data", "--json", env=env)
    assert v.returncode == 0 and json.loads(v.stdout)["ok"], v.stdout + v.stderr


def test_backup_and_restore_through_a_faulty_network(make_vm, s3_bucket, rgw, tmp_path, scratch) -> None:
    proxy = FaultyProxy(rgw["endpoint"], rate=0.05, seed=7)
    try:
        url = s3_url(s3_bucket)
        vm = make_vm()
        seed(vm)
        vm.write("vda", 4 * MiB, random_bytes(12 * MiB, 1))
        vm.write("vdb", 0, text_bytes(8 * MiB, 2))
        # Small packs: many requests, so that 5 % of them is a real number of faults.
        repo = Repository.open(url, create=True, endpoint=proxy.endpoint,
                               config=RepoConfig(chunk_size=256 << 10, pack_target=MiB))
        results = []
        for step in range(6):
            if step:
                vm.write("vda", step * 4 * MiB, random_bytes(4 * MiB, 10 + step))
                vm.write("vdb", step * MiB, random_bytes(MiB, 20 + step))
            rec = Recorder(vm)
            r = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec))
            results.append((r.manifest, rec.refs))
        # The retries were the wrapper's: its counting layer saw the failed attempts.
        assert sum(repo.traffic()["errors"].values()) >= 1, repo.traffic()
        for manifest, refs in results:
            assert_point_matches(Repository.open(url, endpoint=proxy.endpoint), manifest, refs)
        out = tmp_path / "restored"
        run_restore(Repository.open(url, endpoint=proxy.endpoint),
                    RestoreRequest(vm="testvm", out=out, point=results[3][0].id, workers=4))
        identical(out / "vda.qcow2", results[3][1]["vda"])
        assert_clean(vm.guest)
    finally:
        proxy.close()
    # The faults really happened, of every kind, and were all survived.
    assert proxy.requests > 100
    assert set(proxy.injected) == {"500", "503", "reset-before", "reset-mid-response"}, proxy.injected
    assert sum(proxy.injected.values()) >= 4


def test_s3_errors_carry_code_status_and_object(s3_bucket, rgw, monkeypatch) -> None:
    """Decisions are made on the fields, never on the message: an object name (or an endpoint port) with
    "412" in it must not make a genuine failure look like "the object already exists"."""
    b = S3Backend(s3_bucket, secrets.token_hex(6))
    with pytest.raises(ObjectNotFound) as e:
        b.get("data/41/p412")
    assert (e.value.code, e.value.status, e.value.object) == ("NoSuchKey", 404, "data/41/p412")
    with pytest.raises(ObjectNotFound) as e:
        b.head("data/41/p412")
    assert (e.value.status, e.value.object) == (404, "data/41/p412")
    b.put("points/vm412/p412", b"first")
    assert b.put_if_absent("points/vm412/p412", b"second") is False  # a real 412
    b.ensure_bucket(create=True)  # the bucket is already ours: fine
    with pytest.raises(PermanentBackendError) as e:
        S3Backend(f"no-such-{secrets.token_hex(4)}").ensure_bucket()
    assert e.value.code == "NoSuchBucket"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-key-at-all")
    denied = S3Backend(s3_bucket, "pre412")
    with pytest.raises(PermanentBackendError, match="access denied") as e:
        denied.put_if_absent("points/vm412/p412", b"x")
    assert "412" in str(e.value)  # the old substring test took this for "already exists"
    assert e.value.status == 403 and e.value.code in ("SignatureDoesNotMatch", "AccessDenied")
    assert e.value.object == "points/vm412/p412"


@pytest.fixture
def bluestore_rgw(tmp_path_factory):
    """A second RGW on bluestore (it survives being stopped and started mid-test)."""
    d = tmp_path_factory.mktemp("rgw-blue")
    info = s3_server.start(d, backend="bluestore")
    try:
        yield d, info
    finally:
        s3_server.stop(d)


def test_s3_server_stopped_mid_backup(make_vm, bluestore_rgw, scratch) -> None:
    d, info = bluestore_rgw
    env_before = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3")}
    os.environ.update({"AWS_ACCESS_KEY_ID": info["access_key"], "AWS_SECRET_ACCESS_KEY": info["secret_key"],
                       "AWS_ENDPOINT_URL_S3": info["endpoint"]})
    try:
        vm = make_vm()
        seed(vm)
        url = "s3://dr-bucket/vms"
        repo = Repository.open(url, create=True, create_bucket=True, attempts=3)
        first = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch))).manifest
        before = fleece_bitmaps(vm.guest)
        vm.write("vda", 2 * MiB, random_bytes(8 * MiB, 3))
        with pytest.raises(BackendError, match="gave up after 3 attempts"):
            run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch),
                                           on_event=lambda name, data: s3_server.stop(d) if name == "frozen" else None))
        assert vm.status() == "running"
        assert fleece_bitmaps(vm.guest) == before  # folded back
        assert_clean(vm.guest)

        info2 = s3_server.start(d, backend="bluestore")
        assert info2["endpoint"] == info["endpoint"]
        repo = Repository.open(url, attempts=3)
        assert repo.point_ids("testvm") == [first.id]  # nothing half-written
        rec = Recorder(vm)
        nxt = run_backup(repo, BackupRequest(qmp=vm.qmp_path, scratch=str(scratch), on_event=rec)).manifest
        assert nxt.kind == "incremental" and nxt.parent == first.id
        assert_point_matches(repo, nxt, rec.refs)
    finally:
        os.environ.update(env_before)


def test_bad_credentials_and_missing_bucket_fail_before_any_work(make_vm, s3_bucket, rgw, scratch) -> None:
    vm = make_vm()
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY="not-the-secret-key-at-all")
    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", s3_url(s3_bucket), "--scratch", str(scratch), "-v",
               env=env)
    assert p.returncode == 1
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("fleece: error:")]
    assert len(err) == 1 and "access denied" in err[0] and "credentials" in err[0], p.stderr
    for secret in ("not-the-secret-key-at-all", rgw["secret_key"], rgw["access_key"]):
        assert secret not in p.stderr
    assert fleece_bitmaps(vm.guest) == {"vda": [], "vdb": []}  # nothing touched
    assert_clean(vm.guest)

    p = fleece("backup", "--qmp", vm.qmp_path, "--repo", "s3://no-such-bucket-here/x", "--scratch", str(scratch))
    assert p.returncode == 1 and "bucket no-such-bucket-here does not exist" in p.stderr
    assert "--create-bucket" in p.stderr
    assert fleece_bitmaps(vm.guest) == {"vda": [], "vdb": []}
    p = fleece("init", "--repo", "s3://brand-new-bucket/repo", "--create-bucket", "--json")
    assert p.returncode == 0, p.stderr
    assert (json.loads(p.stdout)["format"], json.loads(p.stdout)["encrypted"]) == (2, True)
