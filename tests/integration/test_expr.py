"""The ``expr`` task (precedence vs left-to-right trap) and the tiny backbone on it."""
from __future__ import annotations

import pytest

from metastone_lab.backbones import TinyBackboneConfig, build_tiny_backbone
from metastone_lab.backbones import cache
from metastone_lab.backbones.tokenizer import build_tokenizer
from metastone_lab.errors import ConfigError
from metastone_lab.tasks import TASKS, get_task
from metastone_lab.tasks.base import Problem
from metastone_lab.tasks.expr import ExprTask, reduce_left_to_right, reduce_precedence, render

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def expr():
    return get_task("expr", n_train=3000, n_val=200, n_test=200, n_ood=100)


def _hand_problem(task: ExprTask, terms, ops, kind) -> Problem:
    """A problem built as the generator builds it (meta included)."""
    question, prompt, solution = render(terms, ops, kind)
    other = "plain" if kind == "bracketed" else "bracketed"
    steps = reduce_precedence(terms, ops) if kind == "plain" else reduce_left_to_right(terms, ops)
    trap = reduce_precedence(terms, ops) if other == "plain" else reduce_left_to_right(terms, ops)
    return Problem(id="hand", question=question, answer=str(steps[-1][3]), prompt=prompt,
                   solution=solution, meta={"kind": kind, "steps": [list(s) for s in steps],
                                            "trap_answer": str(trap[-1][3])})


def test_registered_and_config_errors():
    assert "expr" in TASKS.names()
    with pytest.raises(ConfigError, match="n_terms_max"):
        get_task("expr", n_term_max=3)
    with pytest.raises(ConfigError, match="operator"):
        get_task("expr", operators=["add", "div"])
    with pytest.raises(ConfigError, match="require_order_matters"):
        get_task("expr", operators=["add", "sub"])
    with pytest.raises(ConfigError, match="valid keys"):
        get_task("expr", ood={"n_ops_max": 5})
    with pytest.raises(ConfigError, match="too small"):
        get_task("expr", n_terms_max=3, first_max=2, operand_max=2).problems("train", 50)


def test_rendering_of_both_kinds_and_evaluation_orders():
    q, prompt, sol = render([3, 4, 5], ["+", "*"], "plain")
    assert prompt == "Compute 3 + 4 * 5.\n<think>" and q == "Compute 3 + 4 * 5."
    assert sol == "4 * 5 = 20.\n\n3 + 20 = 23.\n\n</think> The answer is 23."
    q, prompt, sol = render([3, 4, 5], ["+", "*"], "bracketed")
    assert prompt == "Compute ((3 + 4) * 5).\n<think>"
    assert sol == "3 + 4 = 7.\n\n7 * 5 = 35.\n\n</think> The answer is 35."
    # all '*' first (leftmost first), then '+'/'-' left to right
    assert reduce_precedence([2, 3, 4, 5], ["*", "+", "*"]) == [
        (2, "*", 3, 6), (4, "*", 5, 20), (6, "+", 20, 26)]
    assert reduce_precedence([9, 2, 3, 2], ["-", "*", "*"]) == [
        (2, "*", 3, 6), (6, "*", 2, 12), (9, "-", 12, -3)]
    assert reduce_left_to_right([2, 3, 4, 5], ["*", "+", "*"]) == [
        (2, "*", 3, 6), (6, "+", 4, 10), (10, "*", 5, 50)]


def test_problems_are_valid_and_orders_differ(expr):
    cfg = expr.config
    kinds = set()
    for p in expr.problems("train", 500):
        kind, terms, ops = p.meta["kind"], p.meta["terms"], p.meta["ops"]
        kinds.add(kind)
        assert p.prompt.endswith("<think>") and p.prompt.startswith(p.question)
        assert p.question.startswith("Compute (") == (kind == "bracketed")
        assert cfg.n_terms_min <= len(terms) <= cfg.n_terms_max
        assert all(cfg.value_min <= c <= cfg.value_max for *_, c in p.meta["steps"])
        assert all(b <= cfg.mul_operand_max for s, b in zip(ops, terms[1:]) if s == "*")
        prec = reduce_precedence(terms, ops)[-1][3]
        l2r = reduce_left_to_right(terms, ops)[-1][3]
        assert prec != l2r   # require_order_matters
        assert int(p.answer) == (prec if kind == "plain" else l2r)
        assert int(p.meta["trap_answer"]) == (l2r if kind == "plain" else prec)
        assert p.solution.count(".\n\n") == len(ops)
        assert expr.is_correct(p.solution, p) and expr.first_wrong_step(p.solution, p) == -1
    assert kinds == {"plain", "bracketed"}
    assert {p.meta["kind"] for p in get_task("expr", paren_fraction=0.0).problems("test", 50)} == {"plain"}


