"""``forwarder check`` in process: the configuration listing (secrets masked), the state-directory check, and
``--send-test`` against HTTPS emulators (pytest-httpserver + trustme): what each destination received, and one
OK/FAIL line per destination."""

from __future__ import annotations

import gzip
import io
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from forwarder.check import make_test_record, masked_secret, run_check, send_test, state_dir_problem
from forwarder.config import load
from forwarder.sinks._protocol import OK, Batch, Encoded, Verdict, retry
from forwarder.sinks.file import FILE_NAME

DD_TOKEN = "pubcheck0123456789abcdef0123456789"
NR_KEY = "eu01xxcheck0123456789abcdef0123456NRAL"
SENTRY_KEY = "c0ffee0123456789abcdef0123456789"


class Recorder:
    """Records each request's decompressed body and answers ``status``."""

    def __init__(self, status: int, body: str = "{}") -> None:
        self.status, self.body = status, body
        self.lock = threading.Lock()
        self.bodies: list[bytes] = []

    def __call__(self, request: Request) -> Response:
        data = request.get_data()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        with self.lock:
            self.bodies.append(data)
        return Response(self.body, status=self.status, content_type="application/json")


def env_for(tmp_path: Path, ca_file: Path, dd: HTTPServer, nr: HTTPServer, sentry: HTTPServer) -> dict[str, str]:
    return {
        "FORWARDER_HOST": "check-host",
        "FORWARDER_SOURCE": "check-agent",
        "FORWARDER_STATE_DIR": str(tmp_path / "state"),
        "SSL_CERT_FILE": str(ca_file),
        "DATADOG_TOKEN": DD_TOKEN,
        "FORWARDER_DATADOG_URL": dd.url_for("/"),
        "NEW_RELIC_LICENSE_KEY": NR_KEY,
        "FORWARDER_NEW_RELIC_URL": nr.url_for("/log/v1"),
        "SENTRY_DSN": f"https://{SENTRY_KEY}@127.0.0.1:{sentry.port}/42",
    }


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        (["pub0123456789abcdef"], "pub0..."),
        (["https://c0ffee0123456789@o1.ingest.sentry.io/42", "c0ffee0123456789"], "c0ff..."),
        (["short"], "..."),
        ([], "-"),
    ],
)
def test_masked_secret_shows_at_most_four_characters(values: list[str], shown: str) -> None:
    assert masked_secret(values) == shown


def test_state_dir_problem(tmp_path: Path) -> None:
    assert state_dir_problem(tmp_path / "not" / "yet" / "there") is None  # creatable
    (tmp_path / "a-file").write_text("x")
    assert state_dir_problem(tmp_path / "a-file" / "state") == f"{tmp_path / 'a-file'} is not a directory"


async def test_listing_masks_secrets_and_names_endpoints(
    tmp_path: Path, ca_file: Path, https_servers: Callable[[], HTTPServer]
) -> None:
    dd, nr, sentry = https_servers(), https_servers(), https_servers()
    config = load(env_for(tmp_path, ca_file, dd, nr, sentry), cwd=tmp_path)
    out = io.StringIO()
    assert await run_check(config, False, out) == 0
    text = out.getvalue()
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert rows["datadog"][1:] == [f"https://127.0.0.1:{dd.port}/api/v2/logs", "secret=pubc..."]
    assert rows["newrelic"][1:] == [f"https://127.0.0.1:{nr.port}/log/v1", "secret=eu01..."]
    assert rows["sentry"][1] == f"https://127.0.0.1:{sentry.port}/api/42/envelope/"
    assert rows["sentry"][2] == "secret=c0ff..."
    assert "file" not in rows  # the file sink is only the default when no destination is configured
    assert "(writable)" in text
    for secret in (DD_TOKEN, NR_KEY, SENTRY_KEY):
        assert secret[:5] not in text
    assert not dd.log and not nr.log and not sentry.log  # nothing sent without --send-test


