"""The retention policy of ``fleece forget`` (repository/retention.py): restic's keep rules plus
fleece's two forced keeps (protected points, the newest point). Pure and fast: no QEMU, no repository.

Exact examples pin the calendar (month ends, leap years, ISO week 53, DST in Berlin, New York and
Lord Howe); hypothesis properties pin the laws a user relies on: order does not matter, each bucket
rule keeps the newest point of its N most recent buckets, a policy keeps the union of what its rules
keep, and raising a count never removes a point.
"""

from __future__ import annotations

import calendar
import os
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleece.repository.errors import InternalError, UsageError
from fleece.repository.retention import Candidate, Decision, Duration, Policy, apply_policy, parse_duration

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # a 30-minute DST shift
KOLKATA = ZoneInfo("Asia/Kolkata")  # +05:30: local hours are not UTC hours
ZONES = [UTC, BERLIN, NEW_YORK, LORD_HOWE, KOLKATA]
FORM = "use e.g. 7d, 12h, 1y6m (y years, m months, d days, h hours)"


def at(text: str) -> datetime:
    """A UTC instant from ISO text ('2026-11-30 12:00' or with seconds)."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def points(*times: str | datetime, tags: dict[int, set[str]] | None = None,
           protected: set[int] = frozenset()) -> list[Candidate]:
    """Candidates whose ids sort by creation time (as fleece's point ids do): p000 is the oldest."""
    instants = sorted(t if isinstance(t, datetime) else at(t) for t in times)
    return [Candidate(f"p{i:03d}", t, frozenset((tags or {}).get(i, ())), i in protected)
            for i, t in enumerate(instants)]


def kept(policy: Policy, cands: list[Candidate], tz=UTC) -> list[str]:
    """The ids *policy* keeps, newest first."""
    return [d.id for d in apply_policy(policy, cands, tz) if d.keep]


def kept_times(policy: Policy, cands: list[Candidate], tz=UTC) -> list[str]:
    created = {c.id: c.created for c in cands}
    return [created[i].strftime("%Y-%m-%d %H:%M") for i in kept(policy, cands, tz)]


def reasons(policy: Policy, cands: list[Candidate], tz=UTC) -> dict[str, list[str]]:
    """id -> reasons, for the kept points only."""
    return {d.id: d.reasons for d in apply_policy(policy, cands, tz) if d.keep}


# -- restic's own scenarios -------------------------------------------------------------------------------

DOCS_EXAMPLE = ["2025-04-21 11:00", "2025-04-22 11:00", "2025-04-23 11:00", "2025-04-24 11:00",
                "2025-04-25 11:00", "2025-04-25 23:00", "2025-04-28 11:00", "2025-04-29 11:00",
                "2025-05-01 11:00", "2025-05-02 11:00", "2025-05-02 23:00"]


def test_docs_example_a_missed_day_reaches_further_back():
    """restic's manual: weekday backups, a missed Wednesday; keep-daily 5 reaches back to Friday."""
    assert kept_times(Policy(daily=5), points(*DOCS_EXAMPLE)) == [
        "2025-05-02 23:00", "2025-05-01 11:00", "2025-04-29 11:00", "2025-04-28 11:00", "2025-04-25 23:00"]


def test_docs_example_reasons_name_the_bucket():
    got = reasons(Policy(daily=5), points(*DOCS_EXAMPLE))
    assert got["p010"] == ["daily 2025-05-02", "newest point"]
    assert got["p005"] == ["daily 2025-04-25"]


def test_daily_weekly_monthly_yearly_over_years_of_daily_backups():
    """restic's "backup every day" example: the rules overlap, so the total is less than their sum."""
    start, end = datetime(2016, 1, 1, 3, tzinfo=UTC), datetime(2026, 11, 30, 3, tzinfo=UTC)
    cands = points(*(start + timedelta(days=n) for n in range((end - start).days + 1)))
    got = kept_times(Policy(daily=7, weekly=5, monthly=12, yearly=75), cands)
    dailies = [f"2026-11-{d}" for d in range(30, 23, -1)]  # 2026-11-30 is a Monday: week 49 has one day
    weeklies = ["2026-11-22", "2026-11-15", "2026-11-08"]  # the Sundays of weeks 47..45 (48's is a daily)
    monthlies = ["2026-10-31", "2026-09-30", "2026-08-31", "2026-07-31", "2026-06-30", "2026-05-31",
                 "2026-04-30", "2026-03-31", "2026-02-28", "2026-01-31", "2025-12-31"]
    yearlies = [f"{y}-12-31" for y in range(2024, 2015, -1)]  # 2026 is the newest, 2025 a monthly
    assert got == [f"{d} 03:00" for d in dailies + weeklies + monthlies + yearlies]
    assert len(got) == 30
    why = reasons(Policy(daily=7, weekly=5, monthly=12, yearly=75), cands)
    by_day = {c.created.date().isoformat(): c.id for c in cands}
    assert why[by_day["2026-11-30"]] == ["daily 2026-11-30", "weekly 2026-W49", "monthly 2026-11",
                                         "yearly 2026", "newest point"]
    assert why[by_day["2025-12-31"]] == ["monthly 2025-12", "yearly 2025"]
    assert why[by_day["2026-11-29"]] == ["daily 2026-11-29", "weekly 2026-W48"]


def test_keep_last_keeps_the_newest():
    cands = points("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05")
    assert kept(Policy(last=3), cands) == ["p004", "p003", "p002"]
    assert reasons(Policy(last=3), cands) == {"p004": ["keep-last", "newest point"], "p003": ["keep-last"],
                                              "p002": ["keep-last"]}


def test_unlimited_counts():
    cands = points(*(at("2026-01-01 06:00") + timedelta(hours=12 * n) for n in range(40)))  # 2 a day
    assert len(kept(Policy(daily=-1), cands)) == 20
    assert len(kept(Policy(last=-1), cands)) == 40
    assert len(kept(Policy(hourly=-1), cands)) == 40
    assert kept(Policy(yearly=-1), cands) == ["p039"]


def test_decisions_are_newest_first_with_ties_broken_by_id():
    same = at("2026-05-05 05:05")
    cands = [Candidate("b", same), Candidate("c", at("2026-05-01")), Candidate("a", same)]
    decisions = apply_policy(Policy(last=1), cands, UTC)
    assert [d.id for d in decisions] == ["b", "a", "c"]
    assert decisions == [Decision("b", True, ["keep-last", "newest point"]), Decision("a", False, []),
                         Decision("c", False, [])]


def test_no_points_no_decisions():
    assert apply_policy(Policy(last=1), [], UTC) == []


# -- calendars: month ends, leap years, ISO weeks -----------------------------------------------------------

def test_monthly_at_month_ends_and_leap_day():
    cands = points("2024-01-31 12:00", "2024-02-29 12:00", "2024-03-01 12:00", "2024-03-31 12:00")
    assert reasons(Policy(monthly=-1), cands) == {"p003": ["monthly 2024-03", "newest point"],
                                                  "p001": ["monthly 2024-02"], "p000": ["monthly 2024-01"]}


def test_iso_week_53_spans_the_new_year():
    # 2026 has 53 ISO weeks: W53 runs Mon 2026-12-28 .. Sun 2027-01-03
    cands = points("2026-12-27 10:00", "2026-12-31 10:00", "2027-01-03 10:00", "2027-01-04 10:00")
    assert reasons(Policy(weekly=3), cands) == {"p003": ["weekly 2027-W01", "newest point"],
                                                "p002": ["weekly 2026-W53"], "p000": ["weekly 2026-W52"]}
    # years are calendar years, not ISO years: Dec 31 is 2026's newest point, Jan 3 is 2027's
    assert reasons(Policy(yearly=2), cands) == {"p003": ["yearly 2027", "newest point"], "p001": ["yearly 2026"]}


def test_iso_week_of_new_years_day_can_belong_to_the_old_year():
    cands = points("2015-12-28 10:00", "2016-01-01 10:00", "2016-01-04 10:00")  # Mon W53, Fri W53, Mon W01
    assert reasons(Policy(weekly=-1), cands) == {"p002": ["weekly 2016-W01", "newest point"],
                                                 "p001": ["weekly 2015-W53"]}


# -- time zones and daylight saving time ----------------------------------------------------------------------

def test_days_are_local_days():
    cands = points("2026-07-14 21:59", "2026-07-14 22:01")  # 23:59 and 00:01 CEST
    assert reasons(Policy(daily=-1), cands, BERLIN) == {"p001": ["daily 2026-07-15", "newest point"],
                                                        "p000": ["daily 2026-07-14"]}
    assert kept(Policy(daily=-1), cands, UTC) == ["p001"]


def test_months_are_local_months():
    cands = points("2026-11-30 22:30", "2026-11-30 23:30")  # 23:30 CET Nov 30, 00:30 CET Dec 1
    assert reasons(Policy(monthly=-1), cands, BERLIN) == {"p001": ["monthly 2026-12", "newest point"],
                                                          "p000": ["monthly 2026-11"]}


def test_berlin_fall_back_each_real_hour_is_its_own_bucket():
    """The DST rule: 02:00-02:59 happens twice on 2026-10-25 (CEST, then CET). The bucket key is the
    local (date, hour, UTC offset), so both real hours count; their labels carry the offset."""
    cands = points("2026-10-25 00:10", "2026-10-25 00:50",  # 02:10, 02:50 CEST
                   "2026-10-25 01:10", "2026-10-25 01:50",  # 02:10, 02:50 CET
                   "2026-10-25 02:10")                      # 03:10 CET
    assert reasons(Policy(hourly=-1), cands, BERLIN) == {
        "p004": ["hourly 2026-10-25 03h", "newest point"],
        "p003": ["hourly 2026-10-25 02h+01:00"],
        "p001": ["hourly 2026-10-25 02h+02:00"]}
    assert kept(Policy(hourly=2), cands, BERLIN) == ["p004", "p003"]
    assert kept(Policy(daily=1), cands, BERLIN) == ["p004"]


def test_berlin_spring_forward_skips_an_hour():
    cands = points("2026-03-29 00:30", "2026-03-29 00:59", "2026-03-29 01:00")  # 01:30, 01:59 CET; 03:00 CEST
    assert reasons(Policy(hourly=-1), cands, BERLIN) == {"p002": ["hourly 2026-03-29 03h", "newest point"],
                                                         "p001": ["hourly 2026-03-29 01h"]}


def test_new_york_fall_back_hour_and_long_day():
    cands = points("2026-11-01 05:30", "2026-11-01 06:30")  # 01:30 EDT, 01:30 EST
    assert reasons(Policy(hourly=-1), cands, NEW_YORK) == {"p001": ["hourly 2026-11-01 01h-05:00", "newest point"],
                                                           "p000": ["hourly 2026-11-01 01h-04:00"]}
    # 2026-11-01 has 25 hours: 00:30 EDT and 23:30 EST are 24 real hours apart, yet the same day
    day = points("2026-11-01 04:30", "2026-11-02 04:30")
    assert reasons(Policy(daily=-1), day, NEW_YORK) == {"p001": ["daily 2026-11-01", "newest point"]}
    assert kept(Policy(daily=-1), day, UTC) == ["p001", "p000"]


def test_new_york_evening_is_the_previous_day():
    cands = points("2026-11-01 03:30", "2026-11-01 04:30")  # 23:30 EDT Oct 31, 00:30 EDT Nov 1
    assert reasons(Policy(daily=-1, monthly=-1), cands, NEW_YORK) == {
        "p001": ["daily 2026-11-01", "monthly 2026-11", "newest point"],
        "p000": ["daily 2026-10-31", "monthly 2026-10"]}


def test_half_hour_fall_back_marks_the_partly_repeated_hour():
    # Lord Howe Island, 2026-04-05: 02:00 (+11:00) falls back to 01:30 (+10:30)
    cands = points("2026-04-04 14:10", "2026-04-04 14:40", "2026-04-04 15:10")  # 01:10, 01:40 +11; 01:40 +10:30
    assert reasons(Policy(hourly=-1), cands, LORD_HOWE) == {
        "p002": ["hourly 2026-04-05 01h+10:30", "newest point"], "p001": ["hourly 2026-04-05 01h+11:00"]}


def test_half_hour_zone_hours_are_local_hours():
    cands = points("2026-06-01 10:20", "2026-06-01 10:40")  # 15:50 and 16:10 in Kolkata
    assert kept(Policy(hourly=-1), cands, KOLKATA) == ["p001", "p000"]
    assert kept(Policy(hourly=-1), cands, UTC) == ["p001"]


@pytest.fixture
def berlin_host():
    """This process's local zone set to Europe/Berlin for one test (TZ + tzset), then restored."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_default_zone_is_the_hosts_with_the_offset_of_each_point(berlin_host):
    # a summer pair (CEST) and a winter pair (CET) across midnight: any one fixed offset gets a pair wrong
    cands = points("2026-07-14 21:59", "2026-07-14 22:01", "2026-01-14 22:59", "2026-01-14 23:01")
    assert reasons(Policy(daily=-1), cands, None) == {
        "p003": ["daily 2026-07-15", "newest point"], "p002": ["daily 2026-07-14"],
        "p001": ["daily 2026-01-15"], "p000": ["daily 2026-01-14"]}
    fall_back = points("2026-10-25 00:50", "2026-10-25 01:50", "2026-10-25 02:10")
    assert reasons(Policy(hourly=-1), fall_back, None) == reasons(Policy(hourly=-1), fall_back, BERLIN)


# -- keep-within, tags, forced keeps ---------------------------------------------------------------------------

def test_within_is_inclusive_and_relative_to_the_newest_point():
    cands = points("2001-01-01", "2001-02-28 11:59:59.999999", "2001-02-28 12:00", "2001-03-02 12:00")
    assert reasons(Policy(within=Duration(days=2)), cands) == {"p003": ["within 2d", "newest point"],
                                                               "p002": ["within 2d"]}


def test_within_a_month_from_a_month_end():
    cands = points("2025-02-28 11:59", "2025-02-28 12:00", "2025-03-31 12:00")
    assert kept(Policy(within=parse_duration("1m")), cands) == ["p002", "p001"]


def test_tags_keep_any_tagged_point():
    cands = points("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", tags={0: {"db"}, 1: {"db", "os"}, 2: {"x"}})
    assert reasons(Policy(tags=frozenset({"db", "os"})), cands) == {
        "p003": ["newest point"], "p001": ["tag db", "tag os"], "p000": ["tag db"]}


def test_protected_points_are_kept_and_spend_no_count():
    cands = points("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05", protected={1, 3})
    assert reasons(Policy(last=2), cands) == {"p004": ["keep-last", "newest point"],
                                              "p003": ["keep-last", "protected"], "p001": ["protected"]}
    # an older protected point of a day does not take that day's slot
    day = points("2026-01-05 08:00", "2026-01-05 09:00", "2026-01-04 09:00", protected={1})
    assert reasons(Policy(daily=2), day) == {"p002": ["daily 2026-01-05", "newest point"], "p001": ["protected"],
                                             "p000": ["daily 2026-01-04"]}


def test_newest_point_is_kept_even_if_no_rule_matches():
    cands = points("2026-01-01", "2026-01-02", tags={0: {"db"}})
    assert reasons(Policy(tags=frozenset({"db"})), cands) == {"p001": ["newest point"], "p000": ["tag db"]}


def test_several_rules_give_several_reasons():
    cands = points("2026-01-01 10:00", "2026-01-02 10:00", tags={1: {"db"}}, protected={1})
    assert reasons(Policy(last=1, daily=1, within=Duration(hours=1), tags=frozenset({"db"})), cands) == {
        "p001": ["keep-last", "daily 2026-01-02", "within 1h", "tag db", "protected", "newest point"]}


# -- policy errors and descriptions ----------------------------------------------------------------------------

def test_empty_policy_is_refused():
    assert Policy().empty()
    assert not Policy(tags=frozenset({"db"})).empty() and not Policy(within=Duration(hours=1)).empty()
    with pytest.raises(UsageError, match=r"^no keep rule given: pass at least one of --keep-last, "
                                         r"--keep-hourly, .*; nothing was removed$") as caught:
        apply_policy(Policy(), points("2026-01-01"), UTC)
    assert caught.value.exit == 2
    with pytest.raises(UsageError):
        apply_policy(Policy(), [], UTC)


@pytest.mark.parametrize("field", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
def test_counts_below_minus_one_are_refused(field):
    with pytest.raises(UsageError, match=rf"^--keep-{field} -2: not a count; .*-1 for unlimited$"):
        Policy(**{field: -2})
    with pytest.raises(UsageError):
        Policy(**{field: True})
    assert getattr(Policy(**{field: -1}), field) == -1


def test_bad_tags_are_refused():
    with pytest.raises(UsageError, match="--keep-tag ''"):
        Policy(tags=frozenset({""}))
    with pytest.raises(InternalError):
        Policy(tags="db")  # type: ignore[arg-type]
    assert Policy(tags={"db"}).tags == frozenset({"db"})  # type: ignore[arg-type]


def test_caller_bugs_are_internal_errors():
    with pytest.raises(InternalError, match="no time zone"):
        Candidate("p1", datetime(2026, 1, 1))
    twice = [Candidate("p1", at("2026-01-01")), Candidate("p1", at("2026-01-02"))]
    with pytest.raises(InternalError, match="twice"):
        apply_policy(Policy(last=1), twice, UTC)


def test_describe():
    assert Policy(last=3, daily=7, within=Duration(days=2)).describe() == "keep-last 3, keep-daily 7, keep-within 2d"
    assert Policy(weekly=-1, yearly=2, tags=frozenset({"web", "db"})).describe() == \
        "keep-weekly unlimited, keep-yearly 2, keep-tag db, keep-tag web"
    assert Policy().describe() == "no keep rule"


# -- durations -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("7d", Duration(days=7)), ("12h", Duration(hours=12)), ("1y6m", Duration(years=1, months=6)),
    ("2y5m7d3h", Duration(2, 5, 7, 3)), ("10m", Duration(months=10)), (" 3d ", Duration(days=3)),
    ("0d12h", Duration(hours=12)), ("100y", Duration(years=100)),
])
def test_parse_duration_accepts(text, want):
    assert parse_duration(text) == want


@pytest.mark.parametrize("text", ["", " ", "0h", "0y0m0d0h", "3x", "7D", "1d2y", "1w", "-1d", "1.5d", "d", "7",
                                  "1y1y", "7 d", "٣d", "1d\n2h", "1234567890h"])
def test_parse_duration_refuses(text):
    with pytest.raises(UsageError) as caught:
        parse_duration(text)
    assert caught.value.message == f"--keep-within {text!r}: not a duration; {FORM}"
    assert "\n" not in caught.value.message


def test_parse_duration_names_the_flag():
    with pytest.raises(UsageError, match=r"^--keep-within '3x': not a duration; use e\.g\. 7d, 12h, 1y6m \(y years"):
        parse_duration("3x")
    with pytest.raises(UsageError, match="^--keep-within-daily 'x'"):
        parse_duration("x", flag="--keep-within-daily")


def test_duration_str_and_invalid_durations():
    assert str(Duration(1, 2, 3, 4)) == "1y2m3d4h" and str(Duration(months=2)) == "2m"
    for bad in ({}, {"days": -1}, {"hours": 1.5}):
        with pytest.raises(UsageError):
            Duration(**bad)


@pytest.mark.parametrize("text, moment, want", [
    ("1m", "2024-03-31 12:00", "2024-02-29 12:00"),  # leap year: clamp to Feb 29
    ("1m", "2025-03-31 12:00", "2025-02-28 12:00"),
    ("1y", "2024-02-29 12:00", "2023-02-28 12:00"),
    ("4y", "2024-02-29 12:00", "2020-02-29 12:00"),
    ("1m", "2026-05-31 00:00", "2026-04-30 00:00"),
    ("12m", "2026-05-31 00:00", "2025-05-31 00:00"),
    ("1y1m", "2025-01-31 08:00", "2023-12-31 08:00"),
    ("1m1d", "2025-03-31 12:00", "2025-02-27 12:00"),  # months first, then days
    ("1d", "2024-03-01 00:30", "2024-02-29 00:30"),
    ("2h", "2026-03-01 01:00", "2026-02-28 23:00"),
    ("1d12h", "2024-03-01 06:00", "2024-02-28 18:00"),
])
def test_duration_before(text, moment, want):
    assert parse_duration(text).before(at(moment)) == at(want)


def test_duration_before_across_dst_days_are_calendar_days_and_hours_are_real():
    noon = datetime(2026, 3, 29, 12, tzinfo=BERLIN)  # CEST, the day after CET
    assert Duration(days=1).before(noon) == datetime(2026, 3, 28, 12, tzinfo=BERLIN)  # 23 real hours
    assert Duration(hours=24).before(noon) == datetime(2026, 3, 28, 11, tzinfo=BERLIN)


def test_duration_before_year_one_means_everything():
    earliest = Duration(years=999999999).before(at("2026-01-01"))
    assert earliest <= datetime(1, 1, 1, tzinfo=UTC)
    assert Duration(hours=999999999).before(at("2026-01-01")) == earliest
    assert kept(Policy(within=Duration(years=9999)), points("0001-01-01", "2026-01-01")) == ["p001", "p000"]


# -- properties ------------------------------------------------------------------------------------------------

BASE = datetime(2026, 10, 28, 12, tzinfo=UTC)  # between Berlin's and New York's fall-back nights
COUNTS = st.sampled_from([0, 0, 0, 1, 2, 3, 5, 8, -1])
DURATIONS = st.tuples(st.integers(0, 2), st.integers(0, 14), st.integers(0, 40), st.integers(0, 48)).filter(
    any).map(lambda parts: Duration(*parts))
BUCKETS = {
    "hourly": lambda t: (t.date(), t.hour, t.utcoffset()),
    "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2],
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}


@st.composite
def candidate_lists(draw, protect: bool = True) -> list[Candidate]:
    """Up to 30 points on one time scale (minutes .. weeks), so buckets get several points or none."""
    step = draw(st.sampled_from([60, 900, 3600, 4 * 3600, 86400, 7 * 86400]))
    # one integer per point carries its time, jitter, tags and protection: fewer draws, faster tests
    raw = sorted(draw(st.lists(st.integers(0, 801 * 60 * 40 - 1), max_size=30)))
    made = []
    for i, value in enumerate(raw):
        slot, rest = divmod(value, 60 * 40)
        jitter, flags = divmod(rest, 40)
        tags = frozenset(tag for bit, tag in ((1, "db"), (2, "web")) if flags & bit)
        made.append(Candidate(f"p{i:03d}", BASE + timedelta(seconds=(slot - 400) * step + jitter), tags,
                              protect and flags >= 36))
    return made


@st.composite
def policies(draw) -> Policy:
    policy = Policy(*(draw(COUNTS) for _ in range(6)), within=draw(st.none() | DURATIONS),
                    tags=draw(st.frozensets(st.sampled_from(["db", "web"]), max_size=1)))
    return policy if not policy.empty() else Policy(last=1)


def kept_set(policy: Policy, cands: list[Candidate], tz) -> set[str]:
    return {d.id for d in apply_policy(policy, cands, tz) if d.keep}


def newest_first(cands: list[Candidate]) -> list[Candidate]:
    return sorted(cands, key=lambda c: (c.created, c.id), reverse=True)


def single_rules(policy: Policy) -> list[Policy]:
    rules = [Policy(**{name: getattr(policy, name)}) for name in ("last", *BUCKETS) if getattr(policy, name)]
    if policy.within is not None:
        rules.append(Policy(within=policy.within))
    if policy.tags:
        rules.append(Policy(tags=policy.tags))
    return rules


@settings(max_examples=200, deadline=None)
@given(policies(), candidate_lists(), st.sampled_from(ZONES), st.data())
def test_order_of_candidates_does_not_matter(policy, cands, tz, data):
    shuffled = data.draw(st.permutations(cands))
    decisions = apply_policy(policy, cands, tz)
    assert apply_policy(policy, shuffled, tz) == decisions
    assert [d.id for d in decisions] == [c.id for c in newest_first(cands)]


@settings(max_examples=200, deadline=None)
@given(policies(), candidate_lists(), st.sampled_from(ZONES))
def test_reasons_iff_kept_and_the_forced_keeps(policy, cands, tz):
    decisions = apply_policy(policy, cands, tz)
    assert all(d.keep == bool(d.reasons) for d in decisions)
    by_id = {d.id: d for d in decisions}
    for c in cands:
        assert ("protected" in by_id[c.id].reasons) == c.protected
    if cands:
        assert decisions[0].keep and decisions[0].reasons[-1] == "newest point"
        assert all("newest point" not in d.reasons for d in decisions[1:])


@settings(max_examples=200, deadline=None)
@given(policies(), candidate_lists(), st.sampled_from(ZONES))
def test_a_policy_keeps_the_union_of_its_rules(policy, cands, tz):
    """Rules are independent (restic ORs them): no rule's count is spent by another rule's keep."""
    union: set[str] = set()
    for rule in single_rules(policy):
        union |= kept_set(rule, cands, tz)
    assert kept_set(policy, cands, tz) == union


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40) | st.just(-1), candidate_lists(protect=False))
def test_keep_last_alone_keeps_exactly_the_newest(n, cands):
    ordered = [c.id for c in newest_first(cands)]
    assert kept(Policy(last=n), cands) == (ordered if n == -1 else ordered[:n])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(BUCKETS)), st.integers(1, 12) | st.just(-1), candidate_lists(protect=False),
       st.sampled_from(ZONES))
def test_a_bucket_rule_keeps_the_newest_point_of_its_most_recent_buckets(rule, n, cands, tz):
    """Oracle: group by local bucket, order buckets by their newest point, take the first n."""
    newest_of: dict[object, Candidate] = {}
    for c in newest_first(cands):
        newest_of.setdefault(BUCKETS[rule](c.created.astimezone(tz)), c)  # dicts keep insertion order
    chosen = list(newest_of.values()) if n == -1 else list(newest_of.values())[:n]
    got = kept(Policy(**{rule: n}), cands, tz)
    assert got == [c.id for c in chosen]
    assert n == -1 or len(got) <= n
    assert len({BUCKETS[rule](c.created.astimezone(tz)) for c in chosen}) == len(got)  # one per bucket


@settings(max_examples=200, deadline=None)
@given(DURATIONS, candidate_lists())
def test_within_alone(duration, cands):
    got = kept_set(Policy(within=duration), cands, UTC)
    if cands:
        floor = duration.before(max(c.created for c in cands))
        assert got == {c.id for c in cands if c.created >= floor or c.protected} | {newest_first(cands)[0].id}


@settings(max_examples=200, deadline=None)
@given(policies(), candidate_lists(), st.sampled_from(ZONES),
       st.sampled_from(["last", *BUCKETS]), st.integers(1, 5) | st.just(-1))
def test_raising_a_count_never_removes_a_point(policy, cands, tz, field, more):
    count = getattr(policy, field)
    if count == -1:
        return
    raised = replace(policy, **{field: -1 if more == -1 else count + more})
    assert kept_set(policy, cands, tz) <= kept_set(raised, cands, tz)


@settings(max_examples=200, deadline=None)
@given(policies(), candidate_lists(), DURATIONS)
def test_a_longer_within_or_more_tags_never_removes_a_point(policy, cands, extra):
    before = kept_set(policy, cands, UTC)
    now = policy.within
    within = extra if now is None else Duration(now.years + extra.years, now.months + extra.months,
                                                now.days + extra.days, now.hours + extra.hours)
    wider = replace(policy, within=within, tags=policy.tags | {"web"})
    assert before <= kept_set(wider, cands, UTC)


@settings(max_examples=200, deadline=None)
@given(DURATIONS, st.datetimes(datetime(1900, 1, 1), datetime(2200, 1, 1), timezones=st.sampled_from(ZONES)))
def test_duration_round_trips_and_goes_back(duration, moment):
    assert parse_duration(str(duration)) == duration
    earlier = duration.before(moment)
    assert earlier < moment
    if not (duration.days or duration.hours) and moment.tzinfo is UTC:
        # months and years alone keep the time of day and clamp the day to the month's length
        assert (earlier.hour, earlier.minute, earlier.microsecond) == (moment.hour, moment.minute, moment.microsecond)
        assert earlier.day == min(moment.day, calendar.monthrange(earlier.year, earlier.month)[1])
