"""Tasks: arith generation/splits/verifier/step checker, jsonl reading and math equivalence."""
from __future__ import annotations

from pathlib import Path

import pytest

from metastone_lab.errors import ConfigError, DataError, UnknownNameError
from metastone_lab.tasks import TASKS, get_task
from metastone_lab.tasks.answers import extract_math_answer, math_equal
from metastone_lab.tasks.arith import ArithConfig, ArithTask, render

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "math_small.jsonl"


@pytest.fixture(scope="module")
def arith():
    return get_task("arith", n_train=3000, n_val=200, n_test=200, n_ood=100)


def _problem(task, n_ops):
    return next(p for p in task.problems("test") if p.meta["n_ops"] == n_ops)


# ---------------------------------------------------------------- registry / config
def test_registry_lists_tasks_and_unknown_name_lists_valid():
    assert set(TASKS.names()) >= {"arith", "jsonl"}
    with pytest.raises(UnknownNameError, match="arith.*jsonl"):
        get_task("arithmetic")


def test_unknown_difficulty_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="n_ops_max") as e:
        get_task("arith", n_op_max=3)
    assert "Valid keys" in str(e.value)
    with pytest.raises(ConfigError, match="valid keys"):
        get_task("arith", ood={"operand_maxx": 3})
    with pytest.raises(ConfigError, match="operator"):
        get_task("arith", operators=["add", "pow"])
    with pytest.raises(ConfigError):
        get_task("arith", n_ops_min=4, n_ops_max=2)


# ---------------------------------------------------------------- problems / splits
def test_format_matches_contract():
    q, prompt, sol = render(7, [("+", 5), ("*", 3), ("-", 4)], [12, 36, 32])
    assert prompt == "Start with 7. Add 5. Multiply by 3. Subtract 4. What is the result?\n<think>"
    assert sol == "7 + 5 = 12.\n\n12 * 3 = 36.\n\n36 - 4 = 32.\n\n</think> The answer is 32."


def test_problems_are_valid_and_respect_knobs(arith):
    cfg = arith.config
    for p in arith.problems("train", 500):
        assert p.prompt.endswith("<think>") and p.prompt.startswith(p.question)
        assert cfg.n_ops_min <= p.meta["n_ops"] <= cfg.n_ops_max
        assert all(cfg.value_min <= v <= cfg.value_max for v in p.meta["values"])
        assert p.solution.count(".\n\n") == p.meta["n_ops"]
        assert p.solution.endswith(f"The answer is {p.answer}.")
        assert arith.is_correct(p.solution, p) and arith.first_wrong_step(p.solution, p) == -1
    only_add = get_task("arith", operators=["add"], n_ops_min=3, n_ops_max=3, operand_max=4)
    for p in only_add.problems("test", 50):
        assert [s for s, _ in p.meta["ops"]] == ["+"] * 3
        assert all(1 <= b <= 4 for _, b in p.meta["ops"])


def test_splits_deterministic_disjoint_and_prefix_stable(arith):
    again = get_task("arith", n_train=3000, n_val=200, n_test=200, n_ood=100)
    assert [p.question for p in again.problems("test")] == [p.question for p in arith.problems("test")]
    assert [p.question for p in again.problems("test", 10)] == [p.question for p in arith.problems("test")[:10]]
    qs = {s: {p.question for p in arith.problems(s)} for s in ("train", "val", "test", "ood")}
    assert len(qs["train"]) == 3000 and len(qs["test"]) == 200   # no duplicates within a split
    for a, b in [("train", "val"), ("train", "test"), ("val", "test"), ("train", "ood")]:
        assert not qs[a] & qs[b], f"{a} and {b} share problems"
    other = get_task("arith", seed=1, n_test=200)
    assert {p.question for p in other.problems("test")} != qs["test"]


def test_ood_family_differs(arith):
    ood = arith.problems("ood")
    assert all(p.meta["n_ops"] >= 5 for p in ood)
    wide = get_task("arith", ood={"operand_min": 10, "operand_max": 20, "mul_operand_max": 12})
    assert all(b >= 10 for p in wide.problems("ood", 30) for _, b in p.meta["ops"])


def test_unknown_split_and_impossible_space():
    t = get_task("arith")
    with pytest.raises(ConfigError, match="train, val, test, ood"):
        t.problems("dev")
    tiny = get_task("arith", n_ops_min=1, n_ops_max=1, start_min=1, start_max=1,
                    operand_min=1, operand_max=1, operators=["add"])
    with pytest.raises(ConfigError, match="too small"):
        tiny.problems("train", 5)


# ---------------------------------------------------------------- verifier
def test_answer_extraction_and_unparsable_counted(arith):
    p = _problem(arith, 3)
    assert arith.extract_answer("blah </think> The answer is 42.") == "42"
    assert arith.extract_answer(p.prompt + p.solution) == p.answer
    t = ArithTask(ArithConfig())
    assert not t.is_correct("7 + 5 = 1", p)          # truncated: no answer
    assert not t.is_correct("The answer is banana.", p)
    assert not t.is_correct("", p)
    assert t.stats["unparsable"] == 3 and t.stats["judged"] == 3
    wrong = p.solution.replace(f"The answer is {p.answer}", f"The answer is {int(p.answer) + 1}")
    assert not t.is_correct(wrong, p) and t.stats["unparsable"] == 3


