#!/usr/bin/env python3
"""Generate the `amalgam moe` parity fixtures: tiny random decoders and what mergekit-moe makes
of them.

Peers: mergekit 0.1.5, transformers 5.24, torch 2.15, tokenizers 0.23
(`/tmp/peers/bin/pip install mergekit`). Seed: torch.manual_seed(20261202) before each set.
Run from the repository root:

    /tmp/peers/bin/python scripts/gen_moe_fixtures.py

It writes under crates/amalgam-cli/tests/fixtures/moe/:

- `llama/{base,e0,e1,e2}`: a 2-layer Llama (hidden 32, intermediate 48, bf16, linear RoPE
  scaling ×2, untied head) with a byte-level BPE tokenizer whose BOS is `<s>`; the experts are the
  base with every tensor perturbed (so a test sees which model each output tensor came from).
- `qwen3/{base,e0,e1}`: the same for Qwen3 (q/k norms, tied embeddings, f32).
- `qwen2/{base,e0,e1}`: the same for Qwen2 (q/k/v biases, tied embeddings, bf16).
- `CASE.yml` and `CASE.out/`: mergekit-moe configs and mergekit-moe's output for them
  (`config.json`, `model.safetensors`): cheap_embed gates, whose every tensor amalgam must
  reproduce exactly. `--i-understand-this-is-not-useful-without-training` is never needed.
  `CASE.out/expected.safetensors`: transformers' logits (f32) of that MoE model for fixed ids
  `ids` [2, 12], which `amalgam eval`'s own MoE forward must match; the tokenizer is the base's.
- `CASE.gates.safetensors` for the `hidden*` modes: mergekit's router weights (`bf16.L`, computed
  as mergekit computes them, with the base loaded in bfloat16) and the same computation with the
  base loaded in float32 (`f32.L`); amalgam's forward runs in f32, so the test holds it to the
  f32 result tightly and reports its distance to mergekit's bf16 one.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("gen_eval_fixtures", os.path.join(HERE, "gen_eval_fixtures.py"))
gen_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen_eval)

ROOT = os.path.join("crates", "amalgam-cli", "tests", "fixtures", "moe")
SEED = 20261202
PEERS = os.path.dirname(sys.executable)

PROMPTS = {
    "e0": (["the quick brown fox", "a dog jumps over the lazy one"], ["model merging"]),
    "e1": (["sparse masks keep the largest entries", "task vectors into one model"], None),
    "e2": (["numbers 12345 and punctuation!?", "évaluation rapide"], None),
    "base": (["language models predict the next token"], None),
}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_tokenizer(folder):
    tok = gen_eval.bpe_tokenizer(bos=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    write_json(os.path.join(folder, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "model_max_length": 128})
    return tok


def make_set(name, cls_name, cfg_kwargs, dtype, experts):
    import transformers
    torch.manual_seed(SEED)
    config_cls = getattr(transformers, cls_name + "Config")
    model_cls = getattr(transformers, cls_name + "ForCausalLM")
    tok = gen_eval.bpe_tokenizer(bos=True)
    cfg = config_cls(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     max_position_embeddings=128, bos_token_id=0, eos_token_id=1, **cfg_kwargs)
    base = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    for tag in ["base"] + experts:
        folder = os.path.join(ROOT, name, tag)
        os.makedirs(folder)
        model = model_cls(cfg).eval()
        model.load_state_dict(base.state_dict())
        if tag != "base":
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.02)
        model.to(dtype).save_pretrained(folder, safe_serialization=True)
        write_tokenizer(folder)


def expert_yaml(name, tag):
    pos, neg = PROMPTS[tag]
    e = {"source_model": os.path.join(ROOT, name, tag), "positive_prompts": pos}
    if neg:
        e["negative_prompts"] = neg
    if tag == "e1":
        # Scales down_proj: tests that amalgam rounds the product as torch does.
        e["residual_scale"] = 0.3
    return e


def write_config(case, name, experts, gate_mode, shared=None, architecture=None, extra=None):
    import yaml
    cfg = {"base_model": os.path.join(ROOT, name, "base"), "gate_mode": gate_mode,
           "experts_per_token": 2, "experts": [expert_yaml(name, t) for t in experts]}
    if shared:
        cfg["shared_experts"] = [expert_yaml(name, shared)]
    if architecture:
        cfg["architecture"] = architecture
    cfg.update(extra or {})
    path = os.path.join(ROOT, case + ".yml")
    with open(path, "w") as f:
        f.write(f"# mergekit-moe 0.1.5 config; made by scripts/gen_moe_fixtures.py\n")
        yaml.safe_dump(cfg, f, sort_keys=False, allow_unicode=True)
    return path


def run_case(case, name, experts, gate_mode, shared=None, architecture=None):
    path = write_config(case, name, experts, gate_mode, shared, architecture)
    out = os.path.join(ROOT, case + ".out")
    subprocess.run([os.path.join(PEERS, "mergekit-moe"), path, out, "--device", "cpu",
                    "--no-copy-tokenizer"], check=True)
    return out


def gates(case, name, experts, mode, shared=None):
    """mergekit's get_gate_params with the base in bf16 (as it runs) and in f32."""
    import transformers
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe import router
    base = os.path.join(ROOT, name, "base")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    tags = experts + ([shared] if shared else [])
    es = [Expert(**expert_yaml(name, t)) for t in tags]
    out = {}
    real = torch.bfloat16
    for label, dt in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        # get_gate_params loads the model with torch_dtype=torch.bfloat16; for the f32 reference
        # the name is rebound for the duration of the call.
        orig = transformers.AutoModelForCausalLM.from_pretrained

        def load(*a, **kw):
            kw["torch_dtype"] = dt
            return orig(*a, **kw)

        transformers.AutoModelForCausalLM.from_pretrained = load
        try:
            g = router.get_gate_params(ModelReference.parse(base), tokenizer, es, mode=mode,
                                       device="cpu")
        finally:
            transformers.AutoModelForCausalLM.from_pretrained = orig
        for layer in range(g.shape[0]):
            out[f"{label}.{layer}"] = g[layer].float().contiguous()
    save_file(out, os.path.join(ROOT, case + ".gates.safetensors"))


