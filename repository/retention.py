"""Which backup points of one VM ``fleece forget`` keeps: restic's ``--keep-*`` policy, as a pure function.

The vocabulary and the bucket rule are restic's (``forget --keep-last/-hourly/-daily/-weekly/-monthly/
-yearly/-within/-tag``), so that a policy a user already runs for restic means the same here. Points
are walked newest first; every bucket rule (hourly … yearly) that still has a count keeps a point
whose bucket it has not kept yet, and spends one count (``-1`` never runs out). So ``keep-daily 7``
keeps the newest point of each of the 7 most recent local days *that have points* — a missed day
reaches further back instead of leaving a hole. The rules are independent and their results are
ORed: what a policy keeps is exactly the union of what each of its rules keeps alone.

fleece adds two rules restic does not have, and they never spend a count:

* a ``protected`` point is always kept (the caller decides what protection means);
* the newest point is always kept: the VM's dirty bitmap records the changes since that point, so
  the next incremental backup is based on it and must find it in the repository.

Deliberate differences from restic, so nobody "fixes" them back:

* ``keep-within`` is inclusive (a point exactly ``D`` before the newest is kept; restic needs it to
  be strictly after), and is measured from the newest point even if that point lies in the future
  (restic ignores future snapshots there; fleece's newest point is the bitmap's base either way).
* ``Duration.before`` clamps the day of month (Mar 31 − 1m = Feb 28/29); Go's ``AddDate`` used by
  restic normalizes it instead (Mar 31 − 1m = Mar 3), which surprises users.
* restic ≥ 0.16 also keeps the *oldest* snapshot when a rule has counts left; fleece does not: a
  rule keeps the newest point of each of its N most recent buckets, nothing else.
* ``keep-tag`` tags are ORed single tags (restic's comma-joined AND lists do not exist here), and an
  empty tag is refused rather than meaning "untagged".
* Hours in a daylight-saving fall-back (see :func:`_hour_key`): each real hour is its own bucket.

Core module: it never prints; bad input raises :class:`~.errors.UsageError`, broken caller
invariants :class:`~.errors.InternalError`.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo

from .errors import InternalError, UsageError

__all__ = ["Candidate", "Decision", "Duration", "Policy", "apply_policy", "parse_duration"]

_DURATION_FORM = "use e.g. 7d, 12h, 1y6m (y years, m months, d days, h hours)"
# Units in restic's order, each at most once; ASCII digits only (str.isdigit accepts "٣"), and few
# enough of them that int() stays cheap and within Python's digit limit.
_DURATION_RE = re.compile(r"(?:([0-9]{1,9})y)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})d)?(?:([0-9]{1,9})h)?")
_EARLIEST = datetime.min.replace(tzinfo=timezone.utc)
_COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


@dataclass(frozen=True)
class Duration:
    """A calendar duration in restic's syntax (``1y2m3d4h``): years, months, days and hours.

    Months and years are calendar units, not fixed lengths, which is why this is not a timedelta:
    "keep a month" on Mar 31 means back to Feb 28/29, not back 30 days.
    """

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    def __post_init__(self) -> None:
        parts = (self.years, self.months, self.days, self.hours)
        if any(type(part) is not int or part < 0 for part in parts) or not any(parts):
            raise UsageError(f"duration of {self.years}y{self.months}m{self.days}d{self.hours}h: not a duration "
                             f"(no part may be negative, and not all zero); {_DURATION_FORM}")

    def before(self, moment: datetime) -> datetime:
        """*moment* minus this duration: years and months first (day clamped to the month's end),
        then days on the calendar of *moment*'s zone, then hours as real elapsed time.

        The order is restic's (Go's ``AddDate`` then ``Add``). A result before year 1 is clamped to
        the earliest representable moment, so a huge ``keep-within`` simply means "everything".
        """
        year, month0 = divmod(moment.year * 12 + moment.month - 1 - (self.years * 12 + self.months), 12)
        if year < 1:
            return _EARLIEST if moment.tzinfo is not None else datetime.min
        day = min(moment.day, calendar.monthrange(year, month0 + 1)[1])
        try:
            shifted = moment.replace(year=year, month=month0 + 1, day=day) - timedelta(days=self.days)
            if moment.tzinfo is None:
                return shifted - timedelta(hours=self.hours)
            # through UTC: an aware datetime's own arithmetic is wall-clock time, which gains or
            # loses an hour across a DST change
            return (shifted.astimezone(timezone.utc) - timedelta(hours=self.hours)).astimezone(moment.tzinfo)
        except OverflowError:
            return _EARLIEST if moment.tzinfo is not None else datetime.min

    def __str__(self) -> str:
        units = zip((self.years, self.months, self.days, self.hours), "ymdh")
        return "".join(f"{value}{unit}" for value, unit in units if value)


def parse_duration(text: str, *, flag: str = "--keep-within") -> Duration:
    """Parse restic's duration syntax (``7d``, ``12h``, ``1y6m``, ``2y5m7d3h``), units in that order.

    *flag* only names the option in the error message. A zero duration (``0h``) is refused: as a
    keep rule it would keep nothing but the newest point, which the user cannot have meant.
    """
    match = _DURATION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    values = [int(group) if group else 0 for group in match.groups()] if match else []
    if not any(values):
        raise UsageError(f"{flag} {_quote(text)}: not a duration; {_DURATION_FORM}")
    return Duration(*values)


@dataclass(frozen=True)
class Policy:
    """The keep rules of one ``fleece forget`` run; counts are 0 (rule off), N, or -1 (unlimited)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: Duration | None = None
    tags: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name, count in self._counts():
            if type(count) is not int or count < -1:
                raise UsageError(f"--keep-{name} {_quote(count)}: not a count; use a number of 0 or more, "
                                 f"or -1 for unlimited")
        if isinstance(self.tags, str):  # frozenset("db") would silently mean the tags "d" and "b"
            raise InternalError(f"Policy.tags must be a set of tags, not the string {self.tags!r}")
        object.__setattr__(self, "tags", frozenset(self.tags))
        if "" in self.tags:  # restic reads '' as "untagged"; here it would silently match nothing
            raise UsageError("--keep-tag '': a tag cannot be empty; name the tag whose points to keep")

    def _counts(self) -> list[tuple[str, int]]:
        return [(name, getattr(self, name)) for name in _COUNT_RULES]

    def empty(self) -> bool:
        """True when no rule is given — applying it would remove everything but the newest point."""
        return not any(count for _, count in self._counts()) and self.within is None and not self.tags

    def describe(self) -> str:
        """The policy in flag words for messages, e.g. ``keep-last 3, keep-daily 7, keep-within 2d``."""
        parts = [f"keep-{name} {'unlimited' if count == -1 else count}" for name, count in self._counts() if count]
        if self.within is not None:
            parts.append(f"keep-within {self.within}")
        parts.extend(f"keep-tag {tag}" for tag in sorted(self.tags))
        return ", ".join(parts) or "no keep rule"


