"""Environment + flags -> a frozen :class:`Config`: tags, limits, which destinations are enabled, validation.

Every variable the forwarder reads is listed in :data:`KNOWN_VARIABLES` (the sinks add their own). A bad value raises
:class:`ConfigError` naming the variable and what is accepted; the CLI prints it as one line and exits 2.
Secrets are kept in :class:`Secret`, whose ``repr``/``str`` never show the value.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from forwarder.record import Level, Tags, printable

if TYPE_CHECKING:
    from forwarder.sinks import SinkConfig

DEFAULT_SERVICE: Final = "cloud.livekit.io"
DEFAULT_MIN_LEVEL: Final = Level.INFO
DEFAULT_SHUTDOWN_TIMEOUT_S: Final = 10.0
DEFAULT_MAX_LINE_BYTES: Final = 256 * 1024
DEFAULT_MULTILINE_TIMEOUT_S: Final = 0.2
DEFAULT_FLUSH_INTERVAL_S: Final = 0.2
DEFAULT_SPOOL_MAX_BYTES: Final = 1024**3
DEFAULT_RETRY_MAX_BACKOFF_S: Final = 30.0
DEFAULT_REQUEST_CONCURRENCY: Final = 4
MAX_REQUEST_CONCURRENCY: Final = 32
"""Upper bound of ``FORWARDER_REQUEST_CONCURRENCY``: CloudWatch requests each hold a worker thread while in flight, and
trio runs at most 40 worker threads at once (its default thread limiter), shared with the spool."""
DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
"""``FORWARDER_REQUEST_TIMEOUT``: connect, read, write and pool timeout of every request to a destination, seconds
(Vector's sinks default to 60 s; a log intake answers in well under a second, and a shorter timeout frees the
request's slot sooner when a destination hangs)."""
MIN_REQUEST_TIMEOUT_S: Final = 0.01
DEFAULT_NICE: Final = 10
"""``FORWARDER_NICE``: added to the nice value of the forwarder's own threads (after the agent started, in run mode)
so that the agent wins the CPU when both want it; 0 leaves the priority alone (:mod:`forwarder._priority`)."""
MAX_NICE_INCREMENT: Final = 19
DEFAULT_HTTP_ADDR: Final = "127.0.0.1:9880"
DEFAULT_HEALTH_GRACE_S: Final = 60.0
SYSTEM_STATE_DIR: Final = Path("/var/lib/forwarder")

CORE_VARIABLES: Final = (
    "FORWARDER_HOST",
    "FORWARDER_SOURCE",
    "FORWARDER_SERVICE",
    "FORWARDER_MIN_LEVEL",
    "FORWARDER_STATE_DIR",
    "FORWARDER_HTTP_ADDR",
    "FORWARDER_HEALTH_GRACE",
    "FORWARDER_SHUTDOWN_TIMEOUT",
    "FORWARDER_MAX_LINE_BYTES",
    "FORWARDER_MULTILINE_TIMEOUT",
    "FORWARDER_FLUSH_INTERVAL",
    "FORWARDER_STRIP_ANSI",
    "FORWARDER_BUFFER",
    "FORWARDER_SPOOL_MAX_BYTES",
    "FORWARDER_RETRY_MAX_BACKOFF",
    "FORWARDER_REQUEST_CONCURRENCY",
    "FORWARDER_REQUEST_TIMEOUT",
    "FORWARDER_NICE",
    "FORWARDER_FILE_SINK",
    "FORWARDER_LOG_LEVEL",
    "FORWARDER_REDACT",
    "SSL_CERT_FILE",
)


class ConfigError(Exception):
    """A setting is missing or invalid.

    Attributes:
        variable: the environment variable (or flag) at fault.
        problem: what is wrong and what is accepted; never contains a secret value.
    """

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class Secret:
    """A secret string whose ``repr`` and ``str`` never reveal it; :meth:`reveal` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value, for building a request. Never log what this returns."""
        return self._value

    def masked(self) -> str:
        """At most the first 4 characters followed by ``...``, for ``forwarder check``."""
        return (self._value[:4] if len(self._value) >= 12 else "") + "..."

    def __repr__(self) -> str:
        return f"Secret({self.masked()!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class HttpSettings:
    """Settings shared by every HTTP sink's client.

    Attributes:
        ca_file: a PEM bundle to trust instead of the system/certifi store (``SSL_CERT_FILE``), or ``None``.
        timeout_s: connect/read/write/pool timeout for every request, seconds (``FORWARDER_REQUEST_TIMEOUT``).
        concurrency: requests one destination may have in flight at once (``FORWARDER_REQUEST_CONCURRENCY``), and
            the size of its connection pool.
    """

    ca_file: str | None = None
    timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    concurrency: int = DEFAULT_REQUEST_CONCURRENCY


@dataclass(frozen=True)
class Config:
    """Everything the forwarder needs to run, validated. Built by :func:`load`.

    Times are in seconds, sizes in bytes.
    """

    tags: Tags
    min_level: Level = DEFAULT_MIN_LEVEL
    state_dir: Path = SYSTEM_STATE_DIR
    http_addr: str | None = DEFAULT_HTTP_ADDR
    health_grace_s: float = DEFAULT_HEALTH_GRACE_S
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    multiline_timeout_s: float = DEFAULT_MULTILINE_TIMEOUT_S
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    strip_ansi: bool = True
    buffer: str = "disk"
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    retry_max_backoff_s: float = DEFAULT_RETRY_MAX_BACKOFF_S
    nice: int = DEFAULT_NICE
    file_sink: bool = True
    log_level: str = "INFO"
    redact_patterns: tuple[str, ...] = ()
    http: HttpSettings = field(default_factory=HttpSettings)
    sinks: tuple[SinkConfig, ...] = ()

    def secrets(self) -> list[str]:
        """Every configured secret value (for scrubbing); never log the result."""
        values: list[str] = []
        for sink in self.sinks:
            values.extend(sink.secret_values())
        return [v for v in values if v]


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def parse_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    """Read a non-negative number of seconds (or other float) from ``env[name]``.

    Raises:
        ConfigError: not a number, or below ``minimum``.
    """
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a number; expected a number >= {minimum:g}") from None
    if math.isnan(value) or value < minimum or math.isinf(value):
        raise ConfigError(name, f"{raw!r} is out of range; expected a finite number >= {minimum:g}")
    return value


_SIZE_UNITS: Final = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1024,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1024**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1024**3,
    "GIB": 1024**3,
}
_SIZE_RE: Final = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    """Read a byte size (``1048576``, ``256KiB``, ``1GiB``; K/M/G are powers of 1024) from ``env[name]``.

    Raises:
        ConfigError: not a size, or below ``minimum``.
    """
    raw = _get(env, name)
    if raw is None:
        return default
    match = _SIZE_RE.match(raw)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(name, f"{raw!r} is not a size; expected bytes such as 1048576, 256KiB or 1GiB")
    value = int(match.group(1)) * _SIZE_UNITS[unit]
    if value < minimum:
        raise ConfigError(name, f"{raw!r} is too small; expected at least {minimum} bytes")
    return value