# ---------------------------------------------------------------- step checker
def test_step_checker_on_hand_made_trajectories():
    t = ArithTask(ArithConfig())
    q, prompt, sol = render(7, [("+", 5), ("*", 3), ("-", 4)], [12, 36, 32])
    from metastone_lab.tasks.base import Problem
    p = Problem("x", q, "32", prompt, sol, {"start": 7, "ops": [["+", 5], ["*", 3], ["-", 4]],
                                             "values": [12, 36, 32]})
    S = ".\n\n"
    cases = {
        sol: -1,
        prompt + sol: -1,                                                      # prompt included
        f"7 + 5 = 13{S}13 * 3 = 39{S}39 - 4 = 35{S}</think> The answer is 35.": 0,   # arithmetic
        f"7 + 5 = 12{S}12 * 3 = 35{S}35 - 4 = 31{S}</think> The answer is 31.": 1,   # arithmetic
        f"7 + 5 = 12{S}12 * 3 = 36{S}36 - 4 = 33{S}</think> The answer is 33.": 2,
        f"7 + 5 = 12{S}13 * 3 = 39{S}39 - 4 = 35{S}</think> The answer is 35.": 1,   # wrong left operand
        f"7 + 5 = 12{S}12 + 3 = 15{S}15 - 4 = 11{S}</think> The answer is 11.": 1,   # wrong operator
        f"7 + 5 = 12{S}12 * 4 = 48{S}48 - 4 = 44{S}</think> The answer is 44.": 1,   # wrong operand
        f"7 + 5 = 12{S}12 - 4 = 8{S}</think> The answer is 8.": 1,                  # skipped step
        f"7 + 5 = 12{S}12 * 3 = 36{S}</think> The answer is 36.": 2,                # stops early
        f"7 + 5 = 12{S}12 * 3 = 36{S}36 - 4 = 32{S}32 + 1 = 33{S}</think> The answer is 33.": 3,  # extra
        f"7 + 5 = 12{S}12 * 3 = 36{S}36 - 4 = 32{S}</think> The answer is 30.": 3,   # wrong conclusion
        f"7 + 5 = 12{S}12 * 3 = 36{S}36 - 4 = 32{S}": 3,                            # no answer
        f"7 + 5 = 12{S}twelve times three{S}36 - 4 = 32{S}</think> The answer is 32.": 1,  # unparsable
        f"7 + 5 = 12{S}12 * 3 = 3": 1,                                              # truncated step
        f"7 + 5 = 12{S}12 x 3 = 36{S}36 - 4 = 32{S}</think> The answer is 32.": -1,   # alias
        f"7 + 5 = 13{S}12 * 3 = 36{S}36 - 4 = 32{S}</think> The answer is 32.": 0,   # right answer, wrong step
    }
    for text, want in cases.items():
        assert t.first_wrong_step(text, p) == want, text
    assert t.split_steps(sol) == ["7 + 5 = 12.\n\n", "12 * 3 = 36.\n\n", "36 - 4 = 32.\n\n"]


def test_step_checker_random_corruptions_agree_with_answer(arith):
    """Corrupting the result of step k and propagating makes k the first wrong step."""
    for p in arith.problems("val", 50):
        k = p.meta["n_ops"] - 1
        vals = list(p.meta["values"])
        vals[k] += 1
        _, _, bad = render(p.meta["start"], [tuple(o) for o in p.meta["ops"]], vals)
        assert arith.first_wrong_step(bad, p) == k
        assert not arith.is_correct(bad, p)


# ---------------------------------------------------------------- jsonl
def test_jsonl_reads_fixture_and_counts_bad_rows():
    t = get_task("jsonl", path=str(FIXTURE))
    ps = t.problems("test")
    assert [p.answer for p in ps] == ["72", "10", "\\frac{3}{4}", "2\\sqrt{2}", "1,234"]
    assert t.stats["bad_rows"] == 1 and t.bad_rows[0][1] == 5   # line number of the bad row
    assert all(p.prompt.endswith("<think>") for p in ps)
    assert t.first_wrong_step("anything", ps[0]) is None
    assert t.is_correct("so the answer is \\boxed{72}", ps[0])
    assert t.is_correct("The answer is 0.75.", ps[2])
    assert t.is_correct("We get #### 1234", ps[4])
    assert not t.is_correct("The answer is 73.", ps[0])
    assert not t.is_correct("no idea", ps[0]) and t.stats["unparsable"] == 1
    with pytest.raises(ConfigError, match="no file for split"):
        t.problems("train")


def test_jsonl_fail_mode_names_line(tmp_path):
    with pytest.raises(DataError, match=r"math_small.jsonl:5:.*answer.*on_bad_row='skip'"):
        get_task("jsonl", path=str(FIXTURE), on_bad_row="fail").problems("test")
    with pytest.raises(ConfigError, match="skip"):
        get_task("jsonl", path=str(FIXTURE), on_bad_row="ignore")


def test_jsonl_bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl.*empty"):
        get_task("jsonl", path=str(empty)).problems("test")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"question": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl.*UTF-8"):
        get_task("jsonl", path=str(latin)).problems("test")
    with pytest.raises(DataError, match="does not exist"):
        get_task("jsonl", path=str(tmp_path / "nope.jsonl")).problems("test")


@pytest.mark.parametrize("text,want", [
    ("x \\boxed{\\frac{1}{2}} y", "\\frac{1}{2}"),
    ("\\boxed{a} then \\boxed{\\sqrt{x^{2}}}", "\\sqrt{x^{2}}"),
    ("The answer is 12.", "12"),
    ("blah\n#### 1,234", "1,234"),
    ("\\boxed{unbalanced", None),
    ("nothing here", None),
])
def test_extract_math_answer(text, want):
    assert extract_math_answer(text) == want


@pytest.mark.parametrize("a,b,eq", [
    ("72", "72.0", True), ("0.5", "\\frac{1}{2}", True), ("1,234", "1234", True),
    ("2\\sqrt{2}", "\\sqrt{8}", True), ("3", "4", False), ("x+1", "1+x", True), ("", "3", False),
])
def test_math_equal(a, b, eq):
    assert math_equal(a, b) is eq
