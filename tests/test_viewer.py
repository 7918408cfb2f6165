"""The offline HTML viewer: what it keeps (against brute force), that it is self-contained and
written atomically, the ``view`` command, top-activating tokens against a direct computation,
and the page itself in headless Chromium (no console errors, no network request, the rendered
node count, the filters, the search box, the side panel's link, a non-blank screenshot)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import build_sae, planted_chain
from helpers_tl import random_jumprelu_sae, tiny_model, tiny_tokens

from sae_match_lens import ChainMatch, FlowGraph, MatchResult, Permutation, match_chain
from sae_match_lens.cli import main
from sae_match_lens.flow.graph import LayerSAEs, flow_graph
from sae_match_lens.matching import match
from sae_match_lens.report.viewer import DEFAULT_SHOWN_PATHS, top_activating_tokens, write_html

D_SAE = 24
N_LAYERS = 4
URL = "https://www.neuronpedia.org/test-model/{model_layer}-{module}/{feature}"


@pytest.fixture(scope="module")
def planted():
    return planted_chain(N_LAYERS, d_in=16, d_sae=D_SAE, noise=0.05, seed=3)


@pytest.fixture(scope="module")
def chain(planted):
    return match_chain(planted.saes, progress=False)


@pytest.fixture(scope="module")
def flow(planted):
    stack = {layer: LayerSAEs(sae) for layer, sae in enumerate(planted.saes)}
    for layer in (1, 2):  # random MLP/attention SAEs: their best cosines in 16 dims pass 0.15
        stack[layer] = LayerSAEs(planted.saes[layer],
                                 mlp=build_sae(d_in=16, d_sae=D_SAE, seed=20 + layer,
                                               hook_name=f"blocks.{layer}.hook_mlp_out"),
                                 attn=build_sae(d_in=16, d_sae=D_SAE, seed=30 + layer,
                                                hook_name=f"blocks.{layer}.hook_attn_out"))
    graph = flow_graph(stack, (1, 3))
    assert set(graph.nodes.module) == {"res", "mlp", "attn"}  # the page has all three lanes
    return graph


def payload(path) -> dict:
    """The data the page's script works from (its JSON block)."""
    text = path.read_text()
    block = re.search(r'<script type="application/json" id="sae-match-data">(.*?)</script>', text,
                      re.S)
    return json.loads(block.group(1))


def expected_visible(data: dict, threshold: float | None, layers: tuple[int, int]) -> int:
    """Nodes shown under the documented filter rule, computed here from the raw values."""
    nodes, edges = data["nodes"], data["edges"]
    sense = data["filter"]["sense"]
    passing = [v is None or threshold is None or (v >= threshold if sense == "min" else v <= threshold)
               for v in edges["value"]]
    degree = [0] * len(nodes["layer"])
    strong = [False] * len(nodes["layer"])
    for s, d, ok in zip(edges["src"], edges["dst"], passing, strict=True):
        degree[s] += 1
        degree[d] += 1
        strong[s] |= ok
        strong[d] |= ok
    return sum(layers[0] <= layer <= layers[1] and (degree[i] == 0 or strong[i])
               for i, layer in enumerate(nodes["layer"]))


# -- what is kept -----------------------------------------------------------------------------
def test_chain_view_keeps_the_longest_then_cheapest_paths(chain, tmp_path):
    write_html(chain, tmp_path / "chain.html", max_paths=10)
    data = payload(tmp_path / "chain.html")
    mean_cost = {f: chain.trace(f).total_cost / (N_LAYERS - 1) for f in range(D_SAE)}
    best = sorted(mean_cost, key=lambda f: (mean_cost[f], f))[:10]  # every path is complete
    nodes = data["nodes"]
    assert len(nodes["id"]) == 10 * N_LAYERS
    assert [f for f, layer in zip(nodes["feature"], nodes["layer"], strict=True) if layer == 0] == best
    for s, d, value in zip(data["edges"]["src"], data["edges"]["dst"], data["edges"]["value"],
                           strict=True):  # every edge is a link of the chain, with its cost
        layer, feature = nodes["layer"][s], nodes["feature"][s]
        step = chain.steps[layer]
        assert nodes["layer"][d] == layer + 1
        assert nodes["feature"][d] == int(step.permutation.indices[feature])
        assert value == pytest.approx(float(step.cost_F[feature]), rel=1e-12)


