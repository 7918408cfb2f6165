"""The one HTTP client (and the judge and Neuronpedia clients on it) against real loopback servers:
redirects (to another origin, same-origin 307, POST turned GET), a server that hangs, 429 then
200, persistent 5xx, and a body that is not JSON."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sae_match_lens.httpclient import (
    MAX_REDIRECTS,
    BadResponseError,
    RedirectRefusedError,
    UnavailableError,
    is_credential_header,
    request,
)
from sae_match_lens.judging.judge import ChatJudge, JudgeUnavailableError
from sae_match_lens.neuronpedia import NeuronpediaUnavailableError, explanations

KEY = "sk-do-not-leak-0123456789"
CHAT_OK = json.dumps({"choices": [{"message": {"role": "assistant", "content": '{"label": 3}'}}]})


class Server:
    """A loopback HTTP server on its own port. ``answer(handler)`` returns ``(status, headers,
    body)`` for each request, or None to hang until the server closes; every request's method,
    path, headers and body are recorded."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: list[tuple[int, dict, bytes] | None] = []
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length", 0) or 0)
                server.requests.append({"method": self.command, "path": self.path,
                                        "headers": {k.lower(): v for k, v in self.headers.items()},
                                        "body": self.rfile.read(length) if length else b""})
                answer = server.answers.pop(0) if server.answers else (500, {}, b"no script")
                if answer is None:
                    server.release.wait(30)
                    return
                status, headers, body = answer
                try:
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_PUT = handle_any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[[], Server]]:
    started: list[Server] = []

    def start() -> Server:
        started.append(Server())
        return started[-1]

    try:
        yield start
    finally:
        for server in started:
            server.close()


def _post(url: str, waits: list[float] | None = None, **options: object):
    settings = {"headers": {"Authorization": f"Bearer {KEY}", "X-Api-Key": KEY,
                            "Content-Type": "application/json"},
                "body": b'{"q": 1}', "timeout": 5.0, "retries": 2, "backoff": 0.5,
                "sleep": (waits if waits is not None else []).append}
    settings.update(options)
    return request("POST", url, **settings)  # type: ignore[arg-type]


# -- redirects --------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_post_redirected_to_another_origin_is_refused_and_the_key_stays_home(servers, status):
    home, elsewhere = servers(), servers()
    elsewhere.answers = [(200, {"Content-Type": "application/json"}, CHAT_OK.encode())] * 2
    home.answers = [(status, {"Location": f"{elsewhere.url}/steal"}, b"")]
    with pytest.raises(RedirectRefusedError, match=f"HTTP {status}.*{elsewhere.url}/steal") as info:
        _post(f"{home.url}/v1/chat/completions")
    assert info.value.location == f"{elsewhere.url}/steal"
    assert elsewhere.requests == []  # nothing at all reached the other origin
    assert len(home.requests) == 1 and home.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"


