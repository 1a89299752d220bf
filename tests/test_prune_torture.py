"""Torture of the lock-free deletion protocol (repository/gc.py, repository/prune.py) on a real Ceph RGW:
two VMs back up into one S3 repository while ``fleece forget --prune`` deletes under them, and any of the
three processes may die by SIGKILL at a random moment. Everything goes through the installed CLI.

Why a torture and not only prune's event-hook tests: the protocol's promise is about interleavings nobody
enumerates — a point committed while a prune whose grace is over deletes (it must rescue the pack the
point needs), a prune listing the pack of a backup whose manifest has not landed yet (it condemns it; the
next prune must rescue or repack it), a forget merging the parent chain of a running backup, a prune
killed between consolidating the index and deleting packs, a backup killed right after its manifest
landed, a dead forget's lock. Each round races three real processes with random start offsets (and some
backups throttled by ``--bwlimit`` so they outlive the forget), then checks, with nothing running, what
must hold whatever happened:

* a backup committed (exit 0, its point listed), died by our SIGKILL, or was refused with prune-conflict,
  busy or locked; the VM runs on and the next backup of it is exact (incremental or a logged full);
* a point vanishes only when a forget of its VM removed it;
* every blob a listed point needs is located by the index in a pack that exists;
* every listed point reads back exactly as its disk was when it was taken. Ground truth: the reference
  image tests/vm.py keeps, copied before the round's backups start (no guest writes during the race, so
  every backup of the round sees that state). Each blob is read at the location the index gives it, unless
  that very location (pack, offset, length, key) was read and verified in an earlier round: packs never
  change (their name is their content's hash) and that they are still listed is checked above, so a round
  reads only what its backups and its prune's repack wrote, and still checks every point.

The rounds are dealt, not diced, so that a dozen of them reliably meet what the final assertions require
(50 diced rounds did so barely: this machine saw 2 rescued packs in one such run):

* kills: every block of four rounds kills one backup and one forget, in random rounds of the block, at a
  random fraction of that role's median duration on this machine (so that a kill lands in the run, not
  in the interpreter's start-up); a kill that came after the process had exited is dealt again;
* the race with the deleting phase (``ECHO``, ``STALL``, ``AIM``): a backup rewrites a blob whose only
  copy is in a pack the previous forget condemned; when this round's forget has condemned, it is stopped
  (SIGSTOP) for a moment — a slow host — and the backup is started to commit in that moment: the prune's
  deleting phase, listing the points again, must rescue the pack;
* two incrementals of each VM before the first round, so that prunes condemn and delete from the first
  rounds on;
* rounds go on past ``ROUNDS`` (at most ``EXTRA`` more) until the final assertions' preconditions hold.

At the end every listed point restores bit-exact through ``fleece restore --flat``, ``verify --read-data``
is clean, and two prunes one grace apart leave no pack in data/ that no point references.

To reproduce: the seed is printed at the start (FLEECE_TORTURE_SEED=<seed> replays the same writes and
plans; the timing of the race stays the machine's, and with it the kill, stall and aimed start moments,
which scale with it), FLEECE_TORTURE_ROUNDS=N runs longer (the default, 12, takes 1.5-3 min on 2 cores).
A failure prints the round's plan (start offsets, throttles, which process was killed or stopped when)
and the processes' output, whose full logs stay in the test's tmp directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from checks import FLEECE, assert_clean, fleece, identical, ok
from conftest import MiB
from fleece.exporter.pause import MARK as PAUSE_MARK
from fleece.repository import Manifest, Repository
from fleece.repository.gc import PREFIX as CONDEMNED, Condemnation, pending_packs, read_records
from fleece.repository.index import Index, Location
from fleece.repository.pack import pack_name
from vm import TestVM, random_bytes, text_bytes

pytestmark = [pytest.mark.slow, pytest.mark.s3]

ROUNDS = int(os.environ.get("FLEECE_TORTURE_ROUNDS", "12"))
DISK = 16 * MiB
GRANULE = 65536  # the qcow2 cluster and bitmap granularity of TestVM disks
#: the prunes' grace: shorter than a round even on an idle machine, so that what one forget condemns is due
#: when the next one deletes
GRACE, GRACE_S = "2s", 2.0
#: the hot region: each VM cycles it through three contents, so the blob a round writes there is the one a
#: point three rounds older wrote — the point forget is removing now (an incremental deduplicates only
#: against its parent chain, which no longer shows it: the blob is stored again, next to a condemned copy)
HOT, HOT_LEN = MiB, 4 * GRANULE
#: the churn region: fresh data every round, so the blob of a point forget removes is no longer needed and
#: its pack becomes (partly) unused: prune repacks and condemns in every round that forgets
CHURN, CHURN_LEN = HOT + HOT_LEN + GRANULE, 2 * GRANULE
#: the echo region: in round r each VM writes there a churn the previous forget removed — of round r-4 (the
#: aimed backup's VM, see AIM) or r-5 of the VM that forget was for. That blob's only copy is in a pack the
#: previous forget condemned, whose grace is over when this round's forget deletes: if the backup's pack
#: lands after the prune listed data/ and its point before the prune lists the points again, the prune
#: rescues the condemned pack (a point committed in the last second of a grace). Committed earlier, the
#: backup's own pack holds the blob and the condemned one goes.
ECHO, ECHO_AGE = CHURN + CHURN_LEN + GRANULE, 4
#: every other write stays clear of these (their dirty runs stay blobs of their own)
SPREAD_FROM = 2 * MiB
#: contents both VMs write at granule-aligned offsets: blobs shared across VMs and rounds (dedup)
POOL = [random_bytes(4 * GRANULE, 7100 + i) for i in range(4)]
#: the share of the forgotten VM's backups throttled, and to what: its pack lands after the forget listed
#: data/ and its manifest after the forget ended — it commits onto a parent chain the forget merged. (Its
#: refusal, prune-conflict, would need its own pack condemned most of a grace before its manifest — they
#: land well within a second of each other — so refusals are rare: counted, not required)
SLOW, SLOW_RATE = 0.2, "160K"
BACKUP_REFUSALS = {"prune-conflict", "busy", "locked"}
HUNG = 120.0  # seconds: a process of a round running longer is hung
MAX_FORGET_LOCKED = 3
#: one block of rounds' kills, dealt in random order: a backup, a forget, and two rounds left alone
KILLS = ("backup", "forget", None, None)
#: where in a run a kill lands, as fractions of the role's median duration on this machine (the first
#: ~20 % of a backup is the interpreter starting; a backup's commit is in its last tenth)
KILL_WINDOW = {"backup": (0.2, 1.0), "forget": (0.1, 1.0)}
#: when the forget's condemnation record appears (its deleting phase begins: it lists the points again),
#: the forget is stopped for this fraction of the time it took to get there (its median so far), within
#: the bounds in seconds: a slow host, a window for the aimed backup's commit
STALL, STALL_BOUNDS = 0.4, (0.8, 2.5)
#: the aimed backup (of torture-b, whose points the deleting phase lists last) is started so that its
#: manifest lands this far into the stall (fractions of it), by the medians of earlier rounds: the time
#: a forget takes to condemn, and as a fraction of it (it varies less with the load) a backup's to commit
AIM = (0.15, 0.85)
AIMED = 1
#: rounds run after ROUNDS while the final assertions' preconditions are not met (a kill owed, no rescue yet);
#: a loaded machine (CI sharing it with a benchmark) once met no rescue in 6 extra rounds: they cost ~4 s each
EXTRA = 12
RESTORE_JOBS = 3  # final `fleece restore` processes at a time


# -- one round's processes -------------------------------------------------------------------------------

@dataclass
class Proc:
    """One fleece process of a round, with the plan that starts (and maybe kills) it."""

    role: str
    argv: list[str]
    start_at: float  #: seconds after the round's start
    kill_after: float | None  #: seconds after its own start (None: left alone)
    log: Path  #: prefix of its .out / .err files
    clock: str = ""  #: whose median duration times its kill: "backup", "backup (slow)" or "forget"
    aimed: bool = False  #: started to commit in the forget's stall (``AIM``)
    #: SIGSTOP when *stall_when* says so, SIGCONT this many seconds later (``STALL``)
    stall_for: float | None = None
    stall_when: threading.Event | None = None
    popen: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    ended: float = 0.0
    kill_sent: bool = False
    stopped: float | None = None  #: when it was stopped (seconds after the round's start)
    resumed: bool = False

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
        stall = f", SIGSTOP for {self.stall_for:.2f} s once it condemned" if self.stall_for is not None else ""
        return f"{self.role} at +{self.start_at:.2f} s{' (aimed)' if self.aimed else ''}{kill}{stall}"

    def outcome(self) -> str:
        stall = (f" (stopped {self.stall_for:.1f} s at {self.stopped - self.started:.2f} s)"
                 if self.stopped is not None and self.stall_for is not None else "")
        if self.killed:
            return f"{self.role}: SIGKILLed after {self.ended - self.started:.2f} s{stall}"
        kind = f" ({self.kind()})" if self.rc else ""
        return f"{self.role}: exit {self.rc}{kind} after {self.ended - self.started:.2f} s{stall}"

    def launch(self, now: float) -> None:
        with open(self.log.with_suffix(".out"), "wb") as out, open(self.log.with_suffix(".err"), "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.started = now


def race(procs: list[Proc]) -> None:
    """Start each process at its offset, SIGKILL the planned one at its moment, stop and continue the
    stalled one, wait for all. One loop in this thread, so the moments are those of the plan (to ~10 ms),
    not of a scheduler's."""
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
            elif p.stall_when is not None and p.stopped is None and p.stall_when.is_set():
                p.popen.send_signal(signal.SIGSTOP)
                p.stopped = now
            elif p.stopped is not None and not p.resumed and now - p.stopped >= (p.stall_for or 0.0):
                p.popen.send_signal(signal.SIGCONT)
                p.resumed = True
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
    #: round → the seed of the churn it wrote
    churn: dict[int, int] = field(default_factory=dict)

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


