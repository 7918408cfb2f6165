"""A pluggable judge for steered generations and for matched features, and a row log that keeps
partial results.

Two protocols, written from the papers (``FEATURE_FLOW.md`` §A6 and §C):

* **Steering** (Feature Flow): the judge reads a prompt, the generated continuation and a theme,
  and answers JSON ``{"coherence": c, "behavioral": b}`` with integers 0–5 (coherence of the
  text; how strongly it shows the theme). :meth:`Judge.score` returns that dict.
* **Matching** (SAE Match): the judge reads two feature explanations and answers
  ``1`` = DIFFERENT, ``2`` = MAYBE, ``3`` = SAME. The prompt warns against position and length
  bias and gives three worked examples (labels 3, 1, 2) with short rationales.
  :meth:`Judge.compare` returns the label.

Implementations:

* :class:`ScriptedJudge` answers from a script (a list or a function): for tests, and for a
  user who rates by hand. String answers go through the same parsers as a real judge's.
* :class:`ChatJudge` talks to any OpenAI-compatible ``/v1/chat/completions`` endpoint over plain
  HTTP with the standard library (:mod:`sae_match_lens.httpclient`; no extra package). Endpoint,
  model and key come from the arguments or the environment (``SAE_MATCH_JUDGE_BASE_URL`` /
  ``OPENAI_BASE_URL``, ``SAE_MATCH_JUDGE_MODEL``, ``SAE_MATCH_JUDGE_API_KEY`` /
  ``OPENAI_API_KEY``). Rate limits (HTTP 429), server errors (5xx), timeouts and dropped
  connections are retried with bounded exponential back-off (``Retry-After`` honoured up to
  ``max_backoff``), then :class:`JudgeUnavailableError`. A redirect is followed only to the same
  origin with a 307/308 (method, body and key kept); any other redirect is refused, so the API
  key never reaches another host; an answer that does not follow the protocol raises
  :class:`JudgeAnswerError` quoting it. Nothing in the package calls a judge unless asked.

:func:`judge_generations` keeps its rows in a :class:`~sae_match_lens.judging.rowlog.RowLog` (re-exported
here), keyed on the judge's :meth:`Judge.identity` and a digest of the inputs, so a rerun resumes
and a rerun with another judge, prompt version or input refuses to reuse the rows.

Example:
    >>> judge = ChatJudge("gpt-4o-mini", base_url="http://127.0.0.1:8000/v1", theme="religion")
    >>> judge.score("I think ", "the Lord is my shepherd")
    {'coherence': 4, 'behavioral': 5}
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..httpclient import (
    BadResponseError,
    RedirectRefusedError,
    Response,
    UnavailableError,
    request,
)
from ..options import accepts_flat_options, resolve_options
from ..progress import progress_bar
from .rowlog import RowLog, callable_identity, digest

__all__ = [
    "LABELS",
    "MATCH_EXAMPLES",
    "MATCH_SYSTEM",
    "STEERING_SYSTEM",
    "ChatJudge",
    "Judge",
    "JudgeAnswerError",
    "JudgeError",
    "JudgeUnavailableError",
    "RetryOptions",
    "RowLog",
    "ScriptedJudge",
    "judge_generations",
    "match_messages",
    "parse_match_answer",
    "parse_steering_answer",
    "prompt_version",
    "steering_messages",
]

logger = logging.getLogger(__name__)

LABELS: dict[int, str] = {1: "DIFFERENT", 2: "MAYBE", 3: "SAME"}
"""The matching judge's labels (SAE Match): 1 = DIFFERENT, 2 = MAYBE, 3 = SAME."""

STEERING_SYSTEM = (
    "You rate short texts written by a language model whose internal features were steered. "
    "You are given the prompt the model started from, the text it wrote after the prompt, and a "
    "theme. Rate two things, each as an integer from 0 to 5:\n"
    "- coherence: is the text fluent, grammatical and sensible on its own (0 = gibberish or "
    "endless repetition, 5 = fully fluent and sensible)? Judge coherence regardless of the theme.\n"
    "- behavioral: how strongly does the text express the theme (0 = not at all, 5 = the theme "
    "dominates the text)? Judge the theme regardless of fluency.\n"
    "Do not reward length. Answer with JSON only, exactly in this form: "
    '{"coherence": <0-5>, "behavioral": <0-5>}'
)
"""System prompt of the steering judge (Feature Flow's protocol: coherence and behaviour 0–5)."""