def test_splits_deterministic_disjoint_and_ood(expr):
    again = get_task("expr", n_train=3000, n_val=200, n_test=200, n_ood=100)
    assert [p.question for p in again.problems("test", 20)] == [p.question for p in expr.problems("test")[:20]]
    qs = {s: {p.question for p in expr.problems(s)} for s in ("train", "val", "test", "ood")}
    assert len(qs["train"]) == 3000 and len(qs["test"]) == 200
    for a, b in [("train", "val"), ("train", "test"), ("val", "test"), ("train", "ood")]:
        assert not qs[a] & qs[b], f"{a} and {b} share problems"
    assert all(p.meta["n_terms"] == 5 for p in expr.problems("ood"))


def test_tokenisation_keeps_the_step_marker_one_token(expr):
    tok = build_tokenizer()
    marker = tok.convert_tokens_to_ids(".\n\n")
    for p in expr.problems("test", 20):
        ids = tok(p.solution, add_special_tokens=False)["input_ids"]
        assert ids.count(marker) == p.solution.count(".\n\n")
        assert tok.unk_token_id not in ids + tok(p.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == p.solution


def test_first_wrong_step():
    task = get_task("expr", n_train=10, n_val=10, n_test=10, n_ood=10)
    plain = _hand_problem(task, [3, 4, 5], ["+", "*"], "plain")
    assert task.first_wrong_step(plain.solution, plain) == -1
    assert task.first_wrong_step(plain.prompt + plain.solution, plain) == -1
    # the other kind's order: wrong from the first step, and its answer is the trap
    wrong_order = "3 + 4 = 7.\n\n7 * 5 = 35.\n\n</think> The answer is 35."
    assert task.first_wrong_step(wrong_order, plain) == 0
    assert task.extract_answer(wrong_order) == plain.meta["trap_answer"]
    assert not task.is_correct(wrong_order, plain)
    # a wrong value at step 1
    assert task.first_wrong_step("4 * 5 = 20.\n\n3 + 20 = 24.\n\n</think> The answer is 24.", plain) == 1
    # missing steps / right steps, wrong or missing answer
    assert task.first_wrong_step("4 * 5 = 20.\n\n</think> The answer is 20.", plain) == 1
    assert task.first_wrong_step("4 * 5 = 20.\n\n3 + 20 = 23.\n\n</think> The answer is 22.", plain) == 2
    assert task.first_wrong_step("4 * 5 = 20.\n\n3 + 20 = 23.\n\n", plain) == 2
    # an extra step, and an unparsable one
    assert task.first_wrong_step(plain.solution.replace("</think>", "23 + 0 = 23.\n\n</think>"), plain) == 2
    assert task.first_wrong_step("four times five.\n\n", plain) == 0
    brk = _hand_problem(task, [3, 4, 5], ["+", "*"], "bracketed")
    assert task.first_wrong_step(brk.solution, brk) == -1
    assert task.first_wrong_step("4 * 5 = 20.\n\n3 + 20 = 23.\n\n</think> The answer is 23.", brk) == 0
    # the same first step, a wrong order afterwards: located at the divergence
    p = _hand_problem(task, [2, 3, 4, 5], ["*", "+", "*"], "plain")
    assert task.first_wrong_step("2 * 3 = 6.\n\n6 + 4 = 10.\n\n10 * 5 = 50.\n\n</think> The answer is 50.", p) == 1


def test_backbone_key_default_unchanged_and_task_name_validated():
    default = TinyBackboneConfig()
    assert "task_name" not in default.key()
    expr_cfg = TinyBackboneConfig(task_name="expr")
    assert expr_cfg.key()["task_name"] == "expr"
    assert cache.config_hash(expr_cfg.key()) != cache.config_hash(default.key())
    with pytest.raises(ConfigError, match="arith, expr"):
        TinyBackboneConfig(task_name="exp")
    with pytest.raises(ConfigError, match="n_terms_max"):
        TinyBackboneConfig(task_name="expr", task={"n_ops_max": 3})


def test_micro_backbone_builds_on_expr(tmp_path):
    cfg = TinyBackboneConfig.micro(task_name="expr", steps=40, eval_n=8, eval_k=2, log_every=20,
                                   task={"n_train": 1000, "n_val": 20, "n_test": 20, "n_ood": 20})
    report = build_tiny_backbone(cfg, out_dir=tmp_path / "expr-micro", log=QUIET)
    assert not report["cached"] and report["eval_n"] == 8 and 0.0 <= report["pass@1"] <= 1.0
    assert cache.read_manifest(tmp_path / "expr-micro")["config"]["task_name"] == "expr"
    again = build_tiny_backbone(cfg, out_dir=tmp_path / "expr-micro", log=QUIET)
    assert again["cached"]