def guest_writes(g: Guest, rng: random.Random, rnd: int, echo: tuple[Guest, int] | None = None) -> list[str]:
    """A round's writes through the guest: the hot region's next content, fresh churn, the *echo* (a guest
    and a round: that churn again, in the echo region), then 1-4 random operations (pool data, fresh data,
    sub-granule writes, ``write -z`` zeros, discards). Returns what was done."""
    vm = g.vm
    vm.write("vda", HOT, g.hot[rnd % 3])
    g.churn[rnd] = rng.getrandbits(32)
    vm.write("vda", CHURN, random_bytes(CHURN_LEN, g.churn[rnd]))
    done = [f"hot#{rnd % 3}", "churn"]
    if echo is not None and echo[1] in echo[0].churn:
        vm.write("vda", ECHO, random_bytes(CHURN_LEN, echo[0].churn[echo[1]]))
        done.append(f"echo of {echo[0].name}'s churn of round {echo[1]}")
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


def snapshot(g: Guest, rnd: int, tag: str | None = None) -> Truth:
    ref = g.vm.snapshot_refs(tag or f"r{rnd}")["vda"]
    return Truth(rnd, ref, hashlib.sha256(ref.read_bytes()).hexdigest())


# -- the repository, read through the API with nothing running -------------------------------------------