async def test_send_test_reports_each_destination(
    tmp_path: Path, ca_file: Path, https_servers: Callable[[], HTTPServer]
) -> None:
    dd, nr, sentry = https_servers(), https_servers(), https_servers()
    dd_intake, nr_intake = Recorder(202), Recorder(202, '{"requestId":"x"}')
    sentry_intake = Recorder(503, '{"detail":"down for maintenance"}')
    dd.expect_request("/api/v2/logs", method="POST").respond_with_handler(dd_intake)
    nr.expect_request("/log/v1", method="POST").respond_with_handler(nr_intake)
    sentry.expect_request("/api/42/envelope/", method="POST").respond_with_handler(sentry_intake)
    config = load(env_for(tmp_path, ca_file, dd, nr, sentry), cwd=tmp_path)
    out = io.StringIO()
    assert await run_check(config, True, out) == 1
    results = out.getvalue().split("send test:\n")[1].splitlines()
    by_name = {line.split()[1]: line for line in results}
    assert len(results) == 3
    assert by_name["datadog"].startswith("OK ") and by_name["newrelic"].startswith("OK ")
    assert by_name["sentry"].startswith("FAIL ")
    assert "http_503" in by_name["sentry"] and "down for maintenance" in by_name["sentry"]

    # One test record each, with the configured tags.
    (dd_body,) = dd_intake.bodies
    (entry,) = orjson.loads(dd_body)
    assert entry["message"] == "forwarder check --send-test: test record"
    assert (entry["hostname"], entry["ddsource"], entry["status"]) == ("check-host", "check-agent", "info")
    (nr_body,) = nr_intake.bodies
    (group,) = orjson.loads(nr_body)
    assert group["common"]["attributes"]["host"] == "check-host"
    assert [log["message"] for log in group["logs"]] == ["forwarder check --send-test: test record"]
    assert len(sentry_intake.bodies) == 1  # one attempt, no retry


async def test_send_test_to_the_file_sink(tmp_path: Path) -> None:
    config = load({"FORWARDER_STATE_DIR": str(tmp_path), "FORWARDER_HOST": "h"}, cwd=tmp_path)
    out = io.StringIO()
    assert await run_check(config, True, out) == 0
    assert "no destination secret is set" in out.getvalue()
    assert out.getvalue().split("send test:\n")[1].startswith("OK    file")
    (line,) = (tmp_path / FILE_NAME).read_text().splitlines()
    assert orjson.loads(line)["attributes"] == {"forwarder_check": True}


async def test_unwritable_state_dir_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    config = load({"FORWARDER_STATE_DIR": str(tmp_path / "a-file" / "state")}, cwd=tmp_path)
    out = io.StringIO()
    assert await run_check(config, False, out) == 1
    assert "NOT WRITABLE" in out.getvalue()


class _ScriptedSink:
    """A sink whose encode/send outcomes are given: for the verdict-to-line mapping of :func:`send_test`."""

    name = "scripted"
    ordered = False

    def __init__(self, verdict: Verdict | None = None, encode_drops: dict[str, int] | None = None) -> None:
        self.verdict, self.encode_drops, self.closed = verdict, encode_drops or {}, False

    def encode(self, records: object) -> Encoded:
        if self.encode_drops:
            return Encoded([], dict(self.encode_drops))
        return Encoded([Batch([], b"x", 1)])

    async def send(self, batch: Batch) -> Verdict:
        if self.verdict is None:
            raise RuntimeError("a bug in the sink")
        return self.verdict

    async def aclose(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("sink", "ok", "detail"),
    [
        (_ScriptedSink(OK), True, ""),
        (
            _ScriptedSink(retry("http_401", detail="credentials\nrejected")),
            False,
            "retry http_401: credentials rejected",
        ),
        (
            _ScriptedSink(Verdict(OK.outcome, dropped={"too_old": 1})),
            False,
            "accepted but the record was rejected: too_old",
        ),
        (_ScriptedSink(encode_drops={"too_large": 1}), False, "dropped while encoding: too_large (1 record)"),
        (_ScriptedSink(None), False, "internal error: RuntimeError"),
    ],
)
async def test_send_test_verdicts(tmp_path: Path, sink: _ScriptedSink, ok: bool, detail: str) -> None:
    config = load({"FORWARDER_STATE_DIR": str(tmp_path)}, cwd=tmp_path)
    result = await send_test(sink, make_test_record(config))
    assert (result.destination, result.ok, result.detail) == ("scripted", ok, detail)
    assert sink.closed
