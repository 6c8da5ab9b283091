"""The trajectory view: every sample of a problem with its step scores, each
selector's pick and the true first wrong step, as one self-contained HTML page.

Scalars and curves say *that* the head ranks a problem's samples well or badly;
this page shows *where*: for each problem, its k samples sorted by the SPRM score,
every step's text coloured by the head's score for that step (red 0 -> green 1,
the score in the tooltip), the task's first wrong step underlined, and a mark on
the sample each selector picks (the names of the summary table: ``bon``,
``majority``, ``weighted``, ``mean_logprob``, ``self_certainty``, ``deepconf``).

The page needs no server and no external file (inline CSS and a few lines of
JavaScript for the filters: mixed problems, problems where the SPRM pick differs
from majority vote, problems whose SPRM pick is wrong). Its size is bounded by
``max_problems`` x ``max_samples``; mixed problems are kept first, and the page
says how many problems were left out.

    html = render_html(ev.test, tokenizer)              # a str, ~10-30 kB per problem
    write_html(ev.test, "trajectories.html", tokenizer)
    study.show_trajectories(ev, tokenizer)              # inline in JupyterLab
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Sequence

from .names import display

#: summary-table name -> selector registry name (metastone_lab.names, metastone_lab.select)
VIEW_SELECTORS = {display(sel): sel for sel in ("sprm_bon", "majority", "sprm_weighted_vote",
                                                "mean_logprob_bon", "self_certainty_bon",
                                                "deepconf_bon")}
#: default bounds of a page (problems, samples per problem)
MAX_PROBLEMS = 40
MAX_SAMPLES = 32

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em} .legend,.bound{color:#555;font-size:.9em}
.problem{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em .8em}
.problem h2{font-size:1em;margin:.1em 0 .4em} .q{font-family:monospace;white-space:pre-wrap}
table{border-collapse:collapse;width:100%} td,th{padding:2px 6px;vertical-align:top;text-align:left}
tr.sample{border-top:1px solid #eee} .ok{color:#1a7f37} .bad{color:#c62828}
.steps{font-family:monospace;white-space:pre-wrap;word-break:break-word}
.step{border-radius:3px;padding:0 1px} .wrong{text-decoration:underline wavy #c62828;text-decoration-thickness:2px}
.pick{display:inline-block;background:#333;color:#fff;border-radius:3px;padding:0 4px;margin:1px;font-size:.8em}
.pick.bon{background:#6a1b9a} .pick.majority{background:#1565c0}
.tag{display:inline-block;border:1px solid #999;border-radius:3px;padding:0 4px;margin-right:4px;font-size:.8em}
"""

_JS = """
function applyFilters(){
  var f = {mixed: document.getElementById('f-mixed').checked,
           differs: document.getElementById('f-differs').checked,
           bonwrong: document.getElementById('f-bonwrong').checked};
  var shown = 0, all = document.querySelectorAll('.problem');
  all.forEach(function(p){
    var ok = (!f.mixed || p.dataset.mixed === '1') && (!f.differs || p.dataset.differs === '1')
             && (!f.bonwrong || p.dataset.bonwrong === '1');
    p.style.display = ok ? '' : 'none'; if (ok) shown++;
  });
  document.getElementById('n-shown').textContent = shown;
}
"""


def _colour(score: float) -> str:
    """Background for a step score in [0, 1]: red (0) -> yellow -> green (1)."""
    if score != score:   # NaN
        return "#ddd"
    s = min(max(float(score), 0.0), 1.0)
    return f"hsl({int(round(120 * s))}, 70%, 82%)"


def _segments(t: Any, tokenizer: Any | None, lookahead: int = 1) -> list[str]:
    """The response text cut after each step token (``lookahead`` tokens after the
    read position: 1 for the reference read, before the step token): one piece per
    step, then whatever follows the last one."""
    ids = list(getattr(t, "token_ids", []) or [])
    if tokenizer is None or not ids:
        return [t.text]
    eos = getattr(tokenizer, "eos_token_id", None)
    cuts = [p - t.prompt_len + 1 + lookahead for p in t.step_positions]
    pieces, lo = [], 0
    for hi in [*cuts, len(ids)]:
        chunk = [x for x in ids[lo:max(hi, lo)] if x != eos]
        pieces.append(tokenizer.decode(chunk, skip_special_tokens=False))
        lo = max(hi, lo)
    return pieces


