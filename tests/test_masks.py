"""masks.py: exact counts, deterministic ties, agreement with torch.nn.utils.prune, N:M."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune as tprune

from asrprune.masks import (
    apply_keep_mask_,
    count_nonzero,
    keep_mask,
    measure_sparsity,
    n_to_prune,
    nm_keep_mask,
    parse_nm_pattern,
    pooled_keep_masks,
    validate_sparsity,
)

SPARSITIES = [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 1.0]


# -- agreement with torch.nn.utils.prune on tie-free weights -----------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (16, 16), (4, 5, 3), (101,)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_keep_mask_equals_l1_unstructured(shape, sparsity, rng):
    w = torch.randn(shape, generator=rng)
    assert torch.unique(w.abs()).numel() == w.numel()  # no ties
    holder = nn.Module()
    holder.weight = nn.Parameter(w.clone())
    tprune.l1_unstructured(holder, "weight", amount=sparsity)
    expected = holder.weight_mask.bool()
    got = keep_mask(w.abs(), sparsity)
    assert got.dtype == torch.bool and got.shape == w.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pooled_keep_masks_equal_global_unstructured(sparsity, rng):
    shapes = [(8, 8), (16, 4), (3, 5, 2), (32, 8)]
    mods = []
    for shape in shapes:
        m = nn.Module()
        m.weight = nn.Parameter(torch.randn(shape, generator=rng))
        mods.append(m)
    weights = [m.weight.detach().clone() for m in mods]
    tprune.global_unstructured(
        [(m, "weight") for m in mods], pruning_method=tprune.L1Unstructured, amount=sparsity
    )
    got = pooled_keep_masks([w.abs() for w in weights], sparsity)
    for m, mask in zip(mods, got):
        assert torch.equal(mask, m.weight_mask.bool())
    total = sum(w.numel() for w in weights)
    assert sum(int((~m).sum()) for m in got) == round(sparsity * total)


# -- exact counts and ties ----------------------------------------------------------------------


@pytest.mark.parametrize("sparsity,numel,expected", [(0.0, 10, 0), (0.5, 10, 5), (1.0, 10, 10),
                                                     (0.5, 7, 4), (0.25, 6, 2), (0.3, 1, 0)])
def test_n_to_prune_is_python_round(sparsity, numel, expected):
    assert n_to_prune(numel, sparsity) == expected == round(sparsity * numel)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_all_ties_exact_count_and_flat_index_order(sparsity):
    scores = torch.ones(6, 5)
    mask = keep_mask(scores, sparsity)
    k = round(sparsity * 30)
    assert int((~mask).sum()) == k
    # ties pruned lowest flat index first: the first k flat entries are the pruned ones
    expected = torch.ones(30, dtype=torch.bool)
    expected[:k] = False
    assert torch.equal(mask.reshape(-1), expected)


def test_partial_ties_at_threshold():
    scores = torch.tensor([3.0, 1.0, 2.0, 1.0, 2.0, 2.0, 5.0, 2.0])
    # 4 to prune: both 1s, then the two 2s with the lowest indices (2 and 4)
    mask = keep_mask(scores, 0.5)
    assert mask.tolist() == [True, False, False, False, False, True, True, True]


def test_pooled_ties_go_to_earlier_tensor_first():
    a, b = torch.zeros(2, 3), torch.zeros(4)
    ma, mb = pooled_keep_masks([a, b], 0.5)  # 5 of 10 pruned
    assert int((~ma).sum()) == 5 and bool(mb.all())
    ma, mb = pooled_keep_masks([a, b], 0.8)  # 8 of 10: all of a, first 2 of b
    assert not ma.any() and mb.tolist() == [False, False, True, True]


def test_threshold_comparison_would_over_prune_but_keep_mask_does_not():
    scores = torch.tensor([0.0] * 6 + [1.0] * 4)
    threshold = torch.kthvalue(scores, 3).values
    assert int((scores <= threshold).sum()) == 6  # the sparsegpt-style comparison prunes 6
    assert int((~keep_mask(scores, 0.3)).sum()) == 3


def test_keep_mask_dtypes_and_does_not_modify_scores():
    w = torch.randn(9, 4, dtype=torch.float16)
    before = w.clone()
    mask = keep_mask(w.abs(), 0.5)
    assert torch.equal(w, before) and int((~mask).sum()) == 18
    ints = torch.arange(10)
    assert keep_mask(ints, 0.3).tolist() == [False] * 3 + [True] * 7


def test_nan_scores_rejected():
    with pytest.raises(ValueError, match="NaN"):
        keep_mask(torch.tensor([1.0, float("nan")]), 0.5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, 50, float("nan"), float("inf"), "0.5", None, True])
def test_invalid_sparsity_rejected(bad):
    with pytest.raises(ValueError) as exc:
        keep_mask(torch.ones(4), bad)
    assert repr(bad) in str(exc.value)


def test_percentage_hint():
    with pytest.raises(ValueError, match="0.5 for 50%"):
        validate_sparsity(50)


def test_pooled_needs_a_tensor():
    with pytest.raises(ValueError):
        pooled_keep_masks([], 0.5)


# -- N:M ---------------------------------------------------------------------------------------


def test_nm_keeps_largest_per_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.2, 9.0]])
    mask = nm_keep_mask(scores, 2, 4)
    assert mask.tolist() == [[True, False, True, False, True, False, False, True]]


def test_nm_ties_by_position():
    mask = nm_keep_mask(torch.ones(2, 8), 2, 4)
    assert mask.tolist() == [[False, False, True, True] * 2] * 2


@pytest.mark.parametrize("n,m,shape", [(2, 4, (3, 6)), (-1, 4, (2, 4)), (5, 4, (2, 4)), (2, 0, (2, 4)),
                                       (2.5, 4, (2, 4)), (2, 4, ())])
def test_nm_invalid(n, m, shape):
    with pytest.raises(ValueError):
        nm_keep_mask(torch.ones(shape), n, m)


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 4 : 8 ", (4, 8)), ("1:2", (1, 2))])
def test_parse_nm(text, expected):
    assert parse_nm_pattern(text) == expected


@pytest.mark.parametrize("text", ["2/4", "4:2", "0:4", "2:2", "a:b", "2:4:8", ""])
def test_parse_nm_invalid(text):
    with pytest.raises(ValueError):
        parse_nm_pattern(text)


# -- application and measurement ---------------------------------------------------------------


def test_apply_zeroes_exactly_the_false_entries(rng):
    w = nn.Parameter(torch.randn(5, 6, generator=rng))
    w.data[0, 0] = float("inf")
    w.data[0, 1] = float("nan")
    original = w.detach().clone()
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[3, 4] = False
    apply_keep_mask_(w, mask)
    assert not w.requires_grad or w.grad is None
    assert torch.equal(w.detach()[mask], original[mask])
    assert (w.detach()[~mask] == 0).all()
    assert measure_sparsity(w) == pytest.approx(3 / 30)
    assert count_nonzero(w) == 27


def test_apply_rejects_bad_masks():
    with pytest.raises(ValueError, match="shape"):
        apply_keep_mask_(torch.ones(2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        apply_keep_mask_(torch.ones(2, 3), torch.ones(2, 3))


def test_measure_sparsity_empty():
    assert measure_sparsity(torch.empty(0)) == 0.0


# -- property tests ----------------------------------------------------------------------------

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
sparsities = st.floats(0.0, 1.0, allow_nan=False)


def _scores(data, shape):
    # few distinct values so that ties are common
    values = data.draw(st.lists(st.integers(-3, 3), min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def _check_ranked(flat_scores: torch.Tensor, flat_keep: torch.Tensor) -> None:
    """Every pruned entry ranks below every kept one by (score, flat index)."""
    pruned = [(float(s), i) for i, (s, k) in enumerate(zip(flat_scores, flat_keep)) if not k]
    kept = [(float(s), i) for i, (s, k) in enumerate(zip(flat_scores, flat_keep)) if k]
    if pruned and kept:
        assert max(pruned) < min(kept)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), shape=shapes, sparsity=sparsities)
def test_property_keep_mask_exact_and_ranked(data, shape, sparsity):
    scores = _scores(data, shape)
    mask = keep_mask(scores, sparsity)
    assert mask.shape == scores.shape
    assert int((~mask).sum()) == round(sparsity * scores.numel())
    _check_ranked(scores.reshape(-1), mask.reshape(-1))
    assert torch.equal(mask, keep_mask(scores, sparsity))  # deterministic


@settings(max_examples=100, deadline=None)
@given(data=st.data(), shape_list=st.lists(shapes, min_size=1, max_size=4), sparsity=sparsities)
def test_property_pooled_exact_and_ranked(data, shape_list, sparsity):
    scores = [_scores(data, s) for s in shape_list]
    masks = pooled_keep_masks(scores, sparsity)
    total = sum(s.numel() for s in scores)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    _check_ranked(torch.cat([s.reshape(-1) for s in scores]), torch.cat([m.reshape(-1) for m in masks]))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), rows=st.integers(1, 6), groups=st.integers(1, 5),
       nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]))
def test_property_nm_valid(data, rows, groups, nm):
    n, m = nm
    scores = _scores(data, (rows, groups * m))
    mask = nm_keep_mask(scores, n, m)
    g_mask = mask.reshape(-1, m)
    g_scores = scores.reshape(-1, m)
    assert (g_mask.sum(dim=1) == n).all()
    for s, k in zip(g_scores, g_mask):
        _check_ranked(s, k)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=shapes, sparsity=sparsities)
def test_property_apply_touches_only_pruned(data, shape, sparsity):
    w = torch.randn(shape) + 10.0  # no zeros beforehand
    mask = keep_mask(_scores(data, shape), sparsity)
    out = w.clone()
    apply_keep_mask_(out, mask)
    assert torch.equal(out[mask], w[mask])
    assert measure_sparsity(out) == pytest.approx(round(sparsity * w.numel()) / w.numel())


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4)])
def test_nm_keep_mask_takes_the_plans_rule(n, m):
    """One N:M rule everywhere: 1 <= N < M (N kept); 0:4 and 4:4 are no patterns."""
    with pytest.raises(ValueError, match="1 <= N < M"):
        nm_keep_mask(torch.ones(2, 8), n, m)
