"""Short, exact tests of the plan's NBD logic against nbdkit servers whose block status we script.

nbdkit's ``eval`` plugin answers ``base:allocation`` from a table, and deliberately with *one* table entry
per reply (servers may answer less than asked), so the follow-up logic is exercised on every range.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from fleece.repository.errors import ExportReadError
from fleece.exporter.plan import ALLOCATION, PlanSources, block_status, plan_full, status_of_ranges

MiB = 1 << 20
SIZE = 64 * MiB
HOLE_ZERO = "hole,zero"


def _extents_script(table: list[tuple[int, int, str]]) -> str:
    """An eval ``extents`` script: the one table entry holding ``$4`` (the offset asked), clipped to it."""
    rows = " ".join(f"{o}:{n}:{t}" for o, n, t in table)
    return ("for r in " + rows + "; do o=${r%%:*}; rest=${r#*:}; n=${rest%%:*}; t=${rest#*:}; "
            'if [ "$4" -ge "$o" ] && [ "$4" -lt $((o+n)) ]; then echo "$4 $((o+n-$4)) $t"; exit 0; fi; done; '
            "exit 1")


@pytest.fixture
def nbdkit_server(tmp_path: Path) -> Iterator:
    started: list[int] = []

    def start(table: list[tuple[int, int, str]], name: str) -> nbd.NBD:
        sock = tmp_path / f"{name}.sock"
        pidfile = tmp_path / f"{name}.pid"
        subprocess.run(["nbdkit", "-U", str(sock), "-P", str(pidfile), "eval",
                        f"get_size=echo {SIZE}", "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
                        f"extents={_extents_script(table)}"], check=True)
        deadline = time.monotonic() + 10  # the forked server writes its pid file once it listens
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.01)
        started.append(int(pidfile.read_text()))
        h = nbd.NBD()
        h.add_meta_context(ALLOCATION)
        h.connect_unix(str(sock))
        return h

    yield start
    for pid in started:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


TABLE = [(0, 4 * MiB, ""), (4 * MiB, 10 * MiB, HOLE_ZERO), (14 * MiB, 2 * MiB, ""),
         (16 * MiB, 40 * MiB, HOLE_ZERO), (56 * MiB, 8 * MiB, "hole")]


def test_block_status_follows_short_replies(nbdkit_server) -> None:
    h = nbdkit_server(TABLE, "a")
    got = list(block_status(h, ALLOCATION, 0, SIZE))
    assert got == [(0, 4 * MiB, 0), (4 * MiB, 10 * MiB, 3), (14 * MiB, 2 * MiB, 0), (16 * MiB, 40 * MiB, 3),
                   (56 * MiB, 8 * MiB, 1)]


@pytest.mark.parametrize("depth", [1, 3, 64])
def test_status_of_ranges_is_exact_and_clipped(nbdkit_server, depth: int) -> None:
    h = nbdkit_server(TABLE, "b")
    ranges = [(MiB, 5 * MiB), (13 * MiB, 2 * MiB), (20 * MiB, 64 << 10), (55 * MiB, 2 * MiB)]
    got = status_of_ranges(h, ALLOCATION, ranges, depth)
    assert got == [(MiB, 3 * MiB, 0), (4 * MiB, 2 * MiB, 3),  # first range: two table entries
                   (13 * MiB, MiB, 3), (14 * MiB, MiB, 0),
                   (20 * MiB, 64 << 10, 3),
                   (55 * MiB, MiB, 3), (56 * MiB, MiB, 1)]


def test_status_errors_are_export_read_errors(nbdkit_server) -> None:
    h = nbdkit_server([(0, MiB, "")], "c")  # nothing describes offsets past 1 MiB: the script fails
    with pytest.raises((ExportReadError, nbd.Error)):
        status_of_ranges(h, ALLOCATION, [(2 * MiB, MiB)])


def test_full_plan_reads_what_the_target_holds_even_where_the_status_says_zero(nbdkit_server) -> None:
    """The §5e case in miniature: the live status calls [6, 7) MiB zero, the fleece target holds it."""
    live = nbdkit_server(TABLE, "live")
    target = nbdkit_server([(0, 6 * MiB, HOLE_ZERO), (6 * MiB, MiB, ""), (7 * MiB, SIZE - 7 * MiB, HOLE_ZERO)],
                           "target")
    calls: list[str] = []
    plan = plan_full(PlanSources(allocation=live, target=target, between=lambda: calls.append("between")),
                     SIZE, 4 * MiB)
    assert calls == ["between"]
    assert [(j.offset, j.length, j.reads) for j in plan.jobs] == [
        (0, 4 * MiB, [(0, 4 * MiB)]),
        (6 * MiB, MiB, [(6 * MiB, MiB)]),  # rescued from the target; a quarter of its cell: a blob of its own
        (12 * MiB, 4 * MiB, [(14 * MiB, 2 * MiB)]),  # half of the cell: the whole cell, one blob
        # 56..64 MiB is "hole" without "zero": it may hold data (a backing file), so it is read
        (56 * MiB, 4 * MiB, [(56 * MiB, 4 * MiB)]), (60 * MiB, 4 * MiB, [(60 * MiB, 4 * MiB)])]
    assert plan.rescued_bytes == MiB
    assert plan.read_bytes == 4 * MiB + MiB + 2 * MiB + 8 * MiB


def test_a_full_cuts_a_sparse_cell_into_blobs_of_its_data_runs(nbdkit_server) -> None:
    """A cell holding little data costs what its data costs (not a 4 MiB blob of mostly zeros): one job per
    run, runs under 1 MiB apart sharing one (so a cell of many tiny runs does not become many tiny blobs);
    a cell mostly holding data stays one whole-cell job, so it dedups as a cell."""
    K = 64 << 10
    table = [(0, K, ""), (K, 7 * K, HOLE_ZERO), (8 * K, K, ""),  # two runs 448 KiB apart: one blob
             (9 * K, 3 * MiB - 9 * K, HOLE_ZERO), (3 * MiB, K, ""),  # a run > 1 MiB further: a blob of its own
             (3 * MiB + K, 5 * MiB - K, HOLE_ZERO),
             (8 * MiB, 3 * MiB, ""), (11 * MiB, SIZE - 11 * MiB, HOLE_ZERO)]  # 3 of 4 MiB: the whole cell
    live = nbdkit_server(table, "live")
    target = nbdkit_server([(0, SIZE, HOLE_ZERO)], "target")
    plan = plan_full(PlanSources(allocation=live, target=target), SIZE, 4 * MiB)
    assert [(j.offset, j.length, j.reads) for j in plan.jobs] == [
        (0, 9 * K, [(0, K), (8 * K, K)]),
        (3 * MiB, K, [(3 * MiB, K)]),
        (8 * MiB, 4 * MiB, [(8 * MiB, 3 * MiB)])]
    assert plan.read_bytes == 3 * K + 3 * MiB and plan.dirty_bytes == 3 * K + 3 * MiB