def slim(out):
    """Keep what the tests read: config.json and the tensors (and the base's tokenizer, which
    evaluation opens)."""
    for f in os.listdir(out):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out, f))


def logits(out, vocab):
    """transformers loads the MoE and computes logits for fixed ids: what `amalgam eval`'s MoE
    forward must reproduce. Stored in `CASE.out/expected.safetensors`."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    with torch.no_grad():
        lg = model(input_ids=ids).logits
    save_file({"ids": ids.to(torch.int64), "logits": lg.contiguous()},
              os.path.join(out, "expected.safetensors"))


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    make_set("llama", "Llama", dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        tie_word_embeddings=False), torch.bfloat16, ["e0", "e1", "e2"])
    make_set("qwen3", "Qwen3", dict(head_dim=16, tie_word_embeddings=True), torch.float32,
             ["e0", "e1"])
    make_set("qwen2", "Qwen2", dict(tie_word_embeddings=True), torch.bfloat16, ["e0", "e1"])
    cases = [
        ("mixtral_cheap", "llama", ["e0", "e1"], "cheap_embed", None, None),
        # The shared expert is the base: mergekit 0.1.5 opens only the base and the routed
        # experts, so a shared expert that is neither fails there ('NoneType' has no get_tensor).
        ("qwen2moe_cheap", "llama", ["e0", "e1"], "cheap_embed", "base", "qwen"),
        ("qwen3moe_cheap", "qwen3", ["e0", "e1"], "cheap_embed", None, "qwen3"),
        # Qwen2 inputs: their q/k/v biases are copied (a Llama base gets zeros).
        ("qwen2_qwen2moe_cheap", "qwen2", ["e0", "e1"], "cheap_embed", "base", None),
    ]
    for case, name, experts, mode, shared, arch in cases:
        out = run_case(case, name, experts, mode, shared, arch)
        slim(out)
        logits(out, 300)
        write_tokenizer(out)
    for case, name, experts, mode, shared in [
        ("llama_hidden", "llama", ["e0", "e1"], "hidden", None),
        ("llama_hidden_avg", "llama", ["e0", "e1"], "hidden_avg", None),
        ("qwen3_hidden_last", "qwen3", ["e0", "e1"], "hidden_last", None),
        ("qwen2moe_hidden", "llama", ["e0", "e1"], "hidden", "base"),
    ]:
        write_config(case, name, experts, mode, shared, "qwen" if shared else None)
        gates(case, name, experts, mode, shared)


if __name__ == "__main__":
    main()
