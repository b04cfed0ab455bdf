"""The ``Store`` contract: behaviour every store shares (memory, SQLite, Redis).

A test module imports these tests and defines a ``make_store`` fixture that opens its kind of store;
pytest collects them there (this module's name does not match ``test_*.py``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import pytest

from gateway.control.store import SampleRecord, Store, StoreError

StoreFactory = Callable[..., Store]


def sample(route: str = "arith", source: str = "gold", budget: int = 100, **overrides: Any) -> SampleRecord:
    fields: dict[str, Any] = dict(level=0, correct=True, tokens=0, at=1_700_000_000.0, reference_id=None)
    fields.update(overrides)
    return SampleRecord(route=route, source=source, budget=budget, **fields)


def test_load_returns_none_for_a_route_never_saved(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.load("arith") is None
    assert store.routes() == []
    assert store.samples("arith") == []
    assert store.counts("arith") == {"canary": 0, "gold": 0, "shadow": 0}


def test_save_then_load_returns_the_same_state(make_store: StoreFactory) -> None:
    store = make_store()
    state = {"budget": 120, "good": None, "window": [True, False], "nested": {"level": 2, "em": 0.75}}
    store.save("arith", state)
    assert store.load("arith") == state


def test_later_save_replaces_the_state(make_store: StoreFactory) -> None:
    store = make_store()
    store.save("arith", {"budget": 120})
    store.save("arith", {"budget": 96})
    assert store.load("arith") == {"budget": 96}


def test_stored_state_does_not_change_when_the_caller_mutates_its_dict(make_store: StoreFactory) -> None:
    store = make_store()
    state: dict[str, Any] = {"window": [True]}
    store.save("arith", state)
    state["window"].append(False)
    loaded = store.load("arith")
    assert loaded == {"window": [True]}
    assert loaded is not None
    loaded["window"].append(False)
    assert store.load("arith") == {"window": [True]}


@pytest.mark.parametrize("bad", [{"em": math.nan}, {"at": object()}])
def test_state_that_is_not_json_is_refused_and_the_old_state_kept(
    make_store: StoreFactory, bad: dict[str, Any]
) -> None:
    store = make_store()
    store.save("arith", {"budget": 120})
    with pytest.raises((ValueError, TypeError)):
        store.save("arith", bad, sample("arith"))
    assert store.load("arith") == {"budget": 120}
    assert store.counts("arith")["gold"] == 0


def test_sample_of_another_route_is_refused(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="does not match"):
        store.save("arith", {"budget": 1}, sample("qa"))
    assert store.load("arith") is None


def test_routes_lists_every_saved_route_sorted(make_store: StoreFactory) -> None:
    store = make_store()
    for route in ["qa", "arith", "code"]:
        store.save(route, {"budget": 1})
    assert store.routes() == ["arith", "code", "qa"]


def test_samples_come_back_oldest_first_and_limited_to_the_newest(make_store: StoreFactory) -> None:
    store = make_store()
    for i in range(5):
        store.save("arith", {"budget": i}, sample("arith", budget=i, correct=i % 2 == 0, reference_id=f"r{i}"))
    store.save("qa", {"budget": 9}, sample("qa", budget=9))
    assert [s.budget for s in store.samples("arith")] == [0, 1, 2, 3, 4]
    assert [s.budget for s in store.samples("arith", limit=2)] == [3, 4]
    assert store.samples("arith", limit=0) == []
    assert store.samples("arith")[1] == sample("arith", budget=1, correct=False, reference_id="r1")


def test_sample_fields_round_trip(make_store: StoreFactory) -> None:
    store = make_store()
    record = SampleRecord(
        route="qa", source="shadow", budget=64, level=3, correct=False, tokens=512, at=1234.5, reference_id="item-7"
    )
    store.save("qa", {"budget": 64}, record)
    assert store.samples("qa") == [record]


def test_counts_are_by_source(make_store: StoreFactory) -> None:
    store = make_store()
    for source, n in [("gold", 3), ("canary", 2), ("shadow", 1)]:
        for _ in range(n):
            store.save("arith", {"budget": 1}, sample("arith", source=source, tokens=0 if source == "gold" else 50))
    store.save("qa", {"budget": 1}, sample("qa", source="canary"))
    assert store.counts("arith") == {"canary": 2, "gold": 3, "shadow": 1}
    assert store.counts("qa") == {"canary": 1, "gold": 0, "shadow": 0}


def test_pruning_keeps_the_newest_samples_and_counts_stay_totals(make_store: StoreFactory) -> None:
    store = make_store(max_samples_per_route=10, prune_every=4)
    for i in range(23):
        store.save("arith", {"budget": i}, sample("arith", source="gold" if i % 3 else "canary", budget=i))
    store.save("qa", {"budget": 0}, sample("qa"))
    assert [s.budget for s in store.samples("arith", limit=1000)] == list(range(13, 23))
    assert store.counts("arith") == {"canary": 8, "gold": 15, "shadow": 0}
    assert [s.budget for s in store.samples("qa")] == [100]


def test_concurrent_saves_from_threads_all_land(make_store: StoreFactory) -> None:
    store = make_store()
    errors: list[BaseException] = []

    def writer(route: str) -> None:
        try:
            for i in range(40):
                store.save(route, {"i": i}, sample(route, budget=i))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"r{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.routes() == ["r0", "r1", "r2", "r3"]
    for k in range(4):
        assert store.load(f"r{k}") == {"i": 39}
        assert store.counts(f"r{k}")["gold"] == 40


def test_calls_after_close_raise_store_error_and_closing_twice_is_harmless(make_store: StoreFactory) -> None:
    store = make_store()
    store.save("arith", {"budget": 1})
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.load("arith")
    with pytest.raises(StoreError, match="closed"):
        store.save("arith", {"budget": 2})


def test_reference_sets_are_kept_by_name_in_upload_order(make_store: StoreFactory) -> None:
    store = make_store()
    store.save_reference_set("arith", "a", "A1\n")
    store.save_reference_set("arith", "b", "B1\n")
    store.save_reference_set("arith", "a", "A2\n")  # a replaced set moves to the end, as the newest upload
    store.save_reference_set("qa", "a", "Q\n")
    assert store.reference_sets("arith") == [("b", "B1\n"), ("a", "A2\n")]
    assert store.reference_sets("qa") == [("a", "Q\n")] and store.reference_sets("none") == []
