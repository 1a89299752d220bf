"""How the command talks to people and scripts: one JSON document on stdout with ``--json``, short human
lines otherwise, log lines and progress on stderr (progress only when stderr is a terminal)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
import logging
import sys
import threading
import time
from collections import deque
from typing import Any

from fleece.repository.errors import OutputError


def setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    handler = _BarSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fleece: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # qemu.qmp logs every failure it raises (at ERROR, with tracebacks); fleece maps each one to a message
    # of its own, so the library's copies only show with -vv.
    logging.getLogger("qemu").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)


@contextlib.contextmanager
def stdout_errors() -> Iterator[None]:
    """Turn a failing stdout into one :class:`OutputError` line (a closed pipe stays BrokenPipeError)."""
    if sys.stdout is None:
        raise OutputError("stdout is closed: nothing could be printed (the command itself completed)")
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write to stdout: {exc.strerror or exc} (the command itself completed)") from None


def emit_json(doc: Any, one_line: bool = False) -> None:
    """The command's one JSON document. *one_line*: for a command that keeps running after it (``serve``
    prints it once ready), so a script can read one line and go on."""
    with stdout_errors():
        json.dump(doc, sys.stdout, indent=None if one_line else 1, sort_keys=True, default=str)
        sys.stdout.write("\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- progress ---------------------------------------------------------------------------------------------
#
# A progress line is drawn by tqdm on stderr, and only when stderr is a terminal: a pipe or a log file gets
# the log lines and nothing else. Log lines never share the bar's line: while a bar is live, the logging
# handler writes through tqdm, which clears the bar, writes the line and draws the bar again below it.

_live = 0  # progress lines on screen; while > 0, _BarSafeHandler routes log lines through tqdm
_live_lock = threading.Lock()


class _BarSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines never land on (or get overwritten by) a progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        if not _live:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must not raise (same contract as StreamHandler.emit)
            self.handleError(record)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{human_bytes(value)}/s"


def _eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _percent(done: int, total: int) -> int:
    """Whole percent, rounded *down*: the line says 100 % only when every byte is done."""
    return 100 if total <= 0 else min(100, done * 100 // total)


class _Recent:
    """Bytes per second of one counter over the last few seconds: what the disk or the link does *now*
    (an average since the start would hide a stall behind the fast first minute)."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def __call__(self, now: float, value: int) -> float | None:
        s = self._samples
        s.append((now, value))
        while len(s) > 2 and now - s[1][0] >= self.window:
            s.popleft()
        t0, v0 = s[0]
        return (value - v0) / (now - t0) if now - t0 >= 1.0 else None


def _new_line(stream: Any, desc: str) -> Any:
    """A tqdm instance that draws the frames it is given (text, bar, text) and fits them to the terminal."""
    from tqdm import tqdm

    class Line(tqdm):  # type: ignore[misc, type-arg]
        monitor_interval = 0  # no tqdm monitor thread: our ticker redraws
        frame: tuple[str, float | None, str] = (desc, None, "")

        @property
        def format_dict(self) -> dict[str, Any]:
            d = super().format_dict
            left, frac, right = self.frame
            cols = d.get("ncols") or 80  # a terminal that reports no size (fresh pty) still gets a line
            if frac is None:
                d.update(ncols=cols, bar_format="{left}{right}", total=None, n=0, left=left, right=right)
            else:
                width = max(10, min(30, cols - len(left) - len(right) - 2))
                d.update(ncols=cols, bar_format="{left}|{bar:%d}|{right}" % width, total=1000,
                         n=int(frac * 1000), left=left, right=right)
            return d

    return Line(file=stream, leave=False, dynamic_ncols=True, bar_format="{left}{right}")


class _Display:
    """One progress line. Worker-thread callbacks only count (:meth:`_changed`): drawing is the ticker
    thread's job — at most every ``MIN_INTERVAL`` s after a change, and every ``TICK`` s regardless, so the
    rates and the ETA stay true while nothing completes (a stalled upload shows as falling rates, not as a
    frozen line), and a slow terminal never holds up a reader or an upload. Run events draw at once.
    Subclasses say what the line shows (:meth:`_frame`)."""

    MIN_INTERVAL = 0.1
    TICK = 0.5

    def __init__(self, desc: str) -> None:
        global _live
        self.desc = desc
        self._lock = threading.Lock()  # counters and drawing; tqdm's own lock is only ever taken inside it
        self._line: Any = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._ticker: threading.Thread | None = None
        if not sys.stderr.isatty():
            return
        self._line = _new_line(sys.stderr, desc)
        with _live_lock:
            _live += 1
        self._ticker = threading.Thread(target=self._tick, name="fleece-progress", daemon=True)
        self._ticker.start()

    def _frame(self, now: float) -> tuple[str, float | None, str]:
        """(text left of the bar, fraction done — ``None``: no bar yet —, text right of the bar)."""
        raise NotImplementedError

    def _changed(self) -> None:
        """A counter moved (any thread): have the ticker draw soon."""
        self._wake.set()

    def _tick(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.TICK)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._draw()
            self._stop.wait(self.MIN_INTERVAL)  # changes in the meantime make one frame

    def _draw(self) -> None:
        if self._line is None:
            return
        with self._lock:
            if self._line is None:
                return
            self._line.frame = self._frame(time.monotonic())
            self._line.refresh()

    def close(self) -> None:
        """Draw the final state once, then clear the line (the command's own summary follows)."""
        global _live
        if self._line is None:
            return
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self._draw()
        with self._lock:
            self._line.close()
            self._line = None
        with _live_lock:
            _live -= 1


