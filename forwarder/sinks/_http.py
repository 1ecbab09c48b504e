"""The shared httpx client for HTTP sinks, ``Retry-After`` parsing, gzip, and the common status-code verdicts.

Every HTTP sink sends through :func:`make_client` (keep-alive, a timeout on every call, ``SSL_CERT_FILE`` honoured)
and classifies transport errors with :func:`transport_verdict`, so that a hanging or refusing destination always
ends in a ``RETRY`` verdict instead of blocking or raising.
"""

from __future__ import annotations

import email.utils
import functools
import ssl
import time
from collections.abc import Mapping
from typing import Final

import httpx
from isal import isal_zlib

from forwarder.config import HttpSettings
from forwarder.sinks._protocol import Verdict, retry

GZIP_LEVEL: Final = 1
"""Deflate level for request bodies. Compression is ISA-L's (``isal``, zlib-compatible output, wheels for Linux
x86-64/aarch64 and macOS): its level 1 costs ~0.26 us per 300-byte log record where zlib's level 1 costs ~0.88 us,
for the same ratio (~9x on agent logs)."""

USER_AGENT: Final = "forwarder/0.1"
URL_CACHE_SIZE: Final = 16
"""Parsed URLs an :class:`HttpClient` keeps (a destination posts to one or two)."""
TLS_CONTEXTS: Final = 4
"""TLS contexts :func:`tls_context` keeps (one per CA bundle in use; a process uses one)."""


