"""The shared pieces of metrics/base.py."""

from metrics.base import ReferenceCache


def test_reference_cache_returns_cached_and_new_texts_and_evicts_least_recent():
    cache = ReferenceCache(size=2)
    table, refs, preds = cache.split(["a", "b", "a"], ["x", "a", "x"])
    assert (table, refs, preds) == ({}, ["a", "b"], ["x"])  # distinct, a prediction equal to a ref not redone
    cache.store({"a": 1, "b": 2, "x": 9}, refs)
    table, refs, preds = cache.split(["b", "c"], ["a"], known={"": 0})
    assert table == {"": 0, "b": 2} and refs == ["c"] and preds == ["a"]
    cache.store({"c": 3}, refs)  # "a" is now the least recently used: evicted
    assert "a" not in cache and "b" in cache and "c" in cache and len(cache) == 2