@dataclass
class Survey:
    """Every listed point, by VM, and blob → one point needing it (what prune keeps: repository/prune.py
    ``_needed``)."""

    points: dict[str, list[Manifest]]
    needed: dict[bytes, str]


def survey(repo: Repository) -> Survey:
    """Every manifest of every VM. A damaged manifest is a failure here: nothing in this test damages one."""
    vms, unnamed = repo.vm_listing()
    assert not unnamed, f"unreadable points/ entries: {unnamed}"
    points: dict[str, list[Manifest]] = {}
    needed: dict[bytes, str] = {}
    for vm in vms:
        scan = repo.scan(vm)
        assert not scan.damaged, f"VM {vm}: damaged points {scan.damaged}"
        points[vm] = scan.points
        for m in scan.points:
            for disk, rec in m.disks.items():
                for _, _, blob in rec.extents:
                    if blob is not None:
                        needed.setdefault(blob, f"point {m.id} of VM {vm} (disk {disk})")
    return Survey(points, needed)


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


def check_needed_packs(repo: Repository, seen: Survey | None = None) -> Index:
    """Every blob a listed point needs is named by the index, and no index object names a pack that is
    gone (prune consolidates the index before it deletes packs: whichever copy of a blob a reader's
    index lookup picks, it exists). Reads no condemnation record unless it fails: their number grows
    every round. Returns the index (with its tables), for reading the points back."""
    needed = (seen or survey(repo)).needed
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
    return index


