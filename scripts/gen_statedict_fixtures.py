#!/usr/bin/env python3
"""Generate the mergekit-pytorch parity fixtures: merges of plain safetensors state dicts (no
config.json, tensor names of no Hugging Face architecture) whose tensor sets differ.

Peers: mergekit 0.1.5 (`mergekit-pytorch`), torch 2.15, safetensors 0.8 (install with
`python3 -m venv /tmp/peers && /tmp/peers/bin/pip install mergekit`).
Seeds: torch.Generator().manual_seed(20261204) for the weights; every merge here is deterministic.

Run from the repository root:

    /tmp/peers/bin/python scripts/gen_statedict_fixtures.py

It writes four UNet-like state dicts (4-D convolutions, 2-D projections, 1-D biases and norms)
under crates/amalgam-cli/tests/fixtures/statedict/models/:

  base.safetensors   A B C D
  ft_a.safetensors   A B C D            (base + noise)
  ft_b.safetensors   A B   D E          (lacks C; E only here)
  ft_c.safetensors   A B   D            (lacks C)

and one config per case under configs/, whose first line `# flags: ...` gives the flag both
tools run with (`--tensor-union` / `--tensor-intersection`, mergekit-pytorch's `-u` / `-i`), and
mergekit-pytorch's output under expected/<case>/.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "crates/amalgam-cli/tests/fixtures/statedict"
MERGEKIT = Path(sys.executable).parent / "mergekit-pytorch"
GEN = torch.Generator().manual_seed(20261204)

SHAPES = {
    "A": ("down_blocks.0.resnets.0.conv1.weight", (8, 4, 3, 3)),
    "B": ("down_blocks.0.resnets.0.conv1.bias", (8,)),
    "C": ("mid_block.attentions.0.to_q.weight", (8, 8)),
    "D": ("conv_norm_out.weight", (8,)),
    "E": ("time_embedding.linear_1.weight", (16, 8)),
}


def randn(shape, scale=1.0):
    return torch.randn(shape, generator=GEN, dtype=torch.float32) * scale


def write(name, keys, base=None):
    tensors = {}
    for k in keys:
        tname, shape = SHAPES[k]
        if base is not None and tname in base:
            tensors[tname] = base[tname] + randn(shape, 0.05)
        else:
            tensors[tname] = randn(shape)
    save_file(tensors, str(ROOT / "models" / f"{name}.safetensors"))
    return tensors


CASES = {
    "linear_union": ("--tensor-union", """merge_method: linear
models:
  - model: models/ft_a.safetensors
    parameters: {weight: 0.7}
  - model: models/ft_b.safetensors
    parameters: {weight: 0.3}
"""),
    "linear_intersection": ("--tensor-intersection", """merge_method: linear
models:
  - model: models/ft_a.safetensors
    parameters: {weight: 0.7}
  - model: models/ft_b.safetensors
    parameters: {weight: 0.3}
"""),
    "ties_union": ("--tensor-union", """merge_method: ties
base_model: models/base.safetensors
models:
  - model: models/ft_a.safetensors
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft_c.safetensors
    parameters: {weight: 0.6, density: 0.7}
"""),
    "task_arithmetic_intersection": ("--tensor-intersection", """merge_method: task_arithmetic
base_model: models/base.safetensors
models:
  - model: models/ft_a.safetensors
    parameters: {weight: 0.5}
  - model: models/ft_b.safetensors
    parameters: {weight: 0.8}
"""),
}


def main():
    if ROOT.exists():
        shutil.rmtree(ROOT)
    for d in ("models", "configs", "expected"):
        (ROOT / d).mkdir(parents=True)
    base = write("base", "ABCD")
    write("ft_a", "ABCD", base)
    write("ft_b", "ABDE", base)
    write("ft_c", "ABD", base)
    for case, (flag, yaml) in CASES.items():
        cfg = ROOT / "configs" / f"{case}.yml"
        cfg.write_text(f"# flags: {flag}\n{yaml}")
        out = ROOT / "expected" / case
        short = {"--tensor-union": "-u", "--tensor-intersection": "-i"}[flag]
        subprocess.run(
            [str(MERGEKIT), str(cfg.relative_to(ROOT)), str(out.relative_to(ROOT)), short,
             "--quiet"],
            cwd=ROOT, check=True,
        )
        for f in out.iterdir():
            if f.name != "model.safetensors":
                f.unlink()
        print(case, sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
