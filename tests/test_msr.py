import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.msr import (
    MemoryRedistribution,
    NoRedistribution,
    RandomRedistribution,
    apply_moves,
    check_partition,
    make_redistribution,
    num_to_move,
    top_skipped,
)


def test_top_skipped_takes_the_largest_counts():
    rng = np.random.default_rng(0)
    counts = np.array([0, 9, 3, 7, 1, 8])
    assert top_skipped(counts, 3, rng).tolist() == [1, 3, 5]


def test_ties_are_broken_by_a_seeded_random_order():
    counts = np.array([5, 5, 5, 5, 5, 5, 5, 5, 0, 0])
    picks = {tuple(top_skipped(counts, 3, np.random.default_rng(s))) for s in range(20)}
    assert len(picks) > 1 and all(set(p) <= set(range(8)) for p in picks)
    again = top_skipped(counts, 3, np.random.default_rng(7))
    assert np.array_equal(again, top_skipped(counts, 3, np.random.default_rng(7)))


def test_msr_moves_top_p_to_the_next_shard_cyclically():
    shards = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7]), np.array([8, 9, 10, 11])]
    counts = [np.array([0, 5, 1, 0]), np.array([9, 0, 0, 1]), np.array([0, 0, 0, 4])]
    rule = MemoryRedistribution(0.25)  # floor(0.25 * 4) = 1 per shard
    moves = apply_moves(shards, rule(shards, counts, np.random.default_rng(0)))
    assert [m.tolist() for m in moves.moved] == [[1], [4], [11]]
    assert [s.tolist() for s in moves.shards] == [[0, 2, 3, 11], [1, 5, 6, 7], [4, 8, 9, 10]]


def test_failed_shard_keeps_its_samples_but_still_receives():
    shards = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    counts = [np.array([3, 0]), None, np.array([0, 2])]
    moves = apply_moves(shards, MemoryRedistribution(0.5)(shards, counts, np.random.default_rng(0)))
    assert [s.tolist() for s in moves.shards] == [[1, 5], [0, 2, 3], [4]]
    assert moves.moved[1].size == 0


def test_single_shard_and_none_mode_change_nothing():
    one = [np.arange(8)]
    assert np.array_equal(apply_moves(one, [np.array([1, 2])]).shards[0], np.arange(8))
    shards = [np.arange(4), np.arange(4, 8)]
    moves = apply_moves(shards, NoRedistribution()(shards, [np.ones(4)] * 2, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(moves.shards, shards, strict=True))


def test_random_mode_moves_the_same_number():
    shards = [np.arange(10), np.arange(10, 20)]
    leaving = RandomRedistribution(0.3)(shards, [np.zeros(10)] * 2, np.random.default_rng(1))
    assert [len(x) for x in leaving] == [3, 3]
    with pytest.raises(ValueError, match="msr"):
        make_redistribution("smart", 0.2)


def test_check_partition_catches_loss_and_duplicates():
    check_partition([np.array([0, 2]), np.array([1])], 3)
    with pytest.raises(RuntimeError, match="1 lost"):
        check_partition([np.array([0]), np.array([1])], 3)
    with pytest.raises(RuntimeError, match="duplicated"):
        check_partition([np.array([0, 1]), np.array([1, 2])], 3)


@st.composite
def _rounds(draw):
    n = draw(st.integers(1, 60))
    k = draw(st.integers(1, n))
    p = draw(st.floats(0, 0.99))
    mode = draw(st.sampled_from(["memory", "random", "none"]))
    seed = draw(st.integers(0, 2**16))
    rounds = draw(st.integers(1, 3))
    return n, k, p, mode, seed, rounds


@settings(max_examples=1000, deadline=None)
@given(_rounds(), st.data())
def test_shards_stay_an_exact_partition(case, data):
    n, k, p, mode, seed, rounds = case
    rng = np.random.default_rng(seed)
    shards = np.array_split(rng.permutation(n), k)
    rule = make_redistribution(mode, p)
    for _ in range(rounds):
        counts = [
            None
            if data.draw(st.booleans().filter(lambda _: True), label="failed") and k > 1
            else np.asarray(data.draw(st.lists(st.integers(0, 5), min_size=len(s), max_size=len(s)), label="c"))
            for s in shards
        ]
        sizes = [len(s) for s in shards]
        moves = apply_moves(shards, rule(shards, counts, rng))
        check_partition(moves.shards, n)
        for i, c in enumerate(counts):
            expect = 0 if (c is None or mode == "none" or k == 1) else num_to_move(sizes[i], p)
            assert len(moves.moved[i]) == expect
            if mode == "memory" and expect:  # the movers are the most skipped of their shard
                stay = np.setdiff1d(shards[i], moves.moved[i])
                pos = {sid: j for j, sid in enumerate(shards[i])}
                if stay.size:
                    assert min(c[pos[x]] for x in moves.moved[i]) >= max(c[pos[x]] for x in stay)
        shards = moves.shards
