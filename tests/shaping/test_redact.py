"""Redaction of secrets and patterns, and its batch fast path (one test on the joined lines)."""

from __future__ import annotations

import random

import pytest

from forwarder.shaping.redact import REDACTED, Redactor
from forwarder.sources._lines import LinePart

SECRET = "0123456789abcdef0123456789abcdef"


def test_nothing_to_find_returns_the_same_list() -> None:
    lines = ["a line", "another"]
    assert Redactor([SECRET]).apply(lines) is lines
    assert Redactor([SECRET], [r"sk-[A-Za-z0-9]{8,}"]).apply(lines) is lines
    assert Redactor().apply(lines) is lines


def test_secret_and_pattern_are_replaced_parts_kept() -> None:
    part = LinePart(f"key={SECRET} and sk-abcdefghij", 2, True)
    out = Redactor([SECRET], [r"sk-[A-Za-z0-9]{8,}"]).apply(["clean", part])
    assert out == ["clean", f"key={REDACTED} and {REDACTED}"]
    assert isinstance(out[1], LinePart) and (out[1].part, out[1].last) == (2, True)


@pytest.mark.parametrize(
    ("pattern", "line", "expected"),
    [
        (r"^token=\w+", "token=abc rest", f"{REDACTED} rest"),  # anchored: true in the line, not in the joined text
        (r"\w+$", "first x", f"first {REDACTED}"),
        (r"(?<!\w)pw=\w+", "pw=hunter2", REDACTED),
        (r"pw=\w+(?!\n)", "pw=hunter2", REDACTED),
        (r"\Apw=\w+", "pw=hunter2", REDACTED),
    ],
)
def test_patterns_bound_to_the_line_still_match_in_every_line(pattern: str, line: str, expected: str) -> None:
    redactor = Redactor(patterns=[pattern])
    assert redactor.apply(["<", line, ">"]) == ["<", expected, ">"]


def test_batch_fast_path_gives_what_line_by_line_scrubbing_gives() -> None:
    patterns = [r"\b\w+\b", r"\s", r"x*", r"(a)\1", r"\B.", r"(?s)a.b", r"(?i)KEY", r"\d{2,}", r"(?m)^a", r"a(?=b)",
                r"a++b", r"\n", r"b\Z", r"ab"]  # fmt: skip
    rng = random.Random(4)
    alphabet = "ab cKEY\tx.-1234é"
    for _ in range(2000):
        redactor = Redactor(
            rng.sample(["abab", "KEY1", "x.x."], rng.randint(0, 2)), rng.sample(patterns, rng.randint(0, 3))
        )
        lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(0, 6))]
        assert redactor.apply(lines) == [redactor.scrub(line) for line in lines]
