"""The ``solve`` task (guess the start of a chain, check it forward)."""
from __future__ import annotations

import pytest

from metastone_lab.backbones import TinyBackboneConfig
from metastone_lab.backbones import cache
from metastone_lab.backbones.tokenizer import build_tokenizer
from metastone_lab.errors import ConfigError
from metastone_lab.tasks import TASKS, get_task
from metastone_lab.tasks.arith import OPERATORS
from metastone_lab.tasks.base import Problem
from metastone_lab.tasks.solve import render

_APPLY = {op.symbol: op.apply for op in OPERATORS.values()}


@pytest.fixture(scope="module")
def solve():
    return get_task("solve", n_train=3000, n_val=200, n_test=200, n_ood=100)


def _hand(start, ops) -> Problem:
    values, v = [], start
    for s, b in ops:
        v = _APPLY[s](v, b)
        values.append(v)
    question, prompt, solution = render(start, ops, values)
    return Problem(id="hand", question=question, answer=str(start), prompt=prompt,
                   solution=solution, meta={"start": start, "ops": [list(o) for o in ops],
                                            "values": values, "result": values[-1]})


def test_registered_and_config_errors():
    assert "solve" in TASKS.names()
    with pytest.raises(ConfigError, match="n_ops"):
        get_task("solve", n_ops_min=0)
    with pytest.raises(ConfigError, match="valid keys"):
        get_task("solve", ood={"n_terms_max": 5})
    with pytest.raises(ConfigError, match="too small"):
        get_task("solve", n_ops_max=1, start_max=2, operand_max=2).problems("train", 50)


def test_rendering():
    q, prompt, sol = render(7, [("+", 5), ("*", 3)], [12, 36])
    assert q == "Start with x. Add 5. Multiply by 3. The result is 36. What is x?"
    assert prompt == q + "\n<think>"
    assert sol == "x = 7.\n\n7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 = 36.\n\n</think> The answer is 7."
    _, _, sol = render(7, [("*", 3)], [21], wrong_guesses=(9, 6))
    assert sol == ("x = 9.\n\n9 * 3 = 27.\n\n27 > 21.\n\nx = 6.\n\n6 * 3 = 18.\n\n18 < 21.\n\n"
                   "x = 7.\n\n7 * 3 = 21.\n\n21 = 21.\n\n</think> The answer is 7.")


def test_problems_are_valid_and_answers_unique(solve):
    cfg = solve.config
    by_question: dict[str, str] = {}
    for p in solve.problems("train", 1000):
        start, ops, values = p.meta["start"], p.meta["ops"], p.meta["values"]
        assert cfg.n_ops_min <= len(ops) <= cfg.n_ops_max and cfg.start_min <= start <= cfg.start_max
        v = start
        for (s, b), c in zip(ops, values):
            v = _APPLY[s](v, b)
            assert v == c and cfg.value_min <= v <= cfg.value_max
        assert p.answer == str(start) and f"The result is {values[-1]}." in p.question
        assert p.question.startswith("Start with x. ")   # the start is hidden
        assert solve.is_correct(p.solution, p) and solve.first_wrong_step(p.solution, p) == -1
        assert by_question.setdefault(p.question, p.answer) == p.answer
    # the question determines the answer: no start gives the same chain result twice
    for p in solve.problems("test"):
        ops = p.meta["ops"]
        hits = []
        for x in range(cfg.start_min, cfg.start_max + 1):
            v = x
            for s, b in ops:
                v = _APPLY[s](v, b)
            hits += [x] if v == p.meta["result"] else []
        assert hits == [p.meta["start"]]


def test_splits_deterministic_disjoint_and_ood(solve):
    again = get_task("solve", n_train=3000, n_val=200, n_test=200, n_ood=100)
    assert [p.question for p in again.problems("test", 20)] == [p.question for p in solve.problems("test")[:20]]
    qs = {s: {p.question for p in solve.problems(s)} for s in ("train", "val", "test", "ood")}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test"), ("train", "ood")]:
        assert not qs[a] & qs[b], f"{a} and {b} share problems"
    assert all(p.meta["n_ops"] in (4, 5) for p in solve.problems("ood"))