#: a blob at one location, read and verified → its plaintext
Verified = dict[tuple[bytes, Location], bytes]


def read_disk(repo: Repository, index: Index, manifest: Manifest, disk: str, verified: Verified,
              used: Verified) -> tuple[bytes, int]:
    """The whole virtual disk at *manifest*, through the repository API: the pieces of its chain
    (``repo.resolve``), each blob at the location *index* gives it, read and verified by ``repo.read_blobs``
    — unless that very location was in an earlier round (*verified*). Every location used goes into
    *used*. Returns the disk and how many blobs were read from storage."""
    out = bytearray(manifest.disks[disk].virtual_size)
    pieces = repo.resolve(manifest, disk)
    located: dict[bytes, Location] = {}
    for p in pieces:
        if p.blob is not None and p.blob not in located:
            loc = index.lookup(p.blob)
            assert loc is not None, f"blob {p.blob.hex()[:16]} of point {manifest.id}: in no index object"
            located[p.blob] = loc
    todo = {b: loc for b, loc in located.items() if (b, loc) not in verified and (b, loc) not in used}
    for rng in repo.plan_reads(list(todo), located=todo):
        for blob, data in repo.read_blobs(rng):
            used[(blob, todo[blob])] = data
    plain = {}
    for b, loc in located.items():
        plain[b] = used.setdefault((b, loc), verified.get((b, loc)))  # type: ignore[arg-type]
    for p in pieces:
        if p.blob is not None:
            out[p.offset:p.offset + p.length] = plain[p.blob][p.skip:p.skip + p.length]
        # ZERO pieces and unlisted ranges stay zero
    return bytes(out), len(todo)


def check_point(got: bytes, vm: str, point: str, truth: Truth) -> None:
    """The point's disk, read through the API, equals its ground truth byte for byte."""
    want = truth.ref.read_bytes()
    if got != want:
        diff = next(i for i in range(min(len(got), len(want))) if got[i] != want[i]) if len(got) == len(want) else -1
        raise AssertionError(f"point {point} of VM {vm} (taken in round {truth.round}) differs from its truth "
                             f"{'first at byte ' + hex(diff) if diff >= 0 else f'in size {len(got)} != {len(want)}'} "
                             f"(sha {hashlib.sha256(got).hexdigest()[:12]} != {truth.sha[:12]})")


def why_condemned(repo: Repository) -> str:
    """For a failure message: the packs of pending records, with what they hold that points need and
    where else the index has those blobs, and their history."""
    needed = survey(repo).needed
    index, _ = repo.load_index_report(keep_tables=True)
    assert index.tables is not None
    holders: dict[bytes, set[str]] = defaultdict(set)
    for pack, tables in index.tables.items():
        for table in tables:
            for e in table:
                holders[e.id].add(pack)
    listed = listed_packs(repo)
    lines = []
    for pack in sorted(pending_packs(read_records(repo.backend, repo.envelope))):
        tables = index.tables.get(pack)
        entries = list(next(iter(tables))) if tables else repo.pack_trailer(pack, listed[pack])[0]
        mine = [e for e in entries if e.id in needed]
        elsewhere = sorted({pack_name(q)[-12:] for e in mine for q in holders[e.id] - {pack}})
        lines.append(f"{pack_name(pack)} ({'indexed' if tables else 'in no index object'}, {len(entries)} blobs, "
                     f"{len(mine)} needed, {sum(e.length for e in mine)} needed bytes, also in {elsewhere}): "
                     f"{pack_history(repo, pack)}")
    return "\n".join(lines)


def unreferenced_packs(repo: Repository) -> dict[str, int]:
    """Listed packs holding no blob any point needs (tables from the index, or the pack's own trailer)."""
    needed = survey(repo).needed
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

