"""Framing: bytes -> lines, including every bad-input case the design lists."""

from __future__ import annotations

import random

import pytest

from forwarder.sources import _lines
from forwarder.sources._lines import LineFramer, LinePart


def frame(chunks: list[bytes], limit: int = 256 * 1024) -> list[str]:
    framer = LineFramer(limit)
    out: list[str] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    out.extend(framer.finish())
    return out


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], ["a", "b"]),
        ([b"a\r\nb\r\n"], ["a", "b"]),
        ([b"a\r", b"\nb\n"], ["a", "b"]),
        ([b"mid\rline\n"], ["mid\rline"]),
        ([b"a", b"b", b"c\n"], ["abc"]),
        ([b"a\n\nb\n"], ["a", "", "b"]),
        ([b"no newline at eof"], ["no newline at eof"]),
        ([b"x\n", b"tail"], ["x", "tail"]),
        ([b"bad \xff\xfe utf8\n"], ["bad \ufffd\ufffd utf8"]),
        ([b"nul\x00byte\n"], ["nul\ufffdbyte"]),
        ([b"caf\xc3", b"\xa9\n"], ["café"]),
        ([b"\xe2\x82", b"\xac euro\n"], ["€ euro"]),
        ([b""], []),
        ([], []),
    ],
)
def test_framing_cases(chunks: list[bytes], expected: list[str]) -> None:
    assert frame(chunks) == expected


def test_binary_blob_never_crashes() -> None:
    blob = bytes(range(256)) * 40
    lines = frame([blob[:1000], blob[1000:]], limit=4096)
    joined = "".join(lines)
    assert "\x00" not in joined
    assert len(lines) == blob.count(b"\n") + 1


def test_five_megabyte_line_without_newline_is_cut_into_marked_parts_none_lost() -> None:
    limit = 256 * 1024
    data = b"0123456789abcdef" * (5 * 1024 * 1024 // 16)
    framer = LineFramer(limit)
    out: list[str] = []
    for i in range(0, len(data), 65536):
        out.extend(framer.feed(data[i : i + 65536]))
    out.extend(framer.finish())
    assert "".join(out).encode() == data
    assert all(isinstance(p, LinePart) for p in out)
    parts = [p for p in out if isinstance(p, LinePart)]
    assert [p.part for p in parts] == list(range(1, len(parts) + 1))
    assert [p.last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert all(len(p.encode()) <= limit for p in parts)


def test_long_line_in_one_block_then_normal_lines() -> None:
    limit = 1024
    data = b"A" * 3000 + b"\nshort\n"
    out = frame([data], limit=limit)
    assert out[-1] == "short" and not isinstance(out[-1], LinePart)
    parts = out[:-1]
    assert "".join(parts) == "A" * 3000
    assert [p.part for p in parts if isinstance(p, LinePart)] == [1, 2, 3]
    assert isinstance(parts[-1], LinePart) and parts[-1].last


def test_long_line_cut_at_utf8_boundary() -> None:
    limit = 1024
    text = "é" * 2000  # 2 bytes per character
    out = frame([text.encode() + b"\n"], limit=limit)
    assert "".join(out) == text
    assert "\ufffd" not in "".join(out)


def test_long_line_spanning_reads_then_newline_marks_last_part() -> None:
    limit = 1024
    out = frame([b"B" * 1500, b"B" * 100 + b"\nnext\n"], limit=limit)
    assert out[-1] == "next"
    parts = out[:-1]
    assert "".join(parts) == "B" * 1600
    assert isinstance(parts[-1], LinePart) and parts[-1].last and parts[-1].part == 2


def test_unterminated_last_line_after_cut_parts() -> None:
    out = frame([b"C" * 1500], limit=1024)
    assert "".join(out) == "C" * 1500
    assert isinstance(out[-1], LinePart) and out[-1].last


def _plain_frame(data: bytes) -> list[str]:
    """What framing gives for a stream without long lines: one decode and one split of the whole."""
    text = data.decode("utf-8", "replace")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return [line.replace("\x00", "\ufffd") for line in lines]


def test_large_reads_are_decoded_in_slices_like_one_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    # A read block is decoded in slices cut at newlines; bad bytes, CRLF and NULs right at the cuts must come out as
    # one decode of the whole gives them.
    monkeypatch.setattr(_lines, "_SLICE_BYTES", 7)
    rng = random.Random(5)
    alphabet = [b"ab", b"\n", b"\r\n", b"\x00", b"\xe2\x82", b"\xac", b"\xf0\x9f\x98\x80", b"\xff", b"\xc3", b"{}"]
    for _ in range(200):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) + b"\n"
        cuts = sorted(rng.sample(range(len(data)), min(len(data), rng.randint(0, 6))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert frame(chunks) == _plain_frame(data)[:-1]


def test_one_mebibyte_reads_of_ordinary_lines() -> None:
    lines = [
        f'{{"message": "line {i}", "level": "INFO"}}' if i % 3 else f"2026-11-21 x - INFO {i} é" for i in range(30_000)
    ]
    data = "\n".join(lines).encode() + b"\n"
    read = 1024 * 1024
    out = frame([data[i : i + read] for i in range(0, len(data), read)])
    assert out == lines
    assert not any(isinstance(line, LinePart) for line in out)


def test_long_line_inside_a_large_read_is_cut_the_same_wherever_the_slices_fall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = b"x\n" * 100 + b"L" * 5000 + b"\n" + b"y\n" * 100
    expected = frame([data], limit=1024)
    assert ["".join(p for p in expected if isinstance(p, LinePart))] == ["L" * 5000]
    for size in (3, 64, 1000, 6000):
        monkeypatch.setattr(_lines, "_SLICE_BYTES", size)
        assert frame([data], limit=1024) == expected
        got = frame([data[:2600], data[2600:]], limit=1024)
        assert [(str(p), getattr(p, "part", 0), getattr(p, "last", None)) for p in got] == [
            (str(p), getattr(p, "part", 0), getattr(p, "last", None)) for p in expected
        ]
