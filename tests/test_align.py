"""Structural alignment on key trees (no TensorFlow): sequences, attributes, ties, optimality."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from regraft.align import GAP, _dp_moves, _traceback, align_trees, build_tree, forced_pairs


def layer_keys(prefix: str, shapes: list[tuple[int, int] | None]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Leaves for a list of Dense-like layers under ``prefix/i``; ``None`` is a weightless layer."""
    leaves = []
    for i, shape in enumerate(shapes):
        if shape is None:
            continue
        leaves.append((f"{prefix}/{i}/_kernel", f"{prefix}/{i}/_kernel", shape))
        leaves.append((f"{prefix}/{i}/bias", f"{prefix}/{i}/bias", (shape[1],)))
    return leaves


def landmarks(prefix: str, shapes: list[tuple[int, int] | None]) -> dict[str, tuple[None, None]]:
    return {f"{prefix}/{i}": (None, None) for i, shape in enumerate(shapes) if shape is None}


def align(old: list, new: list):
    s = build_tree(layer_keys("_operations", old), landmarks("_operations", old))
    t = build_tree(layer_keys("_operations", new), landmarks("_operations", new))
    result = align_trees(s, t, "object")
    return {p.target: (p.source, p.by_order) for p in result.pairs}, result


def test_inserted_layer_in_a_sequence_shifts_nothing():
    old = [None, (8, 32), (32, 16), (16, 4)]
    new = [None, (8, 32), (32, 16), (16, 16), (16, 4)]  # one layer inserted at position 3
    pairs, result = align(old, new)
    assert pairs == {
        "_operations/1/_kernel": ("_operations/1/_kernel", False),
        "_operations/1/bias": ("_operations/1/bias", False),
        "_operations/2/_kernel": ("_operations/2/_kernel", False),
        "_operations/2/bias": ("_operations/2/bias", False),
        "_operations/4/_kernel": ("_operations/3/_kernel", False),
        "_operations/4/bias": ("_operations/3/bias", False),
    }
    assert result.inserted == ["_operations/3"] and result.removed == []


def test_removed_layer_is_reported_removed():
    old = [None, (8, 32), (32, 32), (32, 4)]
    new = [None, (8, 32), (32, 4)]
    pairs, result = align(old, new)
    assert pairs["_operations/2/_kernel"] == ("_operations/3/_kernel", False)
    assert result.removed == ["_operations/2"]


def test_run_of_alike_layers_grown_keeps_old_ones_first_and_marks_them():
    # VGG-like: pool landmarks separate stages; stage 2 grows from 2 to 3 alike convs.
    old = [None, (3, 8), None, (8, 16), (16, 16), None, (16, 16)]
    new = [None, (3, 8), None, (8, 16), (16, 16), (16, 16), None, (16, 16)]
    pairs, result = align(old, new)
    assert pairs["_operations/4/_kernel"] == ("_operations/4/_kernel", True)  # placed by order
    assert pairs["_operations/7/_kernel"] == ("_operations/6/_kernel", False)  # after the landmark: certain
    assert pairs["_operations/3/_kernel"] == ("_operations/3/_kernel", False)
    assert result.inserted == ["_operations/5"]


def test_shape_change_prefers_the_layer_that_kept_its_bias():
    # Old d3 (16->16) must pair with new d3 (24->16, same bias) and not with the inserted (16->24).
    old = [None, (8, 16), (16, 16), (16, 4)]
    new = [None, (8, 16), (16, 24), (24, 16), (16, 4)]
    pairs, result = align(old, new)
    assert pairs["_operations/3/bias"] == ("_operations/2/bias", False)
    assert pairs["_operations/3/_kernel"] == ("_operations/2/_kernel", False)  # a shape mismatch, same layer
    assert not any(target.startswith("_operations/2/") for target in pairs)  # the inserted layer gets nothing
    assert result.inserted == ["_operations/2"]


