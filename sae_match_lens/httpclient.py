"""One small HTTP client (standard library only) for the package's two network clients.

:class:`~sae_match_lens.judging.judge.ChatJudge` (POSTs to a chat-completions endpoint, with an API key)
and :func:`~sae_match_lens.neuronpedia.explanations` (GETs from Neuronpedia) both call
:func:`request`, so they share one behaviour:

* **Timeouts.** ``timeout`` seconds for the connection and for each read.
* **Retries.** A reply whose status is in :data:`RETRY_STATUS` (408, 429 and the 5xx statuses
  that may pass), a timeout or a dropped or refused connection is retried up to ``retries``
  times; the ``n``-th retry waits ``backoff * 2**n`` seconds, or what a ``Retry-After`` header
  asks, never more than ``max_wait``. Then :class:`UnavailableError` says how many attempts
  were made and what the last one got. A host name that does not resolve is not retried.
  Every other status is returned as it is (:class:`Response`), for the caller to judge.
* **Redirects.** Never followed blindly (plain :mod:`urllib` turns a redirected POST into a GET
  and sends every header, ``Authorization`` included, to whatever host the redirect names):

  - a request with a body (POST, ...) follows only a 307/308 to the *same origin* (scheme,
    host and port), with the same method, body and headers; any other redirect raises
    :class:`RedirectRefusedError` naming where it pointed and what to do;
  - a GET or HEAD follows 301/302/303/307/308 (at most :data:`MAX_REDIRECTS`); once it leaves
    the origin it was sent to, credential headers (:func:`is_credential_header`:
    ``Authorization``, ``Proxy-Authorization``, ``Cookie`` and any API-key or token header)
    are dropped for the rest of the chain;
  - a redirect to a scheme other than http/https is refused.
* **JSON.** :meth:`Response.json` decodes the body, or raises :class:`BadResponseError` quoting
  the start of what came instead.

Example:
    >>> reply = request("GET", "https://www.neuronpedia.org/api/feature/gpt2-small/0-res-jb/1",
    ...                 timeout=20.0, retries=4)
    >>> reply.status, reply.json()["index"]
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "MAX_REDIRECTS",
    "RETRY_STATUS",
    "BadResponseError",
    "HTTPClientError",
    "HostNotFoundError",
    "RedirectRefusedError",
    "Response",
    "UnavailableError",
    "is_credential_header",
    "request",
]

logger = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, *(s for s in range(500, 600) if s not in (501, 505))})
"""Statuses that are retried: request timeout, too many requests, and server errors except
501 Not Implemented and 505 HTTP Version Not Supported (which no retry can change)."""
MAX_REDIRECTS = 5
"""Redirects followed at most for one request."""
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_CREDENTIAL_WORDS = ("key", "token", "secret", "auth", "password")


class HTTPClientError(Exception):
    """A request that gave no usable answer.

    Attributes:
        url: the URL that was requested.
    """

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class UnavailableError(HTTPClientError):
    """No answer after every retry (timeouts, failed connections, :data:`RETRY_STATUS` replies),
    or a host name that does not resolve.

    Attributes:
        attempts: how many requests were sent.
        last: what the last one got (e.g. ``"HTTP 503 ..."``, ``"timed out after 20 s"``).
        status: the last reply's status, None when there was no reply.
    """

    def __init__(self, message: str, url: str, *, attempts: int, last: str,
                 status: int | None) -> None:
        super().__init__(message, url)
        self.attempts, self.last, self.status = attempts, last, status


class HostNotFoundError(UnavailableError):
    """The URL's host name does not resolve (offline, or a wrong address); not retried."""


class RedirectRefusedError(HTTPClientError):
    """A redirect this client does not follow (module docstring).

    Attributes:
        status: the redirect's status (301, 302, ...).
        location: where it pointed.
    """

    def __init__(self, message: str, url: str, *, status: int, location: str) -> None:
        super().__init__(message, url)
        self.status, self.location = status, location


class BadResponseError(HTTPClientError, ValueError):
    """A reply whose body is not what was expected (e.g. not JSON)."""