def _picks(trajs: Sequence[Any], aggregator: str) -> dict[str, int]:
    """{view name: index} for the selectors these samples support."""
    from .select import SELECTORS, usable_selectors

    usable = set(usable_selectors(trajs[0])) if trajs else set()
    out = {}
    for name, sel in VIEW_SELECTORS.items():
        if sel in usable:
            out[name] = int(SELECTORS.get(sel)(trajs, aggregator=aggregator))
    return out


def _choose(problems: Sequence[Any], max_problems: int) -> list[int]:
    """Indices of the problems to show: mixed ones first (in order), then the rest,
    up to ``max_problems``; returned in the original order."""
    def mixed(ps):
        c = {bool(t.correct) for t in ps.trajectories}
        return len(c) == 2
    first = [i for i, ps in enumerate(problems) if mixed(ps)]
    rest = [i for i, ps in enumerate(problems) if not mixed(ps)]
    return sorted((first + rest)[:max(int(max_problems), 0)])


def _problem_html(i: int, ps: Any, tokenizer: Any | None, aggregator: str,
                  max_samples: int, lookahead: int) -> str:
    trajs = list(ps.trajectories)
    picks = _picks(trajs, aggregator)
    by_index: dict[int, list[str]] = {}
    for name, j in picks.items():
        by_index.setdefault(j, []).append(name)
    n_ok = sum(bool(t.correct) for t in trajs)
    mixed = 0 < n_ok < len(trajs)
    bon, maj = picks.get("bon"), picks.get("majority")
    differs = bon is not None and maj is not None and trajs[bon].answer != trajs[maj].answer
    bon_wrong = bon is not None and not trajs[bon].correct
    order = sorted(range(len(trajs)), key=lambda j: (-_score(trajs[j], aggregator), j))
    # identical samples (same text) are one row with a count; its marks are the union
    groups: dict[str, list[int]] = {}
    for j in order:
        groups.setdefault(trajs[j].text, []).append(j)
    rep = {j: g[0] for g in groups.values() for j in g}
    marks_of = {g[0]: [n for j in g for n in by_index.get(j, [])] for g in groups.values()}
    count_of = {g[0]: len(g) for g in groups.values()}
    shown = [g[0] for g in groups.values()][:max(int(max_samples), 1)]
    if bon is not None and rep[bon] not in shown:
        shown[-1] = rep[bon]
    q = html.escape(str(getattr(ps.problem, "question", "")))
    gold = html.escape(str(getattr(ps.problem, "answer", "")))
    tags = [f'<span class="tag">{n_ok}/{len(trajs)} correct</span>']
    if mixed:
        tags.append('<span class="tag">mixed</span>')
    if differs:
        tags.append('<span class="tag">bon &ne; majority</span>')
    if bon_wrong:
        tags.append('<span class="tag bad">bon pick wrong</span>')
    rows = []
    for rank, j in enumerate(shown, 1):
        t = trajs[j]
        pieces = _segments(t, tokenizer, lookahead)
        wrong = t.first_wrong_step if t.first_wrong_step is not None and t.first_wrong_step >= 0 \
            else None
        cells = []
        for s, piece in enumerate(pieces):
            text = html.escape(piece).replace("\n", "&#9166;")   # a visible line break
            if s < len(t.step_scores):
                cls = "step wrong" if wrong == s else "step"
                cells.append(f'<span class="{cls}" style="background:{_colour(t.step_scores[s])}" '
                             f'title="step {s + 1}: score {t.step_scores[s]:.3f}">{text}</span>')
            else:
                cells.append(f'<span class="{"wrong" if wrong == s else ""}">{text}</span>')
        marks = "".join(f'<span class="pick {n}">{n}</span>' for n in marks_of.get(j, []))
        ok = '<span class="ok">&#10003;</span>' if t.correct else '<span class="bad">&#10007;</span>'
        rows.append(f'<tr class="sample"><td>{rank}</td><td>&times;{count_of[j]}</td>'
                    f'<td>{_score(t, aggregator):.3f}</td>'
                    f'<td>{ok} {html.escape(str(t.answer))}</td><td>{marks}</td>'
                    f'<td class="steps">{"".join(cells)}</td></tr>')
    hidden = len(trajs) - sum(count_of[j] for j in shown)
    more = (f'<p class="bound">{hidden} more samples ({len(groups) - len(shown)} distinct) not '
            f'shown (max_samples={max_samples} distinct samples)</p>' if hidden else "")
    return (f'<div class="problem" data-mixed="{int(mixed)}" data-differs="{int(differs)}" '
            f'data-bonwrong="{int(bon_wrong)}"><h2>problem {i} {"".join(tags)}</h2>'
            f'<div class="q">{q}</div><div>gold answer: <b>{gold}</b></div>'
            f'<table><tr><th>#</th><th>copies</th><th>score</th><th>answer</th><th>picked by</th>'
            f'<th>steps (colour = step score, underlined = first wrong step)</th></tr>'
            f'{"".join(rows)}</table>{more}</div>')


