#!/usr/bin/env python3
"""Generate the mergekit parity fixtures for amalgam's merge tests.

Peers: mergekit 0.1.5, torch 2.15, safetensors 0.8 (install with
`python3 -m venv /tmp/peers && /tmp/peers/bin/pip install mergekit peft`).
Seeds: numpy default_rng(20261123) for the models; every merge here is deterministic.

Run from the repository root:

    /tmp/peers/bin/python scripts/gen_merge_fixtures.py

It writes small random models (a few layers, hidden size 16) of several architectures under
crates/amalgam-cli/tests/fixtures/merge/models/, one mergekit config per case under configs/,
and mergekit's output for each case under expected/<case>/. The Rust test
`tests/merge_parity.rs` runs amalgam on the same configs and compares every tensor.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "crates/amalgam-cli/tests/fixtures/merge"
MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"
RNG = np.random.default_rng(20261123)

H, I, V = 16, 32, 64


def llama_like(model_type, arch, layers, tied=False, qkv_bias=False, fused=False, extra=None):
    """Tensors and config of a small decoder in HF naming."""
    t = {"model.embed_tokens.weight": (V, H)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (H,)
        t[p + "post_attention_layernorm.weight"] = (H,)
        if fused:
            t[p + "self_attn.qkv_proj.weight"] = (3 * H, H)
            t[p + "mlp.gate_up_proj.weight"] = (2 * I, H)
        else:
            for n in "qkv":
                t[p + f"self_attn.{n}_proj.weight"] = (H, H)
                if qkv_bias:
                    t[p + f"self_attn.{n}_proj.bias"] = (H,)
            t[p + "mlp.gate_proj.weight"] = (I, H)
            t[p + "mlp.up_proj.weight"] = (I, H)
        t[p + "self_attn.o_proj.weight"] = (H, H)
        t[p + "mlp.down_proj.weight"] = (H, I)
    t["model.norm.weight"] = (H,)
    if not tied:
        t["lm_head.weight"] = (V, H)
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": V,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    cfg.update(extra or {})
    return t, cfg


def write_model(name, shapes, cfg, base=None, scale=0.02, dtype=torch.float32, shards=1):
    """A model whose tensors are `base` plus noise (or fresh random tensors), saved in HF layout."""
    out = ROOT / "models" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = {}
    for k, shape in shapes.items():
        if base is None:
            x = RNG.standard_normal(shape).astype(np.float32) * 0.5
        else:
            x = base[k].float().numpy() + RNG.standard_normal(shape).astype(np.float32) * scale
        tensors[k] = torch.from_numpy(np.ascontiguousarray(x)).to(dtype)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = (len(names) + shards - 1) // shards
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2)
        )
    cfg = dict(cfg, torch_dtype=str(dtype).replace("torch.", ""))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return tensors


def make_models():
    shapes, cfg = llama_like("llama", "LlamaForCausalLM", 4)
    base = write_model("llama_base", shapes, cfg)
    write_model("llama_ft1", shapes, cfg, base=base)
    write_model("llama_ft2", shapes, cfg, base=base, shards=3)
    write_model("llama_ft3", shapes, cfg, base=base)
    # An unrelated model of the same shape for SLERP-style merges of two different models.
    write_model("llama_other", shapes, cfg)
    bbase = write_model("llama_bf16_base", shapes, cfg, dtype=torch.bfloat16)
    write_model("llama_bf16_ft1", shapes, cfg, base=bbase, dtype=torch.bfloat16, scale=0.05)
    write_model("llama_bf16_ft2", shapes, cfg, base=bbase, dtype=torch.bfloat16, scale=0.05)
    big = dict(shapes, **{"model.embed_tokens.weight": (V + 8, H), "lm_head.weight": (V + 8, H)})
    padded = {k: (torch.cat([v, torch.zeros(8, H)]) if v.shape[0] == V and v.dim() == 2 and "embed" in k or k == "lm_head.weight" else v)
              for k, v in base.items()}
    write_model("llama_ft_bigvocab", big, dict(cfg, vocab_size=V + 8), base=padded)
    shapes, cfg = llama_like("qwen2", "Qwen2ForCausalLM", 3, tied=True, qkv_bias=True)
    qbase = write_model("qwen2_base", shapes, cfg)
    write_model("qwen2_ft1", shapes, cfg, base=qbase)
    write_model("qwen2_ft2", shapes, cfg, base=qbase)
    shapes, cfg = llama_like("phi3", "Phi3ForCausalLM", 2, fused=True,
                             extra={"pad_token_id": 0, "original_max_position_embeddings": 64})
    pbase = write_model("phi3_base", shapes, cfg)
    write_model("phi3_ft1", shapes, cfg, base=pbase)
    write_model("phi3_ft2", shapes, cfg, base=pbase)


CASES = {
    "linear": """
