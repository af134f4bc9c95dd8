"""Every stage's --help is usable by a newcomer: every flag has a one-line description, defaults are shown
(or the help says what the default is when it depends on the device or the checkpoint), no internal citations,
and the examples copy-paste (a line continuation survives into the help text)."""
import ast
import argparse
import importlib
import re
from pathlib import Path

import pytest

from picochat.__main__ import STAGES
from picochat.common import HelpFormatter


class _Captured(Exception):
    pass


def stage_parsers(stage, monkeypatch):
    """The argparse parsers a stage builds (its subcommands' too), captured at parse time."""
    captured = []

    def capture(self, *args, **kwargs):
        captured.append(self)
        raise _Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured):
        importlib.import_module(STAGES[stage][0]).main(["--help"])
    out = []
    for parser in captured:
        out.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.extend(action.choices.values())
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_flag_is_described_with_its_default(stage, monkeypatch):
    for parser in stage_parsers(stage, monkeypatch):
        assert parser.formatter_class is HelpFormatter, f"{stage}: --help would not show defaults"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"picochat {stage} {name} has no help text"
            if action.default is None and action.option_strings and not action.required:
                assert "default" in action.help.lower(), f"picochat {stage} {name}: say what the default (None) means"
            assert not re.search(r"reference \d|pitfall \d|§", action.help), f"picochat {stage} {name} cites a document"
        text = parser.format_help()
        assert "(default: " in text or not any(a.option_strings and a.default not in (None, False, argparse.SUPPRESS)
                                                for a in parser._actions), f"{stage}: no default shown"


def test_docstring_examples_keep_their_line_continuations():
    # a backslash-newline in a plain docstring disappears from __doc__ (and so from --help): examples must be raw
    for path in sorted((Path(__file__).resolve().parents[1] / "picochat" / "stages").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
        if doc is None:
            continue
        source = path.read_text(encoding="utf-8").splitlines()[doc.lineno - 1:doc.end_lineno]
        continued = [line for line in source if line.endswith("\\") and not line.endswith("\\\\")]
        if continued:
            assert source[0].lstrip().startswith('r"""'), f"{path.name}: examples with '\\' need a raw docstring"