def test_renamed_attribute_is_found_by_structure():
    s = build_tree([("encoder/d/_kernel", "e.k", (4, 3)), ("encoder/d/bias", "e.b", (3,)),
                    ("dense1/_kernel", "d.k", (3, 2)), ("dense1/bias", "d.b", (2,))])
    t = build_tree([("backbone/d/_kernel", "B.k", (4, 3)), ("backbone/d/bias", "B.b", (3,)),
                    ("dense1/_kernel", "D.k", (3, 2)), ("dense1/bias", "D.b", (2,))])
    result = align_trees(s, t, "object")
    assert {p.target: p.source for p in result.pairs} == {"B.k": "e.k", "B.b": "e.b", "D.k": "d.k", "D.b": "d.b"}
    assert result.ambiguous == {}


def test_two_identical_renamed_attributes_are_ambiguous_not_guessed():
    leaves_s = [(f"{a}/_kernel", f"s.{a}", (4, 4)) for a in ("left", "right")]
    leaves_t = [(f"{a}/_kernel", f"t.{a}", (4, 4)) for a in ("first", "second")]
    result = align_trees(build_tree(leaves_s), build_tree(leaves_t), "object")
    assert result.pairs == []
    assert result.ambiguous == {"first": ["left", "right"], "second": ["left", "right"]}


def test_h5_layers_align_per_class_and_by_name():
    def leaves(names):
        out, layers = [], {}
        for i, (cls, name, shape) in enumerate(names):
            key = f"layers/{cls}" if i == 0 else f"layers/{cls}_{i}"
            out.append((f"{key}/vars/0", f"{name}/kernel", shape))
            layers[key] = (name, cls.split("_")[0])
        return out, layers

    old_leaves, old_layers = leaves([("dense", "a", (4, 4)), ("dense", "b", (4, 4))])
    new_leaves, new_layers = leaves([("dense", "new", (4, 4)), ("dense", "a", (4, 4)), ("dense", "b", (4, 4))])
    result = align_trees(build_tree(old_leaves, old_layers), build_tree(new_leaves, new_layers), "h5")
    assert {p.target: p.source for p in result.pairs} == {"a/kernel": "a/kernel", "b/kernel": "b/kernel"}
    assert all(not p.by_order for p in result.pairs)  # names decided, not order


def _best_score_brute_force(scores: np.ndarray) -> int:
    return _optimal_pairings_brute_force(scores)[0]


@pytest.mark.parametrize("seed", range(25))
def test_dynamic_programme_is_optimal_and_both_tracebacks_agree_on_the_score(seed):
    rng = random.Random(seed)
    n, m = rng.randint(1, 5), rng.randint(1, 5)
    scores = np.array([[rng.choice([0, 0, 20, 40, 50, 100]) for _ in range(m)] for _ in range(n)], dtype=np.int64)
    moves = _dp_moves(scores)
    expected = _best_score_brute_force(scores)
    for prefer_diagonal in (False, True):
        pairs = _traceback(moves, prefer_diagonal)
        assert all(scores[i, j] > 0 for i, j in pairs)
        assert [i for i, _ in pairs] == sorted(i for i, _ in pairs)
        assert [j for _, j in pairs] == sorted(j for _, j in pairs)
        total = sum(int(scores[i, j]) for i, j in pairs) - GAP * (n + m - 2 * len(pairs))
        assert total == expected


def _optimal_pairings_brute_force(scores: np.ndarray) -> tuple[int, list[set[tuple[int, int]]]]:
    """The best total score of aligning two sequences, and every pairing that reaches it, by enumeration."""
    n, m = scores.shape
    found: list[set[tuple[int, int]]] = []
    best = None
    for k in range(0, min(n, m) + 1):
        for rows in itertools.combinations(range(n), k):
            for cols in itertools.combinations(range(m), k):
                if all(scores[i, j] > 0 for i, j in zip(rows, cols)):
                    total = sum(int(scores[i, j]) for i, j in zip(rows, cols)) - GAP * (n + m - 2 * k)
                    if best is None or total > best:
                        best, found = total, [set(zip(rows, cols))]
                    elif total == best:
                        found.append(set(zip(rows, cols)))
    return best, found


