"""SPR loss: hand-computed values with each switch on/off, variants, edge cases."""
import math

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _tolerance import rounding_bound  # noqa: E402

from metastone_lab.errors import NumericsError, ShapeError
from metastone_lab.loss import LOSSES, default_reduce_counts, get_loss, last_step_mask, spr_loss


def bce(x: float, y: int) -> float:
    return math.log1p(math.exp(-x)) if y else math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def geo(xs) -> float:
    return math.exp(sum(math.log(sig(x)) for x in xs) / len(xs))


# row 0 correct: steps at 0,1,2; row 1 incorrect: steps at 1,3; row 2 incorrect: steps at 0,2
STEPS = {0: {0: 2.0, 1: -1.0, 2: 0.5}, 1: {1: -0.5, 3: 1.5}, 2: {0: -3.0, 2: -2.0}}
OUTCOME = [1, 0, 0]


@pytest.fixture
def batch():
    logits = torch.full((3, 4), 100.0)  # unscored positions hold junk that must be ignored
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for b, steps in STEPS.items():
        for p, x in steps.items():
            logits[b, p] = x
            mask[b, p] = True
    logits[1, 0] = float("nan")  # unscored NaN: ignored
    return logits.requires_grad_(True), mask, torch.tensor(OUTCOME)


# The float32 loss against the float64 references here: the logits are exact in float32;
# each kept step's BCE (exp, log1p, the label: 3 roundings) times its weight (count ratio,
# pos_boost, the product: 3), a sum over at most 9 steps, over a weight sum of at most 9
# terms (+ 1e-5, the division: 2): n = 26. Every term is positive (no cancellation), so
# the bound of tests/_tolerance.py is relative: 2 x 26 x eps32 = 6.2e-6.
REL = rounding_bound(26, 1.0)


def weighted(pos, neg, wp, wn):
    num = sum(bce(x, 1) * wp for x in pos) + sum(bce(x, 0) * wn for x in neg)
    return num / (wp * len(pos) + wn * len(neg) + 1e-5)


# kept steps by hand. filter on: positives agree if x>0, negatives if x<0
POS_F, NEG_F = [2.0, 0.5], [-0.5, -3.0, -2.0]
POS_ALL, NEG_ALL = [2.0, -1.0, 0.5], [-0.5, 1.5, -3.0, -2.0]