def parse_int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    """Read a whole number from ``minimum`` to ``maximum`` (inclusive) from ``env[name]``.

    Raises:
        ConfigError: not a whole number, or out of range.
    """
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"{raw!r} is not a whole number; expected {minimum} to {maximum}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(name, f"{raw!r} is out of range; expected {minimum} to {maximum}")
    return value


def parse_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Read a boolean (``1/0``, ``true/false``, ``yes/no``, ``on/off``) from ``env[name]``.

    Raises:
        ConfigError: any other value.
    """
    raw = _get(env, name)
    if raw is None:
        return default
    low = raw.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"{raw!r} is not a boolean; expected true or false")


def parse_choice(env: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    """Read one of ``choices`` (case-insensitive) from ``env[name]``.

    Raises:
        ConfigError: any other value; the message lists the accepted ones.
    """
    raw = _get(env, name)
    if raw is None:
        return default
    low = raw.lower()
    for choice in choices:
        if choice.lower() == low:
            return choice
    raise ConfigError(name, f"{raw!r} is not accepted; expected one of {', '.join(choices)}")


def _parse_level(env: Mapping[str, str], name: str, default: Level) -> Level:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        return Level.parse(raw)
    except ValueError:
        accepted = ", ".join(level.name for level in Level)
        raise ConfigError(name, f"{raw!r} is not a level; expected one of {accepted}") from None


def _check_ca_file(ca_file: str) -> None:
    """Raise :class:`ConfigError` unless ``ca_file`` (``SSL_CERT_FILE``) loads as a CA bundle. It is loaded through
    the process's cached TLS context (:func:`forwarder.sinks._http.tls_context`), which the destinations then
    reuse: the check costs no second load."""
    if not Path(ca_file).is_file():
        raise ConfigError("SSL_CERT_FILE", f"{ca_file!r} is not a readable file; expected a PEM CA bundle")
    import ssl

    from forwarder.sinks._http import tls_context

    try:
        tls_context(ca_file)
    except (OSError, ssl.SSLError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else getattr(exc, "reason", None) or exc
        raise ConfigError(
            "SSL_CERT_FILE", f"{ca_file!r} holds no usable CA certificate ({problem}); expected a PEM CA bundle"
        ) from None


def _is_utf8(value: str) -> bool:
    """Whether ``value`` is text: an environment value or argument with bytes that are not UTF-8 reaches Python as
    lone surrogates (``surrogateescape``), which no JSON encoder or HTTP header takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def default_source(command: Sequence[str], cwd: Path) -> str:
    """The ``source`` tag when ``FORWARDER_SOURCE`` is unset: ``[agent] id`` of ``livekit.toml`` in ``cwd``, else
    the command's name (``python agent.py`` -> ``agent``), else ``"forwarder"``. Bytes of the command that are not
    UTF-8 become U+FFFD."""
    return printable(_default_source(command, cwd))


