"""The shared HTTP client (``forwarder/sinks/_http.py``) against a real server on loopback."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trustme
from pytest_httpserver import HTTPServer

from forwarder.config import HttpSettings
from forwarder.sinks._http import URL_CACHE_SIZE, make_client, post, tls_context


async def test_every_request_carries_the_urls_own_query_and_its_current_params(
    httpserver: HTTPServer, ca_file: Path
) -> None:
    """URLs are parsed once and kept: a kept URL must still get the params of each call, merged with its query."""
    httpserver.expect_request("/intake", method="POST").respond_with_data("ok", status=202)
    client = make_client(HttpSettings(ca_file=str(ca_file), timeout_s=5.0, concurrency=1))
    url = httpserver.url_for("/intake") + "?a=1"
    tokens = ["t1", "t1", "t2", None, *(f"n{i}" for i in range(URL_CACHE_SIZE + 1)), "t1"]
    try:
        for token in tokens:
            params = None if token is None else {"k": token}
            response = await post(client, url, content=b"x", headers={"X-Test": "y"}, params=params)
            assert response.status_code == 202
    finally:
        await client.aclose()
    queries = [dict(request.args) for request, _ in httpserver.log]
    assert queries == [{"a": "1"} if token is None else {"a": "1", "k": token} for token in tokens]
    assert all(request.headers["X-Test"] == "y" for request, _ in httpserver.log)


async def test_clients_share_one_tls_context_per_ca_bundle_and_each_verifies_against_its_own(
    httpserver: HTTPServer, ca_file: Path, tmp_path: Path
) -> None:
    """Every destination's client uses the process's one context for a CA bundle (loading a bundle costs ~1 MiB
    and ~20 ms each time), and verification still follows the bundle: a client trusting another CA is refused."""
    httpserver.expect_request("/intake", method="POST").respond_with_data("ok", status=202)
    url = httpserver.url_for("/intake")
    other_ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca_file))
    settings = HttpSettings(ca_file=str(ca_file), timeout_s=5.0, concurrency=1)
    tls_context.cache_clear()
    clients = [make_client(settings), make_client(settings)]
    stranger = make_client(HttpSettings(ca_file=str(other_ca_file), timeout_s=5.0, concurrency=1))
    assert tls_context.cache_info()[:2] == (1, 2)  # (hits, misses): the second client reused the first's context
    try:
        for client in clients:
            assert (await post(client, url, content=b"x", headers={})).status_code == 202
        with pytest.raises(httpx.ConnectError):
            await post(stranger, url, content=b"x", headers={})
    finally:
        for client in (*clients, stranger):
            await client.aclose()
    assert len(httpserver.log) == 2
    assert tls_context(str(ca_file)) is tls_context(str(ca_file))
    assert tls_context(str(ca_file)) is not tls_context(str(other_ca_file))
    assert tls_context(None) is tls_context(None)
    assert tls_context(None).verify_mode == ssl.CERT_REQUIRED and tls_context(None).check_hostname