merge_method: linear
models:
  - model: models/llama_ft1
    parameters: {weight: 0.6}
  - model: models/llama_ft2
    parameters: {weight: 0.3}
  - model: models/llama_ft3
    parameters: {weight: 0.1}
""",
    "linear_gradient_filter": """
merge_method: linear
models:
  - model: models/llama_ft1
    parameters:
      weight:
        - filter: self_attn
          value: [0.1, 0.9]
        - filter: mlp
          value: [1.0, 0.2, 0.5]
        - value: 0.5
  - model: models/llama_ft2
    parameters:
      weight: 0.5
parameters:
  normalize: false
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.7}
  - model: models/llama_ft2
    parameters: {weight: -0.3}
  - model: models/llama_ft3
    parameters: {weight: 0.5}
parameters:
  lambda: 0.8
""",
    "ties": """
merge_method: ties
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 1.0, density: 0.5}
  - model: models/llama_ft2
    parameters: {weight: 0.5, density: 0.3}
  - model: models/llama_ft3
    parameters: {weight: 0.8, density: 0.7}
""",
    "ties_gradient_unnormalized": """
merge_method: ties
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters:
      weight: 1.0
      density: [0.2, 0.9]
  - model: models/llama_ft2
    parameters:
      weight: [0.3, 1.0]
      density:
        - filter: mlp
          value: 0.4
        - value: 0.6
parameters:
  normalize: false
  lambda: 1.3
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.6, density: 0.6, gamma: 0.05}
  - model: models/llama_ft2
    parameters: {weight: 0.4, density: 0.5}
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.6, density: 0.7, gamma: 0.1}
  - model: models/llama_ft2
    parameters: {weight: 0.4, density: 0.5, gamma: 0.02}
  - model: models/llama_ft3
    parameters: {weight: 0.5, density: 0.5}
""",
    "slerp": """
merge_method: slerp
base_model: models/llama_base
slices:
  - sources:
      - model: models/llama_base
        layer_range: [0, 4]
      - model: models/llama_other
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""",
    "nuslerp_base": """
merge_method: nuslerp
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.7}
  - model: models/llama_ft2
    parameters: {weight: 0.3}
""",
    "nuslerp_rowwise": """
merge_method: nuslerp
models:
  - model: models/llama_base
    parameters: {weight: 0.4}
  - model: models/llama_other
    parameters: {weight: 0.6}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
""",
    "nuslerp_columns": """
merge_method: nuslerp
models:
  - model: models/llama_base
    parameters: {weight: 0.4}
  - model: models/llama_other
    parameters: {weight: 0.6}
parameters:
  nuslerp_flatten: false
""",
    "multislerp": """
merge_method: multislerp
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.5}
  - model: models/llama_ft2
    parameters: {weight: 0.3}
  - model: models/llama_ft3
    parameters: {weight: 0.2}
""",
    # float64: mergekit's Karcher iteration in f32 takes arccos of dot products near 1, where
    # f32 rounding moves the angle by ~1e-5 relative; amalgam iterates in f64. Comparing against
    # mergekit run in f64 checks the method rather than f32 noise.
    "karcher": """
merge_method: karcher
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
  - model: models/llama_other
dtype: float64
""",
    "model_stock": """
merge_method: model_stock
base_model: models/llama_base
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
  - model: models/llama_ft3
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: models/llama_base
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
parameters:
  filter_wise: true
""",
    "sce": """