def test_a_chain_at_later_layers_is_drawn_with_its_model_layers(tmp_path):
    planted = planted_chain(3, d_in=16, d_sae=D_SAE, noise=0.05, seed=3, first_layer=5)
    chain = match_chain(planted.saes, progress=False)
    write_html(chain, tmp_path / "late.html", features=[(6, 4)])
    data = payload(tmp_path / "late.html")
    nodes = data["nodes"]
    assert nodes["layer"] == [6, 7]
    assert nodes["feature"] == [4, int(chain.steps[1].permutation.indices[4])]
    assert data["layers"] == [6, 7]
    with pytest.raises(ValueError, match=r"model layers \[5, 6, 7\]"):
        write_html(chain, tmp_path / "bad.html", features=[(0, 4)])


def test_a_large_chain_is_capped_and_says_what_it_kept(tmp_path, caplog):
    n, layers = 16384, 6
    gen = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(layers - 1):
        perm = Permutation(torch.randperm(n, generator=gen), n)
        cost = torch.rand(n, generator=gen, dtype=torch.float64)
        steps.append(MatchResult(perm, cost, float(cost.sum()), cost * 0.1, None, True, 0.0,
                                 "test", {}))
    chain = ChainMatch(tuple(steps), tuple(f"blocks.{i}.hook_resid_post" for i in range(layers)),
                       tuple(range(layers)))
    with caplog.at_level(logging.INFO, logger="sae_match_lens.report.viewer"):
        path = write_html(chain, tmp_path / "big.html")
    assert "kept 200 of 16384 paths" in caplog.text
    assert path.stat().st_size < 10e6
    paths = chain.paths().numpy()
    costs = np.stack([s.cost_F.numpy()[paths[:, i]] for i, s in enumerate(steps)], axis=1)
    best = np.lexsort((np.arange(n), costs.mean(axis=1)))[:200]
    data = payload(path)
    heads = [f for f, layer in zip(data["nodes"]["feature"], data["nodes"]["layer"], strict=True)
             if layer == 0]
    assert heads == best.tolist() and len(data["nodes"]["id"]) == 200 * layers


def test_max_cost_splits_paths_at_costly_links(chain, tmp_path):
    cut = float(np.median(np.concatenate([s.cost_F.numpy() for s in chain.steps])))
    write_html(chain, tmp_path / "cut.html", max_cost=cut, max_paths=10_000)
    data = payload(tmp_path / "cut.html")
    n_cheap = sum(int((s.cost_F <= cut).sum()) for s in chain.steps)
    assert len(data["edges"]["src"]) == n_cheap  # every cheap link drawn, no costly one
    assert len(data["nodes"]["id"]) == N_LAYERS * D_SAE  # each node once
    assert max(data["edges"]["value"]) <= cut


def test_flow_view_draws_every_node_in_module_lanes(flow, tmp_path):
    write_html(flow, tmp_path / "flow.html")
    nodes = payload(tmp_path / "flow.html")["nodes"]
    assert sorted(nodes["id"]) == sorted(flow.nodes.node)
    for node, x, y, group in zip(nodes["id"], nodes["x"], nodes["y"], nodes["group"], strict=True):
        layer = int(node.split("/")[0])
        assert {"res": x == layer, "mlp": layer - 1 < x < layer, "attn": layer - 1 < x < layer}[group]
        assert {"res": abs(y) < 0.5, "mlp": y < -0.5, "attn": y > 0.5}[group]


