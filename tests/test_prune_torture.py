"""Torture of the lock-free deletion protocol (repository/gc.py, repository/prune.py) on a real Ceph RGW:
two VMs back up into one S3 repository while ``fleece forget --prune`` deletes under them, and any of the
three processes may die by SIGKILL at a random moment. Everything goes through the installed CLI.

Why a torture and not only prune's event-hook tests: the protocol's promise is about interleavings nobody
enumerates — a backup loading the index while a prune condemns, a commit in the last second of a grace, a
prune killed between consolidating the index and deleting packs, a backup killed right after its manifest
landed, a dead forget's lock. Each round races three real processes with random start offsets (and some
backups throttled by ``--bwlimit`` so they outlive the grace), then checks, with nothing running, what must
hold whatever happened:

* a backup committed (exit 0, its point listed), died by our SIGKILL, or was refused with prune-conflict,
  busy or locked; the VM runs on and the next backup of it is exact (incremental or a logged full);
* a point vanishes only when a forget of its VM removed it;
* every blob a listed point needs is located by the index in a pack that exists;
* the points committed or rewritten (merged) this round read back exactly as their disk was when they
  were taken. Ground truth: the reference image tests/vm.py keeps, copied before the round's backups
  start (no guest writes during the race, so every backup of the round sees that state).

At the end every listed point restores bit-exact through ``fleece restore --flat``, ``verify --read-data``
is clean, and two prunes one grace apart leave no pack in data/ that no point references.

To reproduce: the seed is printed at the start (FLEECE_TORTURE_SEED=<seed> replays the same writes and
plans; the timing of the race stays the machine's), FLEECE_TORTURE_ROUNDS=N runs longer. A failure prints
the round's plan (start offsets, throttles, which process was killed when) and the processes' output,
whose full logs stay in the test's tmp directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from checks import FLEECE, assert_clean, fleece, identical, materialize, ok
from conftest import MiB
from fleece.repository import Repository
from fleece.repository.gc import read_records
from fleece.repository.pack import pack_name
from vm import TestVM, random_bytes, text_bytes

pytestmark = [pytest.mark.slow, pytest.mark.s3]

ROUNDS = int(os.environ.get("FLEECE_TORTURE_ROUNDS", "50"))
DISK = 16 * MiB
GRANULE = 65536  # the qcow2 cluster and bitmap granularity of TestVM disks
GRACE = "3s"
#: the hot region: each VM cycles it through three contents, so the blob a round writes there is the one a
#: point three rounds older wrote — the point forget is removing now: a backup deduplicates against a pack
#: that the concurrent prune finds unused and condemns (the race the records and the commit guard are for)
HOT, HOT_LEN = MiB, 4 * GRANULE
#: the churn region: fresh data every round, so the blob of a point forget removes is no longer needed and
#: its pack becomes (partly) unused: prune repacks and condemns in every round that forgets
CHURN, CHURN_LEN = HOT + HOT_LEN + GRANULE, 2 * GRANULE
#: every other write stays clear of both (their dirty runs stay blobs of their own)
SPREAD_FROM = 2 * MiB
#: contents both VMs write at granule-aligned offsets: blobs shared across VMs and rounds (dedup)
POOL = [random_bytes(4 * GRANULE, 7100 + i) for i in range(4)]
#: the share of backups throttled, and to what: a backup that uploads its pack slowly commits after a
#: condemnation made meanwhile is due, and must be refused (prune-conflict) instead
SLOW, SLOW_RATE = 0.2, "160K"
BACKUP_REFUSALS = {"prune-conflict", "busy", "locked"}
HUNG = 120.0  # seconds: a process of a round running longer is hung
MAX_FORGET_LOCKED = 3


# -- one round's processes -------------------------------------------------------------------------------

@dataclass
class Proc:
    """One fleece process of a round, with the plan that starts (and maybe kills) it."""

    role: str
    argv: list[str]
    start_at: float  #: seconds after the round's start
    kill_after: float | None  #: seconds after its own start (None: left alone)
    log: Path  #: prefix of its .out / .err files
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float = 0.0
    kill_sent: bool = False

    @property
    def rc(self) -> int | None:
        return None if self.popen is None else self.popen.returncode

    @property
    def killed(self) -> bool:
        """Died by our SIGKILL (a kill sent after it exited by itself leaves its own exit status)."""
        return self.kill_sent and self.rc == -signal.SIGKILL

    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text(errors="replace")

    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text(errors="replace")

    def doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.stdout())
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def kind(self) -> str | None:
        """The error kind of a failed ``--json`` run."""
        doc = self.doc() or {}
        return (doc.get("error") or {}).get("kind")

    def plan(self) -> str:
        kill = f", SIGKILL {self.kill_after:.2f} s after its start" if self.kill_after is not None else ""
        return f"{self.role} at +{self.start_at:.2f} s{kill}"

    def outcome(self) -> str:
        if self.killed:
            return f"{self.role}: SIGKILLed after {self.ended - self.started:.2f} s"
        kind = f" ({self.kind()})" if self.rc else ""
        return f"{self.role}: exit {self.rc}{kind} after {self.ended - self.started:.2f} s"

    def launch(self, now: float) -> None:
        with open(self.log.with_suffix(".out"), "wb") as out, open(self.log.with_suffix(".err"), "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.started = now


def race(procs: list[Proc]) -> None:
    """Start each process at its offset, SIGKILL the planned one at its moment, wait for all. One loop
    in this thread, so the moments are those of the plan (to ~10 ms), not of a scheduler's."""
    t0 = time.monotonic()
    while True:
        now = time.monotonic() - t0
        for p in procs:
            if p.popen is None:
                if now >= p.start_at:
                    p.launch(now)
                continue
            if p.popen.returncode is not None:
                continue
            if p.popen.poll() is not None:
                p.ended = now
            elif p.kill_after is not None and not p.kill_sent and now - p.started >= p.kill_after:
                p.popen.send_signal(signal.SIGKILL)
                p.kill_sent = True
            elif now - p.started > HUNG:
                p.popen.kill()
                p.popen.wait()
                raise AssertionError(f"{p.role} hung for {HUNG:.0f} s: {p.argv}\n{p.stderr()[-3000:]}")
        if all(p.popen is not None and p.popen.returncode is not None for p in procs):
            return
        time.sleep(0.01)


