"""`forwarder tail` end to end: the real CLI as a subprocess, real writer processes, rotation while they write, a
SIGKILL and restart, container log formats, many files. Records are read from the embedded NDJSON file sink.

Synchronisation is by polling for conditions (the sink's record count, the writer's progress) with a deadline;
nothing sleeps to wait for the forwarder.
"""

from __future__ import annotations

import calendar
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder.sources._follow import POLL_INTERVAL_S, SCAN_INTERVAL_S
from tests.e2e.conftest import forwarder_cmd, own_log

DEADLINE_S = 60.0
"""Wall-clock seconds a condition may take before a test fails (the machine is shared and slow)."""
CHECK_EVERY_S = 0.05


def wait_for(cond: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Check ``cond`` every 50 ms until it holds; fail after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(CHECK_EVERY_S)


class Sink:
    """Incremental reader of the file sink's NDJSON (only complete lines; a torn last line is left for later)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "records.ndjson"
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._rest = b""

    def poll(self) -> int:
        """Read what was appended since the last call; return the number of records so far."""
        if not self.path.exists():
            return 0
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        data = self._rest + data
        end = data.rfind(b"\n") + 1
        self._rest = data[end:]
        self.records.extend(json.loads(line) for line in data[:end].splitlines() if line)
        return len(self.records)

    def messages(self) -> list[str]:
        self.poll()
        return [r["message"] for r in self.records]


class Forwarder:
    """A running `forwarder tail` whose own diagnostics go to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(
            forwarder_cmd("tail", *args), env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=DEADLINE_S)
        self._log.close()
        return code

    def events(self, event: str) -> list[dict[str, Any]]:
        return own_log(self.log_path.read_bytes(), event)

    def wait_following(self) -> None:
        """Wait until the forwarder has opened the file (its start-up takes a while on a loaded machine; a writer
        started before that would rotate or truncate a file it has not seen yet)."""
        wait_for(lambda: bool(self.events("tail_file_opened")), "the forwarder to open the file")


@contextmanager
def forwarder(args: list[str], env: dict[str, str], tmp_path: Path) -> Iterator[Forwarder]:
    fwd = Forwarder(args, env, tmp_path / "forwarder.log")
    try:
        yield fwd
    finally:
        if fwd.proc.poll() is None:
            fwd.proc.kill()
            fwd.proc.wait()
        if not fwd._log.closed:
            fwd._log.close()


# A writer process: N lines "<prefix> <seq> <monotonic time> <padding>", each one os.write() on an O_APPEND
# descriptor (atomic). "watch" reopens the path when it no longer names the open file (like Python's
# logging.handlers.WatchedFileHandler): it follows rename+create and delete+create. "keep" never reopens (the
# copytruncate/truncate case). It reports its progress on stdout every 100 lines.
WRITER = r"""
import os, sys, time
path, count, mode, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pace = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0005
flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
fd = os.open(path, flags, 0o644)
for seq in range(count):
    if mode == "watch":
        try:
            st = os.stat(path)
            same = (st.st_dev, st.st_ino) == (lambda s: (s.st_dev, s.st_ino))(os.fstat(fd))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            fd = os.open(path, flags, 0o644)
    line = f"{prefix} {seq:07d} {time.monotonic():.6f} " + "p" * (seq % 23) + "\n"
    os.write(fd, line.encode())
    if seq % 100 == 99:
        print(seq + 1, flush=True)
    if pace:
        time.sleep(pace)
print("done", flush=True)
"""


class Writer:
    """The writer process and its progress."""

    def __init__(self, path: Path, count: int, mode: str, prefix: str = "w", pace: float = 0.0005) -> None:
        self.count = count
        self.written = 0
        self.done = False
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(count), mode, prefix, str(pace)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def wait_written(self, n: int) -> None:
        """Block until the writer reports at least ``n`` lines written (its stdout is read line by line)."""
        assert self.proc.stdout is not None
        while self.written < n and not self.done:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("writer ended early")
            if line.strip() == "done":
                self.done = True
            else:
                self.written = int(line)

    def finish(self) -> None:
        self.wait_written(self.count)
        assert self.proc.stdout is not None
        if not self.done:
            assert self.proc.stdout.readline().strip() == "done"
        assert self.proc.wait(timeout=DEADLINE_S) == 0


def _stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state ``T`` in ``/proc/<pid>/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def _arrived(sink: Sink, seq: int) -> bool:
    return seq in seqs(sink.messages())


def _count_above(sink: Sink, count: int) -> bool:
    return sink.poll() > count


def seqs(messages: list[str], prefix: str = "w") -> Counter[int]:
    """How many times each sequence number arrived."""
    return Counter(int(m.split()[1]) for m in messages if m.startswith(prefix + " "))


def line_times(path_texts: list[str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for text in path_texts:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3:
                out[int(parts[1])] = float(parts[2])
    return out


@pytest.fixture
def tail_env(base_env: dict[str, str]) -> dict[str, str]:
    env = dict(base_env)
    env["FORWARDER_MIN_LEVEL"] = "DEBUG"
    return env


N_LINES = 4000
ROTATE_AT = (1000, 2000, 3000)


@pytest.mark.parametrize("kind", ["rename_create", "delete_create", "truncate"])
def test_rotation_while_writing_every_line_exactly_once(tail_env: dict[str, str], tmp_path: Path, kind: str) -> None:
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    log.write_bytes(b"")
    sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    with forwarder([str(log)], tail_env, tmp_path) as fwd:
        fwd.wait_following()
        writer = Writer(log, N_LINES, "keep" if kind == "truncate" else "watch")
        for n, at in enumerate(ROTATE_AT, start=1):
            writer.wait_written(at)
            if kind == "rename_create":
                log.rename(log.with_name(f"app.log.{n}"))  # the writer reopens app.log on its next line
            elif kind == "delete_create":
                log.unlink()
            else:
                # Plain truncation destroys what was not read yet: pause the writer, let the forwarder catch up,
                # truncate, resume. The writer keeps its O_APPEND descriptor and goes on at the new end.
                writer.proc.send_signal(signal.SIGSTOP)
                wait_for(partial(_stopped, writer.proc.pid), "the writer to stop")  # the signal is asynchronous
                last = int(log.read_text().splitlines()[-1].split()[1])
                wait_for(partial(_arrived, sink, last), f"line {last} before truncating")
                os.truncate(log, 0)
                writer.proc.send_signal(signal.SIGCONT)
        writer.finish()
        wait_for(lambda: len(seqs(sink.messages())) == N_LINES, f"all {N_LINES} lines")
        assert fwd.stop() == 0
    counts = seqs(Sink(Path(tail_env["FORWARDER_STATE_DIR"])).messages())
    assert sorted(counts) == list(range(N_LINES))
    assert {seq: c for seq, c in counts.items() if c != 1} == {}
    if kind == "truncate":
        assert len(fwd.events("tail_file_truncated")) == len(ROTATE_AT)
    elif kind == "rename_create":
        assert len(fwd.events("tail_file_rotated")) == len(ROTATE_AT)
    else:
        assert len(fwd.events("tail_file_deleted")) == len(ROTATE_AT)


COPYTRUNCATE_BOUND_S = POLL_INTERVAL_S + 1.0
"""Lines lost to us at a copytruncate were written at most this long before the truncation: one poll interval,
plus up to 1 s for the forwarder being descheduled on a loaded machine."""


def test_copytruncate_loses_at_most_the_race_window(tail_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    log.write_bytes(b"")
    truncated_at: list[float] = []
    copies: list[Path] = []
    with forwarder([str(log)], tail_env, tmp_path) as fwd:
        fwd.wait_following()
        writer = Writer(log, N_LINES, "keep")
        for n, at in enumerate(ROTATE_AT, start=1):
            writer.wait_written(at)
            copy = log.with_name(f"app.log.{n}")
            shutil.copyfile(log, copy)  # logrotate's copytruncate: copy, then truncate in place
            os.truncate(log, 0)
            truncated_at.append(time.monotonic())
            copies.append(copy)
        writer.finish()
        sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
        wait_for(lambda: seqs(sink.messages()).get(N_LINES - 1) == 1, "the last line")
        assert fwd.stop() == 0
    counts = seqs(Sink(Path(tail_env["FORWARDER_STATE_DIR"])).messages())
    assert all(c == 1 for c in counts.values()), "no line twice"
    lost = sorted(set(range(N_LINES)) - set(counts))
    # Every line we missed was written shortly before a truncation (logrotate's own window between the copy and
    # the truncation included: those lines are in no copy either).
    written_at = line_times([c.read_text() for c in copies] + [log.read_text()])
    in_copies = line_times([c.read_text() for c in copies])
    for seq in lost:
        if seq in written_at:
            t = written_at[seq]
            assert any(cut - COPYTRUNCATE_BOUND_S <= t <= cut for cut in truncated_at), (seq, t, truncated_at)
        else:  # written between the copy and the truncate: in no copy, destroyed by the truncation
            assert seq not in in_copies
    assert len(fwd.events("tail_file_truncated")) == len(ROTATE_AT)
    # Bound stated in lines too: the writer writes ~1 line per 0.5 ms, so far fewer than this per window.
    assert len(lost) <= len(ROTATE_AT) * int(COPYTRUNCATE_BOUND_S / 0.0005)


BULK_WRITER = r"""
import os, sys, time
path, count, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
for start in range(0, count, batch):
    os.write(fd, "".join(f"k {seq:07d} {'x' * (seq % 50)} text line\n" for seq in range(start, start + batch)).encode())
    time.sleep(0.005)
"""


def _bulk_line(seq: int) -> str:
    """Line ``seq`` of :data:`BULK_WRITER`, without its newline (the record's message)."""
    return f"k {seq:07d} {'x' * (seq % 50)} text line"


def test_sigkill_mid_file_then_restart_resumes_at_the_checkpoint(tail_env: dict[str, str], tmp_path: Path) -> None:
    from forwarder.delivery.buffer import RECORD_OVERHEAD_BYTES
    from forwarder.delivery.spool import DEFAULT_CHUNK_MAX_BYTES, SPLIT_TAIL_FRACTION

    env = dict(tail_env, FORWARDER_BUFFER="disk")
    state = Path(env["FORWARDER_STATE_DIR"])
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    total = 400_000
    sink = Sink(state)
    with forwarder([str(log)], env, tmp_path) as fwd:
        fwd.wait_following()
        # ~100,000 lines/s in writes of 500 lines; the forwarder is killed while it follows the growing file.
        writer = subprocess.Popen([sys.executable, "-c", BULK_WRITER, str(log), str(total), "500"])
        wait_for(lambda: sink.poll() >= 50_000, "the first records")
        fwd.stop(signal.SIGKILL)
        size_at_kill = log.stat().st_size
    assert writer.wait(timeout=DEADLINE_S) == 0  # it appends the rest while the forwarder is down
    with sqlite3.connect(state / "spool" / "spool.sqlite3") as db:
        (value,) = [v for k, v in db.execute("SELECT key, value FROM checkpoints") if k.startswith("tail:")]
    checkpoint = json.loads(value)["offset"]
    assert 0 < checkpoint < size_at_kill < log.stat().st_size
    # A SIGKILL may tear the sink's last write: that batch was not acknowledged and is delivered again.
    data = sink.path.read_bytes()
    sink.path.write_bytes(data[: data.rfind(b"\n") + 1])
    sink = Sink(state)
    with forwarder([str(log)], env, tmp_path) as fwd:
        wait_for(lambda: len(seqs(sink.messages(), "k")) == total, "every line after the restart")
        assert fwd.stop() == 0
        reopened = fwd.events("tail_file_opened")[-1]
    assert (reopened["start"], reopened["offset"]) == ("checkpoint", checkpoint)
    counts = seqs(Sink(state).messages(), "k")
    assert sorted(counts) == list(range(total))
    twice = sorted(seq for seq, c in counts.items() if c > 1)
    assert all(counts[seq] == 2 for seq in twice)
    # Duplicates: only the chunk the file sink had written but not acknowledged when killed (one contiguous run).
    # A chunk holds less than (1 + SPLIT_TAIL_FRACTION) x DEFAULT_CHUNK_MAX_BYTES of records by records_size (a
    # short tail joins it), plus the one record that crosses a cut: checked on the duplicates' own sizes.
    max_chunk_bytes = int(DEFAULT_CHUNK_MAX_BYTES * (1 + SPLIT_TAIL_FRACTION))
    longest = len(_bulk_line(49)) + RECORD_OVERHEAD_BYTES
    assert sum(len(_bulk_line(seq)) + RECORD_OVERHEAD_BYTES for seq in twice) < max_chunk_bytes + longest
    if twice:
        assert twice[-1] - twice[0] + 1 == len(twice)


def _rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


BASE_NS = calendar.timegm((2026, 11, 21, 12, 0, 0)) * 1_000_000_000


def _cri_lines(seq: int) -> list[str]:
    """Container output number ``seq`` as CRI lines: every 5th on stderr, every 7th cut in three partial pieces."""
    ts = _rfc3339(BASE_NS + seq * 1000)
    stream = "stderr" if seq % 5 == 0 else "stdout"
    message = f"c {seq:05d} " + "m" * (seq % 40)
    if seq % 7 == 0:
        a, b = message[:4], message[4:8]
        later = _rfc3339(BASE_NS + seq * 1000 + 1)
        return [f"{ts} {stream} P {a}", f"{later} {stream} P {b}", f"{later} {stream} F {message[8:]}"]
    return [f"{ts} {stream} F {message}"]


def _docker_lines(seq: int) -> list[str]:
    ts = _rfc3339(BASE_NS + seq * 1000)
    stream = "stderr" if seq % 5 == 0 else "stdout"
    message = f"c {seq:05d} " + "m" * (seq % 40)
    pieces = [message[:4], message[4:8], message[8:] + "\n"] if seq % 7 == 0 else [message + "\n"]
    return [json.dumps({"log": p, "stream": stream, "time": ts}) for p in pieces]


def _assert_container_records(records: list[dict[str, Any]], count: int) -> None:
    by_seq: dict[int, dict[str, Any]] = {}
    for rec in records:
        seq = int(rec["message"].split()[1])
        assert seq not in by_seq, f"line {seq} twice"
        by_seq[seq] = rec
    assert sorted(by_seq) == list(range(count))
    for seq, rec in by_seq.items():
        assert rec["message"] == f"c {seq:05d} " + "m" * (seq % 40)
        assert rec["stream"] == ("stderr" if seq % 5 == 0 else "stdout")
        assert rec.get("event_time_ns") == BASE_NS + seq * 1000, rec


@pytest.mark.parametrize("fmt", ["cri", "docker"])
def test_container_formats_with_kubelet_style_rotation(tail_env: dict[str, str], tmp_path: Path, fmt: str) -> None:
    """The runtime writes, the kubelet renames 0.log to 0.log.<time> and the runtime reopens 0.log."""
    pod = tmp_path / "pods" / "ns_pod_uid" / "agent"
    pod.mkdir(parents=True)
    log = pod / "0.log"
    make = _cri_lines if fmt == "cri" else _docker_lines
    count = 3000
    rotate_every = 1000
    sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    pattern = str(tmp_path / "pods" / "*" / "*" / "*.log")
    with forwarder(["--format", fmt, pattern], tail_env, tmp_path) as fwd:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = os.open(log, flags, 0o644)
        for seq in range(count):
            if seq and seq % rotate_every == 0:  # rotate, then the runtime reopens 0.log
                log.rename(pod / f"0.log.2026112112000{seq // rotate_every}")
                os.close(fd)
                fd = os.open(log, flags, 0o644)
            for line in make(seq):  # one write per line, as the runtime does
                os.write(fd, (line + "\n").encode())
            if seq % rotate_every == 0:
                # The forwarder follows the file before it is rotated (a rotated name is not matched by the glob:
                # a file created and rotated away before the forwarder ever saw it could not be found).
                wait_for(partial(_count_above, sink, seq), f"record {seq}")
        os.close(fd)
        wait_for(lambda: sink.poll() >= count, f"{count} records")
        assert fwd.stop() == 0
        assert len(fwd.events("tail_file_rotated")) == count // rotate_every - 1
    final = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    final.poll()
    _assert_container_records(final.records, count)


def test_hundred_files_one_glob_and_a_late_file(tail_env: dict[str, str], tmp_path: Path) -> None:
    logs = tmp_path / "many"
    logs.mkdir()
    files = [logs / f"f{i:03d}.log" for i in range(100)]
    for i, path in enumerate(files):
        path.write_text(f"f{i:03d} start\n")
    rounds = 20
    script = (
        "import os, sys\n"
        "paths = sys.argv[1:]\n"
        "fds = [(os.path.basename(p)[:4], os.open(p, os.O_WRONLY | os.O_APPEND)) for p in paths]\n"
        f"for r in range({rounds}):\n"
        "    for name, fd in fds:\n"
        "        os.write(fd, f'{name} round {r}\\n'.encode())\n"
    )
    sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    with forwarder([str(logs / "*.log")], tail_env, tmp_path) as fwd:
        wait_for(lambda: sink.poll() >= 100, "the first line of every file")
        writers = [
            subprocess.Popen([sys.executable, "-c", script, *[str(p) for p in files[k::4]]]) for k in range(4)
        ]  # four processes appending concurrently, 25 files each
        for proc in writers:
            assert proc.wait(timeout=DEADLINE_S) == 0
        wait_for(lambda: sink.poll() >= 100 * (rounds + 1), "every round")
        late = logs / "late.log"
        late.write_text("late line\n")
        created = time.time()
        wait_for(lambda: "late line" in sink.messages(), "the late file's line")
        assert fwd.stop() == 0
        opened = [e for e in fwd.events("tail_file_opened") if e["path"] == str(late)]
    messages = Sink(Path(tail_env["FORWARDER_STATE_DIR"])).messages()
    expected = [f"f{i:03d} start" for i in range(100)]
    expected += [f"f{i:03d} round {r}" for i in range(100) for r in range(rounds)]
    assert sorted(messages) == sorted([*expected, "late line"])
    for i in range(100):  # each file's lines in order
        mine = [m for m in messages if m.startswith(f"f{i:03d} ")]
        assert mine == [f"f{i:03d} start"] + [f"f{i:03d} round {r}" for r in range(rounds)]
    assert len(opened) == 1 and opened[0]["start"] == "head"
    stamp = opened[0]["timestamp"]  # e.g. 2026-11-21T14:41:15.059012Z
    opened_at = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + stamp[20:-1])
    # Picked up within the scan interval (plus a little for a loaded machine's scheduling).
    assert opened_at - created <= SCAN_INTERVAL_S + 1.0


def test_stdin_and_files_together(tail_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "err.log"
    log.write_text("from the file\n")
    sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    proc = subprocess.Popen(
        forwarder_cmd("tail", "-", f"{log}=stderr"),
        env=tail_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"from stdin\n")
        proc.stdin.close()  # EOF on stdin: the files are still followed
        wait_for(lambda: sink.poll() >= 2, "both lines")
        with log.open("a") as fh:
            fh.write("after stdin ended\n")
        wait_for(lambda: sink.poll() >= 3, "the line appended later")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted((r["stream"], r["message"]) for r in sink.records) == [
        ("stderr", "after stdin ended"),
        ("stderr", "from the file"),
        ("stdout", "from stdin"),
    ]


def test_cri_from_stdin_exits_at_eof(tail_env: dict[str, str]) -> None:
    data = "".join(line + "\n" for seq in range(50) for line in _cri_lines(seq)).encode()
    result = subprocess.run(
        forwarder_cmd("tail", "--format", "cri", "-"),
        env=tail_env,
        input=data,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    sink = Sink(Path(tail_env["FORWARDER_STATE_DIR"]))
    sink.poll()
    _assert_container_records(sink.records, 50)


def _checkpoint_lag(addr: str) -> dict[str, float]:
    """``forwarder_checkpoint_lag_bytes`` per source label, scraped from ``/metrics`` at ``addr``."""
    text = httpx.get(f"http://{addr}/metrics", trust_env=False, timeout=10).text
    return {
        sample.labels["source"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "forwarder_checkpoint_lag_bytes"
        for sample in family.samples
    }


def test_checkpoint_lag_metric_follows_the_persisted_offset(tail_env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)) + b"unterminated")
    env = dict(tail_env, FORWARDER_HTTP_ADDR="127.0.0.1:0")
    addr_file = Path(env["FORWARDER_STATE_DIR"]) / "http.addr"
    sink = Sink(Path(env["FORWARDER_STATE_DIR"]))
    with forwarder([str(log)], env, tmp_path) as fwd:
        wait_for(addr_file.exists, "the metrics endpoint")
        addr = addr_file.read_text().strip()
        wait_for(lambda: sink.poll() == 1000, "the complete lines")
        # Persisted with its records: the checkpoint stops before the unterminated line, which is all that is owed.
        wait_for(lambda: _checkpoint_lag(addr) == {str(log): len(b"unterminated")}, "a lag of the held line")
        with log.open("ab") as fh:
            fh.write(b" now ends\n")
        wait_for(lambda: _checkpoint_lag(addr) == {str(log): 0}, "a lag of 0 once the line ended")
        assert sink.messages()[-1] == "unterminated now ends"
        assert fwd.stop() == 0


def test_a_file_name_that_is_not_utf8_is_followed_checkpointed_and_reported(
    tail_env: dict[str, str], tmp_path: Path
) -> None:
    """Linux file names are bytes: one that is not UTF-8 (Python holds it with lone surrogates) must not crash the
    diagnostics, the checkpoint or ``/metrics``; it is shown with U+FFFD where text is required."""
    logs = tmp_path / "logs"
    logs.mkdir()
    raw_name = os.path.join(os.fsencode(logs), b"agent-\xff.log")
    with open(raw_name, "wb") as fh:
        fh.write(b"".join(b"line %d\n" % i for i in range(10)))
    env = dict(tail_env, FORWARDER_HTTP_ADDR="127.0.0.1:0")
    state = Path(env["FORWARDER_STATE_DIR"])
    sink = Sink(state)
    shown = str(logs / "agent-\ufffd.log")
    with forwarder([str(logs / "*.log")], env, tmp_path) as fwd:
        wait_for((state / "http.addr").exists, "the metrics endpoint")
        addr = (state / "http.addr").read_text().strip()
        wait_for(lambda: sink.poll() == 10, "the file's lines")
        wait_for(lambda: _checkpoint_lag(addr) == {shown: 0}, "the lag of the file, by its printable name")
        (opened,) = fwd.events("tail_file_opened")
        assert opened["path"] == os.fsdecode(raw_name)  # the diagnostics keep the byte (as a \udcff escape)
        assert fwd.stop() == 0
    assert sink.messages() == [f"line {i}" for i in range(10)]
    with sqlite3.connect(state / "spool" / "spool.sqlite3") as db:
        (value,) = [v for k, v in db.execute("SELECT key, value FROM checkpoints") if k.startswith("tail:")]
    assert json.loads(value)["path"] == shown
    assert json.loads(value)["offset"] == len(b"".join(b"line %d\n" % i for i in range(10)))
