"""The real CLI as a subprocess: `forwarder run -- CMD` and `forwarder tail -` with the embedded file sink."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import AGENT, file_records, forwarder_cmd, own_log, run_forwarder


def test_run_tags_streams_mirrors_and_returns_exit_status(base_env: dict[str, str]) -> None:
    base_env["FORWARDER_SOURCE"] = "my-agent"
    result = run_forwarder(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"], base_env)
    assert result.returncode == 3
    assert result.stdout == b"out\n"
    assert b"err\n" in result.stderr
    records = file_records(base_env)
    assert sorted((r["stream"], r["message"]) for r in records) == [("stderr", "err"), ("stdout", "out")]
    for rec in records:
        assert rec["host"] == "test-host"
        assert rec["source"] == "my-agent"
        assert rec["service"] == "cloud.livekit.io"


def test_demo_agent_records_are_forwarded(base_env: dict[str, str]) -> None:
    result = run_forwarder(["run", "--", sys.executable, str(AGENT)], base_env)
    assert result.returncode == 0, result.stderr.decode()
    records = file_records(base_env)
    messages = [r["message"] for r in records]
    assert any("starting worker" in m for m in messages)
    assert any(r["stream"] == "stderr" for r in records)
    assert all(r["source"] == "agent" for r in records)
    summary = own_log(result.stderr, "destination_summary")
    assert summary and summary[0]["destination"] == "file" and summary[0]["pending"] == 0


def test_interleaved_streams_keep_order_per_stream(base_env: dict[str, str]) -> None:
    script = "import sys\nfor i in range(2000):\n    sys.stdout.write(f'out {i}\\n'); sys.stderr.write(f'err {i}\\n')\n"
    result = run_forwarder(["run", "--no-mirror", "--", sys.executable, "-c", script], base_env)
    assert result.returncode == 0
    records = file_records(base_env)
    out = [r["message"] for r in records if r["stream"] == "stdout"]
    err = [r["message"] for r in records if r["stream"] == "stderr"]
    assert out == [f"out {i}" for i in range(2000)]
    assert err == [f"err {i}" for i in range(2000)]


def test_bad_bytes_and_unterminated_last_line(base_env: dict[str, str]) -> None:
    script = "import sys; sys.stdout.buffer.write(b'bad \\xff\\nnul \\x00 here\\r\\nno newline')"
    result = run_forwarder(["run", "--", sys.executable, "-c", script], base_env)
    assert result.returncode == 0
    assert [r["message"] for r in file_records(base_env)] == ["bad \ufffd", "nul \ufffd here", "no newline"]


def test_pythonunbuffered_is_set_unless_user_set_it(base_env: dict[str, str]) -> None:
    script = "import os; print(os.environ.get('PYTHONUNBUFFERED'))"
    run_forwarder(["run", "--", sys.executable, "-c", script], base_env)
    assert [r["message"] for r in file_records(base_env)] == ["1"]
    base_env["PYTHONUNBUFFERED"] = "custom"
    base_env["FORWARDER_STATE_DIR"] += "-2"
    run_forwarder(["run", "--", sys.executable, "-c", script], base_env)
    assert [r["message"] for r in file_records(base_env)] == ["custom"]


@pytest.mark.parametrize(("command", "code"), [("no-such-command-xyz", 127), ("not-executable.txt", 126)])
def test_command_that_cannot_start(base_env: dict[str, str], tmp_path: Path, command: str, code: int) -> None:
    if command.endswith(".txt"):
        path = tmp_path / command
        path.write_text("data")
        path.chmod(0o644)
        command = str(path)
    result = run_forwarder(["run", "--", command], base_env)
    assert result.returncode == code
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forwarder: error: cannot start")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FORWARDER_MIN_LEVEL", "LOUD", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("FORWARDER_SHUTDOWN_TIMEOUT", "soon", "number"),
        ("FORWARDER_BUFFER", "tape", "disk, memory"),
        ("FORWARDER_MAX_LINE_BYTES", "huge", "bytes"),
        ("FORWARDER_REQUEST_CONCURRENCY", "many", "1 to 32"),
        ("FORWARDER_REQUEST_CONCURRENCY", "0", "1 to 32"),
        ("FORWARDER_REQUEST_TIMEOUT", "soon", "number"),
        ("FORWARDER_REQUEST_TIMEOUT", "0", ">= 0.01"),
        ("FORWARDER_NICE", "-5", "0 to 19"),
        ("FORWARDER_NICE", "low", "0 to 19"),
    ],
)
def test_invalid_setting_exits_2_with_one_line(
    base_env: dict[str, str], variable: str, value: str, expected: str
) -> None:
    base_env[variable] = value
    result = run_forwarder(["run", "--", "true"], base_env)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0] and expected in lines[0] and value in lines[0]


def _start(base_env: dict[str, str], script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        forwarder_cmd("run", "--", sys.executable, "-c", script),
        env=base_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(("trap", "expected_status"), [(True, 42), (False, 128 + signal.SIGTERM)])
def test_sigterm_reaches_child_and_status_comes_back(
    base_env: dict[str, str], trap: bool, expected_status: int
) -> None:
    script = (
        "import signal, sys, time\n"
        "def bye(signum, frame):\n"
        "    print('got SIGTERM', flush=True); sys.exit(42)\n"
        + ("signal.signal(signal.SIGTERM, bye)\n" if trap else "")
        + "for i in range(100): print(f'line {i}')\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    proc = _start(base_env, script)
    assert proc.stdout is not None
    while proc.stdout.readline().strip() != b"ready":
        pass
    proc.send_signal(signal.SIGTERM)
    _out, _err = proc.communicate(timeout=30)
    assert proc.returncode == expected_status
    messages = [r["message"] for r in file_records(base_env)]
    assert messages[:101] == [f"line {i}" for i in range(100)] + ["ready"]
    if trap:
        assert messages[-1] == "got SIGTERM"


def test_tail_stdin(base_env: dict[str, str]) -> None:
    result = run_forwarder(["tail", "-"], base_env, stdin=b"one\ntwo\r\nthree")
    assert result.returncode == 0
    records = file_records(base_env)
    assert [(r["stream"], r["message"]) for r in records] == [
        ("stdout", "one"),
        ("stdout", "two"),
        ("stdout", "three"),
    ]


def test_version() -> None:
    result = subprocess.run(forwarder_cmd("--version"), capture_output=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith(b"forwarder ")


def test_state_dir_path_is_printed_at_start(base_env: dict[str, str]) -> None:
    result = run_forwarder(["run", "--", "true"], base_env)
    started = own_log(result.stderr, "forwarder_started")
    assert started and any(
        str(Path(base_env["FORWARDER_STATE_DIR"]) / "records.ndjson") in d for d in started[0]["destinations"]
    )


def test_child_exit_with_a_backlog_loses_nothing(base_env: dict[str, str], tmp_path: Path) -> None:
    """`cat` of a large file exits at once while shaping is still seconds behind: every line must still arrive
    (the pipe grace applies only to idle pipes)."""
    n = 300_000
    source = tmp_path / "big.log"
    source.write_text("".join(f'{{"message": "line {i}", "level": "INFO", "n": {i}}}\n' for i in range(n)))
    result = run_forwarder(["run", "--no-mirror", "--", "cat", str(source)], base_env, timeout=300)
    assert result.returncode == 0
    assert not own_log(result.stderr, "pipes_still_open")
    records = file_records(base_env)
    assert [r["attributes"]["n"] for r in records] == list(range(n))


def test_a_burst_larger_than_memory_spills_and_arrives_whole_in_order(base_env: dict[str, str]) -> None:
    """A child writes 48 MiB at pipe speed, far faster than lines are shaped: the backlog past 16 MiB goes to the
    spill file in the state directory (logged once), and every line is forwarded once, in order."""
    count = 48 * 1024 * 1024 // 128
    script = (
        "import os, sys\n"
        f"lines = [b'%09d ' % i + b'x' * 117 + b'\\n' for i in range({count})]\n"
        "for k in range(0, len(lines), 8192):\n"
        "    sys.stdout.buffer.write(b''.join(lines[k:k + 8192]))\n"
    )
    base_env["FORWARDER_BUFFER"] = "memory"
    result = run_forwarder(["run", "--no-mirror", "--", sys.executable, "-c", script], base_env, timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    [spilling] = own_log(result.stderr, "pipe_spilling")
    assert spilling["directory"] == base_env["FORWARDER_STATE_DIR"]
    messages = [r["message"] for r in file_records(base_env)]
    assert len(messages) == count
    assert all(m.startswith(f"{i:09d} ") for i, m in enumerate(messages))
    assert not [name for name in os.listdir(base_env["FORWARDER_STATE_DIR"]) if "spill" in name]  # never named


@pytest.mark.parametrize("variable", ["FORWARDER_HOST", "DATADOG_TOKEN"])
def test_a_setting_that_is_not_utf8_exits_2_with_one_line_naming_it(base_env: dict[str, str], variable: str) -> None:
    base_env[variable] = os.fsdecode(b"abc\xffdef-private")  # subprocess passes the raw byte back
    result = run_forwarder(["run", "--", "true"], base_env)
    assert result.returncode == 2
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"forwarder: error: {variable}: ") and "UTF-8" in lines[0]
    assert b"private" not in result.stderr


def test_a_command_name_that_is_not_utf8_gives_a_printable_source(base_env: dict[str, str], tmp_path: Path) -> None:
    script = os.path.join(os.fsencode(tmp_path), b"ag\xffent")
    with open(script, "wb") as fh:
        fh.write(b"#!/bin/sh\necho hello\n")
    os.chmod(script, 0o755)
    result = run_forwarder(["run", "--", os.fsdecode(script)], base_env)
    assert result.returncode == 0, result.stderr
    (record,) = file_records(base_env)
    assert (record["message"], record["source"]) == ("hello", "ag\ufffdent")


def test_a_stderr_nobody_reads_stops_neither_the_forwarder_nor_delivery(base_env: dict[str, str]) -> None:
    """Our stderr is a pipe whose reader is gone (``... 2>&1 | head``, journald restarting under systemd): every
    diagnostic line and every mirrored stderr line fails with EPIPE. The agent runs to its end and every record is
    delivered; the exit status is the agent's."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    script = "import sys\nfor i in range(2000): print(f'err {i}', file=sys.stderr)\nprint('done')\nsys.exit(3)"
    try:
        result = subprocess.run(
            forwarder_cmd("run", "--", sys.executable, "-c", script),
            env=base_env,
            stdout=subprocess.DEVNULL,
            stderr=write_end,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 3
    records = file_records(base_env)
    assert [r["message"] for r in records if r["stream"] == "stderr"] == [f"err {i}" for i in range(2000)]
    assert [r["message"] for r in records if r["stream"] == "stdout"] == ["done"]


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("state is a file", "a file is in the way"),
        ("state is under a file", "Not a directory"),
        ("spool is a file", "cannot open the spool in"),
    ],
)
def test_a_state_dir_that_cannot_be_used_exits_2_with_one_line(
    base_env: dict[str, str], tmp_path: Path, layout: str, expected: str
) -> None:
    """Checked with paths a file is in the way of (root ignores permissions, and tests may run as root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    if layout == "state is a file":
        base_env["FORWARDER_STATE_DIR"] = str(blocker)
    elif layout == "state is under a file":
        base_env["FORWARDER_STATE_DIR"] = str(blocker / "state")
    else:
        state = tmp_path / "state"
        state.mkdir()
        (state / "spool").write_text("not a directory")
        base_env["FORWARDER_STATE_DIR"] = str(state)
    result = run_forwarder(["run", "--", sys.executable, "-c", "print('never started')"], base_env)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forwarder: error: FORWARDER_STATE_DIR: ") and expected in lines[0]
    assert b"never started" not in result.stdout


def test_a_ca_file_with_no_certificate_exits_2_with_one_line(base_env: dict[str, str], tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    base_env["SSL_CERT_FILE"] = str(bundle)
    result = run_forwarder(["run", "--", "true"], base_env)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("forwarder: error: SSL_CERT_FILE: ")
    assert "no usable CA certificate" in lines[0] and str(bundle) in lines[0]


def test_a_json_line_nested_too_deep_to_encode_is_delivered_as_text(base_env: dict[str, str]) -> None:
    """A JSON line nested 300 levels deep (orjson writes 254 at most) is delivered as a text record; it used to
    stop the file destination with "Recursion limit reached" and the forwarder with it."""
    deep = '{"message": "deep", "a": ' + "[" * 299 + "]" * 299 + "}"
    script = f"print({deep!r})\nprint('after')"
    result = run_forwarder(["run", "--", sys.executable, "-c", script], base_env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["message"] for r in file_records(base_env)] == [deep, "after"]