CASES = {
    # name: (kwargs, expected)
    "reference": ({}, weighted(POS_F, NEG_F, 1.5 * 4 / 7, 3 / 7)),  # n_pos=2+1, n_neg=3+1
    "no_filter": ({"filter": False}, weighted(POS_ALL, NEG_ALL, 1.5 * 5 / 9, 4 / 9)),
    "no_balance": ({"balance": False}, weighted(POS_F, NEG_F, 1.5, 1.0)),
    "no_boost": ({"pos_boost": 1.0}, weighted(POS_F, NEG_F, 4 / 7, 3 / 7)),
    "nothing": ({"filter": False, "balance": False, "pos_boost": 1.0},
                weighted(POS_ALL, NEG_ALL, 1.0, 1.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_computed(batch, case):
    kwargs, expected = CASES[case]
    loss, _ = spr_loss(*batch, **kwargs)
    assert loss.item() == pytest.approx(expected, rel=REL)


def test_switches_matter(batch):
    values = {c: spr_loss(*batch, **kw)[0].item() for c, (kw, _) in CASES.items()}
    assert len({round(v, 6) for v in values.values()}) == len(values)


def test_variants_match_switches(batch):
    assert LOSSES.names() == sorted(["spr", "spr_no_filter", "spr_no_balance", "spr_no_boost",
                                     "bce_all_steps", "last_step_only"])
    pairs = {"spr": "reference", "spr_no_filter": "no_filter", "spr_no_balance": "no_balance",
             "spr_no_boost": "no_boost", "bce_all_steps": "nothing"}
    for name, case in pairs.items():
        assert LOSSES.get(name)(*batch)[0].item() == pytest.approx(CASES[case][1], rel=REL), name
    # last step of each row: 0.5 (y=1, kept), 1.5 (y=0, filtered out), -2.0 (y=0, kept)
    expected = weighted([0.5], [-2.0], 1.5 * 2 / 4, 2 / 4)
    assert LOSSES.get("last_step_only")(*batch)[0].item() == pytest.approx(expected, rel=REL)
    assert get_loss("spr", pos_boost=1.0)(*batch)[0].item() == pytest.approx(CASES["no_boost"][1], rel=REL)


def test_diagnostics(batch):
    _, d = spr_loss(*batch)
    assert d["n_steps"] == 7 and d["n_pos"] == 2 and d["n_neg"] == 3
    assert d["kept_fraction"] == pytest.approx(5 / 7)
    assert d["pos_weight"] == pytest.approx(4 / 7) and d["neg_weight"] == pytest.approx(3 / 7)
    assert d["weight_sum"] == pytest.approx(1.5 * 4 / 7 * 2 + 3 / 7 * 3)
    assert d["score_correct_mean"] == pytest.approx(geo(STEPS[0].values()), rel=REL)
    inc = (geo(STEPS[1].values()) + geo(STEPS[2].values())) / 2
    assert d["score_incorrect_mean"] == pytest.approx(inc, rel=REL)
    assert d["score_gap"] == pytest.approx(d["score_correct_mean"] - inc, rel=REL)
    assert d["n_correct"] == 1 and d["n_incorrect"] == 2
    assert all(math.isfinite(v) for v in d.values())


def test_gradient_only_on_kept_steps(batch):
    logits, mask, outcome = batch
    loss, _ = spr_loss(logits, mask, outcome)
    loss.backward()
    g = logits.grad
    kept = {(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)}
    for b in range(3):
        for p in range(4):
            assert (g[b, p] != 0).item() == ((b, p) in kept), (b, p)


def test_injected_count_reduction(batch):
    seen = []

    def fake_allreduce(counts):  # another rank contributed 4 kept positives and 0 negatives (+1 each)
        seen.append(counts.clone())
        return counts + torch.tensor([5.0, 1.0])

    loss, d = spr_loss(*batch, reduce_counts=fake_allreduce)
    assert seen[0].tolist() == [3.0, 4.0]  # local counts with the +1 smoothing
    # global n_pos = 8, n_neg = 5 -> pos_w = 5/13, neg_w = 8/13
    assert loss.item() == pytest.approx(weighted(POS_F, NEG_F, 1.5 * 5 / 13, 8 / 13), rel=REL)
    assert d["pos_weight"] == pytest.approx(5 / 13)


def test_default_reduction_with_a_process_group(tmp_path):
    import torch.distributed as dist

    assert default_reduce_counts(torch.tensor([2.0, 3.0])).tolist() == [2.0, 3.0]
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        c = torch.tensor([2.0, 3.0])
        assert default_reduce_counts(c).tolist() == [2.0, 3.0] and c.tolist() == [2.0, 3.0]
    finally:
        dist.destroy_process_group()


def test_no_steps_gives_connected_zero():
    logits = torch.full((2, 3), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, d = spr_loss(logits, mask, torch.tensor([1, 0]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))
    assert d["n_steps"] == 0 and d["kept_fraction"] == 0.0
    assert all(math.isfinite(v) for v in d.values())


def test_all_steps_filtered_is_zero_not_nan():
    logits = torch.tensor([[-1.0, -2.0], [3.0, 4.0]], requires_grad=True)
    loss, d = spr_loss(logits, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, 0]))
    assert loss.item() == 0.0 and d["kept_fraction"] == 0.0
    loss.backward()


def test_valid_rows_and_bool_outcome(batch):
    logits, mask, outcome = batch
    loss, d = spr_loss(logits, mask, outcome.bool(), valid=torch.tensor([True, False, True]))
    # row 1 dropped: kept positives 2.0, 0.5; negatives -3, -2 -> n_pos 3, n_neg 3
    assert loss.item() == pytest.approx(weighted(POS_F, [-3.0, -2.0], 1.5 * 0.5, 0.5), rel=REL)
    assert d["n_incorrect"] == 1


def test_last_step_mask():
    m = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]]).bool()
    assert last_step_mask(m).int().tolist() == [[0, 0, 0, 1, 0], [0] * 5, [0, 1, 0, 0, 0]]


def test_bad_inputs(batch):
    logits, mask, outcome = batch
    with pytest.raises(ShapeError, match=r"\(3, 3\).*\(3, 4\)"):
        spr_loss(logits, mask[:, :3], outcome)
    with pytest.raises(ShapeError, match="outcome"):
        spr_loss(logits, mask, outcome[:2])
    bad = logits.detach().clone()
    bad[2, 2] = float("inf")
    with pytest.raises(NumericsError, match="row 2, position 2"):
        spr_loss(bad, mask, outcome)


def test_end_to_end_with_reflective_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from metastone_lab.sprm import ReflectiveModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    rm = ReflectiveModel(LlamaForCausalLM(cfg))
    ids = torch.randint(0, 64, (4, 10))
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 2::3] = True
    out = rm(ids)
    loss, d = spr_loss(out.step_logits, mask, torch.tensor([1, 0, 1, 0]), filter=False)
    loss.backward()
    assert d["n_steps"] == 12 and rm.head[0].weight.grad.abs().sum() > 0
