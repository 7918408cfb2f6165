"""Every Python snippet of README.md runs, and the "Try it offline" section says what it shows;
every ``sae-match`` command of the README runs (the offline block) or, where it needs the hub,
hours or a plan on a hub release, is a valid command line.

The ```python blocks are run in order, one namespace per ``##`` section (so each section must be
self-contained), in a temporary working directory (snippets write files).

Snippets that load a hub release cannot run here (no network): ``SAE.from_pretrained`` and
``HookedTransformer.from_pretrained`` / ``from_pretrained_no_processing`` are monkeypatched to
return default-suite objects. A Gemma Scope id ``layer_{l}/...`` (the README uses layers 10-14)
gets (a copy of) the default suite's SAE of layer ``l`` (the README uses layers 1-5, which both
have), and the model is the default suite's, so the hook names those SAEs read
(``blocks.{l}.hook_resid_post``) are hook points of the model and agree with the model layers the
snippets use, as they would for a real release and its model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
from sae_lens import SAE
from transformer_lens import HookedTransformer

from sae_match_lens import assets

README = Path(__file__).resolve().parents[1] / "README.md"
FIRST_GEMMA_LAYER = 0
"""Gemma Scope layer ``l`` of the README maps to default-suite layer ``l - FIRST_GEMMA_LAYER``."""


def python_sections() -> dict[str, list[str]]:
    """``{"## heading": [python snippet, ...]}`` in README order (sections without one left out)."""
    sections: dict[str, list[str]] = {}
    heading = "(top)"
    in_block, block = False, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not in_block and line.startswith("## "):
            heading = line[3:].strip()
        elif not in_block and line.strip() == "```python":
            in_block, block = True, []
        elif in_block and line.strip() == "```":
            in_block = False
            sections.setdefault(heading, []).append("\n".join(block))
        elif in_block:
            block.append(line)
    return sections


SECTIONS = python_sections()


@pytest.fixture(scope="module")
def suite() -> tuple[Any, list[Any]]:
    return assets.load_default_suite()


@pytest.fixture
def offline_hub(suite, monkeypatch) -> None:
    """Hub loaders answer with default-suite objects (see the module docstring)."""
    model, saes = suite

    def sae_from_pretrained(release: str, sae_id: str, *args: Any, **kwargs: Any) -> Any:
        found = re.search(r"layer_(\d+)", sae_id)
        if found is None:
            raise ValueError(f"the README test maps only 'layer_<l>/...' SAE ids, got {sae_id!r}.")
        layer = int(found.group(1)) - FIRST_GEMMA_LAYER
        if not 0 <= layer < len(saes):
            raise ValueError(f"{sae_id!r}: the default suite has no layer {layer}.")
        return copy.deepcopy(saes[layer])  # loaders record release metadata on what they load

    def model_from_pretrained(name: str, *args: Any, **kwargs: Any) -> Any:
        return model

    monkeypatch.setattr(SAE, "from_pretrained", staticmethod(sae_from_pretrained))
    for loader in ("from_pretrained", "from_pretrained_no_processing"):
        monkeypatch.setattr(HookedTransformer, loader, staticmethod(model_from_pretrained))


def run_section(heading: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme"}
    for i, snippet in enumerate(SECTIONS[heading]):
        exec(compile(snippet, f"README.md [{heading} #{i + 1}]", "exec"), namespace)
    return namespace


def test_the_readme_has_python_snippets_in_try_it_offline_and_usage():
    assert {"Try it offline", "Usage"} <= set(SECTIONS)


FLOW = "Many-to-one links and feature flow"
SMOLLM2 = "A real model: the SmolLM2 suite (built on demand)"
CHECKED = ("Try it offline", FLOW, SMOLLM2)
"""Sections whose output a dedicated test checks against what the README says (the SmolLM2
section in tests/test_suite_build.py, on the suite the build test builds)."""


def test_every_python_block_of_the_readme_is_collected():
    fences = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()
              if line.strip().startswith("```py")]
    assert set(fences) <= {"```python"}, f"python blocks the test would not run: {set(fences)}"
    assert sum(len(snippets) for snippets in SECTIONS.values()) == len(fences)
    assert set(CHECKED) <= set(SECTIONS)


@pytest.mark.parametrize("heading", [h for h in SECTIONS if h not in CHECKED])
def test_every_readme_python_section_runs(heading, offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_section(heading)


def test_the_flow_section_runs_and_shows_what_its_comments_say(offline_hub, tmp_path,
                                                               monkeypatch):
    from sae_match_lens.adapters import model_layer_of
    from sae_match_lens.flow.graph import FlowGraph

    monkeypatch.chdir(tmp_path)
    ns = run_section(FLOW)
    lk, back, saes = ns["lk"], ns["back"], ns["saes"]
    # top-3 partners per feature, best first
    assert lk.k == 3 and bool((lk.scores[:, :-1] >= lk.scores[:, 1:]).all())
    # each layer-1 feature's predecessor (the backward links' rows are layer 1's features)
    assert back.source["hook_name"] == saes[1].cfg.metadata.hook_name
    assert back.indices.shape[0] == saes[1].cfg.d_sae
    table = ns["table"]
    assert sorted(zip(table.method, table.k, strict=True)) == [
        ("links", 1), ("links", 3), ("permutation", 1)]
    assert bool((table.jaccard <= table.ceiling_best_partner + 1e-9).all())
    # the graph is seeded with feature 17's partner, at the layer lk's targets live in
    seed_layer = model_layer_of(lk.target["hook_name"])
    assert ns["graph"].options["seed"] == FlowGraph.node_id(seed_layer, "res", int(lk.top1[17]))
    assert (tmp_path / "flow.json").is_file()
    effect = ns["effect"]  # remove the MLP predecessor, see the target drop
    assert int(effect.n_targets.iloc[0]) > 0
    assert 0 <= float(effect.success_rate.iloc[0]) <= 1
    assert float(effect.activation_change.iloc[0]) > 0


def test_try_it_offline_runs_and_shows_what_its_text_says(offline_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section("Try it offline")
    result, saes, chain = ns["result"], ns["saes"], ns["chain"]
    assert result.permutation.n_matched == saes[2].cfg.d_sae
    assert result.certified and 0 < result.gap < 1e-11 * result.total_cost  # never exactly 0
    assert len(chain.trace(0).features) == len(saes)
    assert 0 < (ns["substituted"] - ns["clean"]).item() < 1
    delta = ns["table"].set_index("variant")["delta_ce"]
    ev = ns["table"].set_index("variant")["explained_variance"]
    assert ev["random_permutation"] < 0 and delta["random_permutation"] > 2
    assert delta["identity"] < delta["folded"] and delta["sae_b_reconstruction"] < delta["folded"]
    assert delta["error_preserving"] < delta["folded"]


def shell_blocks() -> list[list[str]]:
    """Every ```bash block of the README as its commands (continuation lines joined, comment
    lines kept as they are)."""
    blocks, block, in_block = [], [], False
    for line in README.read_text(encoding="utf-8").splitlines():
        if not in_block and line.strip() == "```bash":
            in_block, block = True, []
        elif in_block and line.strip() == "```":
            in_block = False
            blocks.append(block)
        elif in_block:
            if block and block[-1].endswith("\\"):
                block[-1] = block[-1][:-1].rstrip() + " " + line.strip()
            else:
                block.append(line.strip())
    return blocks


