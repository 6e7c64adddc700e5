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
"""

import shutil
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


if __name__ == "__main__":
    main()
