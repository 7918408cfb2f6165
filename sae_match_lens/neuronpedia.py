"""Neuronpedia ids, feature URLs, and explanations fetched from Neuronpedia's public API.

A Neuronpedia id names one SAE's dashboards: ``"{model}/{sae set}"``, e.g.
``"gemma-2-2b/12-gemmascope-res-16k"`` (SAELens records it as ``sae.cfg.metadata.neuronpedia_id``
and its registry lists it per SAE id). Feature ``i`` of that SAE has the page
``https://www.neuronpedia.org/{model}/{sae set}/{i}`` (:func:`feature_url`) and the JSON record
``GET https://www.neuronpedia.org/api/feature/{model}/{sae set}/{i}``, whose ``explanations`` list
holds the automatic explanations (``description``, the explainer model, the method).

:func:`explanations` fetches them over plain HTTP (standard library only): at most ``rate``
requests per second, retries with exponential back-off on ``429 Too Many Requests`` (honouring
``Retry-After``), on ``5xx`` and on timeouts, redirects followed under the policy of
:mod:`sae_match_lens.httpclient` (the one HTTP client of the package), one JSON file per feature
in an on-disk cache (written atomically by :mod:`sae_match_lens.atomicio`; a cached feature needs
no network), and a one-sentence :class:`NeuronpediaUnavailableError` when the server cannot be
reached. A ``404`` means Neuronpedia has no such feature: it is returned (and cached) with
``found=False``. This module imports only the standard library, tqdm and those two modules.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from tqdm.auto import tqdm

from .atomicio import write_text
from .httpclient import HostNotFoundError, RedirectRefusedError, UnavailableError, request

__all__ = [
    "NEURONPEDIA_URL",
    "Explanation",
    "FeatureExplanations",
    "NeuronpediaUnavailableError",
    "default_cache_dir",
    "explanations",
    "feature_url",
    "neuronpedia_id",
]

logger = logging.getLogger(__name__)

NEURONPEDIA_URL = "https://www.neuronpedia.org"
"""Where feature pages and the public API live."""

CACHE_FORMAT = "sae_match_lens.neuronpedia_feature"
_ID = re.compile(r"^[A-Za-z0-9._-]+/[A-Za-z0-9._-]+$")


class NeuronpediaUnavailableError(RuntimeError):
    """Neuronpedia could not be reached, or kept refusing the request."""


class Explanation(NamedTuple):
    """One explanation of a feature on Neuronpedia."""

    description: str
    """The explanation text."""
    explainer: str | None
    """The model that wrote it (``explanationModelName``), when given."""
    method: str | None
    """How it was made (``typeName``, e.g. ``"oai_token-act-pair"``), when given."""


class FeatureExplanations(NamedTuple):
    """What Neuronpedia knows about one feature."""

    neuronpedia_id: str
    """The SAE's Neuronpedia id."""
    feature: int
    """The feature index."""
    url: str
    """The feature's Neuronpedia page."""
    explanations: tuple[Explanation, ...]
    """Its explanations, in Neuronpedia's order (possibly none)."""
    found: bool
    """False when Neuronpedia answered 404 (no such feature or SAE)."""

    @property
    def text(self) -> str | None:
        """The first explanation's description, or None."""
        return self.explanations[0].description if self.explanations else None


def _check_id(npid: Any) -> str:
    if not isinstance(npid, str) or not _ID.match(npid):
        raise ValueError(f"a Neuronpedia id looks like 'gemma-2-2b/12-gemmascope-res-16k' "
                         f"(model/sae set), got {npid!r}.")
    return npid


def _check_feature(feature: Any) -> int:
    try:
        value = operator.index(feature)
    except TypeError:
        value = -1
    if isinstance(feature, bool) or value < 0:
        raise ValueError(f"a feature index must be an integer >= 0, got {feature!r}.")
    return value


def feature_url(neuronpedia_id: str, feature: int, *, base_url: str = NEURONPEDIA_URL) -> str:
    """The Neuronpedia page of ``feature`` of the SAE ``neuronpedia_id``.

    Example:
        >>> feature_url("gpt2-small/0-res-jb", 42)
        'https://www.neuronpedia.org/gpt2-small/0-res-jb/42'
    """
    return f"{base_url.rstrip('/')}/{_check_id(neuronpedia_id)}/{_check_feature(feature)}"