merge_method: sce
base_model: models/llama_base
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
  - model: models/llama_ft3
parameters:
  select_topk: 0.5
""",
    "ram": """
merge_method: ram
base_model: models/llama_base
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
parameters:
  epsilon: 0.01
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: models/llama_base
models:
  - model: models/llama_ft1
  - model: models/llama_ft2
  - model: models/llama_ft3
parameters:
  epsilon: 0.015
  r: 0.5
  alpha: 0.3
""",
    "nearswap": """
merge_method: nearswap
base_model: models/llama_base
models:
  - model: models/llama_ft1
parameters:
  t: 0.01
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: models/llama_base
models:
  - model: models/llama_ft1
""",
    "passthrough_stack": """
merge_method: passthrough
slices:
  - sources:
      - model: models/llama_ft1
        layer_range: [0, 3]
  - sources:
      - model: models/llama_ft2
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
""",
    "slices_linear": """
merge_method: linear
slices:
  - sources:
      - model: models/llama_ft1
        layer_range: [0, 2]
        parameters: {weight: 0.25}
      - model: models/llama_ft2
        layer_range: [2, 4]
        parameters: {weight: 0.75}
  - sources:
      - model: models/llama_ft3
        layer_range: [1, 4]
      - model: models/llama_ft1
        layer_range: [1, 4]
    parameters:
      weight: [1.0, 3.0]
""",
    "dare_ties_density_one": """
merge_method: dare_ties
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.5}
  - model: models/llama_ft2
    parameters: {weight: 0.5}
""",
    "qwen2_tied_ties": """
merge_method: ties
base_model: models/qwen2_base
models:
  - model: models/qwen2_ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: models/qwen2_ft2
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
""",
    "phi3_task_arithmetic": """
merge_method: task_arithmetic
base_model: models/phi3_base
models:
  - model: models/phi3_ft1
    parameters: {weight: 0.5}
  - model: models/phi3_ft2
    parameters: {weight: 0.5}
out_dtype: bfloat16
""",
    "truncate_embeddings": """# flags: --unsafe-truncate-embeddings
merge_method: task_arithmetic
base_model: models/llama_base
models:
  - model: models/llama_ft1
    parameters: {weight: 0.5}
  - model: models/llama_ft_bigvocab
    parameters: {weight: 0.5}
""",
    "bf16_task_arithmetic_float32": """
merge_method: task_arithmetic
base_model: models/llama_bf16_base
models:
  - model: models/llama_bf16_ft1
    parameters: {weight: 0.6}
  - model: models/llama_bf16_ft2
    parameters: {weight: 0.4}
dtype: float32
""",
    # bf16 task vectors have many equal magnitudes, so the top-k boundary often falls inside a
    # run of ties; which of them torch's (unstable) argsort keeps is unspecified. The test
    # checks that amalgam differs from mergekit only at such ties.
    "bf16_ties_float32": """
merge_method: ties
base_model: models/llama_bf16_base
models:
  - model: models/llama_bf16_ft1
    parameters: {weight: 0.6, density: 0.5}
  - model: models/llama_bf16_ft2
    parameters: {weight: 0.4, density: 0.5}
dtype: float32
""",
}


def main():
    make_models()
    (ROOT / "configs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ROOT / "expected", ignore_errors=True)
    for name, yaml in CASES.items():
        cfg = ROOT / "configs" / f"{name}.yml"
        cfg.write_text(yaml.lstrip())
        out = ROOT / "expected" / name
        first = yaml.lstrip().splitlines()[0]
        flags = first[len("# flags:"):].split() if first.startswith("# flags:") else []
        subprocess.run(
            [str(MERGEKIT), str(cfg.relative_to(ROOT)), str(out.relative_to(ROOT)),
             "--quiet", "--no-copy-tokenizer", "--no-write-model-card", *flags],
            cwd=ROOT, check=True,
        )
        # Only the weights and config are compared; drop what mergekit adds besides.
        for f in out.iterdir():
            if f.name not in ("config.json",) and not f.name.startswith("model"):
                f.unlink()
        print("ok", name)


if __name__ == "__main__":
    main()