@pytest.mark.parametrize("seed", range(60))
def test_certainty_matches_brute_force(seed):
    """Forced pairs are those in every optimal alignment; pairable targets those some optimal alignment pairs."""
    from regraft.align import _certainty

    rng = random.Random(1000 + seed)
    n, m = rng.randint(1, 5), rng.randint(1, 6)
    # Few distinct values, so that ties (runs of alike layers) are common.
    scores = np.array([[rng.choice([0, 50, 100, 100]) for _ in range(m)] for _ in range(n)], dtype=np.int64)
    optimal = _optimal_pairings_brute_force(scores)[1]
    forced, pairable = _certainty(scores)
    assert forced == forced_pairs(scores) == (set.intersection(*optimal) if optimal else set())
    assert pairable == {j for pairing in optimal for _, j in pairing}


def test_widened_layer_next_to_an_inserted_one_of_the_old_shape_keeps_its_position():
    # The first layer widens 48 -> 64 (so the second reads 64), and a 48 -> 48 layer is inserted
    # later. Pairing old 1 with new 2 (exact bias) and old 2 with the inserted layer (exact) scores
    # more pair by pair, but needs a new layer in front and every old layer shifted: the widening
    # and the wider input of the next layer are one change, credited only when both pairs are made.
    old = [None, (48, 48), (48, 48), (48, 48), (48, 3)]
    new = [None, (48, 64), (64, 48), (48, 48), (48, 48), (48, 3)]
    pairs, result = align(old, new)
    assert pairs["_operations/1/_kernel"] == ("_operations/1/_kernel", False)
    assert pairs["_operations/2/_kernel"] == ("_operations/2/_kernel", False)
    assert pairs["_operations/5/_kernel"] == ("_operations/4/_kernel", False)
    # Which of the two alike 48 -> 48 layers is the inserted one, only order tells.
    assert pairs["_operations/3/_kernel"] == ("_operations/3/_kernel", True)
    assert result.inserted == ["_operations/4"]


def test_credit_for_an_explained_resize_needs_the_pair_before():
    # Old (32, 16) could read as "input widened" next to new (16, 16) only if the pair before were
    # made too; it is not (the exact pairs win), so the credit is not earned.
    old = [None, (8, 32), (32, 16), (16, 4)]
    new = [None, (8, 32), (32, 16), (16, 16), (16, 4)]
    pairs, _ = align(old, new)
    assert pairs["_operations/2/_kernel"] == ("_operations/2/_kernel", False)


@pytest.mark.parametrize("seed", range(40))
def test_banded_programme_gives_the_full_tables_alignment_forced_pairs_and_ties(seed):
    """Long sequences run on a proved band of diagonals: same traceback, forced pairs and pairable targets."""
    from regraft.align import _band_align, _certainty

    rng = random.Random(7000 + seed)
    n = rng.randint(1, 30)
    m = max(1, n + rng.randint(-3, 3)) if seed % 2 else rng.randint(1, 30)
    scores = np.array([[rng.choice([0, 0, 20, 50, 100, 100, 200]) for _ in range(m)] for _ in range(n)],
                      dtype=np.int64)
    if seed % 2:  # near-identical sequences: a narrow band is proved wide enough
        for i in range(min(n, m)):
            scores[i, i] = 200
    looser = scores.max(axis=1) + (30 if seed % 3 == 0 else 0)  # any upper bound is sound
    banded = _band_align(lambda r, c: scores[r, c], looser, scores.max(axis=0), n, m,
                         slack=seed % 3, give_up=False)
    assert banded == (_traceback(_dp_moves(scores), prefer_diagonal=False), *_certainty(scores))