def feature_urls(neuronpedia_id: str | None, features: Iterable[Any]) -> list[str | None]:
    """:func:`feature_url` of each feature (None for all without an id; None for ``-1``)."""
    if neuronpedia_id is None:
        return [None for _ in features]
    prefix = f"{NEURONPEDIA_URL}/{_check_id(neuronpedia_id)}/"
    return [None if int(f) < 0 else prefix + str(int(f)) for f in features]


def neuronpedia_id(sae: Any, *, registry: bool = True) -> str | None:
    """The Neuronpedia id of an SAE: ``sae.cfg.metadata.neuronpedia_id``, else (with
    ``registry``) the SAELens registry's entry for its ``release`` and ``sae_id`` metadata, else
    None. ``SAE.from_pretrained`` and :func:`~sae_match_lens.releases.load_release_stack` record
    the id in the metadata; the package's tables read it from there."""
    md = getattr(getattr(sae, "cfg", None), "metadata", None)
    if md is None:
        return None
    found = md.get("neuronpedia_id")
    if found:
        return str(found)
    release, sae_id = md.get("release"), md.get("sae_id")
    if not (registry and release and sae_id):
        return None
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(release)
    value = lookup.neuronpedia_id.get(sae_id) if lookup is not None else None
    return str(value) if value else None


def default_cache_dir() -> Path:
    """``$SAE_MATCH_CACHE/neuronpedia``, else ``$XDG_CACHE_HOME/sae_match_lens/neuronpedia``, else
    ``~/.cache/sae_match_lens/neuronpedia``."""
    if os.environ.get("SAE_MATCH_CACHE"):
        return Path(os.environ["SAE_MATCH_CACHE"]) / "neuronpedia"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sae_match_lens" / "neuronpedia"


class _RateLimiter:
    """At most one request per ``interval`` seconds (clock and sleep injectable for tests)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = interval
        self.clock = clock
        self.sleep = sleep
        self.last: float | None = None

    def wait(self) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.sleep(self.interval - (now - self.last))
            now = self.clock()
        self.last = now


def _cache_path(cache_dir: Path, base_url: str, npid: str, feature: int) -> Path:
    host = urllib.parse.urlsplit(base_url).netloc or "local"
    return (cache_dir / urllib.parse.quote(host, safe="") / urllib.parse.quote(npid, safe="")
            / f"{feature}.json")


def _from_record(record: dict[str, Any], npid: str, feature: int, url: str) -> FeatureExplanations:
    items = tuple(Explanation(str(e["description"]), e.get("explainer"), e.get("method"))
                  for e in record["explanations"])
    return FeatureExplanations(npid, feature, url, items, bool(record["found"]))


def _read_cache(path: Path, npid: str, feature: int, url: str) -> FeatureExplanations | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != CACHE_FORMAT:
            raise ValueError("not a cached Neuronpedia feature")
        return _from_record(record, npid, feature, url)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring unreadable cache file %s (%s); fetching the feature again", path, exc)
        return None


def _parse_answer(body: bytes, api_url: str) -> list[Explanation] | None:
    """The explanations in an API answer (None: the answer says there is no such feature)."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        start = body[:60].decode("utf-8", errors="replace")
        raise ValueError(f"Neuronpedia answered {api_url} with something that is not JSON "
                         f"(it starts {start!r}); check base_url, or try again later.") from None
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("explanations"), list):
        raise ValueError(f"Neuronpedia's answer for {api_url} has no 'explanations' list "
                         f"(got {type(data).__name__} with keys "
                         f"{sorted(data)[:8] if isinstance(data, dict) else []}).")
    out = []
    for item in data["explanations"]:
        if not isinstance(item, dict) or not isinstance(item.get("description"), str):
            raise ValueError(f"Neuronpedia's answer for {api_url} has an explanation without a "
                             f"'description' text: {str(item)[:80]!r}.")
        out.append(Explanation(item["description"].strip(), item.get("explanationModelName"),
                               item.get("typeName")))
    return out


