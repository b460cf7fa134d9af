"""TierManager state transitions and its agreement with the PrefixIndex, plus the LRU policy.

The oracle is a plain Python model (dicts of key -> state); `check_consistency()` runs after every
step. The index runs on `kernel_device` (the CPU table on the CPU here, the compiled Triton
backend on the GPU host).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from triton_prefix_cache.index import PrefixIndex
from triton_prefix_cache.policy import LRUPolicy, make_policy
from triton_prefix_cache.stats import TierStats
from triton_prefix_cache.tiers import SlotState, StoreStatus, TierManager

SLOT_BYTES = 1000


def keys(*ids: int) -> np.ndarray:
    """Distinct structured keys: key i = (i * 7919 + 1, -i)."""
    a = np.array(ids, dtype=np.int64)
    return np.stack([a * 7919 + 1, -a], axis=1)


@pytest.fixture
def make_tm(kernel_device):
    def make(num_slots: int, policy="lru") -> TierManager:
        idx = PrefixIndex(max(1, num_slots), device=kernel_device)
        return TierManager(num_slots, SLOT_BYTES, index=idx, policy=policy)

    return make


def findable(tm: TierManager, k: np.ndarray) -> np.ndarray:
    return tm.lookup(k) >= 0


def readers(tm: TierManager, slot: int) -> int:
    """Loads in progress reading `slot`."""
    return int(tm.readers_of([slot])[0])


def lru_order(p: LRUPolicy) -> list[int]:
    """The resident slots, coldest first: every slot is a victim, in eviction order."""
    return p.victims(len(p), lambda s: True)


def test_key_findable_only_after_store_completes(make_tm):
    tm = make_tm(8)
    k = keys(1, 2, 3)
    plan = tm.begin_store(k)
    assert plan.assigned.all() and len(set(plan.slots.tolist())) == 3
    assert [tm.slot_state(s) for s in plan.slots] == [SlotState.STORING] * 3
    assert not findable(tm, k).any()
    assert tm.match_prefix(k).tolist() == [0]
    tm.check_consistency()
    tm.finish_store(plan.slots[:2])
    assert findable(tm, k).tolist() == [True, True, False]
    assert tm.lookup(k[:2]).tolist() == plan.slots[:2].tolist()
    assert tm.match_prefix(k).tolist() == [2]
    tm.check_consistency()
    tm.finish_store(plan.slots[2:])
    assert tm.match_prefix(k).tolist() == [3]
    assert tm.stats.stores_completed == 3 and tm.stats.bytes_to_host == 3 * SLOT_BYTES
    tm.check_consistency()


def test_abort_store_publishes_nothing_and_frees(make_tm):
    tm = make_tm(4)
    plan = tm.begin_store(keys(1, 2))
    assert tm.num_free == 2
    tm.abort_store(plan.slots)
    assert tm.num_free == 4 and not findable(tm, keys(1, 2)).any()
    assert tm.stats.stores_aborted == 2 and tm.stats.stores_completed == 0
    tm.check_consistency()
    with pytest.raises(ValueError, match="not STORING"):
        tm.finish_store(plan.slots)  # the aborted slots cannot complete any more


def test_store_skips_present_in_flight_and_duplicates(make_tm):
    tm = make_tm(8)
    p1 = tm.begin_store(keys(1, 2))
    tm.finish_store(p1.slots[:1])  # key 1 READY, key 2 STORING
    p2 = tm.begin_store(keys(1, 2, 3, 3))
    assert p2.status.tolist() == [
        StoreStatus.PRESENT,
        StoreStatus.IN_FLIGHT,
        StoreStatus.ASSIGNED,
        StoreStatus.DUPLICATE,
    ]
    assert p2.slots[:2].tolist() == [-1, -1] and p2.slots[3] == -1 and p2.slots[2] >= 0
    assert tm.stats.store_skipped_present == 1 and tm.stats.store_skipped_in_flight == 2
    tm.check_consistency()


def test_eviction_follows_lru_and_unpublishes(make_tm):
    tm = make_tm(4)
    p = tm.begin_store(keys(0, 1, 2, 3))
    tm.finish_store(p.slots)
    s = tm.begin_load(keys(0))  # 0 becomes most recently used
    tm.finish_load(s)
    plan = tm.begin_store(keys(10, 11))
    assert plan.assigned.all() and plan.evicted == 2
    # LRU order after the load of 0 was 1, 2, 3, 0: keys 1 and 2 go.
    assert findable(tm, keys(0, 1, 2, 3)).tolist() == [True, False, False, True]
    assert sorted(plan.slots.tolist()) == sorted(p.slots[[1, 2]].tolist())
    assert tm.stats.evictions == 2
    tm.check_consistency()


def test_store_never_evicts_a_key_the_same_batch_found_present(make_tm):
    tm = make_tm(2)
    p = tm.begin_store(keys(0, 1))
    tm.finish_store(p.slots)
    plan = tm.begin_store(keys(0, 5, 6))  # key 0 is present; only key 1's slot may go
    assert plan.status.tolist() == [StoreStatus.PRESENT, StoreStatus.ASSIGNED, StoreStatus.DROPPED]
    assert findable(tm, keys(0, 1)).tolist() == [True, False]
    tm.check_consistency()


def test_full_pool_with_every_slot_pinned_drops(make_tm):
    tm = make_tm(3)
    p = tm.begin_store(keys(0, 1, 2))
    tm.finish_store(p.slots)
    pinned = tm.begin_load(keys(0, 1, 2))
    assert [tm.slot_state(s) for s in pinned] == [SlotState.LOADING] * 3
    plan = tm.begin_store(keys(5, 6))
    assert plan.status.tolist() == [StoreStatus.DROPPED] * 2 and plan.evicted == 0
    assert tm.stats.drops_full == 2 and tm.stats.evictions == 0
    assert findable(tm, keys(0, 1, 2)).all()
    tm.check_consistency()
    tm.finish_load(pinned[:1])  # slot of key 0 is evictable again
    plan = tm.begin_store(keys(5, 6))
    assert plan.status.tolist() == [StoreStatus.ASSIGNED, StoreStatus.DROPPED]
    assert plan.slots[0] == pinned[0] and findable(tm, keys(0, 1, 2)).tolist() == [False, True, True]
    tm.check_consistency()


def test_full_pool_of_storing_slots_drops(make_tm):
    tm = make_tm(2)
    tm.begin_store(keys(0, 1))
    plan = tm.begin_store(keys(2))
    assert plan.status.tolist() == [StoreStatus.DROPPED]
    tm.check_consistency()


def test_abort_load_midway_keeps_the_host_copy(make_tm):
    tm = make_tm(4)
    p = tm.begin_store(keys(0, 1))
    tm.finish_store(p.slots)
    s = tm.begin_load(keys(0, 1))
    assert readers(tm, s[0]) == 1
    tm.abort_load(s)
    assert readers(tm, s[0]) == 0 and tm.slot_state(s[0]) == SlotState.READY
    assert findable(tm, keys(0, 1)).all()
    assert tm.stats.loads_aborted == 2 and tm.stats.loads_completed == 0 and tm.stats.bytes_from_host == 0
    with pytest.raises(ValueError, match="no load in progress"):
        tm.finish_load(s)
    tm.check_consistency()


def test_two_readers_and_leading_only(make_tm):
    tm = make_tm(4)
    p = tm.begin_store(keys(0, 1, 2))
    tm.finish_store(p.slots[[0, 2]])  # 1 still storing: a hole
    got = tm.begin_load(keys(0, 1, 2), leading_only=True)
    assert got.tolist() == [p.slots[0], -1, -1]
    got2 = tm.begin_load(keys(0))
    assert readers(tm, p.slots[0]) == 2
    tm.finish_load(np.concatenate([got[:1], got2]))
    assert readers(tm, p.slots[0]) == 0
    assert tm.stats.loads_completed == 2 and tm.stats.bytes_from_host == 2 * SLOT_BYTES
    tm.check_consistency()


def test_remove_while_loading_retires_until_unpinned(make_tm):
    tm = make_tm(2)
    p = tm.begin_store(keys(0))
    tm.finish_store(p.slots)
    s = tm.begin_load(keys(0))
    assert tm.remove(keys(0, 9)).tolist() == [True, False]
    assert not findable(tm, keys(0)).any()
    assert tm.num_free == 1  # still being read: not reusable
    tm.check_consistency()
    p2 = tm.begin_store(keys(0))  # a fresh store of the same key takes another slot
    assert p2.assigned.all() and p2.slots[0] != s[0]
    tm.finish_load(s)
    assert tm.num_free == 1 and tm.slot_state(s[0]) == SlotState.FREE
    tm.finish_store(p2.slots)
    assert tm.lookup(keys(0)).tolist() == p2.slots.tolist()
    tm.check_consistency()


def test_pinned_publish_and_pins_hold_slots_without_counting_loads(make_tm):
    """A slot published with a reader (a write on to another tier starts as its copy ends) is never
    evicted or reused until `unpin`, also when a reset retires it meanwhile; `pin`/`unpin` add and
    end such readers on READY slots and count no load."""
    tm = make_tm(2)
    plan = tm.begin_store(keys(1, 2))
    tm.clear()  # retires both while they are STORING
    tm.finish_store(plan.slots, pin=True)
    assert not findable(tm, keys(1, 2)).any() and tm.num_free == 0
    assert [tm.slot_state(s) for s in plan.slots] == [SlotState.LOADING] * 2
    tm.check_consistency()
    assert tm.begin_store(keys(3)).dropped.all()  # held: nothing to evict
    tm.unpin(plan.slots)
    assert tm.num_free == 2
    tm.check_consistency()
    plan = tm.begin_store(keys(4, 5))
    tm.finish_store(plan.slots, pin=True)
    assert findable(tm, keys(4, 5)).all() and readers(tm, int(plan.slots[0])) == 1
    tm.pin(plan.slots[:1])
    tm.unpin(plan.slots)
    later = tm.begin_store(keys(6, 7))
    assert later.status.tolist() == [StoreStatus.ASSIGNED, StoreStatus.DROPPED]
    assert int(later.slots[0]) == int(plan.slots[1])  # the unpinned one was evicted
    tm.unpin(plan.slots[:1])
    assert tm.stats.loads_started == tm.stats.loads_completed == 0
    with pytest.raises(ValueError, match="not READY"):
        tm.pin(later.slots[:1])  # STORING
    with pytest.raises(ValueError, match="no load in progress"):
        tm.unpin(plan.slots[:1])
    tm.check_consistency()


def test_remove_and_clear_while_storing(make_tm):
    tm = make_tm(4)
    p = tm.begin_store(keys(0, 1))
    assert tm.remove(keys(0)).tolist() == [True]
    tm.finish_store(p.slots)  # key 0's store completes after its removal: not published
    assert findable(tm, keys(0, 1)).tolist() == [False, True]
    assert tm.num_free == 3
    tm.check_consistency()
    p2 = tm.begin_store(keys(2))
    s1 = tm.begin_load(keys(1))
    tm.clear()
    assert not findable(tm, keys(0, 1, 2)).any() and len(tm.index) == 0
    tm.check_consistency()
    tm.finish_store(p2.slots)
    tm.finish_load(s1)
    assert tm.num_free == 4 and not findable(tm, keys(1, 2)).any()
    tm.check_consistency()


def test_limit_withdraws_slots_and_waits_for_copies_in_flight(make_tm):
    tm = make_tm(6)
    p = tm.begin_store(keys(0, 1, 2, 3, 4))  # slots 0..4
    tm.finish_store(p.slots[:3])
    s = tm.begin_load(keys(2))  # slot 2 READY and pinned, 3 and 4 STORING, 5 free
    tm.limit(2)
    assert tm.usable_slots == 2 and tm.num_free == 0
    assert findable(tm, keys(0, 1, 2)).tolist() == [True, True, False]
    tm.check_consistency()
    tm.finish_store(p.slots[3:])  # completes after the pool shrank: not published, not reused
    tm.finish_load(s)
    assert not findable(tm, keys(3, 4)).any() and tm.num_free == 0
    tm.check_consistency()
    plan = tm.begin_store(keys(7, 8, 9))  # only slots 0 and 1 exist: two evictions, one drop
    assert sorted(plan.slots[plan.assigned].tolist()) == [0, 1] and plan.evicted == 2
    assert plan.status.tolist().count(StoreStatus.DROPPED) == 1
    tm.check_consistency()
    with pytest.raises(ValueError, match="num_slots"):
        tm.limit(3)


def test_bad_calls_raise_clear_errors(make_tm):
    tm = make_tm(4)
    with pytest.raises(ValueError, match="keys"):
        tm.begin_store(np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="keys"):
        tm.lookup(torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"finish_store: slot ids must lie in \[0, 4\)"):
        tm.finish_store([7])
    p = tm.begin_store(keys(0))
    with pytest.raises(ValueError, match="listed twice"):
        tm.finish_store([p.slots[0], p.slots[0]])
    with pytest.raises(ValueError, match="no load in progress"):
        tm.abort_load([0])
    with pytest.raises(ValueError, match="num_slots"):
        TierManager(-1)
    with pytest.raises(ValueError, match="capacity"):
        TierManager(10, index=PrefixIndex(4))


def test_empty_tier_drops_everything():
    tm = TierManager(0, SLOT_BYTES)
    plan = tm.begin_store(keys(1, 2))
    assert plan.status.tolist() == [StoreStatus.DROPPED] * 2 and tm.stats.drops_full == 2
    assert tm.match_prefix(keys(1)).tolist() == [0]
    tm.check_consistency()


def test_match_prefix_many_requests_and_stats(make_tm):
    tm = make_tm(8)
    p = tm.begin_store(keys(0, 1, 2, 5))
    tm.finish_store(p.slots)
    req = np.concatenate([keys(0, 1, 2, 3), keys(5, 0), keys(9)])
    counts = tm.match_prefix(req, offsets=[0, 4, 6, 7])
    assert counts.tolist() == [3, 2, 0]
    st = tm.snapshot()
    assert (st.lookups, st.lookup_blocks, st.hit_blocks, st.miss_blocks) == (3, 7, 5, 2)
    assert (st.ready_slots, st.free_slots, st.storing_slots) == (4, 4, 0)
    tm.match_prefix(req, offsets=[0, 4, 6, 7], record=False)
    assert tm.stats.lookups == 3
    text = st.prometheus(prefix="tpc_host", labels={"engine": "0"})
    assert 'tpc_host_hit_blocks_total{engine="0"} 5' in text
    assert "# TYPE tpc_host_ready_slots gauge" in text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_operations_agree_with_a_model(make_tm, seed):
    """Random stores, loads, aborts and removals; after each step the findable keys are exactly the
    model's completed ones and check_consistency passes."""
    rng = random.Random(seed)
    S = 12
    tm = make_tm(S)
    ready: dict[int, int] = {}  # key id -> slot (findable)
    storing: dict[int, int | None] = {}  # slot -> key id in flight (None once the key was removed)
    loads: list[int] = []  # pinned slots, one entry per pin
    universe = list(range(40))
    for _ in range(150):
        op = rng.choice(["store", "store", "finish", "abort", "load", "unload", "unload", "remove", "clear"])
        if op == "store":
            ids = rng.sample(universe, rng.randint(1, 6))
            before = len(ready)
            plan = tm.begin_store(keys(*ids))
            for i, s, st in zip(ids, plan.slots.tolist(), plan.status.tolist()):
                assert (st == StoreStatus.PRESENT) == (i in ready)
                assert (st == StoreStatus.IN_FLIGHT) == (i in storing.values() and i not in ready)
                if st == StoreStatus.ASSIGNED:
                    storing[s] = i
            ready = {i: s for i, s in ready.items() if tm.lookup(keys(i))[0] == s}  # evictions
            assert before - len(ready) == plan.evicted
        elif op in ("finish", "abort") and storing:
            pick = rng.sample(sorted(storing), rng.randint(1, len(storing)))
            if op == "finish":
                tm.finish_store(pick)
                ready.update({storing[s]: s for s in pick if storing[s] is not None})
            else:
                tm.abort_store(pick)
            for s in pick:
                del storing[s]
        elif op == "load" and ready:
            ids = rng.sample(sorted(ready), rng.randint(1, len(ready)))
            got = tm.begin_load(keys(*ids))
            assert got.tolist() == [ready[i] for i in ids]
            loads.extend(got.tolist())
        elif op == "unload" and loads:
            rng.shuffle(loads)
            k = rng.randint(1, len(loads))
            (tm.finish_load if rng.random() < 0.5 else tm.abort_load)(loads[:k])
            loads = loads[k:]
        elif op == "remove":
            ids = rng.sample(universe, 3)
            tm.remove(keys(*ids))
            for i in ids:
                ready.pop(i, None)
            storing = {s: (None if i in ids else i) for s, i in storing.items()}
        elif op == "clear":
            tm.clear()
            ready, storing = {}, dict.fromkeys(storing)
        tm.check_consistency()
        want = np.array([i in ready for i in universe])
        assert np.array_equal(findable(tm, keys(*universe)), want)
        pinned = set(loads)
        for s in pinned:
            assert readers(tm, s) == loads.count(s)
    # Drain: every in-flight operation ends, then every slot is free or READY.
    if storing:
        tm.finish_store(sorted(storing))
    if loads:
        tm.finish_load(loads)
    tm.check_consistency()
    assert tm.num_free + len(tm.index) == S


