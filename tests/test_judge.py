"""The judge: protocol parsers, the papers' prompts, a scripted judge, and the chat-completions
client against a stub server on 127.0.0.1 (success, timeouts, malformed replies, rate limits)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sae_match_lens.judging.judge import (
    LABELS,
    MATCH_EXAMPLES,
    ChatJudge,
    JudgeAnswerError,
    JudgeError,
    JudgeUnavailableError,
    RetryOptions,
    RowLog,
    ScriptedJudge,
    judge_generations,
    match_messages,
    parse_match_answer,
    parse_steering_answer,
    steering_messages,
)


class Stub:
    """A chat-completions server whose answers are scripted, one per request.

    Each answer is ``("ok", content)``, ``("status", code, retry_after)``, ``("raw", body)`` or
    ``("sleep", seconds, content)``; every request body and header set is recorded.
    """

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                stub.requests.append({"path": self.path, "headers": dict(self.headers),
                                      "body": json.loads(self.rfile.read(length))})
                answer = stub.script.pop(0) if stub.script else ("status", 500, None)
                if answer[0] == "sleep":
                    time.sleep(answer[1])
                    answer = ("ok", answer[2])
                if answer[0] == "ok":
                    body = json.dumps({"id": "x", "object": "chat.completion", "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": answer[1]},
                         "finish_reason": "stop"}]}).encode()
                    code, extra = 200, {}
                elif answer[0] == "raw":
                    body, code, extra = answer[1].encode(), 200, {}
                else:
                    body = json.dumps({"error": {"message": "slow down"}}).encode()
                    code = answer[1]
                    extra = {} if answer[2] is None else {"Retry-After": str(answer[2])}
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    server = Stub()
    try:
        yield server
    finally:
        server.close()


def _judge(stub: Stub, waits: list[float], **kwargs: object) -> ChatJudge:
    options = {"model": "stub-model", "base_url": stub.base_url, "theme": "religion",
               "sleep": waits.append,
               "options": RetryOptions(timeout=2.0, max_retries=3, backoff=0.5)}
    options.update(kwargs)
    return ChatJudge(**options)  # type: ignore[arg-type]


def test_a_judge_answer_is_read_from_json_in_any_wrapping():
    expected = {"coherence": 4, "behavioral": 2}
    for answer in ('{"coherence": 4, "behavioral": 2}',
                   '```json\n{"coherence": 4, "behavioral": 2}\n```',
                   'Sure! {"coherence": "4", "behaviour": 2.0} Hope that helps.'):
        assert parse_steering_answer(answer) == expected
    for garbage, match in (("I cannot rate this.", "not a JSON object"),
                           ('{"coherence": 7, "behavioral": 2}', "coherence=7"),
                           ('{"coherence": 3}', "behavioral=None"),
                           ('{"coherence": true, "behavioral": 1}', "coherence=True")):
        with pytest.raises(JudgeAnswerError, match=match) as info:
            parse_steering_answer(garbage)
        assert info.value.answer == garbage  # the error quotes what the judge said
    assert parse_match_answer('{"rationale": "both water", "label": 2}') == 2
    assert parse_match_answer("3") == 3 and parse_match_answer("They are the SAME.") == 3
    assert parse_match_answer('{"label": "different"}') == 1
    for garbage in ("SAME or DIFFERENT, hard to say", "4", '{"label": 0}', "unclear"):
        with pytest.raises(JudgeAnswerError, match="no single label"):
            parse_match_answer(garbage)


def test_the_prompts_follow_the_papers_protocols():
    steering = steering_messages("I think ", "the Lord said", "religion")
    assert [m["role"] for m in steering] == ["system", "user"]
    assert '"coherence"' in steering[0]["content"] and '"behavioral"' in steering[0]["content"]
    assert "0 to 5" in steering[0]["content"]
    assert "religion" in steering[1]["content"] and "the Lord said" in steering[1]["content"]
    matching = match_messages("Bible verses", "Python keywords")
    assert "order of the two explanations" in matching[0]["content"]
    assert "length" in matching[0]["content"]
    for name in LABELS.values():
        assert name in matching[0]["content"]
    examples = [json.loads(m["content"])["label"] for m in matching if m["role"] == "assistant"]
    assert examples == [3, 1, 2] == [label for _, _, label, _ in MATCH_EXAMPLES]
    assert matching[-1] == {"role": "user",
                            "content": "Explanation 1: Bible verses\nExplanation 2: Python keywords"}


def test_the_chat_judge_sends_chat_completions_and_reads_the_answers(stub, monkeypatch):
    monkeypatch.setenv("SAE_MATCH_JUDGE_API_KEY", "secret-from-env")
    stub.script = [("ok", '{"coherence": 5, "behavioral": 3}'),
                   ("ok", '{"rationale": "same topic", "label": 3}')]
    waits: list[float] = []
    judge = _judge(stub, waits)
    assert judge.score("I think ", "and the LORD spake") == {"coherence": 5, "behavioral": 3}
    assert judge.compare("Bible verses", "Old Testament scripture") == 3
    assert waits == []
    first, second = stub.requests
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == "Bearer secret-from-env"
    assert first["body"]["model"] == "stub-model"
    assert first["body"]["messages"] == steering_messages("I think ", "and the LORD spake",
                                                          "religion")
    assert second["body"]["messages"] == match_messages("Bible verses", "Old Testament scripture")


def test_endpoint_and_model_come_from_arguments_or_the_environment(monkeypatch):
    for name in ("SAE_MATCH_JUDGE_BASE_URL", "OPENAI_BASE_URL", "SAE_MATCH_JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="needs an endpoint"):
        ChatJudge("m")
    with pytest.raises(ValueError, match="needs a model name"):
        ChatJudge(base_url="http://127.0.0.1:9/v1")
    monkeypatch.setenv("SAE_MATCH_JUDGE_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("SAE_MATCH_JUDGE_MODEL", "env-model")
    judge = ChatJudge()
    assert (judge.url, judge.model) == ("http://127.0.0.1:9/v1/chat/completions", "env-model")
    with pytest.raises(ValueError, match="max_retries"):
        ChatJudge(max_retries=-1)


def test_rate_limits_are_retried_with_back_off_then_answered(stub):
    stub.script = [("status", 429, None), ("status", 503, None), ("status", 429, 0.25),
                   ("ok", '{"coherence": 2, "behavioral": 0}')]
    waits: list[float] = []
    judge = _judge(stub, waits)
    assert judge.score("p", "t") == {"coherence": 2, "behavioral": 0}
    assert waits == [0.5, 1.0, 0.25]  # doubling back-off; Retry-After honoured
    assert len(stub.requests) == 4


def test_persistent_rate_limits_end_in_a_clear_error(stub):
    stub.script = [("status", 429, None)] * 10
    waits: list[float] = []
    judge = _judge(stub, waits, max_retries=2, max_backoff=0.75)
    with pytest.raises(JudgeUnavailableError, match=r"no answer after 3 attempts; last: HTTP 429"
                       ) as info:
        judge.compare("a", "b")
    assert stub.base_url in str(info.value) and "stub-model" in str(info.value)
    assert waits == [0.5, 0.75] and len(stub.requests) == 3  # capped at max_backoff


def test_a_refused_request_is_not_retried(stub):
    stub.script = [("status", 401, None)]
    waits: list[float] = []
    with pytest.raises(JudgeUnavailableError, match="refused the request: HTTP 401.*API key"):
        _judge(stub, waits).compare("a", "b")
    assert waits == [] and len(stub.requests) == 1


def test_timeouts_are_retried_and_then_reported(stub):
    # the timeout leaves a loaded 2-core machine ample time for the prompt answer; the stub's
    # slow answers take three times as long
    stub.script = [("sleep", 3.0, '{"label": 1}'), ("ok", '{"label": 2}')]
    waits: list[float] = []
    judge = _judge(stub, waits, timeout=1.0)
    assert judge.compare("a", "b") == 2
    assert waits == [0.5]
    stub.script = [("sleep", 3.0, '{"label": 1}')] * 2
    with pytest.raises(JudgeUnavailableError, match="timed out after 1 s"):
        _judge(stub, [], timeout=1.0, max_retries=1).compare("a", "b")


def test_malformed_replies_raise_quoting_the_reply(stub):
    stub.script = [("raw", "<html>gateway hiccup</html>")]
    with pytest.raises(JudgeAnswerError, match="not chat-completions JSON.*gateway hiccup"):
        _judge(stub, []).compare("a", "b")
    stub.script = [("raw", json.dumps({"choices": []}))]
    with pytest.raises(JudgeAnswerError, match="not chat-completions JSON"):
        _judge(stub, []).compare("a", "b")
    # an off-protocol answer is asked again once (answer_retries=1), then refused
    stub.script = [("ok", "I would say they are alike"), ("ok", '{"label": 3}')]
    assert _judge(stub, []).compare("a", "b") == 3
    stub.script = [("ok", "no idea"), ("ok", "still no idea")]
    with pytest.raises(JudgeAnswerError, match="still no idea"):
        _judge(stub, []).compare("a", "b")


def test_judging_keeps_the_finished_rows_when_the_judge_fails(stub, tmp_path):
    prompts, texts = ["p"] * 4, ["t0", "t1", "t2", "t3"]
    stub.script = [("ok", '{"coherence": 4, "behavioral": 1}'),
                   ("ok", '{"coherence": 3, "behavioral": 2}')] + [("status", 429, None)] * 4
    judge = _judge(stub, [], max_retries=1)
    path = tmp_path / "ratings.jsonl"
    with pytest.raises(JudgeUnavailableError) as info:
        judge_generations(judge, prompts, texts, path=path, progress=False)
    assert info.value.partial.to_dict("records") == [
        {"row": 0, "coherence": 4, "behavioral": 1}, {"row": 1, "coherence": 3, "behavioral": 2}]
    assert len(path.read_text().splitlines()) == 3  # header + the two finished rows
    stub.script = [("ok", '{"coherence": 1, "behavioral": 5}')] * 2
    n_before = len(stub.requests)
    done = judge_generations(judge, prompts, texts, path=path, progress=False)
    assert len(stub.requests) - n_before == 2  # only the missing rows were asked
    assert done.row.tolist() == [0, 1, 2, 3] and done.behavioral.tolist() == [1, 2, 5, 5]


def test_the_scripted_judge_answers_in_order_and_parses_strings():
    judge = ScriptedJudge(scores=[{"coherence": 5, "behavioral": 0}, "garbage"],
                          comparisons=lambda a, b: 3 if a == b else "DIFFERENT", theme="x")
    assert judge.score("p", "t") == {"coherence": 5, "behavioral": 0}
    with pytest.raises(JudgeAnswerError):
        judge.score("p", "t")
    with pytest.raises(JudgeError, match="call 3 has none"):
        judge.score("p", "t")
    assert judge.compare("a", "a") == 3 and judge.compare("a", "b") == 1
    assert judge.calls[0] == ("score", ("p", "t", "x"))


def test_the_row_log_refuses_other_settings_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RowLog(path, key=("i",), header={"seed": 0})
    log.append({"i": 0, "value": float("nan")})
    log.append({"i": 1, "value": 2.5})
    with path.open("a") as handle:
        handle.write('{"i": 2, "val')
    again = RowLog(path, key=("i",), header={"seed": 0})
    assert again.rows == [{"i": 0, "value": None}, {"i": 1, "value": 2.5}]
    assert again.done({"i": 1}) and not again.done({"i": 2})
    assert path.read_text().endswith("2.5}\n")  # the torn line is gone
    with pytest.raises(ValueError, match="other settings"):
        RowLog(path, key=("i",), header={"seed": 1})


def test_flat_retry_keywords_warn_and_equal_retry_options():
    url = "http://127.0.0.1:9/v1"
    with pytest.warns(DeprecationWarning, match=r"max_retries= → options\.max_retries"):
        old = ChatJudge("m", base_url=url, timeout=3.0, max_retries=2, backoff=0.25,
                        max_backoff=5.0, answer_retries=0)
    new = ChatJudge("m", base_url=url, options=RetryOptions(timeout=3.0, max_retries=2,
                                                            backoff=0.25, max_backoff=5.0,
                                                            answer_retries=0))
    fields = ("timeout", "max_retries", "backoff", "max_backoff", "answer_retries")
    assert [getattr(old, f) for f in fields] == [getattr(new, f) for f in fields] == [
        3.0, 2, 0.25, 5.0, 0]
    with pytest.raises(ValueError, match="max_retries"):
        ChatJudge("m", base_url=url, options=RetryOptions(max_retries=-1))