MATCH_EXAMPLES: tuple[tuple[str, str, int, str], ...] = (
    ("References to the Bible, especially verses and books of the Old Testament",
     "Mentions of biblical scripture and Old Testament books",
     3, "Both describe biblical scripture; the wording differs but the concept is the same."),
    ("Python function definitions and the keyword 'def'",
     "Expressions of sadness or grief in personal stories",
     1, "One is about programming syntax, the other about emotions; no shared concept."),
    ("Words related to water, such as rivers and seas",
     "Nouns describing bodies of water and boats",
     2, "Both involve water, but the second also covers boats; related, not clearly the same."),
)
"""The matching prompt's three worked examples ``(explanation 1, explanation 2, label,
rationale)``, labels 3, 1, 2 as in SAE Match."""

MATCH_SYSTEM = (
    "You compare two explanations of features found inside a language model and decide whether "
    "they describe the same concept. Answer with one label:\n"
    "1 = DIFFERENT: the explanations describe unrelated concepts.\n"
    "2 = MAYBE: the concepts are related or overlap, but are not clearly the same.\n"
    "3 = SAME: both explanations describe the same concept, possibly in other words.\n"
    "The order of the two explanations carries no information, and neither does their length: a "
    "longer or more detailed explanation is not more likely to be the same or different. Judge "
    "only the meaning. Answer with JSON only: "
    '{"rationale": "<one short sentence>", "label": <1, 2 or 3>}'
)
"""System prompt of the matching judge (SAE Match's protocol: DIFFERENT / MAYBE / SAME)."""


class JudgeError(RuntimeError):
    """A judge could not give an answer. ``partial`` holds rows finished before the failure
    (a DataFrame) when the error is raised from an evaluation loop."""

    partial: pd.DataFrame | None = None


class JudgeAnswerError(JudgeError, ValueError):
    """The judge answered something that does not follow the protocol; ``answer`` quotes it."""

    def __init__(self, message: str, answer: str = "") -> None:
        super().__init__(message)
        self.answer = answer


class JudgeUnavailableError(JudgeError):
    """The endpoint did not answer (rate limits, server errors, timeouts) after every retry,
    or refused the request (e.g. a wrong key)."""


def _quote(answer: Any, limit: int = 300) -> str:
    text = answer if isinstance(answer, str) else repr(answer)
    return repr(text if len(text) <= limit else text[:limit] + "…")


_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def _json_object(answer: str) -> dict[str, Any] | None:
    """The first JSON object in ``answer`` (bare, fenced in ``` or inside prose), or ``None``."""
    for candidate in (answer.strip(), *_OBJECT.findall(answer)):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _integer(value: Any, lo: int, hi: int) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and lo <= value <= hi:
        return value
    return None


def parse_steering_answer(answer: str | Mapping[str, Any]) -> dict[str, int]:
    """Read a steering judge's answer: ``{"coherence": 0-5, "behavioral": 0-5}``.

    Accepts the JSON object bare, in a code fence or inside prose; integer-valued floats and
    digit strings count as integers. ``"behavior"`` / ``"behaviour"`` are read as
    ``"behavioral"``.

    Raises:
        JudgeAnswerError: no such object, a missing key, or a value that is not an integer in
            0–5 (the message quotes the answer).

    Example:
        >>> parse_steering_answer('```json\\n{"coherence": 4, "behavioral": 2}\\n```')
        {'coherence': 4, 'behavioral': 2}
    """
    obj = dict(answer) if isinstance(answer, Mapping) else _json_object(str(answer))
    if obj is None:
        raise JudgeAnswerError(
            f"the steering judge's answer is not a JSON object {{\"coherence\": 0-5, "
            f"\"behavioral\": 0-5}}: {_quote(answer)}", str(answer))
    for alias in ("behavior", "behaviour", "behavioural"):
        if alias in obj and "behavioral" not in obj:
            obj["behavioral"] = obj[alias]
    out = {}
    for key in ("coherence", "behavioral"):
        value = _integer(obj.get(key), 0, 5)
        if value is None:
            raise JudgeAnswerError(
                f"the steering judge's answer has {key}={obj.get(key)!r}; expected an integer "
                f"0-5. Answer: {_quote(answer)}", str(answer))
        out[key] = value
    return out