@dataclass(frozen=True)
class Candidate:
    """One backup point as the policy sees it; *created* must be timezone-aware."""

    id: str
    created: datetime
    tags: frozenset[str] = frozenset()
    protected: bool = False

    def __post_init__(self) -> None:
        if self.created.tzinfo is None or self.created.utcoffset() is None:
            # a naive time would be read as this host's local time and could land in the wrong bucket
            raise InternalError(f"point {self.id}: creation time {self.created} has no time zone")
        if isinstance(self.tags, str):
            raise InternalError(f"point {self.id}: tags must be a set of tags, not the string {self.tags!r}")
        object.__setattr__(self, "tags", frozenset(self.tags))


@dataclass
class Decision:
    """What happens to one point: *keep*, and why (empty exactly when the point is removed)."""

    id: str
    keep: bool
    reasons: list[str]


def apply_policy(policy: Policy, candidates: Iterable[Candidate], tz: tzinfo | None = None) -> list[Decision]:
    """Decide for every point of one VM whether *policy* keeps it; newest first (by created, then id).

    Calendar buckets are taken in *tz*; ``None`` means this host's local zone, applied per point (a
    summer point gets the summer offset — a fixed ``datetime.now().astimezone().tzinfo`` would put
    it an hour off for half the year). The result does not depend on the order of *candidates*.
    """
    if policy.empty():
        raise UsageError("no keep rule given: pass at least one of --keep-last, --keep-hourly, --keep-daily, "
                         "--keep-weekly, --keep-monthly, --keep-yearly, --keep-within, --keep-tag; "
                         "nothing was removed")
    points = _newest_first(candidates)
    if not points:
        return []
    floor = policy.within.before(points[0].created) if policy.within is not None else None
    rules = _bucket_rules(policy, tz)
    decisions = []
    for index, point in enumerate(points):
        reasons = []
        if policy.last == -1 or index < policy.last:
            reasons.append("keep-last")
        local = _to_local(point.created, tz)
        reasons.extend(label for rule in rules if (label := rule.offer(local)))
        if floor is not None and point.created >= floor:
            reasons.append(f"within {policy.within}")
        reasons.extend(f"tag {tag}" for tag in sorted(policy.tags & point.tags))
        if point.protected:
            reasons.append("protected")
        if index == 0:
            reasons.append("newest point")
        decisions.append(Decision(point.id, bool(reasons), reasons))
    return decisions


