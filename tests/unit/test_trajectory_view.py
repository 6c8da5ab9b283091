"""The trajectory view (metastone_lab.trajectory_view): every sample of a problem
with its step text coloured by score, the first wrong step underlined, each
selector's pick marked, filters, and a bounded size that the page states."""
from __future__ import annotations

import re

import pytest

from metastone_lab.backbones.tokenizer import build_tokenizer
from metastone_lab.generate import ProblemSamples, Trajectory
from metastone_lab.tasks.base import Problem
from metastone_lab.trajectory_view import render_html, write_html


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _traj(tok, text, scores, answer, correct, wrong, lp=-0.1, prompt_len=4):
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # read positions: the token before each ".\n\n" marker (reference rule), in prompt+ids
    marker = tok.convert_tokens_to_ids(".\n\n")
    reads = [prompt_len + i - 1 for i, x in enumerate(ids) if x == marker]
    g = 1.0
    for s in scores:
        g *= s
    g = g ** (1 / len(scores))
    return Trajectory(text=text, token_ids=ids, step_positions=reads[:len(scores)],
                      step_scores=list(scores), scores={"geometric": g}, answer=answer,
                      correct=correct, first_wrong_step=wrong, n_steps=len(scores),
                      hit_max_tokens=False, prompt_len=prompt_len,
                      signals={"mean_logprob": lp, "self_certainty": lp, "deepconf": lp})


def _problem(tok, i, trajs):
    p = Problem(id=f"p{i}", question=f"Start with {i}.", answer="9", prompt="x", solution="s")
    return ProblemSamples(p, trajs)


def _problems(tok):
    right = "4 + 5 = 9.\n\n9 * 1 = 9.\n\n</think> The answer is 9."
    wrong = "4 + 5 = 8.\n\n8 * 1 = 8.\n\n</think> The answer is 8."
    wrong2 = "4 + 5 = 8.\n\n8 * 2 = 16.\n\n</think> The answer is 8."
    mixed = _problem(tok, 0, [_traj(tok, wrong, [0.9, 0.9], "8", False, 0, lp=-0.5),
                              _traj(tok, right, [0.6, 0.7], "9", True, -1, lp=-0.1),
                              _traj(tok, wrong2, [0.2, 0.3], "8", False, 0, lp=-0.9)])
    easy = _problem(tok, 1, [_traj(tok, right, [0.8, 0.8], "9", True, -1),
                             _traj(tok, right, [0.8, 0.8], "9", True, -1),
                             _traj(tok, wrong2, [0.1, 0.1], "8", False, 0)])
    return [mixed, easy]


def test_view_shows_steps_scores_picks_and_the_first_wrong_step(tok):
    page = render_html(_problems(tok), tok)
    assert page.startswith("<!DOCTYPE html>") and "<script>" in page      # self-contained
    assert "http" not in page.split("<body>")[1]                            # nothing external
    first = page[page.index('data-mixed="1"'):page.index("problem 1")]
    # the mixed problem: bon picks the wrong 0.9-scored sample, majority the answer 8,
    # mean_logprob the right one; the filters' attributes say so
    assert 'data-differs="0"' in page[:page.index("problem 0")] + first[:80]
    assert 'data-bonwrong="1"' in first[:120]
    rows = first.split('<tr class="sample">')[1:]
    assert len(rows) == 3
    assert '<span class="pick bon">bon</span>' in rows[0] and "0.900" in rows[0]
    assert '<span class="pick mean_logprob">mean_logprob</span>' in rows[1]
    assert '<span class="pick majority">majority</span>' in rows[0]   # first '8' wins the vote
    # every step is its own span, coloured and with its score in the tooltip
    assert rows[0].count('<span class="step') == 2
    assert 'title="step 1: score 0.900"' in rows[0] and "hsl(108, 70%, 82%)" in rows[0]
    # the first wrong step (step 0 of the wrong samples) is underlined, not in the right one
    assert '<span class="step wrong"' in rows[0] and "wrong" not in rows[1].split("steps")[0] \
        and 'class="step wrong"' not in rows[1]
    assert ">4 + 5 = 8.&#9166;&#9166;</span>" in rows[0]        # a step ends with its step token
    assert "4 + 5 = 8.&#9166;&#9166;8 * 1 = 8." in re.sub(r"<[^>]+>", "", rows[0])
    assert "Showing 2 of 2 problems (2 mixed" in page
    # identical samples are one row with their count
    second = page[page.index("problem 1"):]
    assert second.count('<tr class="sample">') == 2 and "<td>&times;2</td>" in second


def test_view_is_bounded_and_says_so(tok, tmp_path):
    mixed, easy = _problems(tok)
    for t in easy.trajectories:
        t.correct = True                                     # not mixed
    probs = [easy, mixed] * 30                               # 60 problems, 30 mixed
    page = render_html(probs, tok, max_problems=10, max_samples=2)
    assert page.count('<div class="problem"') == 10
    assert page.count('data-mixed="1"') == 10               # mixed problems kept first
    assert "Showing 10 of 60 problems (30 mixed" in page and "max_problems=10" in page
    assert "1 more samples (1 distinct) not shown (max_samples=2 distinct samples)" in page
    big = render_html(probs, tok, max_problems=60)
    assert len(page) < len(big) / 4
    out = write_html(probs, tmp_path / "v.html", tok, max_problems=3)
    assert out.read_text().count('<div class="problem"') == 3


def test_view_without_a_tokenizer_or_signals_still_renders(tok):
    probs = _problems(tok)
    for ps in probs:
        for t in ps.trajectories:
            t.signals = {}
    page = render_html(probs)                                # no tokenizer: text whole
    assert "mean_logprob</span>" not in page and '<span class="pick bon">' in page
    assert "4 + 5 = 8.&#9166;&#9166;8 * 1 = 8." in page
