"""Does longer training make the SmolLM2 suite's SAEs better, and adjacent layers' features more
alike? TopK SAEs at layers 12 and 13 retrained with ``--factor`` times the suite's steps on the
same activation shards (a build kept with ``--keep-activations``), beside the built ones.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/longer_training.py --factor 4

Prints each SAE's training time and held-out explained variance (32 held-out sequences without a
massive activation, BOS not scored), and the median best decoder cosine of a layer-12 feature
among layer 13's with the share at 0.5 or above, for the built SAEs and the retrained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _explained_variance(sae, x: torch.Tensor) -> float:
    x = x[:, 1:].reshape(-1, x.shape[-1])
    r = sae.decode(sae.encode(x))
    return float(1 - (x - r).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@torch.no_grad()
def _similarity(w12: torch.Tensor, w13: torch.Tensor) -> dict[str, float]:
    best = (_unit(w12.float()) @ _unit(w13.float()).T).max(dim=1).values
    return {"median_best_cosine": round(float(best.median()), 4),
            "share_at_0.5": round(float((best >= 0.5).float().mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--factor", type=int, default=4, help="training steps, times the suite's")
    p.add_argument("--root", default=None, help="suite folder (default: the cache)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from sae_lens import SAE
    from safetensors.torch import load_file

    from sae_match_lens.suites import suite_root
    from sae_match_lens.suites.build import _job_seed, _load_hook, _metadata, _plan
    from sae_match_lens.suites.smollm2 import FULL, load_smollm2_model
    from sae_match_lens.suites.training import train_sae

    root = suite_root("smollm2", args.root)
    s, plan = FULL, _plan(FULL)
    held = load_file(str(root / "eval_tokens.safetensors"))
    tokens = held["tokens"].long()[~held["massive"].bool()[:, 1:].any(dim=1)][:32]
    model = load_smollm2_model(check_logits=False)
    hooks = {layer: f"blocks.{layer}.hook_resid_post" for layer in (12, 13)}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in hooks.values())
    built, longer, report = {}, {}, {}
    for layer, hook in hooks.items():
        built[layer] = SAE.load_from_disk(str(root / "saes" / "topk" / hook)).float()
        acts = _load_hook(root, plan, hook, s.train_tokens)
        start = time.time()
        state, _ = train_sae(acts, architecture="topk", d_sae=s.d_sae, k=s.k,
                             steps=args.factor * s.steps, batch=s.batch, lr=s.lr,
                             seed=_job_seed(s, "topk", hook), metadata=_metadata(hook, s))
        seconds = time.time() - start
        longer[layer] = SAE.load_from_disk(str(root / "saes" / "topk" / hook)).float()
        longer[layer].load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        with torch.no_grad():
            report[hook] = {"train_seconds": round(seconds, 1),
                            "ev_built": round(_explained_variance(built[layer], cache[hook]), 4),
                            f"ev_{args.factor}x": round(_explained_variance(longer[layer],
                                                                            cache[hook]), 4)}
    report["built"] = _similarity(built[12].W_dec, built[13].W_dec)
    report[f"{args.factor}x"] = _similarity(longer[12].W_dec, longer[13].W_dec)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