_WORDS = {name: label for label, name in LABELS.items()}


def parse_match_answer(answer: str | int | Mapping[str, Any]) -> int:
    """Read a matching judge's answer: the label 1 (DIFFERENT), 2 (MAYBE) or 3 (SAME).

    Accepts ``{"label": 3, ...}`` (bare, fenced or in prose), a bare ``3``, or exactly one of the
    words DIFFERENT / MAYBE / SAME.

    Raises:
        JudgeAnswerError: anything else (the message quotes the answer).

    Example:
        >>> parse_match_answer('{"rationale": "both are about water", "label": 2}')
        2
    """
    if isinstance(answer, int) and not isinstance(answer, bool):
        if answer in LABELS:
            return answer
        raise JudgeAnswerError(f"the matching judge's label {answer} is not 1, 2 or 3.", str(answer))
    obj = dict(answer) if isinstance(answer, Mapping) else _json_object(str(answer))
    if obj is not None:
        value = obj.get("label")
        label = _integer(value, 1, 3)
        if label is None and isinstance(value, str) and value.strip().upper() in _WORDS:
            label = _WORDS[value.strip().upper()]
        if label is not None:
            return label
    else:
        text = str(answer).strip()
        label = _integer(text, 1, 3)
        if label is not None:
            return label
        found = {word for word in _WORDS if re.search(rf"\b{word}\b", text.upper())}
        if len(found) == 1:
            return _WORDS[found.pop()]
    raise JudgeAnswerError(
        "the matching judge's answer names no single label 1 (DIFFERENT), 2 (MAYBE) or 3 (SAME): "
        f"{_quote(answer)}", str(answer))


def steering_messages(prompt: str, text: str, theme: str) -> list[dict[str, str]]:
    """Chat messages asking the steering judge about one generation."""
    user = (f"Theme: {theme}\n\nPrompt given to the model:\n{prompt}\n\n"
            f"Text the model wrote after the prompt:\n{text}\n\nAnswer with the JSON object only.")
    return [{"role": "system", "content": STEERING_SYSTEM}, {"role": "user", "content": user}]


def match_messages(explanation_a: str, explanation_b: str) -> list[dict[str, str]]:
    """Chat messages asking the matching judge about two explanations (worked examples first)."""
    messages = [{"role": "system", "content": MATCH_SYSTEM}]
    for first, second, label, rationale in MATCH_EXAMPLES:
        messages.append({"role": "user",
                         "content": f"Explanation 1: {first}\nExplanation 2: {second}"})
        messages.append({"role": "assistant",
                         "content": json.dumps({"rationale": rationale, "label": label})})
    messages.append({"role": "user",
                     "content": f"Explanation 1: {explanation_a}\nExplanation 2: {explanation_b}"})
    return messages


def prompt_version() -> str:
    """A digest of both prompt templates (:func:`steering_messages`, :func:`match_messages` with
    placeholder fields): it changes whenever a prompt's wording does, so a row log of a chat
    judge is never resumed under another prompt."""
    return digest([steering_messages("{prompt}", "{text}", "{theme}"),
                   match_messages("{explanation_a}", "{explanation_b}")])


class Judge(ABC):
    """What every judge answers: :meth:`score` (steering) and :meth:`compare` (matching)."""

    theme: str | None = None
    """The default theme of :meth:`score`."""

    def _theme(self, theme: str | None) -> str:
        chosen = theme if theme is not None else self.theme
        if not chosen:
            raise ValueError(f"{type(self).__name__}.score needs a theme (pass theme=, or build "
                             "the judge with theme=).")
        return chosen

    @abstractmethod
    def score(self, prompt: str, text: str, *, theme: str | None = None) -> dict[str, int]:
        """Rate one generation: ``{"coherence": 0-5, "behavioral": 0-5}``.

        Args:
            prompt: the prompt the model continued.
            text: the generated continuation.
            theme: what "behavioral" measures (default: the judge's ``theme``).
        """

    @abstractmethod
    def compare(self, explanation_a: str, explanation_b: str) -> int:
        """Label two feature explanations: 1 DIFFERENT, 2 MAYBE, 3 SAME."""

    def identity(self) -> dict[str, Any]:
        """What determines this judge's answers, for the header of a resumable row log
        (:mod:`~sae_match_lens.judging.rowlog`): rows from a judge with another identity are never
        reused. The base class gives the class and the default theme; a subclass adds what
        else changes its answers (model, endpoint, prompt version, script)."""
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "theme": self.theme}


