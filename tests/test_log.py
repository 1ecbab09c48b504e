"""The forwarder's own diagnostics: one JSON line per event, secrets scrubbed, whatever the values hold."""

from __future__ import annotations

import io
import json
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
