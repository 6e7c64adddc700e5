#!/usr/bin/env python3
"""Check that transformers loads both of `amalgam moe`'s layouts and computes the same logits.

Peers: transformers 5.24, torch 2.15 (/tmp/peers). Run from the repository root after
`cargo build --release -p amalgam-cli`:

    /tmp/peers/bin/python scripts/check_moe_layouts.py

For each parity fixture config (Mixtral and Qwen3-MoE fuse their experts in the v5 layout;
Qwen2-MoE is unfused in both), it builds the MoE with `--layout v5` and `--layout legacy`, loads
both with AutoModelForCausalLM and prints the largest logit difference on fixed ids. Result
(2026-12-02): 0.0 for all three.
"""

import os
import subprocess
import sys
import tempfile

import torch
import transformers

BIN = os.environ.get("AMALGAM_BIN", "target/release/amalgam")
FIXTURES = "crates/amalgam-cli/tests/fixtures/moe"


def main():
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for case in ["mixtral_cheap", "qwen2moe_cheap", "qwen3moe_cheap"]:
            logits = []
            for layout in ["v5", "legacy"]:
                out = os.path.join(tmp, f"{case}-{layout}")
                subprocess.run([BIN, "moe", os.path.join(FIXTURES, case + ".yml"), out,
                                "--layout", layout, "-q"], check=True)
                model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
                with torch.no_grad():
                    logits.append(model.eval()(input_ids=ids).logits)
            d = (logits[0] - logits[1]).abs().max().item()
            worst = max(worst, d)
            print(f"{case}: transformers {transformers.__version__} loads v5 and legacy; "
                  f"max |logit difference| {d}")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main()