def _argv(command: str) -> list[str]:
    """``sae-match ...`` as the arguments of :func:`sae_match_lens.cli.main` (trailing comment
    dropped, ``$VAR`` expanded from the environment)."""
    import os

    words = shlex.split(command, comments=True)
    assert words[0] == "sae-match", command
    return [os.path.expandvars(w) for w in words[1:]]


OFFLINE = "# offline"
"""The README's bash block that starts with this comment runs here in full."""


def test_the_readme_offline_command_block_runs(tmp_path, monkeypatch, capsys):
    from sae_match_lens.cli import main

    (block,) = [b for b in shell_blocks() if b and b[0].startswith(OFFLINE)]
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in block[1:]:
        assign = re.fullmatch(r'(\w+)=\$\(python -c "(.*)"\)', line)
        if assign:  # NAME=$(python -c "CODE"): run CODE here, NAME is what it prints
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(assign.group(2), {})
            monkeypatch.setenv(assign.group(1), out.getvalue().strip())
            continue
        assert main(_argv(line)) == 0, (line, capsys.readouterr().err)
        ran.append(_argv(line)[0])
    assert sorted(set(ran)) == ["chain", "flow", "links", "match", "view"]
    for name in ("match_2_3/result.json", "match.html", "chain/chain.json", "chain.html",
                 "links.csv", "flow.json", "flow.graphml"):
        assert (tmp_path / name).is_file(), name


def test_every_other_readme_command_is_a_valid_command_line(monkeypatch):
    """The release commands need the hub, ``suite build`` hours, ``demo`` a minute and a half
    (tests/test_demo.py runs it), ``batch`` a plan on a hub release: their lines must parse."""
    from sae_match_lens.cli import build_parser

    monkeypatch.setenv("SAES", "saes")
    commands = [line[line.index("sae-match"):] for block in shell_blocks()
                if not (block and block[0].startswith(OFFLINE))
                for line in block if "sae-match " in line and not line.startswith("#")]
    assert len(commands) >= 8
    for command in commands:
        args = build_parser().parse_args(_argv(command))
        assert callable(args.func), command
