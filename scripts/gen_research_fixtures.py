#!/usr/bin/env python3
"""Generate the parity fixtures for amalgam's research merge methods (beyond mergekit).

References: FusionBench 0.2.33 (`fusion_bench.method.*`: Iso-C, Iso-CTS, TSV-M, TIES with
global trimming, TALL masks, EMR), torch 2.15. Install next to the mergekit peers with

    /tmp/peers/bin/pip install --no-deps fusion-bench==0.2.33
    /tmp/peers/bin/pip install omegaconf bidict hydra-core lightning_utilities lightning

(FusionBench's package imports these at module load; the functions used here need only torch).
Where FusionBench has no implementation (Consensus merging, PCB), the reference is noted at the
case: built from FusionBench's own primitives where they exist.

Inputs are the small float32 Llama-shaped models of the mergekit fixtures
(crates/amalgam-cli/tests/fixtures/merge/models, made by gen_merge_fixtures.py): hidden 16,
intermediate 32, vocabulary 64, 4 layers; their task vectors are full rank, so SVD results do
not depend on the backend's choice of null-space vectors. Every reference here is
deterministic.

Run from the repository root:

    /tmp/peers/bin/python scripts/gen_research_fixtures.py

It writes one amalgam config per case under crates/amalgam-cli/tests/fixtures/research/configs/
and the reference output under expected/<case>/. `tests/research_parity.rs` compares them.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fusion_bench.method.emr_merging.utils import emr_merge
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.tall_mask.utils import generate_task_masks
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)
from fusion_bench.method.ties_merging.ties_merging_utils import (
    state_dict_to_vector,
    ties_merging,
    vector_to_state_dict,
)

FIXTURES = Path(__file__).resolve().parent.parent / "crates/amalgam-cli/tests/fixtures"
MODELS = FIXTURES / "merge/models"
ROOT = FIXTURES / "research"
TASKS = ["llama_ft1", "llama_ft2", "llama_ft3"]


def load(name):
    tensors = {}
    for f in sorted((MODELS / name).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def task_vectors(weights=None, base_name="llama_base", tasks=TASKS):
    base = {k: v.float() for k, v in load(base_name).items()}
    tvs = []
    for i, name in enumerate(tasks):
        ft = {k: v.float() for k, v in load(name).items()}
        w = 1.0 if weights is None else weights[i]
        tvs.append({k: (ft[k] - base[k]) * w for k in base})
    return base, tvs


def config(method, parameters=None, weights=None, model_params=None, base_name="llama_base",
           tasks=TASKS, extra=""):
    lines = [f"merge_method: {method}", f"base_model: ../merge/models/{base_name}", "models:"]
    for i, name in enumerate(tasks):
        lines.append(f"  - model: ../merge/models/{name}")
        if weights is not None:
            lines.append(f"    parameters: {{weight: {weights[i]}}}")
        elif model_params is not None:
            lines.append(f"    parameters: {model_params}")
    if parameters:
        lines.append("parameters:")
        for k, v in parameters.items():
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return "\n".join(lines) + "\n" + extra


def write_case(case, text, base, merged_tv, lam):
    (ROOT / "configs").mkdir(parents=True, exist_ok=True)
    (ROOT / "configs" / f"{case}.yml").write_text(text)
    out = ROOT / "expected" / case
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = {k: (base[k] + lam * merged_tv[k]).contiguous() for k in base}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(MODELS / "llama_base" / "config.json", out / "config.json")
    print(case)


def ties_global(base, tvs, density, merge_func):
    """FusionBench's TIES: one flattened vector per task, global top-k, majority sign."""
    flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
    merged = ties_merging(flat, reset_thresh=density, merge_func=merge_func)
    return vector_to_state_dict(merged, base)


def consensus(base, tvs, merged, lambdas, k):
    """Consensus merging as tall_masks does it (its TALL masks are FusionBench's
    `generate_task_masks`; the count-and-threshold glue is tall_masks'
    `construct_consensus_mask`, restated): returns the masked multi-task vector."""
    flat_ptm = state_dict_to_vector(base)
    flat_tv = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
    flat_ft = flat_tv + flat_ptm
    flat_merged = state_dict_to_vector(merged)
    count = torch.zeros_like(flat_ptm)
    for t, lam in enumerate(lambdas):
        mask = generate_task_masks(flat_tv[t], flat_ft[t], flat_ptm, tv=flat_merged,
                                   tall_mask_lambda=lam)
        count += mask.float()
    return vector_to_state_dict(flat_merged * (count >= k), base)