@functools.lru_cache(maxsize=TLS_CONTEXTS)
def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The verifying TLS client context for the CA bundle ``ca_file`` (``SSL_CERT_FILE``), or certifi's bundle when
    ``None``: one per bundle for the whole process, shared by every destination's client (an ``ssl.SSLContext``
    serves any number of connections). Loading a bundle into a context takes ~20 ms of CPU and ~1 MiB of memory.

    Raises:
        OSError, ssl.SSLError: ``ca_file`` cannot be read or holds no usable certificate.
    """
    if ca_file:
        return ssl.create_default_context(cafile=ca_file)
    return httpx.create_ssl_context(trust_env=False)  # certifi's bundle, as httpx's default


def make_client(http: HttpSettings) -> HttpClient:
    """The :class:`HttpClient` of one destination for ``http`` (see there)."""
    return HttpClient(http)


class HttpClient:
    """One destination's keep-alive HTTPS client: a pool of ``http.concurrency`` connections (one per request the
    destination may have in flight), ``http.timeout_s`` on connect/read/write/pool, TLS verified against
    ``http.ca_file`` when set (else certifi's bundle), no proxy from the environment, no redirects. Works under
    trio.

    Requests go straight to httpx's connection-pooling transport (``httpx.AsyncHTTPTransport``, the public
    interface for custom transports: https://www.python-httpx.org/advanced/transports/), not through
    ``httpx.AsyncClient``. The client's per-request layers (auth flow, redirect loop, cookie jar, event hooks, URL
    and header merging, its log call) serve nothing here and cost CPU on every request: with Sentry's 100 logs
    per envelope that is 10,000 requests per million lines, and in ``bench/run_all.py`` scenario (b) the client
    layers above the transport were ~17% of the GIL-holding samples. Errors are httpx's own
    (``httpx.HTTPError``), as the transport maps httpcore's.
    """

    def __init__(self, http: HttpSettings) -> None:
        max_connections = http.concurrency
        self._transport = httpx.AsyncHTTPTransport(
            verify=tls_context(http.ca_file),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,
        )
        self._timeout = httpx.Timeout(http.timeout_s).as_dict()
        self._urls: dict[tuple[str, tuple[tuple[str, str], ...]], httpx.URL] = {}

    async def post(
        self,
        url: str,
        *,
        content: bytes,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """POST ``content`` to ``url`` (``params`` added to its query) with ``headers`` and a ``User-Agent``; the
        response is read whole and closed.

        Raises:
            httpx.HTTPError: a transport failure (connect, TLS, timeout, protocol).
        """
        request = httpx.Request(
            "POST",
            self._parsed(url, params),
            headers={"User-Agent": USER_AGENT, **headers},
            content=content,
            extensions={"timeout": self._timeout},  # a dict per request, as httpx.AsyncClient gives
        )
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    def _parsed(self, url: str, params: Mapping[str, str] | None) -> httpx.URL:
        """``url`` with ``params`` merged into its query, parsed once: ``httpx.Request`` would parse the string on
        every request (~50 us of CPU each, ~10% of a request's cost here; Sentry sends 10,000 per million lines)."""
        key = (url, tuple(params.items()) if params else ())
        parsed = self._urls.get(key)
        if parsed is None:
            parsed = httpx.URL(url)
            if params:
                parsed = parsed.copy_merge_params(params)
            if len(self._urls) >= URL_CACHE_SIZE:
                self._urls.clear()
            self._urls[key] = parsed
        return parsed

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._transport.aclose()


async def post(
    client: HttpClient,
    url: str,
    *,
    content: bytes,
    headers: Mapping[str, str],
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    """``client.post(...)``, then :func:`release_response`'d: the returned response keeps its status, headers and
    body; the request body (``content``) is freed as soon as the caller drops it.

    Raises:
        httpx.HTTPError: as :meth:`HttpClient.post` does.
    """
    response = await client.post(url, content=content, headers=headers, params=params)
    release_response(response)
    return response


def release_response(response: httpx.Response) -> None:
    """Drop what a read and closed response still holds through its spent stream: httpcore's pool request and the
    request body (and, with ``httpx.AsyncClient``, the reference cycle ``Response.stream`` -> ``BoundAsyncStream``
    -> ``Response`` of httpx 0.28, encode/httpx#3733): swap the stream for an empty one. Without it each request's
    objects and payload wait for the garbage collector's next pass over the generation they reached; in
    ``bench/run_all.py`` scenario (a) that held about 25 MiB of peak RSS. Only for a response already read and
    closed (``post``, ``get``...; never a streamed one)."""
    response.stream = httpx.ByteStream(b"")


def gzip_bytes(data: bytes) -> bytes:
    """``data`` compressed as a gzip stream (RFC 1952) at :data:`GZIP_LEVEL` (ISA-L)."""
    compressor = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110 section 10.2.3): delta-seconds or an HTTP-date.

    Returns ``None`` when absent or unparseable; never negative.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def describe_error(exc: BaseException) -> str:
    """A one-line description of a transport error, walking ``__cause__``/``__context__`` (under trio
    ``str(httpx.ConnectError)`` is often empty). Never includes request URLs or headers."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 4:
        seen.add(id(current))
        text = str(current).strip()
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def transport_verdict(exc: httpx.HTTPError) -> Verdict:
    """``RETRY`` for any transport failure (refused, reset, timeout, TLS): the data stays in the spool."""
    reason = "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
    return retry(reason, detail=describe_error(exc))


def status_verdict(response: httpx.Response) -> Verdict | None:
    """The verdict shared by the Datadog and New Relic status tables for a non-2xx, non-special status.

    * 408, 429, 5xx -> ``RETRY`` honouring ``Retry-After``;
    * 401, 403 -> ``RETRY`` with a loud error (a rotated key must not lose data);
    * 413 -> ``SPLIT``;
    * other 4xx -> ``DROP`` with the body's first 300 characters;
    * 2xx -> ``None`` (the caller returns OK).
    """
    from forwarder.sinks._protocol import drop, split

    status = response.status_code
    if 200 <= status < 300:
        return None
    after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 413:
        return split(detail=response.text[:300])
    if status in (408, 429) or status >= 500:
        return retry(f"http_{status}", after, detail=response.text[:300])
    if status in (401, 403):
        return retry(f"http_{status}", after, detail="credentials rejected; records are held", loud=True)
    return drop(f"http_{status}", detail=response.text[:300])