# -- guests and ground truth -----------------------------------------------------------------------------

@dataclass
class Truth:
    """What a point's disk holds: the reference image copied before its backup started."""

    round: int
    ref: Path
    sha: str


@dataclass
class Guest:
    vm: TestVM
    scratch: Path
    hot: list[bytes]
    #: point ids listed after the last round
    points: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.vm.name


def make_guest(make_vm, tmp_path: Path, index: int, node_opts: str) -> Guest:
    vm = make_vm({"vda": DISK}, name=f"torture-{'ab'[index]}", node_opts={"vda": node_opts})
    scratch = tmp_path / f"scratch-{index}"
    scratch.mkdir()
    hot = [random_bytes(HOT_LEN, 7200 + 10 * index + i) for i in range(3)]
    vm.write("vda", 0, text_bytes(HOT, index))  # the full's content: compressible, unlike the rest
    vm.write("vda", 8 * MiB, random_bytes(2 * MiB, 7300 + index))
    return Guest(vm, scratch, hot)


def guest_writes(g: Guest, rng: random.Random, rnd: int) -> list[str]:
    """A round's writes through the guest: the hot region's next content, fresh churn, then 1-4 random operations
    (pool data, fresh data, sub-granule writes, ``write -z`` zeros, discards). Returns what was done."""
    vm = g.vm
    vm.write("vda", HOT, g.hot[rnd % 3])
    vm.write("vda", CHURN, random_bytes(CHURN_LEN, rng.getrandbits(32)))
    done = [f"hot#{rnd % 3}", "churn"]
    lo_g, lo_s = SPREAD_FROM // GRANULE, SPREAD_FROM // 512
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("pool", "pool", "fresh", "small", "zero", "discard"))
        if op == "pool":
            n = rng.choice((1, 2, 4)) * GRANULE
            off = rng.randrange(lo_g, (DISK - n) // GRANULE + 1) * GRANULE
            item = rng.randrange(len(POOL))
            vm.write("vda", off, POOL[item][:n])
            op = f"pool#{item}"
        elif op == "fresh":
            n = rng.choice((1, 3, 8)) * GRANULE
            off = rng.randrange(lo_g, (DISK - n) // GRANULE + 1) * GRANULE
            vm.write("vda", off, random_bytes(n, rng.getrandbits(32)))
        elif op == "small":
            n = rng.choice((512, 4096, 8192))
            off = rng.randrange(lo_s, (DISK - n) // 512 + 1) * 512
            vm.write("vda", off, random_bytes(n, rng.getrandbits(32)))
        elif op == "zero":
            n = rng.randrange(1, 65) * 4096
            off = rng.randrange(SPREAD_FROM // 4096, (DISK - n) // 4096 + 1) * 4096
            vm.zero("vda", off, n)
        else:
            n = rng.randrange(1, 5) * GRANULE
            off = rng.randrange(lo_g, (DISK - n) // GRANULE + 1) * GRANULE
            vm.discard("vda", off, n)
        done.append(f"{op} {off:#x}+{n:#x}")
    return done


def snapshot(g: Guest, rnd: int) -> Truth:
    ref = g.vm.snapshot_refs(f"r{rnd}")["vda"]
    return Truth(rnd, ref, hashlib.sha256(ref.read_bytes()).hexdigest())


# -- the repository, read through the API with nothing running -------------------------------------------

def needed_blobs(repo: Repository) -> dict[bytes, str]:
    """Blob → one point needing it, over every manifest of every VM (what prune keeps: repository/prune.py
    ``_needed``). A damaged manifest is a failure here: nothing in this test damages one."""
    needed: dict[bytes, str] = {}
    vms, unnamed = repo.vm_listing()
    assert not unnamed, f"unreadable points/ entries: {unnamed}"
    for vm in vms:
        scan = repo.scan(vm)
        assert not scan.damaged, f"VM {vm}: damaged points {scan.damaged}"
        for m in scan.points:
            for disk, rec in m.disks.items():
                for _, _, blob in rec.extents:
                    if blob is not None:
                        needed.setdefault(blob, f"point {m.id} of VM {vm} (disk {disk})")
    return needed


def listed_packs(repo: Repository) -> dict[str, int]:
    return {info.name.rsplit("/", 1)[1]: info.size for info in repo.backend.list("data/")
            if info.name == pack_name(info.name.rsplit("/", 1)[1])}


def pack_history(repo: Repository, pack: str) -> str:
    """What prune's records say about *pack*: for a failure message about a missing one."""
    lines = []
    for r in read_records(repo.backend, repo.envelope):
        if pack in r.packs:
            fate = ("deleted" if pack in r.deleted else "rescued" if pack in r.rescued else "?") if r.state == "done" \
                else "pending"
            lines.append(f"{r.name}: condemned at {r.created:.2f} (grace {r.grace:g} s), {fate}"
                         + (f" at {r.done_at:.2f}" if r.done_at else ""))
    return "; ".join(lines) or "in no condemnation record"


def check_needed_packs(repo: Repository) -> None:
    """Every blob a listed point needs is named by the index, and no index object names a pack that is
    gone (prune consolidates the index before it deletes packs: whichever copy of a blob a reader's
    index lookup picks, it exists). Reads no condemnation record: their number grows every round."""
    needed = needed_blobs(repo)
    index, damaged = repo.load_index_report(keep_tables=True)
    assert not damaged, f"damaged index objects: {damaged}"
    assert index.tables is not None
    packs = listed_packs(repo)
    bad = [f"blob {blob.hex()[:16]} of {who}: in no index object" for blob, who in needed.items()
           if index.lookup(blob) is None]
    for pack in sorted(index.packs - set(packs)):
        held = {e.id for table in index.tables[pack] for e in table}
        users = sorted({who for blob, who in needed.items() if blob in held})
        bad.append(f"the index names {pack_name(pack)}, which is gone ({pack_history(repo, pack)}); "
                   f"needed by {users or 'no point'}")
    assert not bad, f"{len(bad)} problem(s):\n  " + "\n  ".join(bad[:10])


def check_point(repo: Repository, vm: str, point: str, truth: Truth) -> None:
    """The point's disk, read through the API, equals its ground truth byte for byte."""
    got = materialize(repo, repo.manifest(vm, point), "vda")
    want = truth.ref.read_bytes()
    if got != want:
        diff = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) if len(got) == len(want) else -1
        raise AssertionError(f"point {point} of VM {vm} (taken in round {truth.round}) differs from its truth "
                             f"{'first at byte ' + hex(diff) if diff >= 0 else f'in size {len(got)} != {len(want)}'} "
                             f"(sha {hashlib.sha256(got).hexdigest()[:12]} != {truth.sha[:12]})")


def unreferenced_packs(repo: Repository) -> dict[str, int]:
    """Listed packs holding no blob any point needs (tables from the index, or the pack's own trailer)."""
    needed = needed_blobs(repo)
    index, damaged = repo.load_index_report(keep_tables=True)
    assert not damaged, damaged
    assert index.tables is not None
    out = {}
    for pack, size in listed_packs(repo).items():
        tables = index.tables.get(pack)
        entries = list(next(iter(tables))) if tables else repo.pack_trailer(pack, size)[0]
        if not any(e.id in needed for e in entries):
            out[pack] = size
    return out


# -- the torture -----------------------------------------------------------------------------------------

@dataclass
class Torture:
    url: str
    guests: list[Guest]
    runs: Path
    rng: random.Random
    truths: dict[tuple[str, str], Truth] = field(default_factory=dict)
    stats: Counter[str] = field(default_factory=Counter)
    rounds_deleting: int = 0
    base: Repository | None = None

    def view(self) -> Repository:
        """A fresh handle on the repository (no cached manifests or index: forget rewrites manifests in
        place), sharing the unlocked keys and the backend of one opened once."""
        if self.base is None:
            self.base = Repository.open(self.url)
        b = self.base
        return Repository(b.backend, b.config, b.url, b.keys, b.slot)

    def backup(self, g: Guest, rnd: int, start_at: float, slow: bool) -> Proc:
        argv = [FLEECE, "backup", "--qmp", g.vm.qmp_path, "--repo", self.url, "--scratch", str(g.scratch), "--json"]
        if slow:  # outlives the grace: its commit may meet a condemnation whose deadline passed
            argv += ["--bwlimit", SLOW_RATE]
        return Proc(f"backup {g.name}" + (f" (--bwlimit {SLOW_RATE})" if slow else ""), argv, start_at, None,
                    self.runs / f"r{rnd:02d}-backup-{g.name}")

    def forget(self, g: Guest, rnd: int, start_at: float) -> Proc:
        argv = [FLEECE, "forget", "--repo", self.url, "--vm", g.name, "--keep-last", "2", "--prune", "--grace", GRACE,
                "--max-unused", "0%", "--json"]
        return Proc(f"forget --vm {g.name} --prune", argv, start_at, None, self.runs / f"r{rnd:02d}-forget")

    def plan(self, rnd: int) -> tuple[list[Proc], Guest]:
        """Three processes with random start offsets; a quarter of the rounds kill a backup, a quarter
        the forget, each at a random moment of its expected run. The forget alternates between the VMs
        (each keeps 2-4 points: every forget removes some), and the backup of its VM is sometimes
        throttled so that it commits after the condemnation its forget makes is due."""
        rng = self.rng
        target = self.guests[rnd % 2]
        backups = [self.backup(g, rnd, rng.uniform(0, 0.5), g is target and rng.random() < SLOW)
                   for g in self.guests]
        forget = self.forget(target, rnd, rng.uniform(0, 0.3))
        dice = rng.random()
        if dice < 0.25:
            rng.choice(backups).kill_after = rng.uniform(0.2, 1.6)
        elif dice < 0.5:
            forget.kill_after = rng.uniform(0.3, 2.2)
        return [*backups, forget], target

    def initial_fulls(self) -> None:
        for g in self.guests:
            truth = snapshot(g, 0)
            doc = ok(fleece("backup", "--qmp", g.vm.qmp_path, "--repo", self.url, "--scratch", str(g.scratch),
                            "--json"))
            assert doc["kind"] == "full", doc
            self.truths[(g.name, doc["id"])] = truth
            g.points = {doc["id"]}

    def round(self, rnd: int) -> None:
        writes = {g.name: guest_writes(g, self.rng, rnd) for g in self.guests}
        truths = {g.name: snapshot(g, rnd) for g in self.guests}
        procs, target = self.plan(rnd)
        t0 = time.monotonic()
        race(procs)
        t1 = time.monotonic()
        where = (f"round {rnd}: writes {writes}; plan: " + "; ".join(p.plan() for p in procs)
                 + "; outcome: " + "; ".join(p.outcome() for p in procs))
        try:
            forget = self.judge_forget(procs[-1])
            repo = self.view()
            check = set()
            for g, proc in zip(self.guests, procs):
                forgot = target is g and (forget is not None or procs[-1].killed)
                check |= self.account(repo, g, proc, truths[g.name], forgot, forget)
            if forget is not None:
                check |= {(target.name, p) for p in forget["rewritten"]}
            elif procs[-1].killed:  # what it rewrote is unknown: check every point of its VM
                check |= {(target.name, p) for p in target.points}
            check_needed_packs(repo)
            for vm, point in sorted(check):
                check_point(repo, vm, point, self.truths[(vm, point)])
            self.stats["points checked in rounds"] += len(check)
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.role} (exit {p.rc}), stderr:\n{p.stderr()[-2500:]}" for p in procs)
            raise AssertionError(f"{where}\n{exc}\n{logs}\n(full logs: {self.runs})") from None
        for truth in truths.values():  # the ground truth of no point: its copy goes
            if not any(kept is truth for kept in self.truths.values()):
                truth.ref.unlink()
        print(f"round {rnd:2d} ({t1 - t0:.1f} s + {time.monotonic() - t1:.1f} s checks): " + "; ".join(p.outcome() for p in procs)
              + (f"; prune deleted {forget['prune']['deleted_packs']} condemned {forget['prune']['condemned_packs']} "
                 f"rescued {forget['prune']['rescued_packs']}" if forget else ""), flush=True)

    def judge_forget(self, p: Proc) -> dict[str, Any] | None:
        """The forget's report, or ``None`` when it died by our kill or found the maintenance lock held."""
        if p.killed:
            self.stats["forget killed"] += 1
            return None
        if p.rc == 1 and p.kind() == "locked":
            self.stats["forget locked"] += 1
            assert self.stats["forget locked"] <= MAX_FORGET_LOCKED, "forget found the lock held too often"
            return None
        assert p.rc == 0, f"{p.role} failed (exit {p.rc}, kind {p.kind()}):\n{p.stderr()}"
        doc = p.doc()
        assert doc is not None and doc.get("prune") is not None, p.stdout()
        pruned = doc["prune"]
        self.stats["forget ok"] += 1
        self.stats["points removed"] += len(doc["removed"])
        self.stats["points rewritten (merged)"] += len(doc["rewritten"])
        for k in ("condemned_packs", "deleted_packs", "rescued_packs", "repacked_packs"):
            self.stats[k] += pruned[k]
        self.rounds_deleting += pruned["deleted_packs"] > 0
        return doc

    def account(self, repo: Repository, g: Guest, p: Proc, truth: Truth, forgot: bool,
                forget: dict[str, Any] | None) -> set[tuple[str, str]]:
        """Judge one backup, map its point to the round's truth, check the VM's points against what the
        processes say they did (*forgot*: a forget of this VM ran — to its end, *forget* its report, or
        until our kill). Returns the (vm, point) to read back."""
        assert g.vm.status() == "running", f"VM {g.name} is {g.vm.status()} after {p.role}"
        now = set(repo.point_ids(g.name))
        new, gone = now - g.points, g.points - now
        committed: str | None = None
        if p.rc == 0:
            doc = p.doc()
            assert doc is not None and "id" in doc, p.stdout()
            committed = doc["id"]
            assert committed in now, f"{p.role} committed point {committed}, which is not listed"
            assert_clean(g.vm.guest)
            self.stats[f"backup ok ({doc['kind']})"] += 1
        elif p.killed:
            self.stats["backup killed"] += 1
            if new:  # killed after its manifest landed: the point is the round's state all the same
                committed = next(iter(new))
                self.stats["backup killed after its commit"] += 1
        elif p.rc == 1 and p.kind() in BACKUP_REFUSALS:
            self.stats[f"backup refused: {p.kind()}"] += 1
        else:
            raise AssertionError(f"{p.role} failed unexpectedly (exit {p.rc}, kind {p.kind()}):\n{p.stderr()}")
        assert new <= ({committed} if committed else set()), \
            f"VM {g.name}: points {sorted(new)} appeared, but {p.outcome()}"
        if gone:
            assert forgot, f"VM {g.name}: points {sorted(gone)} vanished, but no forget of this VM ran"
            if forget is not None:
                assert gone <= set(forget["removed"]), \
                    f"VM {g.name}: points {sorted(gone - set(forget['removed']))} vanished; forget removed " \
                    f"{forget['removed']}"
        for point in gone:
            self.truths.pop((g.name, point)).ref.unlink()
        g.points = now
        if committed:
            self.truths[(g.name, committed)] = truth
            return {(g.name, committed)}
        return set()

    def final_restores(self, out: Path) -> int:
        """Every listed point through ``fleece restore --flat``, compared with its truth by qemu-img."""
        listing = ok(fleece("list", "--repo", self.url, "--json"))
        assert not listing["damaged"], listing["damaged"]
        points = [(p["vm"], p["id"]) for p in listing["points"]]
        assert set(points) == {(g.name, i) for g in self.guests for i in g.points}
        for vm, point in points:
            target = out / f"{vm}-{point}"
            ok(fleece("restore", "--repo", self.url, "--vm", vm, "--point", point, "--out", str(target), "--flat",
                      "--json"))
            identical(target / "vda.qcow2", self.truths[(vm, point)].ref)
        return len(points)


def test_backups_forget_and_prune_race_under_sigkill(make_vm, s3_bucket, rgw, tmp_path) -> None:
    seed = int(os.environ.get("FLEECE_TORTURE_SEED") or secrets.randbits(32))
    url = f"s3://{s3_bucket}/torture-{secrets.token_hex(6)}"
    print(f"\nprune torture: seed {seed}, {ROUNDS} rounds, {url}", flush=True)
    ok(fleece("init", "--repo", url, "--json"))
    guests = [make_guest(make_vm, tmp_path, 0, "discard=unmap"),
              make_guest(make_vm, tmp_path, 1, "detect-zeroes=unmap,discard=unmap")]
    runs = tmp_path / "runs"
    runs.mkdir()
    t = Torture(url, guests, runs, random.Random(seed))
    started = time.monotonic()
    t.initial_fulls()
    for rnd in range(1, ROUNDS + 1):
        t.round(rnd)
    raced = time.monotonic() - started

    # Nothing races any more. The model first: the references are what QEMU really holds.
    for g in guests:
        g.vm.quit()
        assert g.vm.read_disk_stopped("vda") == g.vm.disks["vda"].reference.read_bytes(), \
            f"the test's reference of {g.name} is not what QEMU holds: the ground truth is wrong, not fleece"
    restored = t.final_restores(tmp_path / "restored")
    verify = fleece("verify", "--repo", url, "--read-data", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout[-3000:] + verify.stderr[-2000:]

    first = ok(fleece("prune", "--repo", url, "--grace", GRACE, "--json"))
    time.sleep(3.5)
    second = ok(fleece("prune", "--repo", url, "--grace", GRACE, "--json"))
    repo = t.view()
    left = unreferenced_packs(repo)
    assert not left, (f"{len(left)} unreferenced pack(s) left after two prunes a grace apart: "
                      + ", ".join(f"{pack_name(p)} ({pack_history(repo, p)})" for p in sorted(left)))
    assert second["condemned_packs"] == 0 and not second["waiting"], second
    check_needed_packs(repo)

    records = read_records(repo.backend, repo.envelope)
    rescued = sum(len(r.rescued) for r in records)
    conflicts = t.stats["backup refused: prune-conflict"]
    summary = dict(sorted(t.stats.items())) | {
        "rounds with deletions": t.rounds_deleting, "records": len(records), "packs rescued (records)": rescued,
        "points restored at the end": restored, "final prunes deleted": first["deleted_packs"] + second["deleted_packs"],
        "seconds racing": round(raced), "seconds total": round(time.monotonic() - started)}
    print("prune torture summary:\n  " + "\n  ".join(f"{k}: {v}" for k, v in summary.items()), flush=True)
    # The protocol was exercised, not just survived.
    assert t.rounds_deleting >= 5, summary
    assert rescued + conflicts >= 1, f"no backup raced a condemnation: {summary}"
    assert t.stats["backup killed"] >= 3 and t.stats["forget killed"] >= 3, summary
