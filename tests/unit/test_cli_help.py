"""``--help`` answers: every option of every command has help text and shows its
default; descriptions are whole sentences; a bare or mistyped spec name is resolved
or answered with the list of specs; ``--dry-run`` shows what differs between points."""
from __future__ import annotations

import argparse
import importlib

import pytest

from metastone_lab import cli, runner
from metastone_lab.errors import ConfigError


class _Captured(Exception):
    pass


def _parser_of(words, monkeypatch) -> argparse.ArgumentParser:
    """The parser a command builds (captured at parse_args, before it runs anything)."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    module, func, _ = cli.COMMANDS[words]
    with pytest.raises(_Captured):
        getattr(importlib.import_module(module), func)([])
    return seen["parser"]


@pytest.mark.parametrize("words", list(cli.COMMANDS), ids=lambda w: " ".join(w))
def test_every_option_has_help_and_shows_its_default(words, monkeypatch):
    ap = _parser_of(words, monkeypatch)
    text = ap.format_help()
    assert ap.description and ap.description.rstrip()[-1] in ".?)", ap.description
    for action in ap._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{' '.join(words)}: {action.option_strings or action.dest} has no help"
        d = action.default
        shown = ap._get_formatter()._get_help_string(action)
        if action.option_strings and d not in (None, False, [], "", argparse.SUPPRESS):
            assert "default" in shown, f"{action.option_strings}: default {d!r} not shown"
    assert "(default: " in text or all(a.default in (None, False, [], argparse.SUPPRESS)
                                       for a in ap._actions if a.option_strings)


def test_probe_description_is_not_cut_mid_sentence(monkeypatch):
    ap = _parser_of(("probe",), monkeypatch)
    assert ap.description.endswith("wrong ones?"), ap.description


def test_a_bare_spec_name_resolves_and_a_wrong_one_lists_the_specs(capsys):
    assert runner.resolve_spec_path("quickstart").name == "quickstart.yaml"
    assert runner.resolve_spec_path("experiments/quickstart.yaml").is_file()
    with pytest.raises(ConfigError, match=r"not found; the specs here are .*ablate_loss.*quickstart"):
        runner.resolve_spec_path("quickstrt")
    assert cli.main(["run", "quickstrt"]) == 2
    assert "quickstart" in capsys.readouterr().err


def test_dry_run_shows_what_differs_between_points(capsys):
    rep = runner.run_spec("ablate_loss", dry_run=True)
    out = capsys.readouterr().out
    assert rep["exit_code"] == 0
    header = [line for line in out.splitlines() if line.strip().startswith("index")][0]
    assert "train.loss" in header and "variant" in header and "seed" in header
    assert "train.head_lr" not in header            # the same in every point: listed once
    assert "the same in every point:" in out and "train.head_lr=0.03" in out
    assert "SPR vs its ablations" in out             # the spec's description
