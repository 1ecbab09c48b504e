"""Operability end to end: the real ``forwarder run`` as a subprocess with its HTTP endpoint on a port chosen by the
OS (found through ``<state dir>/http.addr``), intake emulators on loopback (pytest-httpserver over HTTPS with a
trustme CA; moto's server mode for CloudWatch), and the real ``forwarder logs`` / ``forwarder check`` commands.

The agent is a small script driven through its stdin (which it inherits from the forwarder): each line it reads is
a command (``burst N``, ``err TEXT``, ``env``, or any text, echoed), so that every test decides exactly when the
agent writes; closing stdin ends the agent and so the forwarder.
"""

from __future__ import annotations

import gzip
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from tests.e2e.conftest import forwarder_cmd, own_log, poll, run_forwarder
from tests.sinks.moto_server import admin_client, require_loopback, running_moto

AGENT_SCRIPT = r"""
import os, sys
for line in sys.stdin:
    command = line.rstrip("\n")
    if command.startswith("burst "):
        for i in range(int(command.split()[1])):
            print(f"burst {i}")
    elif command.startswith("err "):
        print(command[4:], file=sys.stderr)
    elif command == "env":
        for key, value in sorted(os.environ.items()):
            print(f"{key}={value}")
            print(f"{key}={value}", file=sys.stderr)
    else:
        print(command)
    sys.stdout.flush()
    sys.stderr.flush()
"""

# --- emulators ----------------------------------------------------------------------------------------------------


def take_down(server: HTTPServer) -> None:
    """Stop an emulator and close its listening socket, so that connections are refused (not left pending)."""
    inner = server.server
    server.stop()
    if inner is not None:
        inner.server_close()


class Intake:
    """Records every request (query, headers, decompressed body) and answers with ``respond(body) -> status``."""

    def __init__(self, respond: Callable[[bytes], int] = lambda body: 202) -> None:
        self.respond = respond
        self.lock = threading.Lock()
        self.requests: list[tuple[dict[str, str], dict[str, str], bytes, int]] = []

    def __call__(self, request: Request) -> Response:
        body = request.get_data()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        status = self.respond(body)
        with self.lock:
            self.requests.append((dict(request.args), dict(request.headers), body, status))
        if status < 300:
            return Response("{}", status=status)
        # Like some proxies, an error echoes the request line: with Datadog's client token, a secret in the query.
        return Response(json.dumps({"error": f"status {status}", "request": request.full_path}), status=status)

    def accepted(self) -> list[dict[str, Any]]:
        """Every Datadog log object of an accepted (2xx) request."""
        with self.lock:
            return [obj for _, _, body, status in self.requests if status < 300 for obj in json.loads(body)]


# --- the forwarder as a daemon ------------------------------------------------------------------------------------