class Progress(_Display):
    """Bytes done out of a total known up front — restore: bytes written, verify: bytes read — with the
    current rate and an ETA. ``Progress(...)(nbytes)`` is the core's ``progress`` callback."""

    def __init__(self, desc: str, total: int | None = None, verb: str = "done") -> None:
        self.total = total
        self.verb = verb
        self.done = 0
        self._first: float | None = None  # when the first byte was done: the ETA's clock
        self._recent = _Recent()
        super().__init__(desc)

    def __call__(self, nbytes: int, total: int | None = None) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            if self._first is None and nbytes:
                self._first = time.monotonic()
            self.done += nbytes
        self._changed()

    def _frame(self, now: float) -> tuple[str, float | None, str]:
        rate = _rate(self._recent(now, self.done))
        if self.total is None:
            return f"{self.desc}: ", None, f"{human_bytes(self.done)} {self.verb} · {rate}"
        pct = _percent(self.done, self.total)
        left = self.total - self.done
        eta = "-"
        if left <= 0:
            eta = "0:00"
        elif self._first is not None and self.done and now - self._first >= 1.0:  # no guesses off one burst
            eta = _eta(left / (self.done / (now - self._first)))
        return (f"{self.desc} {pct:3d}% ", min(1.0, self.done / self.total) if self.total else 1.0,
                f" {human_bytes(self.done)} of {human_bytes(self.total)} {self.verb} · {rate} · ETA {eta}")


class BackupProgress(_Display):
    """What a backup's user waits for: bytes *committed* to the repository (a pack counts once its upload
    finished; a duplicate or a range that reads as zero once it is known to need no upload) out of the
    bytes the plan reads, the ETA of that, and the read and stored rates; then the phase.

    Wire :meth:`read` as ``BackupRequest.progress``, :meth:`committed` as ``on_committed`` and
    :meth:`event` as ``on_event``. The total grows disk by disk as each is planned; until the last disk is
    planned it is shown with a ``+``.
    """

    def __init__(self, desc: str = "backup") -> None:
        self.total = 0
        self.read_bytes = 0
        self.committed_bytes = 0
        self.stored_bytes = 0
        self.disks: int | None = None  # how many disks the run reads, once exported
        self.planned = 0
        self.phase = "freezing"
        self._first: float | None = None
        self._read_rate = _Recent()
        self._stored_rate = _Recent()
        super().__init__(desc)

    def read(self, nbytes: int) -> None:
        with self._lock:
            if self._first is None:
                self._first = time.monotonic()
            self.read_bytes += nbytes
        self._changed()

    def committed(self, raw: int, stored: int) -> None:
        with self._lock:
            self.committed_bytes += raw
            self.stored_bytes += stored
        self._changed()

    def event(self, name: str, data: dict[str, Any]) -> None:
        with self._lock:
            if name == "exported":
                self.disks = len(data.get("disks", ())) or None
                self.phase = "planning"
            elif name == "planning":
                self.phase = f"planning {data.get('disk', '')}"
            elif name == "disk":
                # job_bytes: what the plan hands on (reads plus holes inside their cells) = what commits
                self.total += data.get("job_bytes", data.get("read_bytes", 0))
                self.planned += 1
                self.phase = f"reading {data.get('disk', '')}"
            elif name in ("pulled", "flushing"):
                self.phase = "uploading"
            elif name in ("committing", "committed"):
                self.phase = name
        self._draw()

    def _frame(self, now: float) -> tuple[str, float | None, str]:
        read_rate = self._read_rate(now, self.read_bytes)
        stored_rate = _rate(self._stored_rate(now, self.stored_bytes))
        if not self.planned:
            return f"{self.desc}: ", None, f"{self.phase} · stored {stored_rate}"
        more = "+" if self.disks is None or self.planned < self.disks else ""
        done = min(self.committed_bytes, self.total)
        left = self.total - done
        eta = "-"
        if left <= 0:
            eta = "0:00"
        elif self._first is not None and done and now - self._first >= 1.0:  # not off the first burst alone
            eta = _eta(left / (done / (now - self._first))) + more
        reading = ("read done" if not more and self.read_bytes >= self.total else f"read {_rate(read_rate)}")
        return (f"{self.desc} {_percent(done, self.total):3d}% ", done / self.total if self.total else 1.0,
                f" {human_bytes(done)} of {human_bytes(self.total)}{more} committed · ETA {eta} · "
                f"stored {stored_rate} · {reading} · {self.phase}")