def test_links_already_on_the_graph_are_used_and_an_explicit_template_wins(flow, tmp_path):
    nodes = flow.nodes.copy()
    nodes["neuronpedia_url"] = [f"https://example.org/{n}" for n in nodes.node]
    nodes.loc[0, "neuronpedia_url"] = None  # unknown for one node
    graph = FlowGraph(nodes, flow.edges, flow.options)
    urls = payload(write_html(graph, tmp_path / "a.html"))["nodes"]
    known = [u if isinstance(u, str) else None for u in nodes.neuronpedia_url]  # pandas: None -> nan
    assert dict(zip(urls["id"], urls["url"], strict=True)) == dict(zip(nodes.node, known, strict=True))
    assert urls["url"][urls["id"].index(nodes.node[0])] is None
    urls = payload(write_html(graph, tmp_path / "b.html", neuronpedia=URL))["nodes"]
    assert urls["url"] == [URL.format(model_layer=int(i.split("/")[0]), module=i.split("/")[1],
                                      feature=int(i.split("/")[2])) for i in urls["id"]]


HOSTILE = ("<!--<script>", "</script><script>window.pwned=1</script>",
           "<img src=x onerror=\"window.pwned=2\">", "]]> & \u2028 \u2029 <\\/b>")
"""Strings that would break out of a ``<script>`` element or run code if embedded unescaped (no
``-->`` among them: it would end the comment that ``<!--<script>`` opens)."""


def hostile_flow(flow: FlowGraph) -> tuple[FlowGraph, dict]:
    """``flow`` with hostile hook names and explanations on its nodes, and hostile top tokens."""
    nodes = flow.nodes.copy()
    nodes["hook"] = [HOSTILE[i % len(HOSTILE)] + f" hook {i}" for i in range(len(nodes))]
    nodes["explanation"] = [HOSTILE[(i + 1) % len(HOSTILE)] for i in range(len(nodes))]
    tokens = {(int(r.layer), r.module, int(r.feature)): list(HOSTILE) for r in nodes.itertuples()}
    return dataclasses.replace(flow, nodes=nodes), tokens


def test_embedded_json_escapes_every_angle_bracket_and_reads_back_unchanged(flow, tmp_path):
    graph, tokens = hostile_flow(flow)
    path = write_html(graph, tmp_path / "hostile.html", top_tokens=tokens, title=HOSTILE[1])
    text = path.read_text()
    start = text.index('<script type="application/json" id="sae-match-data">') + 52
    block = text[start:text.index("</script>", start)]
    assert not set(block) & set("<>&\u2028\u2029")  # each written as a \\uXXXX escape
    data = json.loads(block)
    assert data["nodes"]["tokens"] == [list(HOSTILE)] * len(graph.nodes)
    info = dict(data["nodes"]["info"][0])
    assert info["explanation"] == graph.nodes.explanation[0]
    assert info["layer"].endswith(f"({graph.nodes.hook[0]})")
    for raw in ("<script>window.pwned", "<!--<script>", "<img src=x"):
        assert raw not in text  # in no script, title or attribute of the page either