def pcb_reference(tvs, weights, variant):
    """PCB-Merging restated from the authors' code (duguodong7/pcb-merging at 31fa2dc:
    vision_source_code/pcb.py for `vision`, pcb-merging.py for `nlp`), which is not packaged:
    sort-based clamps at the same indices, min-max normalisation, exp/tanh balancing, the
    (1 - ratio) drop, and the weighted average. Each task is one flattened row."""
    clamp_ratio, pcb_ratio = (0.01, 0.05) if variant == "vision" else (0.0001, 0.1)
    checks = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
    n, d = checks.shape

    def clamp(x, lo_ratio, hi_ratio):
        s, _ = torch.sort(x, dim=1)
        lo = s[:, int(d * lo_ratio)].unsqueeze(1)
        hi = s[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def normalize(x):
        lo = x.min(dim=1, keepdim=True).values
        hi = x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    mag = clamp(checks.abs(), clamp_ratio, clamp_ratio)
    clamped = torch.sign(checks) * mag
    intra = torch.exp(n * normalize(mag) ** 2)
    if variant == "vision":
        inter = torch.tanh(checks * torch.sum(torch.sign(checks) * normalize(mag), dim=0))
    else:
        inter = torch.tanh(checks * torch.sum(checks, dim=0))
    scale = normalize(clamp(intra * inter, 1 - pcb_ratio, 0))
    lams = torch.tensor(weights).unsqueeze(1)
    merged = torch.sum(clamped * lams * scale, dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)
    return vector_to_state_dict(merged, tvs[0])


def main():
    shutil.rmtree(ROOT, ignore_errors=True)

    base, tvs = task_vectors()
    write_case("iso_c", config("iso_c", {"lambda": 1.5}), base,
               iso_c(tvs, accelerator="cpu"), 1.5)
    write_case("iso_c_exclude_lm_head",
               config("iso_c", {"svd": "[{filter: lm_head, value: false}, {value: true}]"}),
               base, iso_c(tvs, accelerator="cpu", exclude_keys=["lm_head.weight"]), 1.0)
    write_case("iso_cts", config("iso_cts", {"lambda": 1.2}), base,
               iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"), 1.2)
    write_case("iso_cts_half", config("iso_cts", {"common_space_fraction": 0.5}), base,
               iso_cts(tvs, common_space_fraction=0.5, accelerator="cpu"), 1.0)
    write_case("tsv_m", config("tsv_m", {"lambda": 0.9}), base,
               compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"), 0.9)
    # A list of per-task alphas pre-scales each task vector (FusionBench's `alpha` list).
    weights = [0.5, 1.0, 1.5]
    wbase, wtvs = task_vectors(weights)
    write_case("tsv_m_weights", config("tsv_m", weights=weights), wbase,
               compute_and_sum_svd_mem_reduction(wtvs, accelerator="cpu"), 1.0)
    unified, _masks, _rescalers = emr_merge(tvs)
    write_case("emr", config("emr"), base, unified, 1.0)
    write_case("emr_lambda", config("emr", {"lambda": 0.7}), base, unified, 0.7)

    # TIES as in the paper: global trim scope, majority sign for zero sums, disjoint sum or
    # disjoint mean over the agreeing count (FusionBench `ties_merging`, `merge_func`).
    paper = {"trim_scope": "global", "sign_tie": "majority"}
    write_case("ties_global_sum",
               config("ties", dict(paper, normalize=False, **{"lambda": 0.3}),
                      model_params="{weight: 1.0, density: 0.2}"),
               base, ties_global(base, tvs, 0.2, "sum"), 0.3)
    write_case("ties_global_mean",
               config("ties", dict(paper, normalize=True, mean_divisor="count"),
                      model_params="{weight: 1.0, density: 0.5}"),
               base, ties_global(base, tvs, 0.5, "mean"), 1.0)
    # Consensus merging over task arithmetic (the plain sum) and over paper TIES (global
    # density 0.2, majority sign, disjoint sum), with per-task TALL-mask lambdas.
    lambdas = [0.4, 0.5, 0.6]
    ta = {k: sum(tv[k] for tv in tvs) for k in base}
    write_case("consensus_ta",
               config("consensus", {"k": 2, "lambda": 0.8}, model_params=None, extra="")
               .replace("  - model: ../merge/models/llama_ft1",
                        "  - model: ../merge/models/llama_ft1\n    parameters: {tall_mask_lambda: 0.4}")
               .replace("  - model: ../merge/models/llama_ft2",
                        "  - model: ../merge/models/llama_ft2\n    parameters: {tall_mask_lambda: 0.5}")
               .replace("  - model: ../merge/models/llama_ft3",
                        "  - model: ../merge/models/llama_ft3\n    parameters: {tall_mask_lambda: 0.6}"),
               base, consensus(base, tvs, ta, lambdas, 2), 0.8)
    ties = ties_global(base, tvs, 0.2, "sum")
    write_case("consensus_ties", config("consensus", {"base_merge": "ties", "k": 1}), base,
               consensus(base, tvs, ties, [0.6] * 3, 1), 1.0)

    # PCB, both variants of the authors' code, with their per-task lambda 1.2 (`weight`).
    write_case("pcb_vision", config("pcb"), base, pcb_reference(tvs, [1.2] * 3, "vision"), 1.0)
    write_case("pcb_nlp", config("pcb", {"variant": "nlp"}, weights=[1.0, 0.8, 1.3]), base,
               pcb_reference(tvs, [1.0, 0.8, 1.3], "nlp"), 1.0)

    # bf16 task vectors take few distinct values: exact zero sums and threshold ties occur, so
    # the majority sign and keep-all-ties rules are exercised. Computed in f32 (bf16 upcast).
    # With llama_bf16_ft2 as the base the global majority sign is −1, so the paper's rule
    # differs from mergekit's "+1 on ties" (47 elements at density 0.8).
    bname, btasks = "llama_bf16_ft2", ["llama_bf16_base", "llama_bf16_ft1"]
    bbase, btvs = task_vectors(base_name=bname, tasks=btasks)
    merged = ties_global(bbase, btvs, 0.8, "sum")
    flat = torch.vstack([state_dict_to_vector(tv) for tv in btvs])
    print("  bf16 elements (before trimming) where two nonzero deltas sum to zero:",
          int(((flat[0] + flat[1]) == 0).logical_and(flat[0] != 0).sum()))
    write_case("ties_global_bf16_majority",
               config("ties", dict(paper, normalize=False), base_name=bname,
                      tasks=btasks, model_params="{weight: 1.0, density: 0.8}",
                      extra="dtype: float32\n"),
               bbase, merged, 1.0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