class Daemon:
    """``forwarder run -- python AGENT_SCRIPT`` with stdin piped to the agent and output captured in files."""

    def __init__(self, env: dict[str, str], tmp_path: Path, *flags: str) -> None:
        self.env = env
        self.state_dir = Path(env["FORWARDER_STATE_DIR"])
        self.out_path, self.err_path = tmp_path / "forwarder.out", tmp_path / "forwarder.err"
        self._out, self._err = self.out_path.open("wb"), self.err_path.open("wb")
        self.proc = subprocess.Popen(
            forwarder_cmd("run", *flags, "--", sys.executable, "-c", AGENT_SCRIPT),
            env=env,
            stdin=subprocess.PIPE,
            stdout=self._out,
            stderr=self._err,
        )
        addr_file = self.state_dir / "http.addr"
        self.addr = poll(lambda: addr_file.read_text().strip() if addr_file.exists() else None, 30, "http.addr")
        self.http = httpx.Client(base_url=f"http://{self.addr}", trust_env=False, timeout=10)

    def send(self, command: str) -> None:
        """Give the agent one command line."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape ``/metrics`` and parse it with prometheus-client's parser."""
        response = self.http.get("/metrics")
        assert response.status_code == 200
        out = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def stop(self, timeout: float = 30) -> tuple[int, bytes, bytes]:
        """Close the agent's stdin (it exits, then the forwarder flushes and exits); status, stdout, stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        status = self.proc.wait(timeout=timeout)
        self.http.close()
        self._out.close()
        self._err.close()
        return status, self.out_path.read_bytes(), self.err_path.read_bytes()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.http.close()
        self._out.close()
        self._err.close()


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(env: dict[str, str], tmp_path: Path, *flags: str) -> Daemon:
        daemon = Daemon(env, tmp_path, *flags)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()


@pytest.fixture
def op_env(base_env: dict[str, str], ca_file: Path) -> dict[str, str]:
    """``base_env`` with the endpoint on a port chosen by the OS, the durable spool, fast retries."""
    env = dict(base_env)
    env.pop("FORWARDER_BUFFER", None)
    env.update(
        FORWARDER_HTTP_ADDR="127.0.0.1:0",
        FORWARDER_SOURCE="op-agent",
        FORWARDER_RETRY_MAX_BACKOFF="0.3",
        SSL_CERT_FILE=str(ca_file),
    )
    return env


def dest(name: str) -> tuple[tuple[str, str], ...]:
    return (("destination", name),)


# --- Done when 1: /metrics matches what the emulators received ---------------------------------------------------


def test_metrics_match_what_the_intakes_received(
    op_env: dict[str, str], tmp_path: Path, https_servers: Callable[[], HTTPServer], daemons: Callable[..., Daemon]
) -> None:
    dd_server, nr_server = https_servers(), https_servers()
    # Datadog accepts everything but a batch holding the HUGE line (413: split until that one record is dropped).
    dd = Intake(lambda body: 413 if b"HUGE" in body else 202)
    nr = Intake(lambda body: 400)  # New Relic refuses every batch: each record is dropped as http_400
    dd_server.expect_request("/api/v2/logs", method="POST").respond_with_handler(dd)
    nr_server.expect_request("/log/v1", method="POST").respond_with_handler(nr)
    op_env.update(
        DATADOG_TOKEN="pubmetrics0123456789abcdef01234567",
        FORWARDER_DATADOG_URL=dd_server.url_for("/"),
        NEW_RELIC_LICENSE_KEY="metrics0123456789abcdef0123456789abNRAL",
        FORWARDER_NEW_RELIC_URL=nr_server.url_for("/log/v1"),
    )
    daemon = daemons(op_env, tmp_path)
    daemon.send("burst 300")
    daemon.send("HUGE line that Datadog refuses")
    daemon.send("err one line on stderr")
    total = 302

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        m = daemon.metrics()
        done = (
            m.get(("forwarder_delivered_records_total", dest("datadog")), 0)
            + m.get(("forwarder_dropped_records_total", (("destination", "datadog"), ("reason", "too_large"))), 0)
            == total
            and m.get(("forwarder_dropped_records_total", (("destination", "newrelic"), ("reason", "http_400"))), 0)
            == total
        )
        return m if done else None

    m = poll(settled, 30, "every record delivered or dropped")
    accepted = dd.accepted()
    dd_attempts = len(dd.requests)
    assert len(accepted) == total - 1
    assert not any("HUGE" in obj["message"] for obj in accepted)
    assert m[("forwarder_delivered_records_total", dest("datadog"))] == len(accepted)
    assert m[("forwarder_sent_batches_total", dest("datadog"))] == sum(1 for *_, s in dd.requests if s == 202)
    assert m[("forwarder_dropped_records_total", (("destination", "datadog"), ("reason", "too_large")))] == 1
    assert m[("forwarder_request_duration_seconds_count", dest("datadog"))] == dd_attempts
    assert m[("forwarder_sent_bytes_total", dest("datadog"))] > 0
    assert m[("forwarder_pending_records", dest("datadog"))] == 0
    assert m[("forwarder_delivered_records_total", dest("newrelic"))] == 0
    nr_received = sum(len(group["logs"]) for *_, body, _s in nr.requests for group in json.loads(body))
    assert nr_received == total
    assert m[("forwarder_request_duration_seconds_count", dest("newrelic"))] == len(nr.requests)
    assert m[("forwarder_retries_total", dest("datadog"))] == m[("forwarder_retries_total", dest("newrelic"))] == 0
    assert m[("forwarder_input_lines_total", (("stream", "stdout"),))] == total - 1
    assert m[("forwarder_input_lines_total", (("stream", "stderr"),))] == 1
    assert m[("forwarder_records_total", ())] == total
    assert m[("forwarder_spool_chunks", ())] >= 0 and ("forwarder_spool_bytes", ()) in m
    assert m[("forwarder_last_success_timestamp_seconds", dest("datadog"))] > time.time() - 60
    assert ("forwarder_child_exit_status", ()) not in m  # the agent still runs
    assert m[("forwarder_build_info", (("mode", "run"), ("version", "0.1.0")))] == 1

    status, _out, err = daemon.stop()
    assert status == 0, err.decode()
    summaries = {s["destination"]: s for s in own_log(err, "destination_summary")}
    assert summaries["datadog"]["delivered"] == len(accepted)
    assert summaries["datadog"]["dropped"] == {"too_large": 1}
    assert summaries["newrelic"]["dropped"] == {"http_400": total}


# --- Done when 2: /healthz 503 naming the destination, then 200 ---------------------------------------------------


def test_healthz_turns_503_when_an_intake_goes_down_and_200_when_it_recovers(
    op_env: dict[str, str], tmp_path: Path, https_servers: Callable[[], HTTPServer], daemons: Callable[..., Daemon]
) -> None:
    grace = 1.0
    server = https_servers()
    intake = Intake()
    server.expect_request("/api/v2/logs", method="POST").respond_with_handler(intake)
    op_env.update(
        DATADOG_TOKEN="pubhealth0123456789abcdef012345678",
        FORWARDER_DATADOG_URL=server.url_for("/"),
        FORWARDER_HEALTH_GRACE=str(grace),
    )
    daemon = daemons(op_env, tmp_path)
    daemon.send("before the outage")
    poll(lambda: len(intake.accepted()) == 1, 30, "the first record delivered")
    assert daemon.http.get("/healthz").status_code == 200

    take_down(server)  # connections are refused from now on
    down_at = time.monotonic()
    daemon.send("during the outage")

    def unhealthy() -> httpx.Response | None:
        response = daemon.http.get("/healthz")
        return response if response.status_code == 503 else None

    bad = poll(unhealthy, 30, "/healthz 503")
    took = time.monotonic() - down_at
    body = bad.json()
    assert body["failing"] == ["datadog"]
    assert body["reason"].startswith("datadog: network")
    (entry,) = body["destinations"]
    assert entry["pending"] == 1 and entry["healthy"] is False and entry["failing_for_s"] >= grace
    assert grace <= took < grace + 5, took
    metrics = daemon.metrics()
    assert metrics[("forwarder_destination_healthy", dest("datadog"))] == 0
    assert metrics[("forwarder_retries_total", dest("datadog"))] >= 1

    server.start()  # the same port again
    poll(lambda: daemon.http.get("/healthz").status_code == 200, 30, "/healthz 200 after recovery")
    assert [obj["message"] for obj in intake.accepted()] == ["before the outage", "during the outage"]
    status, _out, err = daemon.stop()
    assert status == 0, err.decode()


# --- Done when 3: forwarder logs --follow and -n 50 ---------------------------------------------------------------


def _lines_of(stream: IO[bytes]) -> queue.Queue[str]:
    """A queue fed with every line of ``stream`` by a thread (so that a test can wait with a timeout)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for raw in stream:
            lines.put(raw.decode())

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_logs_follow_shows_new_records_within_a_second_and_n_shows_the_last(
    op_env: dict[str, str], tmp_path: Path, daemons: Callable[..., Daemon]
) -> None:
    daemon = daemons(op_env, tmp_path)
    daemon.send("burst 200")
    poll(lambda: (r := daemon.http.get("/logs", params={"n": 1}).text) and "burst 199" in r, 30, "the burst in /logs")
    client_env = {k: v for k, v in op_env.items() if k != "FORWARDER_HTTP_ADDR"}  # found through http.addr

    last = subprocess.run(
        forwarder_cmd("logs", "-n", "50"), env=client_env, capture_output=True, timeout=30, check=False
    )
    assert last.returncode == 0, last.stderr.decode()
    lines = last.stdout.decode().splitlines()
    assert [line.split(" ", 3)[3].strip() for line in lines] == [f"burst {i}" for i in range(150, 200)]
    assert all(line.split()[1:3] == ["stdout", "-"] for line in lines)
    assert b"\x1b[" not in last.stdout  # piped: no colour

    daemon.send("err something on stderr")

    def stderr_records() -> subprocess.CompletedProcess[bytes] | None:
        result = run_forwarder(["logs", "--stream", "stderr"], client_env)
        return result if b"something on stderr" in result.stdout else None

    only_err = poll(stderr_records, 30, "the stderr record")
    assert only_err.stdout.decode().splitlines()[0].split()[1:] == ["stderr", "-", "something", "on", "stderr"]

    follower = subprocess.Popen(
        forwarder_cmd("logs", "--follow", "-n", "1"), env=client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert follower.stdout is not None
        shown = _lines_of(follower.stdout)
        assert "something on stderr" in shown.get(timeout=30)  # attached: the last record came first
        delays = []
        for i in range(5):
            written = time.monotonic()
            daemon.send(f"mark {i}")
            line = shown.get(timeout=10)
            delays.append(time.monotonic() - written)
            assert line.rstrip("\n").endswith(f"mark {i}")
        print(f"forwarder logs --follow delays (s): {[round(d, 3) for d in delays]}")
        assert max(delays) < 1.0, delays
        status, _out, err = daemon.stop()
        assert status == 0, err.decode()
        assert follower.wait(timeout=30) == 0  # the forwarder stopped: the follower ends cleanly
        assert follower.stderr is not None
        assert b"stopped" in follower.stderr.read()
    finally:
        if follower.poll() is None:
            follower.kill()
        follower.wait()


def test_logs_without_a_running_forwarder_says_so(op_env: dict[str, str]) -> None:
    result = subprocess.run(
        forwarder_cmd("logs", "--http-addr", "127.0.0.1:9"), env=op_env, capture_output=True, timeout=30, check=False
    )
    assert result.returncode == 1
    assert b"no forwarder answers at 127.0.0.1:9" in result.stderr


# --- the endpoint never stops the forwarder -----------------------------------------------------------------------


def test_port_in_use_is_one_warning_and_the_forwarder_carries_on(base_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        base_env["FORWARDER_HTTP_ADDR"] = f"127.0.0.1:{taken.getsockname()[1]}"
        result = run_forwarder(["run", "--", "sh", "-c", "echo hello"], base_env)
    assert result.returncode == 0, result.stderr.decode()
    warnings = [json.loads(line) for line in result.stderr.splitlines() if b'"level":"warning"' in line]
    assert [w["event"] for w in warnings] == ["http_unavailable"]
    assert warnings[0]["addr"] == base_env["FORWARDER_HTTP_ADDR"]
    records = (Path(base_env["FORWARDER_STATE_DIR"]) / "records.ndjson").read_text()
    assert json.loads(records)["message"] == "hello"


def test_own_log_level_is_separate_from_the_forwarded_level(base_env: dict[str, str]) -> None:
    base_env.update(FORWARDER_LOG_LEVEL="ERROR", FORWARDER_MIN_LEVEL="DEBUG")
    script = "echo 'DEBUG detail'; echo 'ERROR broken' >&2"
    result = run_forwarder(["run", "--", "sh", "-c", script], base_env)
    assert result.returncode == 0
    assert result.stderr == b"ERROR broken\n"  # the mirrored line only: no info line of ours
    records = (Path(base_env["FORWARDER_STATE_DIR"]) / "records.ndjson").read_text().splitlines()
    assert sorted(json.loads(line)["level"] for line in records) == ["DEBUG", "ERROR"]  # two pipes: any order


# --- Done when 4: forwarder check --send-test ---------------------------------------------------------------------


def test_check_send_test_two_ok_one_failing(op_env: dict[str, str], https_servers: Callable[[], HTTPServer]) -> None:
    dd_server, nr_server, sentry_server = https_servers(), https_servers(), https_servers()
    dd, nr, sentry = Intake(), Intake(), Intake(lambda body: 500)
    dd_server.expect_request("/api/v2/logs", method="POST").respond_with_handler(dd)
    nr_server.expect_request("/log/v1", method="POST").respond_with_handler(nr)
    sentry_server.expect_request("/api/42/envelope/", method="POST").respond_with_handler(sentry)
    secrets = {
        "DATADOG_TOKEN": "pubcheckcli0123456789abcdef01234567",
        "NEW_RELIC_LICENSE_KEY": "checkcli0123456789abcdef0123456789NRAL",
        "SENTRY_DSN": f"https://5e7c1ec0ffee0123456789abcdef0123@127.0.0.1:{sentry_server.port}/42",
    }
    op_env.update(
        secrets,
        FORWARDER_DATADOG_URL=dd_server.url_for("/"),
        FORWARDER_NEW_RELIC_URL=nr_server.url_for("/log/v1"),
    )
    result = subprocess.run(
        forwarder_cmd("check", "--send-test"), env=op_env, capture_output=True, timeout=60, check=False
    )
    out = result.stdout.decode()
    assert result.returncode == 1, out + result.stderr.decode()
    verdicts = out.split("send test:\n")[1].splitlines()
    assert sorted(line.split()[0] + " " + line.split()[1] for line in verdicts) == [
        "FAIL sentry",
        "OK datadog",
        "OK newrelic",
    ]
    (failed,) = [line for line in verdicts if line.startswith("FAIL")]
    assert "retry http_500" in failed
    assert len(dd.accepted()) == 1 and len(nr.requests) == 1 and len(sentry.requests) == 1
    for value in (secrets["DATADOG_TOKEN"], secrets["NEW_RELIC_LICENSE_KEY"], "5e7c1ec0ffee0123456789abcdef0123"):
        assert value[4:14] not in out + result.stderr.decode()  # at most the first 4 characters are shown

    # Without --send-test: the listing only, exit 0, nothing sent.
    listing = subprocess.run(forwarder_cmd("check"), env=op_env, capture_output=True, timeout=60, check=False)
    assert listing.returncode == 0
    rows = [line.split() for line in listing.stdout.decode().splitlines() if line.startswith("  datadog ")]
    assert rows == [["datadog", f"https://127.0.0.1:{dd_server.port}/api/v2/logs", "secret=pubc..."]]
    assert len(dd.requests) == 1


# --- Done when 5: no secret value anywhere ------------------------------------------------------------------------

SECRETS = {
    "DATADOG_TOKEN": "pubSECRETdd0123456789abcdef0123456",
    "AWS_ACCESS_KEY_ID": "AKIASECRETKEYID00042",
    "AWS_SECRET_ACCESS_KEY": "SECRETawsSecretAccessKey/0123456789+abcd",
    "AWS_SESSION_TOKEN": "SECRETawsSessionToken0123456789abcdefghijklmnop",
    "NEW_RELIC_LICENSE_KEY": "SECRETnr0123456789abcdef0123456789abNRAL",
}
SENTRY_KEY = "5ec2e75ec2e75ec2e75ec2e75ec2e700"


@pytest.fixture
def moto_endpoint() -> Iterator[str]:
    with running_moto() as endpoint:
        yield endpoint


def test_no_secret_value_leaves_the_forwarder(
    op_env: dict[str, str],
    tmp_path: Path,
    https_servers: Callable[[], HTTPServer],
    moto_endpoint: str,
    daemons: Callable[..., Daemon],
) -> None:
    dd_server, nr_server, sentry_server = https_servers(), https_servers(), https_servers()
    first = threading.Event()

    def dd_respond(body: bytes) -> int:  # the first request fails once, so that errors are logged and retried
        if not first.is_set():
            first.set()
            return 500
        return 202

    dd, nr, sentry = Intake(dd_respond), Intake(), Intake(lambda body: 200)
    dd_server.expect_request("/api/v2/logs", method="POST").respond_with_handler(dd)
    nr_server.expect_request("/log/v1", method="POST").respond_with_handler(nr)
    sentry_server.expect_request("/api/42/envelope/", method="POST").respond_with_handler(sentry)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    env = {k: v for k, v in op_env.items() if not k.startswith(("AWS_", "CLOUDWATCH_"))}
    env.update(
        SECRETS,
        SENTRY_DSN=f"https://{SENTRY_KEY}@127.0.0.1:{sentry_server.port}/42",
        FORWARDER_DATADOG_URL=dd_server.url_for("/"),
        FORWARDER_NEW_RELIC_URL=nr_server.url_for("/log/v1"),
        AWS_REGION="us-west-2",
        AWS_ENDPOINT_URL_CLOUDWATCH_LOGS=require_loopback(moto_endpoint),
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
        CLOUDWATCH_LOG_GROUP=f"/forwarder/secrets-{uuid.uuid4().hex[:8]}",
        CLOUDWATCH_LOG_STREAM="secrets",
        FORWARDER_LOG_LEVEL="DEBUG",
        FORWARDER_REDACT="card=[0-9]{16}",
    )
    values = [*SECRETS.values(), SENTRY_KEY, "4242424242424242"]
    daemon = daemons(env, tmp_path, "--no-mirror")  # the agent's own terminal output is not ours to print
    daemon.send("env")  # the agent prints its whole environment, on stdout and on stderr
    daemon.send("paid with card=4242424242424242 today")  # a FORWARDER_REDACT pattern
    env_lines = 2 * len(env) + 2 + 1  # + PYTHONUNBUFFERED, set by the forwarder for the agent

    def everyone_delivered() -> bool:
        m = daemon.metrics()
        return all(
            m.get(("forwarder_delivered_records_total", dest(name)), 0) >= env_lines
            for name in ("datadog", "newrelic", "sentry", "cloudwatch")
        )

    poll(everyone_delivered, 60, "the environment delivered everywhere")
    scraped = daemon.http.get("/metrics").text
    health = daemon.http.get("/healthz").text
    logs = daemon.http.get("/logs", params={"n": 1000}).text
    status, out, err = daemon.stop()
    assert status == 0, err.decode()

    # What each intake received: bodies, URLs and headers other than the one that carries its own credential.
    received: list[str] = []
    for intake, auth in ((dd, None), (nr, "Api-Key"), (sentry, "X-Sentry-Auth")):
        for query, headers, body, _status in intake.requests:
            received.append(body.decode())
            received.append(json.dumps({k: v for k, v in query.items() if k != "dd-api-key"}))
            received.append(json.dumps({k: v for k, v in headers.items() if k != auth}))
    client = admin_client(moto_endpoint)
    events = client.get_log_events(
        logGroupName=env["CLOUDWATCH_LOG_GROUP"], logStreamName="secrets", startFromHead=True
    )["events"]
    client.close()
    received.extend(event["message"] for event in events)
    everything = {
        "our stdout": out.decode(),
        "our stderr": err.decode(),
        "/metrics": scraped,
        "/healthz": health,
        "/logs": logs,
        "the intakes": "\n".join(received),
    }
    for where, text in everything.items():
        for value in values:
            assert value not in text, f"a secret value was found in {where}"
    # ...and the agent's environment did arrive, scrubbed, at every destination.
    assert "DATADOG_TOKEN=[REDACTED]" in everything["the intakes"]
    assert "AWS_SECRET_ACCESS_KEY=[REDACTED]" in "\n".join(event["message"] for event in events)
    assert "NEW_RELIC_LICENSE_KEY=[REDACTED]" in "\n".join(body.decode() for _, _, body, _ in nr.requests)
    assert "SENTRY_DSN=[REDACTED]" in logs
    assert "paid with [REDACTED] today" in logs
    assert len(dd.requests) >= 2 and dd.requests[0][3] == 500  # an error happened and was logged
    assert own_log(err, "send_retry")