def test_lru_policy_order_and_predicate():
    p = LRUPolicy()
    p.insert([3, 1, 2])
    p.touch([3])
    assert lru_order(p) == [1, 2, 3]
    assert p.victims(2, lambda s: s != 1) == [2, 3]
    assert p.victims(5, lambda s: True) == [1, 2, 3]
    p.remove([2, 99])
    assert lru_order(p) == [1, 3] and 2 not in p and len(p) == 2
    assert make_policy("lru").name == "lru"
    with pytest.raises(ValueError, match="policy"):
        make_policy("fifo")


def test_stats_reset_and_dict():
    st = TierStats()
    st.hit_blocks = 4
    st.ready_slots = 2
    assert st.as_dict()["hit_blocks"] == 4
    st.reset()
    assert st.hit_blocks == 0 and st.ready_slots == 0


def test_key_states_name_the_state_of_each_keys_slot():
    """Diagnostics: which state the slot of each key is in (None where no slot holds it)."""
    tm = TierManager(4, 1)
    keys = torch.tensor([[1, 10], [2, 20], [3, 30]], dtype=torch.int64)
    plan = tm.begin_store(keys[:2])
    assert tm.key_states(keys) == [SlotState.STORING, SlotState.STORING, None]
    tm.finish_store(plan.slots[:1])
    assert tm.key_states(keys) == [SlotState.READY, SlotState.STORING, None]
    tm.abort_store(plan.slots[1:])
    assert tm.key_states(keys) == [SlotState.READY, None, None]
    slots = tm.begin_load(keys[:1])
    assert tm.key_states(keys[:1]) == [SlotState.LOADING]
    tm.finish_load(slots)
    assert tm.key_states(keys[:1]) == [SlotState.READY]


def test_keys_on_the_tables_reserved_first_words_are_stored_and_found(make_tm):
    """A first word equal to one of the table's markers is folded (keys.sanitize) the same way on
    every path: stored, in flight, found, removed."""
    from triton_prefix_cache.keys import FIRST_REAL

    tm = make_tm(8)
    lo = np.iinfo(np.int64).min
    marked = np.array([[lo, 3], [lo + 1, 4], [lo + 2, 5], [lo + 3, 6]], dtype=np.int64)
    orig = marked.copy()
    p = tm.begin_store(marked)
    assert p.assigned.all() and tm.holds(marked).all()
    assert (tm.begin_store(marked).status == int(StoreStatus.IN_FLIGHT)).all()
    tm.finish_store(p.slots)
    assert tm.lookup(marked).tolist() == p.slots.tolist()
    assert tm.lookup(np.array([[FIRST_REAL, 5]])).tolist() == [p.slots[2]]  # the documented alias
    assert np.array_equal(marked, orig)  # the caller's keys are not folded in place
    assert tm.remove(marked[:2]).tolist() == [True, True] and findable(tm, marked).tolist() == [
        False, False, True, True]
    tm.check_consistency()