def _score(t: Any, aggregator: str) -> float:
    v = (getattr(t, "scores", None) or {}).get(aggregator)
    return float("-inf") if v is None or v != v else float(v)


def render_html(problems: Sequence[Any], tokenizer: Any | None = None, *,
                aggregator: str = "geometric", max_problems: int = MAX_PROBLEMS,
                max_samples: int = MAX_SAMPLES, title: str = "Trajectories",
                standalone: bool = True, read_at: str = "before_step_token") -> str:
    """The view of ``problems`` (``generate.ProblemSamples``) as HTML. ``tokenizer``
    (the one that sampled them) cuts each response into its steps, each ending with
    its step token (``read_at``: where the steps were read); without it a response
    is shown whole. ``standalone=False`` gives a fragment for a notebook."""
    from .confidence import lookahead
    idx = _choose(problems, max_problems)
    n_mixed = sum(0 < sum(bool(t.correct) for t in ps.trajectories) < len(ps.trajectories)
                  for ps in problems)
    body = "".join(_problem_html(i, problems[i], tokenizer, aggregator, max_samples,
                                 lookahead(read_at)) for i in idx)
    bound = (f'<p class="bound">Showing {len(idx)} of {len(problems)} problems ({n_mixed} mixed; '
             f'mixed problems are kept first), up to {max_samples} samples each: the page is '
             f'bounded by max_problems={max_problems} and max_samples={max_samples}.</p>')
    filters = ('<p><label><input type="checkbox" id="f-mixed" onchange="applyFilters()"> mixed '
               'problems only</label> <label><input type="checkbox" id="f-differs" '
               'onchange="applyFilters()"> SPRM pick &ne; majority</label> <label><input '
               'type="checkbox" id="f-bonwrong" onchange="applyFilters()"> SPRM pick wrong'
               f'</label> &mdash; <span id="n-shown">{len(idx)}</span> shown</p>')
    legend = ('<p class="legend">Samples are sorted by the SPRM trajectory score '
              f'({html.escape(aggregator)}). A step\'s colour is the head\'s score for it '
              '(red 0, green 1; hover for the value); &#9166; is a line break; the underlined '
              'step is the task\'s first wrong step (its own step split). Identical samples are '
              'one row (copies). Marks name the sample each selector picks: '
              + ", ".join(f"<b>{n}</b>" for n in VIEW_SELECTORS) + '.</p>')
    inner = (f'<h1>{html.escape(title)}</h1>{bound}{legend}{filters}'
             f'<div id="problems">{body}</div>')
    if not standalone:
        return f'<div class="metastone-trajectories"><style>{_CSS}</style>{inner}</div>'
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f'</title><style>{_CSS}</style><script>{_JS}</script></head><body>{inner}'
            f'</body></html>')


def write_html(problems: Sequence[Any], path: str | Path, tokenizer: Any | None = None,
               **kw: Any) -> Path:
    """:func:`render_html` written atomically to ``path``."""
    from .io_utils import atomic_write_text

    p = Path(path)
    atomic_write_text(p, render_html(problems, tokenizer, **kw))
    return p


__all__ = ["render_html", "write_html", "VIEW_SELECTORS", "MAX_PROBLEMS", "MAX_SAMPLES"]