def _default_source(command: Sequence[str], cwd: Path) -> str:
    toml_path = cwd / "livekit.toml"
    try:
        with toml_path.open("rb") as fh:
            data = tomllib.load(fh)
        agent_id = data.get("agent", {}).get("id")
        if isinstance(agent_id, str) and agent_id:
            return agent_id
    except (OSError, tomllib.TOMLDecodeError, AttributeError):
        pass
    if not command:
        return "forwarder"
    name = Path(command[0]).name
    if re.fullmatch(r"python[0-9.]*|uv|node|bash|sh", name) and len(command) > 1:
        for arg in command[1:]:
            if arg.startswith("-"):
                if arg == "-c":
                    break  # an inline script: the interpreter's name is the best we have
                continue
            if " " not in arg and Path(arg).stem:
                return Path(arg).stem
            break
    return name


def default_state_dir(env: Mapping[str, str]) -> Path:
    """``/var/lib/forwarder`` when it is (or can be made) writable, else ``$XDG_STATE_HOME/forwarder`` or
    ``~/.local/state/forwarder``."""
    target = SYSTEM_STATE_DIR
    probe = target if target.exists() else target.parent
    if os.access(probe, os.W_OK):
        return target
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "forwarder"


def _parse_http_addr(env: Mapping[str, str]) -> str | None:
    raw = _get(env, "FORWARDER_HTTP_ADDR")
    if raw is None:
        return DEFAULT_HTTP_ADDR
    if raw.lower() == "off":
        return None
    _host, sep, port = raw.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("FORWARDER_HTTP_ADDR", f"{raw!r} is not HOST:PORT; expected e.g. 127.0.0.1:9880 or off")
    return raw


