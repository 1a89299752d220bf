"""Property tests of the interval algebra against a set-of-bytes model."""

from hypothesis import given, settings
from hypothesis import strategies as st

from fleece.repository import extents as ex

SPACE = 300
raw_ranges = st.lists(st.tuples(st.integers(0, SPACE), st.integers(0, 40)), max_size=12)


def as_set(ranges):
    return {b for off, length in ranges for b in range(off, off + length)}


def is_normal(ranges):
    return all(length > 0 for _, length in ranges) and all(
        a[0] + a[1] < b[0] for a, b in zip(ranges, ranges[1:]))


@given(raw_ranges)
def test_normalize_keeps_bytes_and_form(rs):
    n = ex.normalize(rs)
    assert is_normal(n)
    assert as_set(n) == as_set(rs)
    assert ex.total(n) == len(as_set(rs))


@given(raw_ranges, raw_ranges)
def test_union_intersection_difference(a, b):
    a, b = ex.normalize(a), ex.normalize(b)
    for result, expected in ((ex.union(a, b), as_set(a) | as_set(b)),
                             (ex.intersection(a, b), as_set(a) & as_set(b)),
                             (ex.difference(a, b), as_set(a) - as_set(b))):
        assert is_normal(result)
        assert as_set(result) == expected


@given(raw_ranges, st.integers(0, SPACE + 50))
def test_complement_and_clip(a, size):
    a = ex.normalize(a)
    assert as_set(ex.complement(a, size)) == set(range(size)) - as_set(a)
    assert as_set(ex.clip(a, size)) == as_set(a) & set(range(size))


@given(raw_ranges, st.integers(1, 64))
def test_split_at_grid(a, grid):
    a = ex.normalize(a)
    pieces = list(ex.split_at_grid(a, grid))
    assert as_set(pieces) == as_set(a)
    assert sum(length for _, length in pieces) == ex.total(a)  # no overlap
    for off, length in pieces:
        assert length > 0
        assert off // grid == (off + length - 1) // grid  # never crosses a boundary
    assert pieces == sorted(pieces)


@given(raw_ranges, st.integers(0, 30))
def test_coalesce(a, gap):
    a = ex.normalize(a)
    c = ex.coalesce(a, gap)
    assert is_normal(c)
    assert as_set(a) <= as_set(c)
    # only gaps of at most `gap` bytes were filled, and every such gap was
    for off, length in ex.difference(c, a):
        assert length <= gap
    for left, right in zip(c, c[1:]):
        assert right[0] - (left[0] + left[1]) > gap


@settings(max_examples=200)
@given(raw_ranges, st.sampled_from([1, 4, 16, 64]), st.integers(1, SPACE + 50))
def test_align_out(a, granule, size):
    a = ex.clip(ex.normalize(a), size)
    al = ex.align_out(a, granule, size)
    assert is_normal(al)
    assert as_set(a) <= as_set(al) <= set(range(size))
    for off, length in al:
        assert off % granule == 0
        assert (off + length) % granule == 0 or off + length == size


def test_large_offsets_cost_nothing():
    tib = 1 << 40
    a = [(0, 4096), (2 * tib - 4096, 4096)]
    assert ex.total(ex.complement(a, 2 * tib)) == 2 * tib - 8192
    assert list(ex.split_at_grid([(tib - 10, 20)], 4 << 20)) == [(tib - 10, 10), (tib, 10)]
