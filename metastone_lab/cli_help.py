"""Argument parsers of the ``metastone-lab`` commands: one look for every ``--help``.

Every command builds its parser with :func:`parser`: the description is the first
paragraph of the module's docstring (never cut mid-sentence), descriptions and
epilogs keep their line breaks, and every option's help ends with its default
(``(default: ...)``), so ``--help`` answers what a run would do without the source.
"""
from __future__ import annotations

import argparse
import textwrap


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's layout; end each option's help with its default, unless
    the help already says it (a computed default such as ``$MLFLOW_TRACKING_URI``) or
    there is none to show (a flag, an empty list, ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or d is None or d is False or d == [] or d == ""
                or d is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of ``doc`` as one line (a docstring's summary)."""
    text = (doc or "").strip().split("\n\n", 1)[0]
    return " ".join(line.strip() for line in text.splitlines())


def parser(prog: str, description: str | None = None, epilog: str | None = None
           ) -> argparse.ArgumentParser:
    """An :class:`argparse.ArgumentParser` for ``metastone-lab <command>``; the
    description and epilog are wrapped at 88 columns, their paragraphs kept."""
    return argparse.ArgumentParser(prog=prog, description=_wrap(description),
                                   epilog=_wrap(epilog), formatter_class=_Formatter)


def _wrap(text: str | None) -> str | None:
    if not text:
        return text
    return "\n\n".join(textwrap.fill(par, 88) for par in text.split("\n\n"))


__all__ = ["parser", "first_paragraph"]
