"""Scale benchmark of the extent plan: a 1 TiB sparse qcow2 with 10,000 scattered dirty extents.

The plan must stay O(extents) (DESIGN §6): the frozen bitmap over the whole disk, the live status only
inside the dirty ranges (pipelined), and the fleece-target check that keeps zeroed-after-freeze data
(FIELD-NOTES §5e). This measures the whole incremental plan — every NBD query it makes — on a real QEMU
with the real fleece in place, and, for contrast, a full's plan of the same disk.

    .venv/bin/python tools/bench_plan.py [--extents 10000] [--reps 3] [--size-tib 1]

The image is built offline with one ``qemu-io`` process: a persistent bitmap is added first, so QEMU's
qcow2 driver records the scattered writes in it exactly as a running VM would.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import nbd  # noqa: E402

from fleece.exporter import bitmaps, graph  # noqa: E402
from fleece.exporter.inventory import inspect  # noqa: E402
from fleece.exporter.plan import ALLOCATION, PlanSources, plan_full, plan_incremental  # noqa: E402
from fleece.exporter.qmp import Monitor  # noqa: E402
from tools.benchlib.vm import BenchVM  # noqa: E402

CHUNK = 4 << 20
GRANULE = 64 << 10
BITMAP = "bench-b0"


def build_image(path: Path, size: int, extents: int, seed: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), BITMAP], check=True)
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(size // GRANULE), extents))
    script = "".join(f"write -q -P {1 + i % 250} {o * GRANULE} {GRANULE}\n" for i, o in enumerate(offsets))
    subprocess.run(["qemu-io", "-f", "qcow2", str(path)], input=script, text=True, check=True,
                   stdout=subprocess.DEVNULL)


def handle(sock: str, export: str, context: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(context)
    h.set_export_name(export)
    h.connect_unix(sock)
    return h


args_profile = False


def measure(work: Path, image: Path, reps: int) -> dict[str, list[float]]:
    vm = BenchVM(work, {"vda": image})
    mon = Monitor(vm.qmp, timeout=120)
    times: dict[str, list[float]] = {"incremental": [], "full": []}
    stats: dict[str, int] = {}
    try:
        disk = next(d for d in inspect(mon).disks if d.id == "vda")
        f = graph.DiskFleece(disk, graph.FleeceNames.for_disk("vda"), work / f"{graph.PREFIX}bench.qcow2")
        graph.create_scratch(f.scratch_file, disk.virtual_size)
        graph.add_target(mon, f)
        graph.add_cbw(mon, f)
        mon.cmd("stop")
        bitmaps.transaction(mon, [{"type": "block-dirty-bitmap-add",
                                   "data": {"node": disk.node, "name": "bench-b1", "persistent": False}},
                                  {"type": "block-dirty-bitmap-disable", "data": {"node": disk.node, "name": BITMAP}}])
        graph.insert_cbw(mon, f)
        mon.cmd("cont")
        graph.add_snapshot(mon, f)
        sock = str(work / "nbd.sock")
        graph.start_nbd_server(mon, sock)
        graph.export(mon, f, BITMAP)
        graph.export_plan_sources(mon, f)
        for _ in range(reps):
            t0 = time.perf_counter()
            src = PlanSources(allocation=handle(sock, f.names.live_export, ALLOCATION),
                              target=handle(sock, f.names.target_export, ALLOCATION),
                              dirty=handle(sock, f.names.export, f"qemu:dirty-bitmap:{BITMAP}"))
            plan = plan_incremental(src, BITMAP, disk.virtual_size, CHUNK)
            times["incremental"].append(time.perf_counter() - t0)
            if args_profile:
                from fleece.exporter import plan as P
                from fleece.repository import extents as ex
                t = time.perf_counter(); d = P.dirty_ranges(src.dirty, BITMAP, disk.virtual_size); t1 = time.perf_counter()
                P.status_of_ranges(src.allocation, ALLOCATION, ex.coalesce(d, P.ALLOC_GAP)); t2 = time.perf_counter()
                P.overwritten(src.target, disk.virtual_size); t3 = time.perf_counter()
                print(f"  dirty {t1-t:.3f}  status {t2-t1:.3f}  target {t3-t2:.3f}")
                hs = handle(sock, f.names.export, ALLOCATION)
                for name, hh in (("frozen", hs), ("live", src.allocation)):
                    for depth in (1, 16, 64, 256):
                        t = time.perf_counter(); P.status_of_ranges(hh, ALLOCATION, ex.coalesce(d, P.ALLOC_GAP), depth)
                        print(f"  {name} depth {depth}: {time.perf_counter()-t:.3f}")
            stats = {"dirty_extents": len(plan.dirty), "dirty_bytes": plan.dirty_bytes, "jobs": len(plan.jobs)}
            t0 = time.perf_counter()
            src = PlanSources(allocation=handle(sock, f.names.live_export, ALLOCATION),
                              target=handle(sock, f.names.target_export, ALLOCATION))
            full = plan_full(src, disk.virtual_size, CHUNK)
            times["full"].append(time.perf_counter() - t0)
            stats["full_jobs"] = len(full.jobs)
        graph.unwind(mon)
    finally:
        mon.close()
        vm.quit()
    print(f"plan of {stats}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extents", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-tib", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleece-bench-plan-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        image = work / "big.qcow2"
        t0 = time.monotonic()
        build_image(image, int(args.size_tib * (1 << 40)), args.extents, seed=1)
        print(f"built {args.size_tib} TiB image with {args.extents} scattered 64 KiB writes in "
              f"{time.monotonic() - t0:.1f} s")
        times = measure(work, image, args.reps)
    for kind, ts in times.items():
        print(f"{kind:12s} plan: median {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    ok = statistics.median(times["incremental"]) <= 0.3
    print(f"incremental plan <= 0.3 s: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