def _fetch(api_url: str, *, limiter: _RateLimiter, timeout: float, retries: int,
           backoff: float, max_wait: float, base_url: str,
           sleep: Callable[[float], None]) -> list[Explanation] | None:
    try:
        reply = request("GET", api_url, headers={"Accept": "application/json",
                                                 "User-Agent": "sae-match-lens"},
                        timeout=timeout, retries=retries, backoff=backoff, max_wait=max_wait,
                        sleep=sleep, before_attempt=limiter.wait)
    except HostNotFoundError as error:
        raise NeuronpediaUnavailableError(
            f"Cannot reach Neuronpedia at {base_url} ({error.last}); explanations need network "
            "access, except for features already in the cache.") from None
    except UnavailableError as error:
        raise NeuronpediaUnavailableError(
            f"Neuronpedia kept failing for {api_url} ({error.last}) after {error.attempts} tries; "
            "lower rate= or try again later.") from None
    except RedirectRefusedError as error:
        raise NeuronpediaUnavailableError(f"Neuronpedia at {base_url}: {error}") from None
    if reply.status == 404:
        return None
    if not 200 <= reply.status < 300:
        raise ValueError(f"Neuronpedia refused {api_url} with HTTP {reply.status} "
                         f"({reply.reason}); check the Neuronpedia id.")
    return _parse_answer(reply.body, api_url)


def explanations(
    neuronpedia_id: str,
    features: Iterable[int],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    rate: float = 2.0,
    base_url: str = NEURONPEDIA_URL,
    timeout: float = 20.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_wait: float = 60.0,
    refresh: bool = False,
    progress: bool = True,
) -> dict[int, FeatureExplanations]:
    """Neuronpedia's explanations of some features of one SAE, cached on disk.

    Args:
        neuronpedia_id: the SAE's Neuronpedia id (:func:`neuronpedia_id`), e.g.
            ``"gemma-2-2b/12-gemmascope-res-16k"``.
        features: the feature indices (repeats are fetched once).
        cache_dir: where answers are kept, one JSON file per feature (default:
            :func:`default_cache_dir`); cached features are not fetched again.
        rate: at most this many requests per second (including retries).
        base_url: the Neuronpedia server.
        timeout: seconds to wait for one answer.
        retries: further tries after a 429, a 5xx or a timeout.
        backoff: the first retry waits this many seconds, each next one twice as long (a
            ``Retry-After`` header takes precedence); no wait is longer than ``max_wait``.
        max_wait: the longest single wait, in seconds.
        refresh: fetch even features that are in the cache (and update it).
        progress: show a progress bar.

    Returns:
        ``{feature: FeatureExplanations}`` in the order the features were given.

    Raises:
        NeuronpediaUnavailableError: the server cannot be reached (offline), or kept answering
            429/5xx; features fetched before the failure are already in the cache.
        ValueError: a malformed id or feature, or an answer that is not the expected JSON.

    Example:
        >>> found = explanations("gpt2-small/0-res-jb", [1, 2, 3])
        >>> found[1].text
    """
    npid = _check_id(neuronpedia_id)
    wanted = list(dict.fromkeys(_check_feature(f) for f in features))
    if not (isinstance(rate, int | float) and rate > 0):
        raise ValueError(f"rate must be a number of requests per second > 0, got {rate!r}.")
    if not (isinstance(retries, int) and retries >= 0):
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}.")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    limiter = _RateLimiter(1.0 / rate)
    root = base_url.rstrip("/")
    out: dict[int, FeatureExplanations] = {}
    fetched = 0
    for feature in tqdm(wanted, desc=f"Neuronpedia {npid}", unit="feature", disable=not progress):
        url = feature_url(npid, feature, base_url=root)
        path = _cache_path(directory, root, npid, feature)
        cached = None if refresh else _read_cache(path, npid, feature, url)
        if cached is not None:
            out[feature] = cached
            continue
        api_url = f"{root}/api/feature/{npid}/{feature}"
        items = _fetch(api_url, limiter=limiter, timeout=timeout, retries=retries,
                       backoff=backoff, max_wait=max_wait, base_url=root, sleep=time.sleep)
        found = items is not None
        result = FeatureExplanations(npid, feature, url, tuple(items or ()), found)
        record = {"format": CACHE_FORMAT, "version": 1, "neuronpedia_id": npid, "feature": feature,
                  "found": found, "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                  "explanations": [e._asdict() for e in result.explanations]}
        write_text(path, json.dumps(record, indent=1))
        fetched += 1
        out[feature] = result
    logger.info("Neuronpedia %s: %d features, %d fetched, %d from the cache in %s", npid,
                len(out), fetched, len(out) - fetched, directory)
    return out