def test_plain_urllib_would_send_the_key_to_the_other_origin_as_a_get(servers):
    """What the client prevents (the independent truth behind the test above)."""
    home, elsewhere = servers(), servers()
    elsewhere.answers = [(200, {}, b"{}")]
    home.answers = [(302, {"Location": f"{elsewhere.url}/steal"}, b"")]
    req = urllib.request.Request(f"{home.url}/v1/chat/completions", data=b'{"q": 1}',
                                 headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    with urllib.request.urlopen(req, timeout=5) as reply:
        reply.read()
    assert elsewhere.requests[0]["method"] == "GET"  # the POST silently became a GET
    assert elsewhere.requests[0]["headers"]["authorization"] == f"Bearer {KEY}"


def test_the_chat_judge_never_sends_its_key_to_a_redirect_target(servers):
    home, elsewhere = servers(), servers()
    elsewhere.answers = [(200, {}, CHAT_OK.encode())]
    home.answers = [(302, {"Location": f"{elsewhere.url}/v1/chat/completions"}, b"")]
    judge = ChatJudge("m", base_url=f"{home.url}/v1", api_key=KEY, max_retries=2, sleep=[].append)
    with pytest.raises(JudgeUnavailableError, match=f"redirect.*{elsewhere.url}.*base_url"):
        judge.compare("a", "b")
    assert elsewhere.requests == [] and len(home.requests) == 1


def test_a_same_origin_307_or_308_is_followed_with_method_body_and_key(servers):
    home = servers()
    home.answers = [(307, {"Location": "/v2/chat/completions"}, b""),
                    (308, {"Location": f"{home.url}/v3/chat/completions"}, b""),
                    (200, {"Content-Type": "application/json"}, CHAT_OK.encode())]
    judge = ChatJudge("m", base_url=f"{home.url}/v1", api_key=KEY, sleep=[].append)
    assert judge.compare("a", "b") == 3
    assert [r["path"] for r in home.requests] == ["/v1/chat/completions", "/v2/chat/completions",
                                                  "/v3/chat/completions"]
    assert {r["method"] for r in home.requests} == {"POST"}
    assert len({r["body"] for r in home.requests}) == 1 and home.requests[0]["body"]
    assert {r["headers"]["authorization"] for r in home.requests} == {f"Bearer {KEY}"}


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_same_origin_redirect_that_would_turn_a_post_into_a_get_is_refused(servers, status):
    home = servers()
    home.answers = [(status, {"Location": "/elsewhere"}, b""), (200, {}, b"{}")]
    with pytest.raises(RedirectRefusedError, match="GET"):
        _post(f"{home.url}/v1/chat/completions")
    assert len(home.requests) == 1


def test_a_get_follows_redirects_but_drops_credentials_at_another_origin(servers):
    home, elsewhere = servers(), servers()
    home.answers = [(302, {"LOCATION": "/moved"}, b""),  # header names in any case
                    (301, {"location": f"{elsewhere.url}/api/x"}, b"")]
    elsewhere.answers = [(200, {}, b'{"ok": true}')]
    reply = request("GET", f"{home.url}/api/x", headers={
        "Authorization": f"Bearer {KEY}", "X-Api-Key": KEY, "Cookie": "s=1", "Accept": "text/json"},
        timeout=5.0, retries=0)
    assert reply.status == 200 and reply.json() == {"ok": True}
    assert reply.url == f"{elsewhere.url}/api/x"
    assert home.requests[1]["headers"]["authorization"] == f"Bearer {KEY}"  # same origin: kept
    got = elsewhere.requests[0]["headers"]
    assert "authorization" not in got and "x-api-key" not in got and "cookie" not in got
    assert got["accept"] == "text/json"
    assert KEY not in json.dumps(elsewhere.requests[0]["headers"])


def test_redirects_to_other_schemes_and_endless_redirects_are_refused(servers):
    home = servers()
    home.answers = [(302, {"Location": "file:///etc/passwd"}, b"")]
    with pytest.raises(RedirectRefusedError, match="not an http"):
        request("GET", f"{home.url}/a", retries=0)
    home.answers = [(302, {"Location": f"/loop{i}"}, b"") for i in range(MAX_REDIRECTS + 1)]
    with pytest.raises(RedirectRefusedError, match=f"more than {MAX_REDIRECTS} times"):
        request("GET", f"{home.url}/loop", retries=0)


def test_credential_headers_are_recognised_by_name():
    for name in ("Authorization", "proxy-authorization", "Cookie", "X-Api-Key", "api-key",
                 "X-Auth-Token", "OpenAI-Secret"):
        assert is_credential_header(name), name
    for name in ("Accept", "Content-Type", "User-Agent"):
        assert not is_credential_header(name), name


# -- timeouts, retries, bodies ----------------------------------------------------------------
def test_a_server_that_hangs_times_out_and_gives_up_after_the_retries(servers):
    home = servers()
    home.answers = [None, None]
    waits: list[float] = []
    with pytest.raises(UnavailableError, match="2 attempts; last: timed out after 0.5 s") as info:
        _post(home.url, waits, timeout=0.5, retries=1)
    assert info.value.attempts == 2 and info.value.status is None
    assert waits == [0.5] and len(home.requests) == 2


def test_429_then_200_is_retried_after_the_servers_retry_after(servers):
    home = servers()
    home.answers = [(429, {"retry-after": "7"}, b"slow down"), (503, {}, b"busy"),
                    (200, {}, b'{"fine": 1}')]
    waits: list[float] = []
    reply = _post(home.url, waits, max_wait=10.0)
    assert reply.status == 200 and reply.json() == {"fine": 1}
    assert waits == [7.0, 1.0]  # Retry-After honoured, then the doubled back-off (0.5 * 2)
    assert len(home.requests) == 3


def test_persistent_server_errors_end_in_a_clear_error_after_n_attempts(servers):
    home = servers()
    home.answers = [(500, {}, b"internal error")] * 5
    waits: list[float] = []
    with pytest.raises(UnavailableError, match=r"3 attempts; last: HTTP 500 'internal error'"
                       ) as info:
        _post(home.url, waits)
    assert info.value.status == 500 and info.value.attempts == 3
    assert waits == [0.5, 1.0] and len(home.requests) == 3


def test_statuses_outside_the_retry_set_are_returned_at_once(servers):
    home = servers()
    home.answers = [(404, {}, b"{}"), (401, {}, b"no key"), (501, {}, b"")]
    for status in (404, 401, 501):
        assert _post(home.url).status == status
    assert len(home.requests) == 3


def test_a_body_that_is_not_json_raises_a_clear_error(servers):
    home = servers()
    home.answers = [(200, {}, b"\xff\xfe<html>gateway hiccup</html>"),
                    (200, {}, b"<html>gateway hiccup</html>")]
    for _ in range(2):
        reply = _post(home.url)
        with pytest.raises(BadResponseError, match="HTTP 200 with a body that is not JSON") as info:
            reply.json()
        assert isinstance(info.value, ValueError) and "hiccup" in str(info.value)


def test_bad_urls_and_settings_are_refused():
    with pytest.raises(ValueError, match="http"):
        request("GET", "file:///etc/passwd")
    with pytest.raises(ValueError, match="retries"):
        request("GET", "http://127.0.0.1:9/", retries=-1)


# -- the Neuronpedia client on the same helper ------------------------------------------------
def _feature(description: str) -> bytes:
    return json.dumps({"index": "1", "explanations": [
        {"description": description, "explanationModelName": "m", "typeName": "t"}]}).encode()


def test_neuronpedia_follows_a_redirect_and_retries_a_rate_limit(servers, tmp_path):
    home, mirror = servers(), servers()
    home.answers = [(429, {"Retry-After": "0"}, b""),
                    (302, {"Location": f"{mirror.url}/api/feature/m/0-res/1"}, b"")]
    mirror.answers = [(200, {}, _feature("Bible verses"))]
    found = explanations("m/0-res", [1], base_url=home.url, cache_dir=tmp_path, rate=1000,
                         progress=False)
    assert found[1].text == "Bible verses" and found[1].found
    assert [r["path"] for r in home.requests] == ["/api/feature/m/0-res/1"] * 2
    assert mirror.requests[0]["method"] == "GET"
    again = explanations("m/0-res", [1], base_url=home.url, cache_dir=tmp_path, progress=False)
    assert again[1].text == "Bible verses" and len(home.requests) == 2  # from the cache


def test_neuronpedia_reports_garbage_and_persistent_errors_clearly(servers, tmp_path):
    home = servers()
    home.answers = [(200, {}, b"<html>maintenance</html>")]
    with pytest.raises(ValueError, match="not JSON.*maintenance"):
        explanations("m/0-res", [2], base_url=home.url, cache_dir=tmp_path, rate=1000,
                     progress=False)
    home.answers = [(503, {"Retry-After": "0"}, b"down")] * 3
    with pytest.raises(NeuronpediaUnavailableError, match="HTTP 503.*after 3 tries"):
        explanations("m/0-res", [2], base_url=home.url, cache_dir=tmp_path, rate=1000,
                     retries=2, progress=False)
    home.answers = [(404, {}, b"")]
    assert not explanations("m/0-res", [3], base_url=home.url, cache_dir=tmp_path, rate=1000,
                            progress=False)[3].found
    assert not list(tmp_path.rglob("*.sae-match-tmp"))  # the cache leaves no temporary

