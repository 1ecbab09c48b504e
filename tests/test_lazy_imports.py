"""sentry-sdk and botocore are imported only when their destination is configured (~6 MiB of RSS otherwise), and
importlib.metadata (the sentry-sdk version for Sentry's ``sdk`` header) too: ~10 ms of every start otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_PROBE = """
import sys
from pathlib import Path
from forwarder import app, cli, config
cfg = config.load({"FORWARDER_STATE_DIR": sys.argv[1], **dict(a.split("=", 1) for a in sys.argv[2:])})
app.build_sinks(cfg)
print(",".join(sorted(m for m in ("sentry_sdk", "botocore", "boto3", "importlib.metadata") if m in sys.modules)))
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ([], ""),
        (["DATADOG_TOKEN=abc"], ""),
        (
            ["SENTRY_DSN=https://0123456789abcdef0123456789abcdef@o1.ingest.sentry.io/1"],
            "importlib.metadata,sentry_sdk",
        ),
    ],
)
def test_heavy_sdks_load_only_with_their_destination(tmp_path: Path, env: list[str], expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp_path), *env], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == expected