def _parse_redact(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _get(env, "FORWARDER_REDACT")
    if raw is None:
        return ()
    patterns = tuple(p for p in raw.split("\n") if p.strip()) if "\n" in raw else (raw,)
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError("FORWARDER_REDACT", f"invalid regular expression: {exc}") from None
    return patterns


def load(
    env: Mapping[str, str],
    *,
    command: Sequence[str] = (),
    cwd: Path | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Config:
    """Build and validate the :class:`Config` from ``env`` and flag ``overrides`` (which win).

    Args:
        env: the process environment (or a test's dict).
        command: the child's argv in ``run`` mode (for the default ``source``).
        cwd: where to look for ``livekit.toml`` (default: the current directory).
        overrides: flag values keyed by the variable they mirror.

    Raises:
        ConfigError: the first invalid setting.
    """
    from forwarder.sinks import sink_configs_from_env

    merged: dict[str, str] = dict(env)
    if overrides:
        merged.update({k: v for k, v in overrides.items() if v is not None})
    for name in known_variables():
        value = merged.get(name)
        if value is not None and not _is_utf8(value):
            raise ConfigError(name, "is not valid UTF-8 text (it holds bytes that decode to no character)")
    tags = Tags(
        host=_get(merged, "FORWARDER_HOST") or printable(socket.gethostname()),
        source=_get(merged, "FORWARDER_SOURCE") or default_source(command, cwd or Path.cwd()),
        service=_get(merged, "FORWARDER_SERVICE") or DEFAULT_SERVICE,
    )
    state_raw = _get(merged, "FORWARDER_STATE_DIR")
    ca_file = _get(merged, "SSL_CERT_FILE")
    if ca_file is not None:
        _check_ca_file(ca_file)
    sinks = tuple(sink_configs_from_env(merged))
    file_sink_mode = parse_choice(merged, "FORWARDER_FILE_SINK", ("auto", "on", "off"), "auto")
    file_sink = file_sink_mode == "on" or (file_sink_mode == "auto" and not sinks)
    return Config(
        tags=tags,
        min_level=_parse_level(merged, "FORWARDER_MIN_LEVEL", DEFAULT_MIN_LEVEL),
        state_dir=Path(state_raw) if state_raw else default_state_dir(merged),
        http_addr=_parse_http_addr(merged),
        health_grace_s=parse_float(merged, "FORWARDER_HEALTH_GRACE", DEFAULT_HEALTH_GRACE_S),
        shutdown_timeout_s=parse_float(merged, "FORWARDER_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT_S),
        max_line_bytes=parse_size(merged, "FORWARDER_MAX_LINE_BYTES", DEFAULT_MAX_LINE_BYTES, minimum=1024),
        multiline_timeout_s=parse_float(merged, "FORWARDER_MULTILINE_TIMEOUT", DEFAULT_MULTILINE_TIMEOUT_S),
        flush_interval_s=parse_float(merged, "FORWARDER_FLUSH_INTERVAL", DEFAULT_FLUSH_INTERVAL_S, minimum=0.001),
        strip_ansi=parse_bool(merged, "FORWARDER_STRIP_ANSI", True),
        buffer=parse_choice(merged, "FORWARDER_BUFFER", ("disk", "memory"), "disk"),
        spool_max_bytes=parse_size(merged, "FORWARDER_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES, minimum=65536),
        nice=parse_int(merged, "FORWARDER_NICE", DEFAULT_NICE, minimum=0, maximum=MAX_NICE_INCREMENT),
        retry_max_backoff_s=parse_float(
            merged, "FORWARDER_RETRY_MAX_BACKOFF", DEFAULT_RETRY_MAX_BACKOFF_S, minimum=0.001
        ),
        file_sink=file_sink,
        log_level=parse_choice(
            merged, "FORWARDER_LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "INFO"
        ),
        redact_patterns=_parse_redact(merged),
        http=HttpSettings(
            ca_file=ca_file,
            timeout_s=parse_float(
                merged, "FORWARDER_REQUEST_TIMEOUT", DEFAULT_REQUEST_TIMEOUT_S, minimum=MIN_REQUEST_TIMEOUT_S
            ),
            concurrency=parse_int(
                merged,
                "FORWARDER_REQUEST_CONCURRENCY",
                DEFAULT_REQUEST_CONCURRENCY,
                minimum=1,
                maximum=MAX_REQUEST_CONCURRENCY,
            ),
        ),
        sinks=sinks,
    )


def known_variables() -> tuple[str, ...]:
    """Every environment variable the forwarder reads (core and every sink's)."""
    from forwarder.sinks import SINK_VARIABLES

    return CORE_VARIABLES + SINK_VARIABLES