class Watch:
    """A thread listing ``condemned/`` until a record appears that was not there when it started: a
    forget's condemnation (its deleting phase starts right after). *after* seconds pass before it polls."""

    def __init__(self, repo: Repository, after: float) -> None:
        self.repo = repo
        self.known = {info.name for info in repo.backend.list(CONDEMNED)}
        self.seen = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(after,), name="torture-watch", daemon=True)
        self.thread.start()

    def _run(self, after: float) -> None:
        if self.done.wait(after):
            return
        while not self.done.is_set():
            if any(info.name not in self.known for info in self.repo.backend.list(CONDEMNED)):
                self.seen.set()
                return
            self.done.wait(0.01)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


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
    #: this block's kills (``KILLS`` shuffled), and the kills whose process had exited: dealt again
    deck: list[str | None] = field(default_factory=list)
    owed: list[str] = field(default_factory=list)
    #: Proc.clock → how long its runs took that nobody killed (the kill moments scale with them)
    durations: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    #: the blob locations the last round's checks read and verified
    verified: Verified = field(default_factory=dict)
    #: Proc.clock → (seconds from a forget's start to its condemnation record, from a backup's start to its
    #: manifest landing), per round (for ``STALL`` and ``AIM``)
    phases: defaultdict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    records: dict[str, Condemnation] = field(default_factory=dict)  #: read_records' cache
    #: condemned packs found needed by a listed point after a round (each is rescued or repacked later)
    revived: set[str] = field(default_factory=set)
    rescued: int = 0  #: packs the records say were rescued

    def view(self) -> Repository:
        """A fresh handle on the repository (no cached manifests or index: forget rewrites manifests in
        place), sharing the unlocked keys and the backend of one opened once."""
        if self.base is None:
            self.base = Repository.open(self.url)
        b = self.base
        return Repository(b.backend, b.config, b.url, b.keys, b.slot)

    def backup(self, g: Guest, rnd: int, start_at: float, slow: bool, log: str | None = None) -> Proc:
        argv = [FLEECE, "backup", "--qmp", g.vm.qmp_path, "--repo", self.url, "--scratch", str(g.scratch), "--json"]
        if slow:  # outlives the forget: its commit lands on a parent chain the forget merged
            argv += ["--bwlimit", SLOW_RATE]
        return Proc(f"backup {g.name}" + (f" (--bwlimit {SLOW_RATE})" if slow else ""), argv, start_at, None,
                    self.runs / (log or f"r{rnd:02d}-backup-{g.name}"), clock="backup (slow)" if slow else "backup")

    def forget(self, g: Guest, rnd: int, start_at: float) -> Proc:
        argv = [FLEECE, "forget", "--repo", self.url, "--vm", g.name, "--keep-last", "2", "--prune", "--grace", GRACE,
                "--max-unused", "0%", "--json"]
        return Proc(f"forget --vm {g.name} --prune", argv, start_at, None, self.runs / f"r{rnd:02d}-forget",
                    clock="forget")

    def typical(self, clock: str) -> float:
        """The median duration of *clock*'s recent runs (before any: guessed from the backups')."""
        seen = self.durations[clock][-8:]
        if seen:
            return statistics.median(seen)
        backup = statistics.median(self.durations["backup"][-8:])
        return {"backup (slow)": 2.0, "forget": 1.5}[clock] * backup

    def plan(self, rnd: int) -> tuple[list[Proc], Guest]:
        """Three processes with random start offsets; in every block of four rounds one backup and one
        forget are killed (a kill that came too late is dealt again next round), each at a random moment
        of its expected run. The forget alternates between the VMs (each keeps 2-4 points: every forget
        removes some), and the backup of its VM is sometimes throttled so that it commits after the
        forget. The forget stalls once it condemned, and one backup is aimed at the stall (``STALL``,
        ``AIM``). The random draws per round are the same whatever happens: a seed replays the plans."""
        rng = self.rng
        target = self.guests[rnd % 2]
        if (rnd - 1) % len(KILLS) == 0:
            self.deck = list(KILLS)
            rng.shuffle(self.deck)
        starts = [rng.uniform(0, 0.5) for _ in self.guests]
        slow = rng.random() < SLOW
        forget_at = rng.uniform(0, 0.3)
        victim, moments = rng.randrange(len(self.guests)), {kind: rng.random() for kind in KILL_WINDOW}
        into = rng.uniform(*AIM)
        backups = [self.backup(g, rnd, at, g is target and slow) for g, at in zip(self.guests, starts)]
        forget = self.forget(target, rnd, forget_at)
        aim = backups[AIMED]
        if self.phases[aim.clock]:
            condemned = statistics.median(c for c, _ in self.phases[aim.clock][-6:])
            commit = statistics.median(m / c for c, m in self.phases[aim.clock][-6:])
            forget.stall_for = min(max(STALL * condemned, STALL_BOUNDS[0]), STALL_BOUNDS[1])
            aim.start_at = max(0.0, forget_at + condemned * (1 - commit) + into * forget.stall_for)
            aim.aimed = True
        kills = {self.deck[(rnd - 1) % len(KILLS)]} - {None}
        for kind in list(self.owed):
            if kind not in kills:
                kills.add(kind)
                self.owed.remove(kind)
        for kind in kills:
            p = backups[victim] if kind == "backup" else forget
            lo, hi = KILL_WINDOW[kind]
            p.kill_after = (lo + (hi - lo) * moments[kind]) * self.typical(p.clock)
        return [*backups, forget], target

    def initial_points(self) -> None:
        """A full of each VM, then (after a round's writes each) two incrementals of each, both VMs at once:
        the first forgets already remove incremental points (removing the full frees nothing: the next
        point still shows its blobs), so prunes condemn and delete from the first rounds on."""
        for step, kind in enumerate(("full", "incremental", "incremental")):
            if step:
                for g in self.guests:
                    guest_writes(g, self.rng, step - 2)  # rounds -1 and 0: the hot region's contents before 1's
            truths = {g.name: snapshot(g, 0, f"r0-{step}") for g in self.guests}
            procs = [self.backup(g, 0, 0.0, False, log=f"r00-{step}-{kind}-{g.name}") for g in self.guests]
            race(procs)
            for g, p in zip(self.guests, procs):
                assert p.rc == 0, f"{p.role} ({kind}): exit {p.rc}\n{p.stderr()[-3000:]}"
                doc = p.doc()
                assert doc is not None and doc["kind"] == kind, p.stdout()
                self.truths[(g.name, doc["id"])] = truths[g.name]
                g.points.add(doc["id"])
                if step:
                    self.durations["backup"].append(p.ended - p.started)

    def learn(self, procs: list[Proc]) -> None:
        """Durations of the runs left alone; kills that came after the process had exited are owed."""
        for p in procs:
            if p.kill_after is not None and not p.killed:
                self.owed.append("forget" if p.clock == "forget" else "backup")
                self.stats["kills dealt again (the process had exited)"] += 1
            elif p.kill_after is None and p.rc == 0:
                self.durations[p.clock].append(p.ended - p.started - (p.stall_for or 0.0) * (p.stopped is not None))
            if p.stopped is not None:
                self.stats["forget stopped once it condemned"] += 1

    def round(self, rnd: int) -> None:
        forgotten = self.guests[(rnd - 1) % 2]  # the previous forget removed its points of those rounds
        writes = {g.name: guest_writes(g, self.rng, rnd, (forgotten, rnd - ECHO_AGE - (i != AIMED)))
                  for i, g in enumerate(self.guests)}
        truths = {g.name: snapshot(g, rnd) for g in self.guests}
        procs, target = self.plan(rnd)
        forget = procs[-1]
        watch = None
        if forget.stall_for is not None:
            watch = Watch(self.view(), forget.start_at + 0.7 * statistics.median(
                c for c, _ in self.phases[procs[AIMED].clock][-6:]))
            forget.stall_when = watch.seen
        t0, w0 = time.monotonic(), time.time()
        try:
            race(procs)
        finally:
            if watch is not None:
                watch.stop()
        t1 = time.monotonic()
        self.learn(procs)
        where = (f"round {rnd}: writes {writes}; plan: " + "; ".join(p.plan() for p in procs)
                 + "; outcome: " + "; ".join(p.outcome() for p in procs))
        try:
            report = self.judge_forget(forget)
            repo = self.view()
            for g, proc in zip(self.guests, procs):
                forgot = target is g and (report is not None or forget.killed)
                self.account(repo, g, proc, truths[g.name], forgot, report)
            seen = survey(repo)
            index = check_needed_packs(repo, seen)
            self.check_points(repo, seen, index)
            note = self.observe(repo, procs, w0, seen, index)
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.role} (exit {p.rc}), stderr:\n{p.stderr()[-2500:]}" for p in procs)
            raise AssertionError(f"{where}\n{exc}\n{logs}\n(full logs: {self.runs})") from None
        for truth in truths.values():  # the ground truth of no point: its copy goes
            if not any(kept is truth for kept in self.truths.values()):
                truth.ref.unlink()
        print(f"round {rnd:2d} ({t1 - t0:.1f} s + {time.monotonic() - t1:.1f} s checks): " + "; ".join(p.outcome() for p in procs)
              + (f"; prune deleted {report['prune']['deleted_packs']} condemned {report['prune']['condemned_packs']} "
                 f"rescued {report['prune']['rescued_packs']}" if report else "") + note, flush=True)

    def observe(self, repo: Repository, procs: list[Proc], w0: float, seen: Survey, index: Index) -> str:
        """What the round did to the protocol: packs condemned although a listed point needs them (a later
        prune rescues or repacks them), the rescues so far; and when the forget condemned and the backups'
        manifests landed, from their starts (for ``STALL`` and ``AIM``). Returns a note on the aimed
        backup for the round's line."""
        records = read_records(repo.backend, repo.envelope, self.records)
        self.rescued = sum(len(r.rescued) for r in records)
        pending = pending_packs(records)
        assert index.tables is not None
        live = {e.id for p in index.packs - pending for e in next(iter(index.tables[p]))}
        needed = {p for p in pending & index.packs
                  if any(e.id in seen.needed and e.id not in live for e in next(iter(index.tables[p])))}
        self.stats["packs condemned under a point that needs them"] += len(needed - self.revived)
        self.revived |= needed
        forget, new = procs[-1], [r.created for r in records if r.created > w0]
        if not new:
            return ""
        condemned, note = min(new) - (w0 + forget.started), ""
        for g, p in zip(self.guests, procs):
            doc = p.doc() if p.rc == 0 else None
            if doc is None:
                continue
            name = repo.envelope.manifest_name(g.name, doc["id"])
            landed = next((i.mtime for i in repo.backend.list(name.rsplit("/", 1)[0] + "/") if i.name == name), None)
            if landed is None:
                continue
            self.phases[p.clock].append((condemned, landed - (w0 + p.started)))
            if p.aimed:
                note = f"; {p.role} committed {landed - min(new):+.2f} s after the condemnation"
        return note

    def wanting(self) -> str:
        """Why the rounds so far fall short of the final assertions' preconditions ("" when they do not)."""
        why = [f"{kind} kill owed" for kind in self.owed]
        if not (self.rescued or self.stats["backup refused: prune-conflict"]):
            why.append("no pack rescued yet")
        if self.rounds_deleting < 5:
            why.append(f"{self.rounds_deleting} rounds with deletions")
        return ", ".join(why)

    def check_points(self, repo: Repository, seen: Survey, index: Index) -> None:
        """Every listed point reads back as its truth (see ``read_disk``: only locations no earlier round
        verified are read)."""
        used: Verified = {}
        for vm, points in seen.points.items():
            for m in points:
                truth = self.truths.get((vm, m.id))
                assert truth is not None, f"point {m.id} of VM {vm} is listed, but no backup of this test made it"
                got, read = read_disk(repo, index, m, "vda", self.verified, used)
                check_point(got, vm, m.id, truth)
                self.stats["points read back in rounds"] += 1
                self.stats["blobs read back in rounds (new locations)"] += read
        self.verified = used

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
                forget: dict[str, Any] | None) -> None:
        """Judge one backup, map its point to the round's truth, check the VM's points against what the
        processes say they did (*forgot*: a forget of this VM ran — to its end, *forget* its report, or
        until our kill)."""
        status = g.vm.status()
        if status == "paused" and p.rc != 0:
            # killed inside its ~30 ms pause (exporter/pause.py): the guest is paused under the run's marker
            # until the run's pause guard resumes it, within moments (the guard is never killed here)
            deadline = time.monotonic() + 15
            while status == "paused" and time.monotonic() < deadline:
                time.sleep(0.05)
                status = g.vm.status()
            assert g.vm.guest is not None
            marks = [o["name"] for o in g.vm.guest.cmd("qom-list", {"path": "/objects"})
                     if o["name"].startswith(PAUSE_MARK)]
            assert status == "running", f"VM {g.name} is still {status} 15 s after {p.role} (exit {p.rc}) " \
                                        f"was killed inside its pause (markers {marks}): its guard did not resume it"
            self.stats["backup killed inside the pause (guest resumed by its guard)"] += 1
        else:
            assert status == "running", f"VM {g.name} is {status} after {p.role} (exit {p.rc})"
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

    def final_restores(self, out: Path) -> int:
        """Every listed point through ``fleece restore --flat`` (a few at a time), compared with its truth
        by qemu-img."""
        listing = ok(fleece("list", "--repo", self.url, "--json"))
        assert not listing["damaged"], listing["damaged"]
        points = [(p["vm"], p["id"]) for p in listing["points"]]
        assert set(points) == {(g.name, i) for g in self.guests for i in g.points}

        def restore(vm: str, point: str) -> None:
            target = out / f"{vm}-{point}"
            ok(fleece("restore", "--repo", self.url, "--vm", vm, "--point", point, "--out", str(target), "--flat",
                      "--json"))
            identical(target / "vda.qcow2", self.truths[(vm, point)].ref)

        with ThreadPoolExecutor(RESTORE_JOBS, thread_name_prefix="torture-restore") as pool:
            for done in [pool.submit(restore, vm, point) for vm, point in points]:
                done.result()
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
    t.initial_points()
    rnd = 0
    while rnd < ROUNDS or (rnd < ROUNDS + EXTRA and t.wanting()):
        if rnd >= ROUNDS:
            print(f"one more round: {t.wanting()}", flush=True)
        rnd += 1
        t.round(rnd)
    raced = time.monotonic() - started

    # Nothing races any more. The model first: the references are what QEMU really holds.
    for g in guests:
        g.vm.quit()
        assert g.vm.read_disk_stopped("vda") == g.vm.disks["vda"].reference.read_bytes(), \
            f"the test's reference of {g.name} is not what QEMU holds: the ground truth is wrong, not fleece"
    with ThreadPoolExecutor(1, thread_name_prefix="torture-verify") as bg:  # reads only, like the restores
        verifying = bg.submit(fleece, "verify", "--repo", url, "--read-data", "--json")
        restored = t.final_restores(tmp_path / "restored")
        verify = verifying.result()
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"], verify.stdout[-3000:] + verify.stderr[-2000:]

    first = ok(fleece("prune", "--repo", url, "--grace", GRACE, "--json"))
    time.sleep(GRACE_S + 0.5)
    second = ok(fleece("prune", "--repo", url, "--grace", GRACE, "--json"))
    repo = t.view()
    left = unreferenced_packs(repo)
    assert not left, (f"{len(left)} unreferenced pack(s) left after two prunes a grace apart: "
                      + ", ".join(f"{pack_name(p)} ({pack_history(repo, p)})" for p in sorted(left)))
    assert second["condemned_packs"] == 0 and not second["waiting"], \
        f"no fixed point: the second prune {second}\nthe first {first}\n{why_condemned(repo)}"
    check_needed_packs(repo)

    records = read_records(repo.backend, repo.envelope)
    rescued = sum(len(r.rescued) for r in records)
    conflicts = t.stats["backup refused: prune-conflict"]
    summary = dict(sorted(t.stats.items())) | {
        "rounds": rnd, "rounds with deletions": t.rounds_deleting, "records": len(records),
        "packs rescued (records)": rescued, "points restored at the end": restored,
        "final prunes deleted": first["deleted_packs"] + second["deleted_packs"],
        "seconds racing": round(raced), "seconds total": round(time.monotonic() - started)}
    print("prune torture summary:\n  " + "\n  ".join(f"{k}: {v}" for k, v in summary.items()), flush=True)
    # The protocol was exercised, not just survived.
    assert t.rounds_deleting >= 5, summary
    assert rescued + conflicts >= 1, f"no backup raced a condemnation: {summary}"
    assert t.stats["backup killed"] >= 3 and t.stats["forget killed"] >= 3, summary