@dataclass
class _BucketRule:
    """One of hourly … yearly while walking newest first: the buckets kept so far and the count left."""

    remaining: int
    key: Callable[[datetime], Hashable]
    label: Callable[[datetime], str]
    kept: set[Hashable] = field(default_factory=set)

    def offer(self, local: datetime) -> str | None:
        """Keep *local*'s point if its bucket is new and counts remain; the reason, or None.

        restic compares with the last kept key only; a set gives the same answer whenever keys
        change monotonically in time (always, for hour-aligned DST changes) and stays right for the
        odd zone whose clock ever jumped back across a bucket boundary.
        """
        if self.remaining == 0:
            return None
        key = self.key(local)
        if key in self.kept:
            return None
        self.kept.add(key)
        if self.remaining > 0:
            self.remaining -= 1
        return self.label(local)


def _bucket_rules(policy: Policy, tz: tzinfo | None) -> list[_BucketRule]:
    def hour_label(t: datetime) -> str:
        suffix = _offset_text(t.utcoffset()) if _repeated_hour(t, tz) else ""
        return f"hourly {t:%Y-%m-%d} {t.hour:02d}h{suffix}"

    def week_label(t: datetime) -> str:
        iso = t.isocalendar()
        return f"weekly {iso.year}-W{iso.week:02d}"

    specs: list[tuple[int, Callable[[datetime], Hashable], Callable[[datetime], str]]] = [
        (policy.hourly, _hour_key, hour_label),
        (policy.daily, lambda t: t.date(), lambda t: f"daily {t:%Y-%m-%d}"),
        (policy.weekly, lambda t: t.isocalendar()[:2], week_label),
        (policy.monthly, lambda t: (t.year, t.month), lambda t: f"monthly {t:%Y-%m}"),
        (policy.yearly, lambda t: t.year, lambda t: f"yearly {t.year:04d}"),
    ]
    return [_BucketRule(count, key, label) for count, key, label in specs if count]


def _hour_key(local: datetime) -> tuple[date, int, timedelta | None]:
    """An hour bucket: local date and hour *and UTC offset*.

    The offset is there for the fall-back night, when a wall-clock hour (02:00–02:59 in Berlin)
    happens twice: with it, each real hour is its own bucket and an hourly backup of either is kept,
    where restic's (date, hour) would merge two real hours into one bucket and drop one backup.
    Outside such an hour the offset is the same for the whole hour and changes nothing.
    """
    return local.date(), local.hour, local.utcoffset()


def _repeated_hour(local: datetime, tz: tzinfo | None) -> bool:
    """Whether *local*'s wall-clock hour also exists with another UTC offset (a fall-back).

    Only for labels: the two buckets of a repeated hour get their offsets so they read apart.
    Probes a few wall times of the hour with both folds and keeps the offsets that really exist.
    """
    start = local.replace(minute=0, second=0, microsecond=0, tzinfo=None, fold=0)
    offsets = set()
    for minutes in (0, 15, 30, 45, 59):
        for fold in (0, 1):
            wall = (start + timedelta(minutes=minutes)).replace(fold=fold)
            try:
                back = _to_local(_wall_to_utc(wall, tz), tz)
            except (OverflowError, OSError, ValueError):
                continue
            if back.replace(tzinfo=None) == wall:  # wall times in a spring-forward gap do not exist
                offsets.add(back.utcoffset())
    return len(offsets) > 1


def _to_local(moment: datetime, tz: tzinfo | None) -> datetime:
    """*moment* on *tz*'s wall clock; None = the host's zone with the offset in force at *moment*."""
    return moment.astimezone(tz) if tz is not None else moment.astimezone()


def _wall_to_utc(wall: datetime, tz: tzinfo | None) -> datetime:
    """The instant a naive wall time (with its fold) means in *tz* (None = the host's zone)."""
    return (wall if tz is None else wall.replace(tzinfo=tz)).astimezone(timezone.utc)


def _offset_text(offset: timedelta | None) -> str:
    minutes = int((offset or timedelta()).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def _newest_first(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The points sorted newest first; an id twice is a caller bug (decisions are keyed by id)."""
    points = sorted(candidates, key=lambda c: (c.created, c.id), reverse=True)
    seen: set[str] = set()
    for point in points:
        if point.id in seen:
            raise InternalError(f"point {point.id} was given to the retention policy twice")
        seen.add(point.id)
    return points


def _quote(value: object) -> str:
    """A user's value for a one-line message: quoted, with newlines and controls escaped."""
    return repr(value) if isinstance(value, str) else str(value)
