"""Resumable row logs are keyed on everything that determines their rows: another judge (chat
model, endpoint, prompt wording, script), other inputs, another model or SAE checkpoint is
refused, naming what differs, and the same ones resume without asking again."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest
import torch

from sae_match_lens.judging import judge as judge_module
from sae_match_lens.judging.judge import ChatJudge, ScriptedJudge, judge_generations
from sae_match_lens.judging.rowlog import (
    RowLog,
    digest,
    header_differences,
    model_fingerprint,
    sae_fingerprint,
)
from sae_match_lens.judging.semantic import label_pairs
from sae_match_lens.judging.steering_scores import steering_sweep
from tests.helpers_tl import N_LAYERS, random_jumprelu_sae, tiny_model


class LabelServer:
    """A chat-completions server on 127.0.0.1 that answers label 3 and counts requests by the
    model name in the request body."""

    def __init__(self) -> None:
        self.models: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                server.models.append(body["model"])
                reply = json.dumps({"choices": [{"index": 0, "message": {
                    "role": "assistant", "content": '{"label": 3}'}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"

    def judge(self, model: str) -> ChatJudge:
        return ChatJudge(model, base_url=self.base_url, timeout=5.0, max_retries=0)


@pytest.fixture
def server() -> Iterator[LabelServer]:
    served = LabelServer()
    try:
        yield served
    finally:
        served.http.shutdown()
        served.http.server_close()


def _pairs() -> pd.DataFrame:
    rows = [{"path": 0, "kind": "consecutive", "layer_a": 0, "module_a": "res", "feature_a": f,
             "layer_b": 1, "module_b": "res", "feature_b": f + 1, "distance": 1}
            for f in range(3)]
    return pd.DataFrame(rows)


EXPLANATIONS = {(0, "res", 0): "water", (0, "res", 1): "fire", (0, "res", 2): "earth",
                (1, "res", 1): "rivers", (1, "res", 2): "flames", (1, "res", 3): "soil"}


def test_semantic_labels_of_another_chat_model_are_not_reused(server, tmp_path):
    path = tmp_path / "labels.jsonl"
    first = label_pairs(_pairs(), judge=server.judge("model-a"), explanations=EXPLANATIONS,
                        path=path, progress=False)
    assert server.models == ["model-a"] * 3
    with pytest.raises(ValueError, match=r"judge\.model: file 'model-a', this run 'model-b'"):
        label_pairs(_pairs(), judge=server.judge("model-b"), explanations=EXPLANATIONS,
                    path=path, progress=False)
    assert server.models == ["model-a"] * 3  # nothing was asked, nothing reused
    again = label_pairs(_pairs(), judge=server.judge("model-a"), explanations=EXPLANATIONS,
                        path=path, progress=False)
    assert server.models == ["model-a"] * 3  # the same judge resumes without asking
    assert again.label.tolist() == first.label.tolist() == [3.0] * 3
    label_pairs(_pairs(), judge=server.judge("model-b"), explanations=EXPLANATIONS,
                path=tmp_path / "labels-b.jsonl", progress=False)
    assert server.models == ["model-a"] * 3 + ["model-b"] * 3


def test_a_chat_judges_identity_changes_with_its_endpoint_and_prompt_wording(monkeypatch):
    judge = ChatJudge("m", base_url="http://127.0.0.1:1/v1")
    before = judge.identity()
    assert ChatJudge("m", base_url="http://127.0.0.1:2/v1").identity() != before
    assert ChatJudge("m", base_url="http://127.0.0.1:1/v1", temperature=0.7).identity() != before
    monkeypatch.setattr(judge_module, "MATCH_SYSTEM", judge_module.MATCH_SYSTEM + " Be brief.")
    assert judge.identity()["prompts"] != before["prompts"]


def test_rated_generations_are_keyed_on_the_judges_script_and_the_texts(tmp_path):
    path = tmp_path / "ratings.jsonl"
    kind = ScriptedJudge(scores=[{"coherence": 5, "behavioral": 1}], cycle=True, theme="t")
    harsh = ScriptedJudge(scores=[{"coherence": 0, "behavioral": 0}], cycle=True, theme="t")
    judge_generations(kind, ["p", "p"], ["a", "b"], path=path, progress=False)
    with pytest.raises(ValueError, match=r"judge\.scores: file '[0-9a-f]+', this run"):
        judge_generations(harsh, ["p", "p"], ["a", "b"], path=path, progress=False)
    with pytest.raises(ValueError, match="inputs: file"):
        judge_generations(kind, ["p", "p"], ["a", "c"], path=path, progress=False)
    assert harsh.calls == [] and len(kind.calls) == 2
    again = ScriptedJudge(scores=[{"coherence": 5, "behavioral": 1}], cycle=True, theme="t")
    assert judge_generations(again, ["p", "p"], ["a", "b"], path=path,
                             progress=False).coherence.tolist() == [5, 5]
    assert again.calls == []


def test_fingerprints_tell_checkpoints_apart_and_are_stable():
    sae = random_jumprelu_sae("blocks.1.hook_resid_post", seed=1)
    same = random_jumprelu_sae("blocks.1.hook_resid_post", seed=1)
    other = random_jumprelu_sae("blocks.1.hook_resid_post", seed=2)
    moved = random_jumprelu_sae("blocks.2.hook_resid_post", seed=1)
    assert sae_fingerprint(sae) == sae_fingerprint(same)
    assert sae_fingerprint(sae)["weights"] != sae_fingerprint(other)["weights"]
    assert sae_fingerprint(sae)["hook"] != sae_fingerprint(moved)["hook"]
    model = tiny_model()
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.W_E.mul_(1.01)  # a fine-tuned checkpoint: every value moves
    assert model_fingerprint(model)["weights"] != before["weights"]


def test_a_steering_sweep_refuses_rows_of_another_model_or_sae(tmp_path):
    model = tiny_model()
    saes = {layer: random_jumprelu_sae(f"blocks.{layer}.hook_resid_post", seed=20 + layer)
            for layer in range(N_LAYERS)}
    path = tmp_path / "sweep.jsonl"

    def sweep(model: object, saes: object) -> pd.DataFrame:
        return steering_sweep(model, saes, [(1, 3)], ["t1 t2"], path=path, coefficients=[0.0],
                              n_samples=1, max_new_tokens=2, progress=False)

    first = sweep(model, saes)
    assert sweep(model, saes).ce.tolist() == first.ce.tolist()  # the same ones resume
    other = dict(saes)
    other[1] = random_jumprelu_sae("blocks.1.hook_resid_post", seed=99)
    with pytest.raises(ValueError, match=r"saes\.blocks\.1\.hook_resid_post\.weights: file"):
        sweep(model, other)
    with torch.no_grad():
        model.W_U.mul_(2.0)
    with pytest.raises(ValueError, match=r"model\.weights: file"):
        sweep(model, saes)


def test_the_log_names_every_field_that_differs(tmp_path):
    assert header_differences({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}, "d": 4}) == [
        "b.c: file 2, this run 3", "d: file <absent>, this run 4"]
    path = tmp_path / "log.jsonl"
    RowLog(path, key=("i",), header={"judge": {"model": "x"}, "seed": 0}).append({"i": 0})
    with pytest.raises(ValueError, match=r"judge\.model: file 'x', this run 'y'\. Give"):
        RowLog(path, key=("i",), header={"judge": {"model": "y"}, "seed": 0})
    assert digest([1, 2]) == digest((1, 2)) != digest([2, 1])
