#!/usr/bin/env python3
"""Generate the LoRA parity fixtures: PEFT adapters on the small Llama fixture model and the
weights PEFT's `merge_and_unload` makes of them.

Peers: peft 0.21.2, transformers 5.23, torch 2.15 (`python3 -m venv /tmp/peers &&
/tmp/peers/bin/pip install mergekit peft`). Seed: torch.manual_seed(20261123) before each adapter.

Run from the repository root (after gen_merge_fixtures.py, whose llama_base it reads):

    /tmp/peers/bin/python scripts/gen_lora_fixtures.py

It writes under crates/amalgam-cli/tests/fixtures/lora/: `adapters/<case>/` (PEFT's
adapter_config.json and adapter_model.safetensors) and `expected/<case>/` (the base with the
adapter merged by PEFT, in float32). `tests/lora_cli.rs` compares `amalgam lora apply`.

Extraction (mergekit 0.1.5's `mergekit-extract-lora`, run offline): for each case in EXTRACT,
`extract/<case>/errors.json` holds the relative reconstruction error ‖Δ − B·A‖_F / ‖Δ‖_F of
every factored module of mergekit's adapter (Δ = fine-tune − base in float32) and overall;
`tests/lora_cli.rs` checks amalgam's extraction against it. Two of mergekit's adapters are kept
(`adapters/mergekit_<case>/`) with PEFT's merge of them (`expected/mergekit_<case>/`), so that
reading mergekit's output (modules_to_save, lora_B.bias) is checked too.

Composition: three PEFT adapters `adapters/m1..m3` (different ranks, scalings and targets, one
with rsLoRA, embeddings in two) and, per case in MERGE, PEFT's `add_weighted_adapter` result
`merged/<case>/` with the matching amalgam config `merged/<case>.yml` (paths relative to the
lora fixture directory). `tests/lora_merge.rs` compares the ΔW = s·B·A of every module.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parent.parent / "crates/amalgam-cli/tests/fixtures"
BASE = FIXTURES / "merge/models/llama_base"
ROOT = FIXTURES / "lora"

CASES = {
    # The common case: attention projections, alpha/r scaling.
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    # Everything linear plus the embeddings, rsLoRA scaling, per-module rank and alpha.
    "all_rslora_patterns": dict(
        r=4, lora_alpha=6, use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                        "down_proj", "embed_tokens"],
        rank_pattern={"layers.1.mlp.down_proj": 2, "o_proj": 3},
        alpha_pattern={"layers.0.self_attn.q_proj": 16},
    ),
}


# case: (base, fine-tune, extra mergekit-extract-lora arguments, keep the adapter)
EXTRACT = {
    "llama_r4": ("llama_base", "llama_ft1", ["--max-rank", "4"], True),
    "llama_embed_r3": ("llama_base", "llama_ft3", ["--max-rank", "3", "--embed-lora"], False),
    "llama_bf16_r4": ("llama_bf16_base", "llama_bf16_ft1", ["--max-rank", "4"], False),
    "qwen2_r4": ("qwen2_base", "qwen2_ft1", ["--max-rank", "4"], True),
}


def load(path):
    from safetensors.torch import load_file

    return {k: v.double() for f in sorted(path.glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def merge_with_peft(base, adapter, out):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # PEFT unties a tied head it merged a saved lm_head into: keep its config.
    config = json.loads((base / "config.json").read_text())
    config["tie_word_embeddings"] = merged.config.tie_word_embeddings
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def extract_cases():
    from safetensors.torch import load_file

    models = FIXTURES / "merge/models"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    exe = Path(sys.executable).parent / "mergekit-extract-lora"
    for case, (base, ft, args, keep) in EXTRACT.items():
        tmp = ROOT / "tmp" / case
        cmd = [str(exe), "--model", str(models / ft), "--base-model", str(models / base),
               "--out-path", str(tmp), *args]
        # mergekit writes the adapter, then fails fetching a model card offline; the tensors
        # and config are complete by then.
        subprocess.run(cmd, env=env, capture_output=True)
        factors = load_file(str(tmp / "adapter_model.safetensors"))
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        b, f = load(models / base), load(models / ft)
        errors, num, den = {}, 0.0, 0.0
        for name, a in factors.items():
            for kind, emb in ((".lora_A.weight", False), (".lora_embedding_A", True)):
                if not name.endswith(kind):
                    continue
                module = name.removeprefix("base_model.model.").removesuffix(kind)
                bb = factors[name.replace("_A", "_B")].double()
                delta = (f[module + ".weight"] - b[module + ".weight"]).double()
                if emb:
                    delta = delta.T
                assert cfg["r"] == cfg["lora_alpha"] and not cfg["rank_pattern"]
                resid = (delta - bb @ a.double()).norm().item()
                norm = delta.norm().item()
                errors[module] = resid / norm
                num, den = num + resid**2, den + norm**2
        out = ROOT / "extract" / case
        out.mkdir(parents=True)
        (out / "errors.json").write_text(json.dumps(
            {"args": args, "base": base, "model": ft, "modules": errors,
             "overall": (num / den) ** 0.5}, indent=1) + "\n")
        if keep:
            adapter = ROOT / "adapters" / f"mergekit_{case}"
            adapter.mkdir(parents=True)
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy(tmp / file, adapter / file)
            merge_with_peft(models / base, adapter, ROOT / "expected" / f"mergekit_{case}")
        print(case, len(errors), "modules, overall", (num / den) ** 0.5)
    shutil.rmtree(ROOT / "tmp")


SOURCES = {
    "m1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "m2": dict(r=4, lora_alpha=4, use_rslora=True,
               target_modules=["q_proj", "k_proj", "v_proj", "embed_tokens"]),
    "m3": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "down_proj"]),
}

# case: (adapters, weights, add_weighted_adapter keyword arguments)
MERGE = {
    "cat": (["m1", "m2", "m3"], [0.7, 0.5, -0.3], dict(combination_type="cat")),
    "svd": (["m1", "m2", "m3"], [0.7, 0.5, -0.3], dict(combination_type="svd")),
    # Truncation below the combined rank. (svd_clamp is not compared: its quantile is taken
    # over signed factor entries, so it depends on the signs the SVD backend gives each
    # singular pair, an arbitrary choice that LAPACK and faer make differently.)
    "svd_rank": (["m1", "m3"], [1.0, 0.6], dict(combination_type="svd", svd_rank=3)),
    "linear": (["m1", "m2"], [0.7, 0.5], dict(combination_type="linear")),
    "ties": (["m1", "m2"], [0.7, -0.5], dict(combination_type="ties", density=0.5)),
    "magnitude_prune": (["m1", "m2"], [1.0, 0.5],
                        dict(combination_type="magnitude_prune", density=0.6)),
    "ties_svd": (["m1", "m2", "m3"], [0.7, 0.5, 0.4],
                 dict(combination_type="ties_svd", density=0.5, majority_sign_method="frequency")),
    "magnitude_prune_svd": (["m1", "m3"], [1.0, 1.0],
                            dict(combination_type="magnitude_prune_svd", density=0.5)),
}


def merge_cases():
    from peft import PeftModel

    for i, (name, kwargs) in enumerate(SOURCES.items()):
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs)).save_pretrained(
            ROOT / "adapters" / name)
    for case, (names, weights, kwargs) in MERGE.items():
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(model, ROOT / "adapters" / names[0],
                                               adapter_name=names[0])
        for n in names[1:]:
            peft_model.load_adapter(ROOT / "adapters" / n, adapter_name=n)
        peft_model.add_weighted_adapter(names, weights, "merged", **kwargs)
        tmp = ROOT / "tmp" / case
        peft_model.save_pretrained(tmp, selected_adapters=["merged"])
        found = next(p.parent for p in tmp.rglob("adapter_config.json"))
        out = ROOT / "merged" / case
        shutil.copytree(found, out)
        lines = [f"base_model: ../merge/models/llama_base"]
        lines += [f"{k}: {v}" for k, v in kwargs.items()]
        lines.append("adapters:")
        lines += [f"  - {{adapter: adapters/{n}, weight: {w}}}" for n, w in zip(names, weights)]
        (ROOT / "merged" / f"{case}.yml").write_text("\n".join(lines) + "\n")
        print(case, "rank", json.loads((out / "adapter_config.json").read_text())["r"])
    shutil.rmtree(ROOT / "tmp")


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    for case, kwargs in CASES.items():
        torch.manual_seed(20261123)
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        # Random A and B (PEFT's default B = 0 would make every delta zero).
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **kwargs))
        adapter = ROOT / "adapters" / case
        peft_model.save_pretrained(adapter)
        merged = peft_model.merge_and_unload()
        out = ROOT / "expected" / case
        out.mkdir(parents=True)
        state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(BASE / "config.json", out / "config.json")
        print(case, sorted(p.name for p in adapter.iterdir()))
    extract_cases()
    merge_cases()


if __name__ == "__main__":
    main()
