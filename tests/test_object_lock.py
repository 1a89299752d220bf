"""S3 Object Lock (WORM) on a real Ceph RGW: what a locked repository locks, what forget and prune do.

``fleece init --object-lock DAYS`` locks every pack, index object, point and the config for DAYS
(GOVERNANCE by default); forget keeps points whose lock has not ended, prune never rewrites (repacks)
packs and extends the locks of the packs points still need. Object Lock implies a versioned bucket,
where RGW 16 ignores ``If-None-Match: *``: put-if-absent is emulated (``S3Backend._put_if_absent_versioned``)
— the maintenance lock and the commit record depend on it.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import boto3
import pytest

from checks import env_with, fleece, identical, ok
from conftest import MiB
from fleece.repository import RepoConfig, Repository
from fleece.repository.errors import LockedError
from fleece.repository.prune import prune
from vm import random_bytes

pytestmark = pytest.mark.s3


def _client(rgw: dict):
    return boto3.client("s3", endpoint_url=rgw["endpoint"], aws_access_key_id=rgw["access_key"],
                        aws_secret_access_key=rgw["secret_key"], region_name="us-east-1")


def _retention(client, bucket: str, key: str) -> tuple[str, float] | None:
    try:
        r = client.get_object_retention(Bucket=bucket, Key=key)["Retention"]
    except client.exceptions.ClientError:
        return None
    return r["Mode"], r["RetainUntilDate"].timestamp()


@pytest.fixture(scope="module")
def locked(rgw: dict, tmp_path_factory):
    """A locked repository in a new Object Lock bucket (made by init --create-bucket)."""
    bucket = f"worm-{secrets.token_hex(4)}"
    url = f"s3://{bucket}/repo"
    doc = ok(fleece("init", "--repo", url, "--create-bucket", "--object-lock", "2", "--json", env=env_with()))
    assert doc["object_lock"] == {"mode": "GOVERNANCE", "days": 2}
    return bucket, url


def test_every_point_object_is_locked_and_restores(locked, rgw, make_vm, tmp_path: Path) -> None:
    bucket, url = locked
    vm = make_vm({"vda": 16 * MiB})
    vm.write("vda", 0, random_bytes(6 * MiB, 1))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    ids = []
    for i in range(3):
        if i:
            vm.write("vda", MiB * i, random_bytes(65536, 10 + i))
        ids.append(ok(fleece("backup", "--qmp", vm.qmp_path, "--repo", url, "--scratch", str(scratch), "--json",
                             env=env_with()))["id"])
    client = _client(rgw)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="repo/")["Contents"]]
    now = time.time()
    for key in keys:
        got = _retention(client, bucket, key)
        if key.startswith(("repo/data/", "repo/index/", "repo/points/")) or key == "repo/config":
            assert got is not None and got[0] == "GOVERNANCE", key
            assert now + 1.9 * 86400 < got[1] < now + 2.1 * 86400, key
        else:
            assert got is None, key  # keys/, locks/, condemned/ stay deletable
    # A locked object version cannot be deleted, even by the bucket's owner without bypass rights
    pack = next(k for k in keys if k.startswith("repo/data/"))
    version = client.list_object_versions(Bucket=bucket, Prefix=pack)["Versions"][0]["VersionId"]
    with pytest.raises(client.exceptions.ClientError):
        client.delete_object(Bucket=bucket, Key=pack, VersionId=version)

    # forget cannot drop a locked point, whatever the policy: it says why, and changes nothing
    doc = ok(fleece("forget", "--repo", url, "--vm", vm.name, "--keep-last", "1", "--json", env=env_with()))
    assert doc["removed"] == [] and doc["kept"] == 3
    assert all(any(r.startswith("object lock until") for r in p["reasons"]) for p in doc["points"])
    listed = ok(fleece("list", "--repo", url, "--vm", vm.name, "--json", env=env_with()))
    assert [p["id"] for p in listed["points"]] == ids

    out = tmp_path / "out"
    ok(fleece("restore", "--repo", url, "--vm", vm.name, "--out", str(out), "--flat", "--format", "raw", "--json",
              env=env_with()))
    identical(out / "vda.raw", vm.disks["vda"].reference)  # the truth: no write since the last backup


def test_prune_extends_locks_instead_of_repacking(locked, rgw) -> None:
    bucket, url = locked
    repo = Repository.open(url)
    client = _client(rgw)
    packs = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="repo/data/").get("Contents", [])]
    assert packs, "the backups above stored packs"
    before = {k: _retention(client, bucket, k) for k in packs}
    # a day and a half later, more than half of each pack's 2-day lock is gone: prune extends it
    later = time.time() + 1.5 * 86400
    report = prune(repo, grace=86400, max_unused=0.0, now=lambda: later)
    assert report.repacked_packs == 0  # max_unused 0 would repack anything partly used: never under a lock
    assert report.locks_extended == len(packs)
    for k in packs:
        mode, until = _retention(client, bucket, k)
        assert mode == "GOVERNANCE" and until > before[k][1] + 86400 and abs(until - (later + 2 * 86400)) < 5


def test_maintenance_lock_is_exclusive_in_a_versioned_bucket(locked) -> None:
    _, url = locked
    first, second = Repository.open(url), Repository.open(url)
    with first.maintenance("one"):
        with pytest.raises(LockedError) as caught:
            second.maintenance("two").acquire()
        assert "one" in caught.value.holder
    with second.maintenance("two"):  # released: the next one gets it
        pass


def test_object_lock_needs_a_lock_enabled_s3_bucket(s3_bucket: str, tmp_path: Path) -> None:
    p = fleece("init", "--repo", f"s3://{s3_bucket}/{secrets.token_hex(4)}", "--object-lock", "1", "--json",
               env=env_with())
    assert p.returncode == 2 and "Object Lock enabled" in p.stderr, p.stderr
    p = fleece("init", "--repo", str(tmp_path / "dir"), "--object-lock", "1", env=env_with())
    assert p.returncode == 2 and "needs an S3 bucket" in p.stderr, p.stderr
    assert not (tmp_path / "dir").exists()
    with pytest.raises(Exception):
        RepoConfig(object_lock={"mode": "WEEKLY", "days": 1}).validate("x")
