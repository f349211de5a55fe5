"""What a name may be (meridio.core.names)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meridio.core.names import MAX_NAME_LENGTH, InvalidName, check_name, name_problem


def _slow(value: str) -> bool:
    """The rule, character by character."""
    return (
        0 < len(value) <= MAX_NAME_LENGTH
        and value not in (".", "..")
        and all(c not in "/\\" and not c.isspace() and c.isprintable() for c in value)
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=20), st.text(alphabet="ab./\\ \t\n\x00\u200b\u00e9", max_size=6)))
def test_the_fast_check_is_the_rule(value: str) -> None:
    assert (name_problem(value) is None) == _slow(value)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "trench name must not be empty"),
        ("   ", "trench name '   ' must not contain whitespace"),
        ("../c\n0", "path separator"),
        ("a\u202eb", "control or invisible"),
        ("x" * 254, "longer than 253 characters (254)"),
        ("..", "must not be . or .."),
    ],
)
def test_refused_names_are_named_in_the_message(value: str, words: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(words)):
        check_name("trench", value)


def test_accepted_names() -> None:
    for value in ("trench-a", "Conduit_1.b", "é", "x" * 253, "conn-1-src"):
        assert check_name("child", value) == value
