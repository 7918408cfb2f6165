"""Link quality on the default suite: every data-free link score against the data-based ceilings.

For every adjacent pair of the shipped SAE stack (JumpReLU by default), on held-out sequences
(BOS excluded), prints the mean Jaccard of each method's top-1 links, P(B|A), P(A|B), the
distinct targets, the fraction of the data-based best-partner ceiling, the ceilings themselves and
the correlation-based references, then the mean over pairs, SAE Match's weight ablation on this
metric and the computed verdicts (the same code as the demo's flow section,
:mod:`sae_match_lens.report.flow_section`). Methods: Feature Flow's decoder cosine, SAE Match's folded
cost as a per-pair score, decoder+encoder cosine, its CSLS (hubness-corrected) version,
decoder+encoder cosine with the firing-density gap (the default), and the SAE Match permutation.

    python benchmarks/bench_links.py [--family topk] [--n-seq 128]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd

from sae_match_lens.assets import load_default_suite, load_eval_tokens
from sae_match_lens.flow.graph import LayerSAEs
from sae_match_lens.matching import match
from sae_match_lens.report.flow_section import link_quality, link_verdicts, weight_ablation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="jumprelu", choices=["jumprelu", "topk"])
    parser.add_argument("--n-seq", type=int, default=128)
    args = parser.parse_args()
    model, saes = load_default_suite(args.family)
    tokens = load_eval_tokens()[: args.n_seq]
    stack = {layer: LayerSAEs(res=sae) for layer, sae in enumerate(saes)}
    t0 = time.perf_counter()
    perms = {(a, a + 1): match(saes[a], saes[a + 1], progress=False)
             for a in range(len(saes) - 1)}
    table = link_quality(model, stack, tokens, permutations=perms)
    seconds = time.perf_counter() - t0
    pd.set_option("display.width", 200)
    fmt = {"float_format": lambda v: f"{v:.3f}", "index": False}
    main_rows = table[~table.method.str.startswith("mse_")]
    print(main_rows[["layer_a", "layer_b", "method", "jaccard", "p_b_given_a", "p_a_given_b",
                     "distinct_targets", "fraction_of_ceiling"]].to_string(**fmt))
    print("\nceilings and references per pair:")
    print(table.groupby(["layer_a", "layer_b"])[
        ["ceiling_best_partner", "ceiling_one_to_one", "reference_correlation_best_partner",
         "reference_correlation_one_to_one"]].first().reset_index().to_string(**fmt))
    print("\nmean over pairs:")
    print(main_rows.groupby("method", sort=False)[["jaccard", "fraction_of_ceiling",
                                                   "distinct_targets"]].mean()
          .to_string(float_format=lambda v: f"{v:.3f}"))
    print()
    for sentence in link_verdicts(table):
        print(sentence)
    ablation = weight_ablation(table)
    if ablation:
        print(ablation["sentence"])
    print(f"(links, matches and evaluation in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