Script = Sequence[Any] | Callable[..., Any] | None


class ScriptedJudge(Judge):
    """A judge that answers from a script, for tests and hand ratings.

    Each script is a list (answers in call order; ``cycle=True`` repeats it) or a function
    (``scores(prompt, text, theme)``, ``comparisons(explanation_a, explanation_b)``). An answer
    may be the parsed value (a dict / an int), a raw string (parsed as a real judge's answer,
    so garbage raises :class:`JudgeAnswerError`) or an exception instance (raised). Every call
    is recorded in ``calls``.

    Example:
        >>> judge = ScriptedJudge(scores=[{"coherence": 5, "behavioral": 0}], theme="religion")
        >>> judge.score("I think ", "the weather is fine")
        {'coherence': 5, 'behavioral': 0}
    """

    def __init__(self, scores: Script = None, comparisons: Script = None, *,
                 theme: str | None = None, cycle: bool = False) -> None:
        self.scores, self.comparisons, self.theme, self.cycle = scores, comparisons, theme, cycle
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._next = {"score": 0, "compare": 0}

    def _answer(self, what: str, script: Script, args: tuple[Any, ...]) -> Any:
        self.calls.append((what, args))
        if script is None:
            raise JudgeError(f"ScriptedJudge has no script for {what}().")
        if callable(script):
            answer = script(*args)
        else:
            i = self._next[what]
            if i >= len(script) and not (self.cycle and len(script)):
                raise JudgeError(f"ScriptedJudge's {what} script has {len(script)} answers; call "
                                 f"{i + 1} has none (pass cycle=True to repeat it).")
            answer = script[i % len(script)]
            self._next[what] = i + 1
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def identity(self) -> dict[str, Any]:
        """Class, theme and a digest of each script (a list's answers, a function's source)."""
        def script_id(script: Script) -> Any:
            return callable_identity(script) if callable(script) else digest(script)

        return {**super().identity(), "scores": script_id(self.scores),
                "comparisons": script_id(self.comparisons), "cycle": self.cycle}

    def score(self, prompt: str, text: str, *, theme: str | None = None) -> dict[str, int]:
        """The next scripted rating (see :meth:`Judge.score`)."""
        theme_used = theme if theme is not None else self.theme
        return parse_steering_answer(self._answer("score", self.scores, (prompt, text, theme_used)))

    def compare(self, explanation_a: str, explanation_b: str) -> int:
        """The next scripted label (see :meth:`Judge.compare`)."""
        return parse_match_answer(self._answer("compare", self.comparisons,
                                               (explanation_a, explanation_b)))


@dataclass(frozen=True)
class RetryOptions:
    """Timeouts and retries of :class:`ChatJudge` (checked when the judge is made)."""

    timeout: float = 60.0
    """Seconds per request."""
    max_retries: int = 4
    """Retries after the first attempt for 408, 429, 5xx
    (:data:`~sae_match_lens.httpclient.RETRY_STATUS`), timeouts and connection errors; then
    :class:`JudgeUnavailableError`."""
    backoff: float = 1.0
    """First wait in seconds; doubles with each retry, at most ``max_backoff`` (a
    ``Retry-After`` header is honoured up to ``max_backoff``)."""
    max_backoff: float = 30.0
    """The longest wait between retries, in seconds."""
    answer_retries: int = 1
    """How often an answer that does not follow the protocol is asked again before
    :class:`JudgeAnswerError`."""


class ChatJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (standard library only).

    Requests are plain ``POST {base_url}/chat/completions`` JSON bodies sent with
    :func:`sae_match_lens.httpclient.request` (standard library only): its timeouts, retries
    and redirect policy (a redirect to another origin, or one that would turn the POST into a
    GET, is refused; the key is never sent elsewhere).

    Args:
        model: the model name sent in the request (default: ``$SAE_MATCH_JUDGE_MODEL``).
        base_url: the API root, e.g. ``"http://127.0.0.1:8000/v1"`` or
            ``"https://api.openai.com/v1"``; requests go to ``{base_url}/chat/completions``
            (default: ``$SAE_MATCH_JUDGE_BASE_URL``, then ``$OPENAI_BASE_URL``).
        api_key: sent as ``Authorization: Bearer`` (default: ``$SAE_MATCH_JUDGE_API_KEY``, then
            ``$OPENAI_API_KEY``; none for local servers that need none).
        theme: default theme of :meth:`score`.
        temperature: sent with each request.
        max_tokens: sent with each request.
        sleep: the waiting function (tests pass one that records instead of sleeping).
        options: timeouts and retries (:class:`RetryOptions`). The flat keywords of 0.2
            (``timeout=``, ``max_retries=``, ``backoff=``, ``max_backoff=``,
            ``answer_retries=``) still work until 0.4, with a ``DeprecationWarning``.

    Raises:
        ValueError: no endpoint or no model name given or in the environment, or bad retry
            settings.

    Example:
        >>> judge = ChatJudge("llama3.1:8b", base_url="http://127.0.0.1:11434/v1")
        >>> judge.compare("Bible verses", "Old Testament scripture")
        3
    """

    @accepts_flat_options(RetryOptions)
    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, theme: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 200, sleep: Callable[[float], None] = time.sleep,
                 options: RetryOptions | None = None) -> None:
        opts = resolve_options(RetryOptions, options)
        timeout, max_retries, backoff, max_backoff, answer_retries = (
            opts.timeout, opts.max_retries, opts.backoff, opts.max_backoff, opts.answer_retries)
        env = os.environ
        base = base_url or env.get("SAE_MATCH_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL")
        name = model or env.get("SAE_MATCH_JUDGE_MODEL")
        if not base:
            raise ValueError("ChatJudge needs an endpoint: pass base_url='http://host:port/v1' or "
                             "set SAE_MATCH_JUDGE_BASE_URL (or OPENAI_BASE_URL).")
        if not name:
            raise ValueError("ChatJudge needs a model name: pass model= or set "
                             "SAE_MATCH_JUDGE_MODEL.")
        for what, value in (("max_retries", max_retries), ("answer_retries", answer_retries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be an integer >= 0, got {value!r}.")
        if not (timeout > 0 and backoff >= 0 and max_backoff >= 0):
            raise ValueError(f"timeout must be > 0 and backoff, max_backoff >= 0; got {timeout}, "
                             f"{backoff}, {max_backoff}.")
        self.model, self.theme = name, theme
        self.url = base.rstrip("/") + "/chat/completions"
        self.timeout = float(timeout)
        self.max_retries, self.backoff, self.max_backoff = max_retries, backoff, max_backoff
        self.answer_retries, self.temperature, self.max_tokens = answer_retries, temperature, max_tokens
        self.sleep = sleep
        key = api_key or env.get("SAE_MATCH_JUDGE_API_KEY") or env.get("OPENAI_API_KEY")
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"ChatJudge(model={self.model!r}, url={self.url!r})"

    def identity(self) -> dict[str, Any]:
        """Class, theme, model name, endpoint, sampling options and :func:`prompt_version`."""
        return {**super().identity(), "model": self.model, "url": self.url,
                "temperature": self.temperature, "max_tokens": self.max_tokens,
                "prompts": prompt_version()}

    def chat(self, messages: list[dict[str, str]]) -> str:
        """Send one chat request (with the retries described above) and return the answer text.

        Raises:
            JudgeUnavailableError: no answer after ``max_retries`` retries, a refused request,
                or a redirect that is not followed.
            JudgeAnswerError: the reply is not chat-completions JSON.
        """
        body = json.dumps({"model": self.model, "messages": messages,
                           "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        try:
            reply = request("POST", self.url, headers=self._headers, body=body,
                            timeout=self.timeout, retries=self.max_retries, backoff=self.backoff,
                            max_wait=self.max_backoff, sleep=self.sleep)
        except UnavailableError as exc:
            raise JudgeUnavailableError(
                f"the judge at {self.url} (model {self.model!r}) gave no answer after "
                f"{exc.attempts} attempts; last: {exc.last}. Try later, raise max_retries, or "
                "lower the request rate.") from None
        except RedirectRefusedError as exc:
            raise JudgeUnavailableError(
                f"the judge at {self.url} (model {self.model!r}) answered with a redirect that "
                f"is not followed: {exc} Set base_url to the address that answers.") from None
        if reply.status != 200:
            raise JudgeUnavailableError(
                f"the judge at {self.url} (model {self.model!r}) refused the request: HTTP "
                f"{reply.status} {_quote(reply.text(), 200)}. Check the endpoint, the model name "
                "and the API key.")
        return self._content(reply)

    def _content(self, reply: Response) -> str:
        text = reply.text()
        try:
            content = reply.json()["choices"][0]["message"]["content"]
        except (BadResponseError, KeyError, IndexError, TypeError):
            raise JudgeAnswerError(
                f"the judge at {self.url} replied with HTTP 200 but not chat-completions JSON "
                f"(choices[0].message.content): {_quote(text)}", text) from None
        if not isinstance(content, str):
            raise JudgeAnswerError(f"the judge at {self.url} sent message content {content!r}; "
                                   "expected text.", repr(content))
        return content

    def _ask(self, messages: list[dict[str, str]], parse: Callable[[str], Any]) -> Any:
        for attempt in range(self.answer_retries + 1):
            answer = self.chat(messages)
            try:
                return parse(answer)
            except JudgeAnswerError:
                if attempt == self.answer_retries:
                    raise
                logger.info("judge at %s answered off-protocol (%s); asking again", self.url,
                            _quote(answer, 80))
        raise AssertionError("unreachable")  # pragma: no cover

    def score(self, prompt: str, text: str, *, theme: str | None = None) -> dict[str, int]:
        """Rate one generation (see :meth:`Judge.score`)."""
        return self._ask(steering_messages(prompt, text, self._theme(theme)), parse_steering_answer)

    def compare(self, explanation_a: str, explanation_b: str) -> int:
        """Label two explanations (see :meth:`Judge.compare`)."""
        return self._ask(match_messages(explanation_a, explanation_b), parse_match_answer)


JUDGED_COLUMNS: tuple[str, ...] = ("row", "coherence", "behavioral")


def judge_generations(
    judge: Judge,
    prompts: Sequence[str],
    texts: Sequence[str],
    *,
    theme: str | None = None,
    path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Rate every generation, keeping finished rows when the judge fails.

    Args:
        judge: any :class:`Judge`.
        prompts: one prompt per generation.
        texts: one continuation per generation (aligned with ``prompts``).
        theme: the theme of the ratings (default: the judge's).
        path: a :class:`~sae_match_lens.judging.rowlog.RowLog` file; rows are written as they finish,
            and a rerun with the same judge (:meth:`Judge.identity`) and inputs skips the rows
            already there (another judge or other inputs: refused, naming what differs).
        progress: show a progress bar.

    Returns:
        One row per generation: ``row`` (its index), ``coherence``, ``behavioral`` (0–5).

    Raises:
        JudgeError: the judge failed; ``error.partial`` holds the rows finished before it (also
            kept in ``path``).

    Example:
        >>> ratings = judge_generations(judge, gen.prompts, gen.texts, theme="religion",
        ...                             path="ratings.jsonl")
    """
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} texts; give one prompt per text.")
    header = {"what": "judge_generations", "theme": theme if theme is not None else judge.theme,
              "n": len(texts), "judge": judge.identity(), "inputs": digest([prompts, texts])}
    log = RowLog(path, key=("row",), header=header) if path is not None else None
    rows: list[dict[str, Any]] = [] if log is None else list(log.rows)
    done = {r["row"] for r in rows}
    todo: Iterable[int] = [i for i in range(len(texts)) if i not in done]
    for i in progress_bar(list(todo), desc="judging generations", unit="text", enabled=progress):
        try:
            rating = judge.score(prompts[i], texts[i], theme=theme)
        except JudgeError as exc:
            exc.partial = pd.DataFrame(sorted(rows, key=lambda r: r["row"]),
                                       columns=list(JUDGED_COLUMNS))
            raise
        row = {"row": i, **rating}
        rows.append(log.append(row) if log is not None else row)
    return pd.DataFrame(sorted(rows, key=lambda r: r["row"]), columns=list(JUDGED_COLUMNS))
