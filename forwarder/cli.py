"""Command line: arguments -> :class:`~forwarder.config.Config` -> :func:`forwarder.app.serve`; exit status.

Exit status: ``run`` returns the child's status (``128 + N`` if it died of signal N; 127/126 if it could not be
started); 2 for a usage or configuration error (one line naming the variable and what is accepted); 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from forwarder import __version__
from forwarder import log as ownlog
from forwarder.config import Config, ConfigError, load

if TYPE_CHECKING:
    from forwarder.sources.child import CommandNotStartedError as CommandNotStartedErrorType

EXIT_USAGE: Final = 2

# Flags that mirror an environment variable (a flag wins over the environment).
_MIRRORED: Final = {
    "host": "FORWARDER_HOST",
    "source": "FORWARDER_SOURCE",
    "service": "FORWARDER_SERVICE",
    "min_level": "FORWARDER_MIN_LEVEL",
    "state_dir": "FORWARDER_STATE_DIR",
    "shutdown_timeout": "FORWARDER_SHUTDOWN_TIMEOUT",
    "http_addr": "FORWARDER_HTTP_ADDR",
    "buffer": "FORWARDER_BUFFER",
    "max_line_bytes": "FORWARDER_MAX_LINE_BYTES",
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each mirrors an environment variable; the flag wins)")
    for dest, var in _MIRRORED.items():
        group.add_argument(
            f"--{dest.replace('_', '-')}",
            dest=dest,
            metavar=var.removeprefix("FORWARDER_"),
            help=f"overrides {var}",
        )


def build_parser() -> argparse.ArgumentParser:
    """The ``forwarder`` argument parser (subcommands run, tail, check, logs)."""
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Capture an agent's stdout/stderr, tag every line and ship it to Datadog, CloudWatch Logs, "
        "Sentry and New Relic (whichever secrets are set), or to a local NDJSON file.",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="spawn COMMAND and forward its stdout/stderr",
        usage="forwarder run [OPTIONS] -- COMMAND [ARG...]",
    )
    _add_common(run)
    run.add_argument("--no-mirror", action="store_true", help="do not copy the child's output to our stdout/stderr")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")

    tail = sub.add_parser("tail", help="follow files ('-' is stdin)", usage="forwarder tail [OPTIONS] PATH[=STREAM]...")
    _add_common(tail)
    tail.add_argument(
        "--format",
        choices=("raw", "cri", "docker"),
        default="raw",
        help="raw lines (default), CRI (kubelet) or Docker json-file logs",
    )
    tail.add_argument(
        "--read-from",
        choices=("head", "tail"),
        default=None,
        help="where to start in a file with no checkpoint (see README)",
    )
    tail.add_argument("paths", nargs="+", metavar="PATH[=STREAM]")

    check = sub.add_parser("check", help="validate the configuration and list the enabled destinations")
    _add_common(check)
    check.add_argument("--send-test", action="store_true", help="send one test record to each destination")

    logs = sub.add_parser("logs", help="show recent (and live) forwarded records from the running forwarder")
    logs.add_argument("-n", type=int, default=20, dest="lines", help="how many recent records (default 20)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    logs.add_argument("--stream", choices=("stdout", "stderr"), default=None)
    logs.add_argument("--min-level", default=None)
    logs.add_argument("--http-addr", default=None, help="overrides FORWARDER_HTTP_ADDR")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    return {var: str(getattr(args, dest)) for dest, var in _MIRRORED.items() if getattr(args, dest, None) is not None}


def _error(message: str) -> int:
    print(f"forwarder: error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _load(args: argparse.Namespace, command: Sequence[str]) -> Config:
    return load(os.environ, command=command, cwd=Path.cwd(), overrides=_overrides(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``forwarder`` console script and ``python -m forwarder``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            command = list(args.argv)
            if command and command[0] == "--":
                command = command[1:]
            if not command:
                return _error("run: missing COMMAND (usage: forwarder run [OPTIONS] -- COMMAND [ARG...])")
            config = _load(args, command)
            ownlog.configure(config.log_level)
            ownlog.set_secrets(config.secrets())
            return _run(config, command, mirror=not args.no_mirror)
        if args.command == "tail":
            config = _load(args, ())
            ownlog.configure(config.log_level)
            ownlog.set_secrets(config.secrets())
            return _tail(config, args)
        if args.command == "check":
            config = _load(args, ())
            ownlog.configure(config.log_level)
            ownlog.set_secrets(config.secrets())
            from forwarder.check import run_check

            return trio.run(run_check, config, args.send_test)
        if args.command == "logs":
            from forwarder.telemetry import run_logs_client

            return run_logs_client(args, os.environ)
    except ConfigError as exc:
        return _error(f"{exc.variable}: {exc.problem}")
    return _error(f"unknown command {args.command!r}")


def _run(config: Config, command: list[str], *, mirror: bool) -> int:
    from forwarder._priority import lower_priority
    from forwarder.app import serve
    from forwarder.pipeline import Ingest
    from forwarder.sources._pipe_thread import spill_bound
    from forwarder.sources.child import CommandNotStartedError, run_child

    def started(_pid: int) -> None:
        lower_priority(config.nice)  # the agent keeps our priority; our threads yield the CPU to it

    async def source(ingest: Ingest) -> int:
        return await run_child(
            command,
            ingest,
            env=os.environ,
            max_line_bytes=config.max_line_bytes,
            mirror=mirror,
            on_started=started,
            spill_dir=config.state_dir,
            spill_max_bytes=spill_bound(config.spool_max_bytes),
        )

    problem = _check_command(command[0])
    if problem is not None:
        print(f"forwarder: error: {problem.args[0]}", file=sys.stderr, flush=True)
        return problem.exit_code
    try:
        return trio.run(serve, config, source, "run")
    except BaseExceptionGroup as group:
        match, _rest = group.split(CommandNotStartedError)
        if match is None:
            raise
        first = match.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        assert isinstance(first, CommandNotStartedError)
        print(f"forwarder: error: {first.args[0]}", file=sys.stderr, flush=True)
        return first.exit_code
    except CommandNotStartedError as exc:
        print(f"forwarder: error: {exc.args[0]}", file=sys.stderr, flush=True)
        return exc.exit_code


def _check_command(name: str) -> CommandNotStartedErrorType | None:
    """A start error for ``name`` found before anything starts (not found: 127, not executable: 126)."""
    from forwarder.sources.child import CommandNotStartedError

    if "/" in name:
        path = Path(name)
        if not path.exists():
            return CommandNotStartedError(name, "no such file", 127)
        if path.is_dir() or not os.access(path, os.X_OK):
            return CommandNotStartedError(name, "not executable", 126)
        return None
    if shutil.which(name) is None:
        return CommandNotStartedError(name, "command not found in PATH", 127)
    return None


def _tail(config: Config, args: argparse.Namespace) -> int:
    from forwarder._priority import lower_priority
    from forwarder.app import serve
    from forwarder.pipeline import Ingest

    lower_priority(config.nice)  # an agent on this machine wins the CPU when both want it

    paths: list[str] = list(args.paths)
    if paths == ["-"] and args.format == "raw":
        from forwarder.sources.stdin import read_stdin

        async def stdin_source(ingest: Ingest) -> int:
            await read_stdin(ingest, max_line_bytes=config.max_line_bytes)
            return 0

        return trio.run(serve, config, stdin_source, "tail")
    from forwarder.sources.tail import make_tail_source

    return trio.run(serve, config, make_tail_source(config, paths, fmt=args.format, read_from=args.read_from), "tail")
