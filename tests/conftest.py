"""Shared fixtures: a trustme CA, HTTPS for pytest-httpserver, and a loopback-only network guard."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from pytest_httpserver import HTTPServer


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throwaway certificate authority; its leaf certificates cover localhost and 127.0.0.1."""
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA's certificate as a PEM file, for ``SSL_CERT_FILE`` / ``HttpSettings(ca_file=...)``."""
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="session")
def httpserver_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """Makes pytest-httpserver's ``httpserver`` fixture serve HTTPS with a certificate signed by :func:`ca`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def https_servers(httpserver_ssl_context: ssl.SSLContext) -> Iterator[Callable[..., HTTPServer]]:
    """Starts HTTPS intake emulators on ports chosen by the OS (trusted through :func:`ca_file`); stops them, and
    closes their listening sockets, after the test. ``make(threaded=True)`` answers requests concurrently."""
    servers: list[HTTPServer] = []

    def make(threaded: bool = False) -> HTTPServer:
        server = HTTPServer(host="127.0.0.1", port=0, ssl_context=httpserver_ssl_context, threaded=threaded)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.clear()
        if server.is_running():
            inner = server.server
            server.stop()
            if inner is not None:
                inner.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never go through a proxy from the machine's environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    yield
