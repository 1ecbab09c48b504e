"""The forwarder's own diagnostics: one JSON line per event, secrets scrubbed, whatever the values hold."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator

import pytest
import structlog

from forwarder import log


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    before = structlog.get_config()
    buf = io.StringIO()
    log.configure(stream=buf)
    try:
        yield buf
    finally:
        log.set_secrets([])
        structlog.configure(**before)


def test_values_orjson_refuses_still_give_one_scrubbed_json_line(lines: io.StringIO) -> None:
    """A file name that is not UTF-8 reaches us with lone surrogates, and orjson refuses them (and ints beyond 64
    bits); the line falls back to the stdlib encoder and must stay one valid JSON line with secrets scrubbed, even
    a secret with non-ASCII characters."""
    log.set_secrets(["pässwörd-123"])
    logger = structlog.get_logger("forwarder")
    logger.info("tail_file_opened", path="/logs/a\udcff.log", note="token pässwörd-123 here", big=2**70)
    logger.info("plain", note="pässwörd-123")
    first, second = lines.getvalue().splitlines()
    event = json.loads(first)
    assert (event["event"], event["path"], event["big"]) == ("tail_file_opened", "/logs/a\udcff.log", 2**70)
    assert event["note"] == "token [REDACTED] here" and "pässwörd" not in first
    assert '"logger":"forwarder"' in first  # the compact form, as orjson writes it
    assert json.loads(second)["note"] == "[REDACTED]"


def test_a_failing_diagnostics_stream_drops_lines_and_never_raises() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    broken = log.LineLogger(Broken())
    broken.msg("x")
    assert broken.dropped == 1
    closed = io.StringIO()
    closed.close()
    gone = log.LineLogger(closed)
    gone.msg("x")
    assert gone.dropped == 1
    nothing = log.LineLogger(None)  # sys.stderr when descriptor 2 was closed at start
    nothing.msg("x")
    assert nothing.dropped == 1

    read_end, write_end = os.pipe()
    with open(write_end, "w", encoding="ascii") as stream:  # the descriptor is written to, in UTF-8, unbuffered
        pipe = log.LineLogger(stream)
        pipe.msg('{"event":"é"}')
        assert os.read(read_end, 100) == '{"event":"é"}\n'.encode()
        os.close(read_end)  # the reader goes away: EPIPE from now on
        pipe.msg("lost")
        assert pipe.dropped == 1