@dataclass(frozen=True)
class Response:
    """A reply: its status, headers and body, and the URL that gave it."""

    status: int
    """The HTTP status."""
    reason: str
    """The status text (``"Not Found"``)."""
    headers: Mapping[str, str] = field(repr=False)
    """The reply's headers (names as sent)."""
    body: bytes = field(repr=False)
    """The raw body."""
    url: str
    """The URL that answered (after any redirects followed)."""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)

    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON.

        Raises:
            BadResponseError: the body is not UTF-8 JSON; the message quotes its start.
        """
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            start = self.body[:80].decode("utf-8", errors="replace")
            raise BadResponseError(
                f"{self.url} answered HTTP {self.status} with a body that is not JSON (it starts "
                f"{start!r}); check the address, or try again later.", self.url) from None


def is_credential_header(name: str) -> bool:
    """Whether a header may carry a credential: ``Authorization``, ``Proxy-Authorization``,
    ``Cookie``, or any name with ``key``, ``token``, ``secret``, ``auth`` or ``password`` in it
    (``X-Api-Key``, ``api-key``, ``X-Auth-Token``...). Such headers never go to another origin."""
    lowered = name.lower()
    return lowered in _CREDENTIAL_HEADERS or any(w in lowered for w in _CREDENTIAL_WORDS)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hands every redirect back as an ``HTTPError`` (this module decides what to follow)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _retry_after(reply: Response) -> float | None:
    value = reply.header("Retry-After")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(TypeError, ValueError, IndexError):
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - datetime.now(UTC)).total_seconds())
    return None


def _send(method: str, url: str, headers: Mapping[str, str], body: bytes | None,
          timeout: float) -> Response:
    """One request, no redirect followed; a reply of any status is returned."""
    req = urllib.request.Request(url, data=body, headers=dict(headers), method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as reply:
            return Response(int(reply.status), str(reply.reason), dict(reply.headers.items()),
                            reply.read(), url)
    except urllib.error.HTTPError as error:
        with contextlib.closing(error):
            try:
                data = error.read()
            except (OSError, http.client.HTTPException):
                data = b""
            return Response(int(error.code), str(error.reason),
                            dict(error.headers.items()) if error.headers else {}, data, url)


def _follow(method: str, url: str, headers: dict[str, str], body: bytes | None,
            timeout: float) -> Response:
    """One request, following the redirects the policy allows (module docstring)."""
    origin = _origin(url)
    current, sent = url, dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        reply = _send(method, current, sent, body, timeout)
        if reply.status not in _REDIRECT_STATUS:
            return reply
        location = reply.header("Location")
        if not location:
            return reply
        target = urllib.parse.urljoin(current, location)
        if urllib.parse.urlsplit(target).scheme.lower() not in ("http", "https"):
            raise RedirectRefusedError(
                f"{method} {current} was redirected (HTTP {reply.status}) to {target}, which is "
                "not an http(s) address; it is not followed.", url,
                status=reply.status, location=target)
        same = _origin(target) == origin
        if body is not None or method not in ("GET", "HEAD"):
            if not (same and reply.status in (307, 308)):
                why = ("another origin, which would receive its credentials and body" if not same
                       else f"a redirect that (HTTP {reply.status}) would turn it into a GET")
                raise RedirectRefusedError(
                    f"{method} {current} was redirected (HTTP {reply.status}) to {target}: "
                    f"{why}. It is not followed; use the final address ({target}) directly if "
                    "you trust it.", url, status=reply.status, location=target)
        elif not same:
            sent = {k: v for k, v in sent.items() if not is_credential_header(k)}
        logger.info("%s %s: HTTP %d, following to %s", method, current, reply.status, target)
        current = target
    raise RedirectRefusedError(f"{method} {url} was redirected more than {MAX_REDIRECTS} times "
                               f"(last to {current}); it is not followed further.", url,
                               status=reply.status, location=current)


def request(method: str, url: str, *, headers: Mapping[str, str] | None = None,
            body: bytes | None = None, timeout: float = 30.0, retries: int = 4,
            backoff: float = 1.0, max_wait: float = 30.0,
            sleep: Callable[[float], None] = time.sleep,
            before_attempt: Callable[[], None] | None = None) -> Response:
    """Send one HTTP request with the timeouts, retries and redirect policy of the module
    docstring, and return the reply (any status not retried: 2xx, 4xx, 501...).

    Args:
        method: ``"GET"``, ``"POST"``, ...
        url: an http(s) URL.
        headers: request headers (credentials among them never leave the URL's origin).
        body: the request body (a request with a body never follows a redirect that would
            change its method or its origin).
        timeout: seconds for the connection and for each read (> 0).
        retries: further attempts after the first (>= 0).
        backoff: the first retry's wait in seconds; each next one waits twice as long.
        max_wait: the longest single wait (also caps ``Retry-After``).
        sleep: the waiting function (tests pass one that records instead of sleeping).
        before_attempt: called before each attempt (a rate limiter).

    Returns:
        The :class:`Response`.

    Raises:
        UnavailableError: no reply outside :data:`RETRY_STATUS` after ``retries`` retries
            (:class:`HostNotFoundError`, at once, for a host name that does not resolve).
        RedirectRefusedError: a redirect the policy does not follow.
        ValueError: a URL that is not http(s), or bad retry settings.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"an http(s) URL is needed, got {url!r}.")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}.")
    if not (timeout > 0 and backoff >= 0 and max_wait >= 0):
        raise ValueError(f"timeout must be > 0 and backoff, max_wait >= 0; got {timeout}, "
                         f"{backoff}, {max_wait}.")
    method = method.upper()
    last, status = "no attempt", None
    for attempt in range(retries + 1):
        if before_attempt is not None:
            before_attempt()
        wait = None
        try:
            reply = _follow(method, url, dict(headers or {}), body, timeout)
        except TimeoutError:
            last, status = f"timed out after {timeout:g} s", None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, socket.gaierror):
                raise HostNotFoundError(
                    f"cannot reach {url}: the host name does not resolve ({exc.reason}); check "
                    "the address and the network.", url, attempts=attempt + 1,
                    last=f"host not found ({exc.reason})", status=None) from None
            timed_out = isinstance(exc.reason, TimeoutError)
            last = f"timed out after {timeout:g} s" if timed_out else \
                f"connection failed ({exc.reason})"
            status = None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            last, status = f"connection failed ({type(exc).__name__}: {exc})", None
        else:
            if reply.status not in RETRY_STATUS:
                return reply
            status = reply.status
            last = f"HTTP {reply.status} {_quote(reply.text(), 200)}"
            wait = _retry_after(reply)
        if attempt < retries:
            delay = min(max_wait, wait if wait is not None else backoff * 2 ** attempt)
            logger.info("%s %s: %s; retry %d/%d in %.2f s", method, url, last, attempt + 1,
                        retries, delay)
            sleep(delay)
    raise UnavailableError(
        f"{method} {url} got no answer after {retries + 1} attempts; last: {last}. Try again "
        "later, allow more retries, or lower the request rate.", url, attempts=retries + 1,
        last=last, status=status)


def _quote(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters, quoted."""
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")