# -- the file ---------------------------------------------------------------------------------
def test_the_page_is_self_contained(flow, tmp_path):
    text = write_html(flow, tmp_path / "flow.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text) and "<link" not in text
    assert not re.search(r"@import|url\(\s*['\"]?https?:", text)  # no fetched CSS either
    assert "Plotly.newPlot" in text and len(text) > 3_000_000  # plotly.js is inline


def test_a_failed_write_leaves_the_existing_file_untouched(chain, tmp_path, monkeypatch):
    target = tmp_path / "view.html"
    target.write_text("the user's earlier view")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sae_match_lens.report.viewer.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_html(chain, target)
    assert target.read_text() == "the user's earlier view"
    assert [p.name for p in tmp_path.iterdir()] == ["view.html"]  # no temporary left behind


def test_bad_inputs_raise_with_what_was_expected(chain, flow, tmp_path):
    with pytest.raises(TypeError, match=r"\(layer, feature\)"):
        write_html(chain, tmp_path / "a.html", top_tokens={(0, "res", 1): ["x"]})
    with pytest.raises(TypeError, match="list of strings"):
        write_html(flow, tmp_path / "a.html", top_tokens={(1, "res", 3): "x"})
    with pytest.raises(ValueError, match="http"):
        write_html(flow, tmp_path / "a.html", neuronpedia="javascript:alert({feature})")
    with pytest.raises(TypeError, match="ChainMatch, a MatchResult, a Permutation or a FlowGraph"):
        write_html([1, 2], tmp_path / "a.html")
    with pytest.raises(ValueError, match="does not exist"):
        write_html(tmp_path / "missing", tmp_path / "a.html")
    with pytest.raises(ValueError, match="apply to chains"):
        write_html(flow, tmp_path / "a.html", max_cost=1.0)
    assert not (tmp_path / "a.html").exists()


def test_saved_chain_and_flow_json_are_viewed_from_disk(chain, flow, tmp_path):
    chain.save(tmp_path / "chain")
    write_html(tmp_path / "chain", tmp_path / "chain.html")
    write_html(chain, tmp_path / "direct.html")
    data = payload(tmp_path / "chain.html")
    assert len(data["nodes"]["id"]) == D_SAE * N_LAYERS
    assert data == payload(tmp_path / "direct.html")  # costs and margins are saved too
    loaded = FlowGraph.load_json(flow.save_json(tmp_path / "flow.json"))
    assert loaded.nodes.to_dict("records") == flow.nodes.to_dict("records")
    def links(frame):  # networkx lists edges by source node
        return sorted(frame.to_dict("records"), key=lambda r: (r["source"], r["target"]))

    assert links(loaded.edges) == links(flow.edges)
    assert loaded.options == flow.options


def test_a_chain_page_opens_on_its_best_paths_and_keeps_the_rest_for_its_control(tmp_path):
    """A six-SAE chain put 200 paths (1,200 nodes) in the page and showed them all at once."""
    planted = planted_chain(6, d_in=16, d_sae=256, noise=0.05, seed=4)
    chain = match_chain(planted.saes, progress=False)
    page = write_html(chain, tmp_path / "chain.html").read_text()
    data = payload(tmp_path / "chain.html")
    assert data["paths"] == {"total": 200, "shown": DEFAULT_SHOWN_PATHS}
    assert len(data["nodes"]["id"]) == 200 * 6  # all of them are in the page, for the control
    assert sorted(set(data["nodes"]["path"])) == list(range(200))
    figure = json.loads(re.search(r"Plotly\.newPlot\(\s*\"sae-match-graph\",\s*(\[.*?\]),\s*\{",
                                  page, re.S).group(1))
    opening = sum(len(t["x"]) for t in figure if t.get("uid", "").startswith("nodes-"))
    assert opening == DEFAULT_SHOWN_PATHS * 6 == 150
    assert 'id="sae-match-paths"' in page and 'id="sae-match-all"' in page


def test_a_saved_match_result_and_an_old_permutation_file_are_viewed(planted, tmp_path, capsys):
    result = match(planted.saes[0], planted.saes[1], progress=False)
    result.save(tmp_path / "m")
    write_html(tmp_path / "m", tmp_path / "m.html")
    data = payload(tmp_path / "m.html")
    assert data["layers"] == [0, 1] and len(data["edges"]["src"]) == D_SAE
    assert sorted(data["edges"]["value"]) == pytest.approx(sorted(result.cost_F.tolist()))
    assert data == payload(write_html(result, tmp_path / "direct.html"))
    src = data["edges"]["src"][0]  # each link's hover names its confidence (match computes it)
    feature = data["nodes"]["feature"][src]
    out = [v for k, v in data["nodes"]["info"][src] if k == "link out"]
    assert out and out[0].endswith(f"confidence {float(result.confidence_F[feature]):.4g}")
    result.permutation.save(tmp_path / "perm.safetensors")  # what `sae-match match` wrote before
    assert main(["view", str(tmp_path / "perm.safetensors"), "--out", str(tmp_path / "p.html")]) == 0
    data = payload(tmp_path / "p.html")
    assert len(data["edges"]["src"]) == D_SAE and set(data["edges"]["value"]) == {None}
    dst = [data["nodes"]["feature"][d] for d in data["edges"]["dst"]]
    src = [data["nodes"]["feature"][s] for s in data["edges"]["src"]]
    assert dst == [int(result.permutation.indices[f]) for f in src]


def test_view_command_writes_the_page_and_reports_errors_in_one_line(chain, tmp_path, capsys):
    chain.save(tmp_path / "chain")
    assert main(["view", str(tmp_path / "chain"), "--out", str(tmp_path / "v.html"),
                 "--max-paths", "5"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(payload(tmp_path / "v.html")["nodes"]["id"]) == 5 * N_LAYERS
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["view", str(tmp_path / "bad.json"), "--out", str(tmp_path / "w.html")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a FlowGraph JSON file" in err[0]


# -- top-activating tokens --------------------------------------------------------------------
def test_top_activating_tokens_equal_a_direct_ranking():
    model = tiny_model()
    tokens = tiny_tokens(n_seq=5)
    sae = random_jumprelu_sae("blocks.1.hook_resid_post", seed=3)
    feats = [0, 5, 17]
    got = top_activating_tokens(model, [sae], tokens, [(1, f) for f in feats], k=3, context=2,
                                batch_size=2, progress=False)  # a list is keyed by model layer
    _, cache = model.run_with_cache(tokens)
    acts = sae.encode(cache["blocks.1.hook_resid_post"][:, 1:]).detach()  # BOS excluded
    decode = model.tokenizer.decode
    for f in feats:
        a = acts[..., f]
        order = sorted(((float(a[s, p]), s, p + 1) for s in range(a.shape[0])
                        for p in range(a.shape[1]) if a[s, p] != 0), reverse=True)[:3]
        want = [f"{decode(tokens[s, max(1, p - 2):p].tolist())}[{decode([int(tokens[s, p])])}] "
                f"({v:.3g})" for v, s, p in order]
        assert got[(1, f)] == want
    flow_keys = top_activating_tokens(model, {1: LayerSAEs(sae)}, tokens, [(1, "res", 5)], k=3,
                                      context=2, progress=False)
    assert flow_keys[(1, "res", 5)] == got[(1, 5)]
    with pytest.raises(KeyError, match="no SAE for node"):
        top_activating_tokens(model, [sae], tokens, [(3, 1)], progress=False)


# -- in a real browser ------------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install -e '.[test]')")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium found (install it with: apt-get install -y chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable)
        yield b
        b.close()


class Page:
    """A page opened on a local file, recording console errors and network requests."""

    def __init__(self, browser, path):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors, self.requests = [], []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url)
        self.page.wait_for_selector("[data-sae-match-ready]", timeout=30_000)

    def points(self, trace: str = "nodes") -> int:
        """SVG points drawn by the node traces (or the search-highlight trace)."""
        selector = (".scatterlayer [class*='tracenodes-'] .point" if trace == "nodes"
                    else ".scatterlayer .tracehighlight .point")
        return self.page.locator(selector).count()

    def set_threshold(self, value: float) -> None:
        self.page.fill("#sae-match-threshold-value", repr(value))

    def clean(self) -> None:
        assert self.errors == []
        assert self.requests == [self.url]  # nothing fetched but the file itself
        self.page.close()


def test_chain_page_renders_filters_and_searches_in_chromium(browser, chain, tmp_path):
    path = write_html(chain, tmp_path / "chain.html", max_paths=12,
                      top_tokens={(0, f): [f"tok{f}"] for f in range(D_SAE)})
    data = payload(path)
    page = Page(browser, path)
    assert page.points() == 12 * N_LAYERS == len(data["nodes"]["id"])
    costs = sorted(v for v in data["edges"]["value"])
    cut = (costs[len(costs) // 2] + costs[len(costs) // 2 + 1]) / 2
    page.set_threshold(cut)  # chains: a maximum link cost
    assert page.points() == expected_visible(data, cut, (0, N_LAYERS - 1)) < 12 * N_LAYERS
    page.page.select_option("#sae-match-layer-lo", "1")
    assert page.points() == expected_visible(data, cut, (1, N_LAYERS - 1))
    page.page.select_option("#sae-match-layer-lo", "0")
    page.set_threshold(costs[-1])
    feature = data["nodes"]["feature"][0]
    page.page.fill("#sae-match-search", str(feature))
    assert page.points("highlight") == data["nodes"]["feature"].count(feature)
    assert f"feature {feature}" in page.page.inner_text("#sae-match-panel")
    assert f"tok{feature}" in page.page.inner_text("#sae-match-panel")
    page.page.fill("#sae-match-search", "99999")
    assert page.points("highlight") == 0
    assert "no node matches" in page.page.inner_text("#sae-match-search-status")
    page.clean()


def test_chain_page_opens_on_its_first_paths_and_shows_all_on_request_in_chromium(browser,
                                                                                 tmp_path):
    planted = planted_chain(3, d_in=16, d_sae=64, noise=0.05, seed=4)
    path = write_html(match_chain(planted.saes, progress=False), tmp_path / "chain.html")
    page = Page(browser, path)
    assert page.points() == DEFAULT_SHOWN_PATHS * 3
    page.page.fill("#sae-match-paths", "10")
    assert page.points() == 10 * 3
    page.page.click("#sae-match-all")
    assert page.points() == 64 * 3
    page.clean()


def test_flow_page_renders_filters_links_and_screenshot_in_chromium(browser, flow, tmp_path):
    from PIL import Image

    path = write_html(flow, tmp_path / "flow.html", neuronpedia=URL)
    data = payload(path)
    page = Page(browser, path)
    assert page.points() == len(flow.nodes)
    scores = sorted(flow.edges.score)
    cut = (scores[0] + scores[1]) / 2  # the weakest link fails
    page.set_threshold(cut)  # flows: a minimum link score
    assert page.points() == expected_visible(data, cut, (0, N_LAYERS - 1))
    page.set_threshold(scores[0])
    assert page.points() == len(flow.nodes)
    page.page.fill("#sae-match-search", "1/res/3")  # the seed, by node id
    assert page.points("highlight") == 1
    page.page.fill("#sae-match-search", "")
    seed = page.page.locator(".scatterlayer .tracenodes-res .point").nth(
        [n for n in data["nodes"]["id"] if n.split("/")[1] == "res"].index("1/res/3"))
    box = seed.bounding_box()
    page.page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    link = page.page.locator("#sae-match-link")
    assert link.get_attribute("href") == URL.format(model_layer=1, module="res", feature=3)
    shot = tmp_path / "flow.png"
    page.page.screenshot(path=str(shot))
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank: the graph is drawn
    blue = (np.abs(image.astype(int) - [31, 119, 180]).sum(axis=2) < 40).sum()
    assert blue > 100  # residual nodes and links in their colour
    page.clean()


def test_hostile_tokens_explanations_and_hooks_show_as_text_in_chromium(browser, flow, tmp_path):
    graph, tokens = hostile_flow(flow)
    path = write_html(graph, tmp_path / "hostile.html", top_tokens=tokens, title=HOSTILE[1])
    page = Page(browser, path)  # waits for the page's script to finish: nothing swallowed it
    assert page.points() == len(graph.nodes)
    assert page.page.evaluate("window.pwned") is None  # no injected script or handler ran
    assert page.page.locator("#sae-match-panel script, #sae-match-panel img").count() == 0
    seed = graph.options["seed"]
    page.page.fill("#sae-match-search", seed)
    panel = page.page.inner_text("#sae-match-panel")
    row = graph.nodes.index[graph.nodes.node == seed][0]
    for shown in (*HOSTILE[:3], graph.nodes.hook[row].strip(), graph.nodes.explanation[row]):
        assert shown.strip() in panel  # shown as text, character for character
    assert page.page.title() == HOSTILE[1]
    assert page.page.evaluate("window.pwned") is None
    page.clean()  # no console error, nothing fetched (the <img> never loaded)