def test_tokenisation_adds_the_task_phrases_without_moving_other_ids(solve):
    tok, plain = build_tokenizer(999, solve.phrases), build_tokenizer(999)
    assert len(tok) == len(plain) + len(solve.phrases)
    assert [tok.convert_tokens_to_ids(t) for t in ("5", "999", ".\n\n", " = ")] == \
        [plain.convert_tokens_to_ids(t) for t in ("5", "999", ".\n\n", " = ")]
    marker = tok.convert_tokens_to_ids(".\n\n")
    for p in solve.problems("test", 20):
        ids = tok(p.solution, add_special_tokens=False)["input_ids"]
        assert ids.count(marker) == p.solution.count(".\n\n") == len(p.meta["ops"]) + 2
        assert len(tok(p.prompt, add_special_tokens=False)["input_ids"]) == 2 * len(p.meta["ops"]) + 6
        assert tok.unk_token_id not in ids + tok(p.prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == p.solution


def test_first_wrong_step():
    task = get_task("solve", n_train=10, n_val=10, n_test=10, n_ood=10)
    p = _hand(7, [("+", 5), ("*", 3)])
    assert p.solution == "x = 7.\n\n7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 = 36.\n\n</think> The answer is 7."
    assert task.first_wrong_step(p.solution, p) == -1
    assert task.first_wrong_step(p.prompt + p.solution, p) == -1
    search = ("x = 6.\n\n6 + 5 = 11.\n\n11 * 3 = 33.\n\n33 < 36.\n\n"
              "x = 7.\n\n7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 = 36.\n\n</think> The answer is 7.")
    assert task.first_wrong_step(search, p) == -1 and task.is_correct(search, p)  # a rejected guess is fine
    # a wrong guess whose check lies, or whose chain "reaches" the result by breaking the arithmetic
    assert task.first_wrong_step("x = 6.\n\n6 + 5 = 11.\n\n11 * 3 = 33.\n\n33 = 36.\n\n</think> The answer is 6.", p) == 3
    assert task.first_wrong_step("x = 6.\n\n6 + 5 = 11.\n\n11 * 3 = 36.\n\n36 = 36.\n\n</think> The answer is 6.", p) == 2
    # honest steps, but it stops after a failed check, or answers another number
    stop = "x = 6.\n\n6 + 5 = 11.\n\n11 * 3 = 33.\n\n33 < 36.\n\n</think> The answer is 6."
    assert task.first_wrong_step(stop, p) == 4 and not task.is_correct(stop, p)
    assert task.first_wrong_step(p.solution.replace("is 7.", "is 8."), p) == 4
    # right guess, then an arithmetic slip; missing steps; a guess after the result was found
    assert task.first_wrong_step("x = 7.\n\n7 + 5 = 13.\n\n13 * 3 = 39.\n\n", p) == 1
    assert task.first_wrong_step("x = 7.\n\n7 + 5 = 12.\n\n", p) == 2
    assert task.first_wrong_step(p.solution.replace("</think>", "x = 7.\n\n</think>"), p) == 4
    assert task.first_wrong_step("seven.\n\n", p) == 0 and task.first_wrong_step("", p) == 0
    assert task.first_wrong_step("x = 7.\n\n7 * 5 = 35.\n\n", p) == 1   # wrong operation


def test_canonical_searches_converge():
    task = get_task("solve", retry_weights=[0.2, 0.4, 0.4], n_train=500)
    n_wrong = []
    for p in task.problems("train"):
        wrong, start = p.meta["wrong_guesses"], p.meta["start"]
        gaps = [abs(g - start) for g in wrong]
        assert all(0 < g <= task.config.guess_offset_max for g in gaps) and gaps == sorted(gaps, reverse=True)
        assert len(set(gaps)) == len(gaps)
        assert task.first_wrong_step(p.solution, p) == -1 and task.is_correct(p.solution, p)
        n_wrong.append(len(wrong))
    assert set(n_wrong) == {0, 1, 2}
    assert all(not p.meta["wrong_guesses"] for p in get_task("solve").problems("train", 50))
    # the search in the solutions has its own random stream: the same problems either way
    assert [p.question for p in task.problems("test", 50)] == \
        [p.question for p in get_task("solve").problems("test", 50)]
    with pytest.raises(ConfigError, match="retry_weights"):
        get_task("solve", retry_weights=[0.0])


def test_backbone_key_names_the_task():
    cfg = TinyBackboneConfig(task_name="solve")
    assert cfg.key()["task_name"] == "solve"
    assert cache.config_hash(cfg.key()) != cache.config_hash(TinyBackboneConfig().key())
    with pytest.raises(ConfigError, match="n_ops"):
        TinyBackboneConfig(task_name="solve", task={"n_terms_max": 3})
