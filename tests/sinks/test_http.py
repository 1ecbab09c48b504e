"""The shared HTTP client (``forwarder/sinks/_http.py``) against a real server on loopback."""

from __future__ import annotations

from pathlib import Path

from pytest_httpserver import HTTPServer

from forwarder.config import HttpSettings
from forwarder.sinks._http import URL_CACHE_SIZE, make_client, post


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
