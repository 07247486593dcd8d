"""Every numeric flag of every command is parsed by `config.number`: a value that breaks
its rule is refused in one line, exit 2, before any work.

The table is generated from the parser itself, so a flag added later is covered (and a
numeric flag added without a rule fails `test_every_numeric_flag_has_a_rule`).
"""

from __future__ import annotations

import argparse

import pytest

from bertforge.cli.main import build_parser
from bertforge.config import satisfies

BAD = ("0", "-1", "-5", "nan", "inf")
PARSER = build_parser()  # `bertforge`'s own: main() builds this and parses with it


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _value_flags() -> list[tuple[str, str, argparse.Action]]:
    """(command, flag, action) of every flag that takes a value."""
    return [
        (name, action.option_strings[-1], action)
        for name, parser in _commands().items()
        for action in parser._actions
        if action.option_strings and action.nargs != 0
    ]


def _numeric_flags() -> list[tuple[str, str, str]]:
    """(command, flag, rule) of every flag whose value is a number."""
    return [
        (cmd, flag, action.type.rule)
        for cmd, flag, action in _value_flags()
        if hasattr(action.type, "rule")
    ]


def test_every_numeric_flag_has_a_rule():
    # A bare int/float type, or a function named like one, would let -1 through.
    for cmd, flag, action in _value_flags():
        kind = action.type
        bare = kind in (int, float) or getattr(kind, "__name__", "") in ("int", "float")
        assert not bare or hasattr(kind, "rule"), f"{cmd} {flag} has no rule"
    assert len(_numeric_flags()) > 60  # all commands' flags, not a handful


CASES = [
    (cmd, flag, rule, value)
    for cmd, flag, rule in _numeric_flags()
    for value in BAD
    if not satisfies(float(value), rule)
]


@pytest.mark.parametrize("cmd,flag,rule,value", CASES, ids=[f"{c}{f}={v}" for c, f, _, v in CASES])
def test_bad_number_refused_in_one_line(capsys, cmd, flag, rule, value):
    with pytest.raises(SystemExit) as e:
        PARSER.parse_args([cmd, flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert flag in err and "Traceback" not in err


def test_good_numbers_pass_the_rule():
    # The rules refuse only what they should: the lower bound itself is accepted.
    for cmd, flag, rule in _numeric_flags():
        action = next(a for a in _commands()[cmd]._actions if flag in a.option_strings)
        lowest = rule.split()[-1].strip("[()]").rstrip(",") if rule[0] == ">" else None
        if lowest is not None and rule.startswith(">="):
            assert action.type(lowest) == float(lowest), f"{cmd} {flag} {rule}"
