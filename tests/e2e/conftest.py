"""Helpers for end-to-end tests that run the real ``forwarder`` CLI as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "examples" / "agent.py"
SECRET_VARS = (
    "DATADOG_TOKEN",
    "DATADOG_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "SENTRY_DSN",
    "NEW_RELIC_LICENSE_KEY",
    "CLOUDWATCH_LOG_GROUP",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS",
    "FORWARDER_DATADOG_URL",
    "FORWARDER_NEW_RELIC_URL",
    "PYTHONUNBUFFERED",
)


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """A clean environment for the CLI: no destination secrets, a private state dir, no HTTP endpoint."""
    env = {k: v for k, v in os.environ.items() if k not in SECRET_VARS and not k.startswith("FORWARDER_")}
    env["FORWARDER_STATE_DIR"] = str(tmp_path / "state")
    env["FORWARDER_HTTP_ADDR"] = "off"
    env["FORWARDER_HOST"] = "test-host"
    env["FORWARDER_SHUTDOWN_TIMEOUT"] = "10"
    return env


def forwarder_cmd(*args: str) -> list[str]:
    """argv running the forwarder from this checkout with the test interpreter."""
    return [sys.executable, "-m", "forwarder", *args]


def run_forwarder(
    args: Sequence[str], env: Mapping[str, str], *, timeout: float = 60, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI to completion and capture its stdout and stderr (bytes)."""
    return subprocess.run(
        forwarder_cmd(*args), env=dict(env), capture_output=True, timeout=timeout, input=stdin, check=False
    )


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of an NDJSON file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def file_records(env: Mapping[str, str]) -> list[dict[str, Any]]:
    """The records the embedded file sink wrote for a run with ``env``."""
    return read_ndjson(Path(env["FORWARDER_STATE_DIR"]) / "records.ndjson")


def own_log(stderr: bytes, event: str) -> list[dict[str, Any]]:
    """The forwarder's own JSON diagnostics on ``stderr`` whose ``event`` is ``event``."""
    out = []
    for line in stderr.decode(errors="replace").splitlines():
        if line.startswith("{") and '"logger":"forwarder"' in line:
            data = json.loads(line)
            if data.get("event") == event:
                out.append(data)
    return out


Runner = Callable[..., subprocess.CompletedProcess[bytes]]


T = TypeVar("T")


def poll(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Call ``probe`` until it returns something truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
