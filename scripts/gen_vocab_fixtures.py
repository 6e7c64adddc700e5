#!/usr/bin/env python3
"""Generate the mergekit vocabulary-alignment parity fixtures (tokenizer_source / tokenizer:).

Peers: mergekit 0.1.5, transformers 5.24, tokenizers 0.23, torch 2.15, safetensors 0.8 (install with
`python3 -m venv /tmp/peers && /tmp/peers/bin/pip install mergekit`).
Seeds: numpy default_rng(20261201) for the weights and for ft_small's id order; every merge here is
deterministic once mergekit's two unspecified iteration orders are pinned (see LAUNCHER).

Run from the repository root:

    /tmp/peers/bin/python scripts/gen_vocab_fixtures.py

It writes four tiny Llama models (hidden 16, 2 layers, untied lm_head, f32), each with its own
hand-built BPE tokenizer (llama-2 style: normalizer Prepend("▁") + Replace(" ", "▁"), no
pre-tokenizer, `<s>` prepended by the post-processor), under
crates/amalgam-cli/tests/fixtures/vocab/models/:

  base        45 tokens: <unk> <s> </s>, 16 characters, 26 merges
  ft_special  base + "<|im_start|>", "<|im_end|>" as added special tokens (ids 45, 46); eos = <|im_end|>
  ft_extra    base + 5 regular BPE tokens in the vocab proper ("ld", "▁world", "ge", "▁mer", "▁merge")
  ft_small    40 tokens: base minus "y", "ay", "▁say", "▁hello", "▁and", ids 3.. shuffled

Fine-tunes are base + N(0, 0.02) noise on the rows (and layers) they share with base. One mergekit
config per case goes to configs/, mergekit's output to expected/<case>/ (weights, config and
tokenizer files only; transformers 5 writes no special_tokens_map.json), and
expected/<case>/tokenize.json holds the ids transformers' AutoTokenizer, loaded from that output,
gives for TEST_STRING with and without special tokens, plus the output vocabulary in id order.

Order: mergekit 0.1.5 walks models in Python-set order and each model's vocabulary in Rust-HashMap
order, so the ids it gives tokens appended by a union change from run to run. mergekit-yaml is run
through LAUNCHER, which fixes both to the canonical order ([base_model] + models in YAML order;
vocabulary in id order) and changes nothing else.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

ROOT = Path(__file__).resolve().parent.parent / "crates/amalgam-cli/tests/fixtures/vocab"
PY = Path(sys.executable)
RNG = np.random.default_rng(20261201)

H, I, LAYERS = 16, 32, 2

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = list("▁adeghilmnorstwy")
BASE_MERGES = [
    ("h", "e"), ("l", "l"), ("▁", "t"), ("▁t", "he"), ("he", "ll"), ("hell", "o"), ("▁", "hello"),
    ("o", "r"), ("▁", "w"), ("▁w", "or"), ("i", "s"), ("▁", "is"), ("e", "r"), ("▁", "m"),
    ("a", "n"), ("▁", "an"), ("▁an", "d"), ("▁", "s"), ("a", "y"), ("▁s", "ay"), ("▁", "a"),
    ("i", "n"), ("▁", "in"), ("o", "n"), ("▁", "on"), ("e", "d"),
]
EXTRA_MERGES = [("l", "d"), ("▁wor", "ld"), ("g", "e"), ("▁m", "er"), ("▁mer", "ge")]
SMALL_DROP = {"y", "ay", "▁say", "▁hello", "▁and"}
CHAT = ["<|im_start|>", "<|im_end|>"]

TEST_STRING = "<s>hello world, the merge is on<|im_start|>say hold and<|im_end|> yes</s>"


def vocab_of(merges, drop=()):
    toks = SPECIALS + CHARS + ["".join(m) for m in merges]
    return [t for t in toks if t not in drop]


def write_tokenizer(out, vocab, merges, added_special=(), eos="</s>"):
    """A BPE tokenizer.json plus tokenizer_config.json and special_tokens_map.json."""
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = SPECIALS + list(added_special)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    (out / "tokenizer.json").write_text(json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n")
    decoder = {
        str(tok.token_to_id(s)): {
            "content": s, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for s in specials
    }
    special_map = {"bos_token": "<s>", "eos_token": eos, "unk_token": "<unk>"}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 64,
        **special_map,
    }
    if added_special:
        cfg["extra_special_tokens"] = list(added_special)
        special_map["additional_special_tokens"] = list(added_special)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def layer_shapes():
    t = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (H,)
        t[p + "post_attention_layernorm.weight"] = (H,)
        for n in "qkvo":
            t[p + f"self_attn.{n}_proj.weight"] = (H, H)
        t[p + "mlp.gate_proj.weight"] = (I, H)
        t[p + "mlp.up_proj.weight"] = (I, H)
        t[p + "mlp.down_proj.weight"] = (H, I)
    t["model.norm.weight"] = (H,)
    return t


def write_model(name, tokens, base=None, base_ids=None, scale=0.02, **tok_kw):
    """Save a model whose vocabulary is `tokens` (in id order).

    With `base`, every tensor is base + noise; a token's embedding/lm_head row is base's row for
    the same token (looked up through `base_ids`) + noise, and tokens base lacks get fresh rows.
    """
    out = ROOT / "models" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    noise = lambda shape: RNG.standard_normal(shape).astype(np.float32)
    tensors = {}
    for k in ["model.embed_tokens.weight"] + list(layer_shapes()) + ["lm_head.weight"]:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = []
            for tok in tokens:
                if base is not None and tok in base_ids:
                    rows.append(base[k][base_ids[tok]] + noise((H,)) * scale)
                else:
                    rows.append(noise((H,)) * 0.5)
            x = np.stack(rows)
        else:
            shape = layer_shapes()[k]
            x = base[k] + noise(shape) * scale if base is not None else noise(shape) * 0.5
            if k.endswith("norm.weight") and base is None:
                x = 1.0 + x * 0.2
        tensors[k] = np.ascontiguousarray(x, dtype=np.float32)
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": len(tokens),
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "bos_token_id": tokens.index("<s>"),
        "eos_token_id": tokens.index(tok_kw.get("eos", "</s>")),
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tensors


def make_models():
    base_tokens = vocab_of(BASE_MERGES)
    base_ids = {t: i for i, t in enumerate(base_tokens)}
    base = write_model("base", base_tokens)
    write_tokenizer(ROOT / "models/base", base_ids, BASE_MERGES)

    sp_tokens = base_tokens + CHAT
    write_model("ft_special", sp_tokens, base, base_ids, eos="<|im_end|>")
    write_tokenizer(ROOT / "models/ft_special", base_ids, BASE_MERGES, added_special=CHAT, eos="<|im_end|>")

    ex_tokens = vocab_of(BASE_MERGES + EXTRA_MERGES)
    write_model("ft_extra", ex_tokens, base, base_ids)
    write_tokenizer(ROOT / "models/ft_extra", {t: i for i, t in enumerate(ex_tokens)}, BASE_MERGES + EXTRA_MERGES)

    kept = vocab_of(BASE_MERGES, drop=SMALL_DROP)
    rest = kept[len(SPECIALS):]
    order = RNG.permutation(len(rest))
    sm_tokens = SPECIALS + [rest[j] for j in order]
    sm_merges = [m for m in BASE_MERGES if "".join(m) not in SMALL_DROP]
    write_model("ft_small", sm_tokens, base, base_ids)
    write_tokenizer(ROOT / "models/ft_small", {t: i for i, t in enumerate(sm_tokens)}, sm_merges)


# Each case: (YAML, canonical referenced-model order = [base_model] + models/sources in YAML order).
CASES = {
    # No base_model: mergekit's tokenizer base is referenced_models()[0] = ft_small, so the output
    # vocabulary starts with ft_small's ids; rows missing in some model are the mean of the others.
    "linear_union": """
merge_method: linear
models:
  - model: models/ft_small
    parameters: {weight: 0.4}
  - model: models/base
    parameters: {weight: 0.3}
  - model: models/ft_special
    parameters: {weight: 0.2}
  - model: models/ft_extra
    parameters: {weight: 0.1}
tokenizer_source: union
out_dtype: float32
""",
    "ties_union": """
merge_method: ties
base_model: models/base
models:
  - model: models/ft_special
    parameters: {weight: 1.0, density: 0.5}
  - model: models/ft_extra
    parameters: {weight: 0.7, density: 0.5}
  - model: models/ft_small
    parameters: {weight: 0.5, density: 0.6}
tokenizer_source: union
out_dtype: float32
""",
    "slerp_base": """
merge_method: slerp
base_model: models/base
slices:
  - sources:
      - model: models/base
        layer_range: [0, 2]
      - model: models/ft_small
        layer_range: [0, 2]
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - value: 0.6
tokenizer_source: base
out_dtype: float32
""",
    "linear_model_source": """
merge_method: linear
models:
  - model: models/base
    parameters: {weight: 0.5}
  - model: models/ft_special
    parameters: {weight: 0.3}
  - model: models/ft_small
    parameters: {weight: 0.2}
tokenizer_source: models/ft_special
out_dtype: float32
""",
    "linear_tokens": """
merge_method: linear
models:
  - model: models/base
    parameters: {weight: 0.4}
  - model: models/ft_special
    parameters: {weight: 0.3}
  - model: models/ft_extra
    parameters: {weight: 0.2}
  - model: models/ft_small
    parameters: {weight: 0.1}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "▁hello":
      source: models/ft_extra
    "<|im_start|>":
      source: {kind: model_token, model: models/base, token_id: 1}
    "<|im_end|>":
      source: {kind: model_token, model: models/base, token: "</s>"}
    "<|pad|>":
      source: {kind: zero}
    "▁the":
      source: models/ft_special
      force: true
out_dtype: float32
""",
    # base_model ft_small lacks y/ay/▁say/▁hello/▁and, which the three others have: the base's
    # aligned row for those is their mean, and that is what TIES subtracts. The 12 pad rows of
    # each input are copies of one row, so TIES's top-k (an unstable argsort) could keep some
    # copies and drop others; the densities are chosen so no copy group straddles the cut-off,
    # and main() checks that the output's pad rows are still identical.
    "ties_union_pad": """
merge_method: ties
base_model: models/ft_small
models:
  - model: models/base
    parameters: {weight: 0.6, density: 0.5}
  - model: models/ft_special
    parameters: {weight: 0.5, density: 0.5}
  - model: models/ft_extra
    parameters: {weight: 0.8, density: 0.66}
tokenizer:
  source: union
  pad_to_multiple_of: 16
out_dtype: float32
""",
}


# mergekit 0.1.5 leaves two orders unspecified, and both move token ids in the union vocabulary:
#  * MergeConfiguration.referenced_models() returns list(set(...)); ModelReference hashes mix str
#    hashes (PYTHONHASHSEED) and, in Python 3.11, hash(None) (an address, so ASLR). It decides the
#    tokenizer base when there is no base_model, and the order models are walked in a union.
#  * tokenizer.get_vocab() is the Rust tokenizer's HashMap in iteration order, which is random per
#    process; build_union_tokenizer appends each model's new tokens in that order.
# The launcher pins both to the obvious order ([base_model] + models/sources in YAML order, dedup;
# vocab in id order) without changing what mergekit computes, then runs the mergekit-yaml CLI.
LAUNCHER = """
import sys
import transformers.tokenization_utils_tokenizers as tut
from mergekit.config import MergeConfiguration

_get_vocab = tut.TokenizersBackend.get_vocab
tut.TokenizersBackend.get_vocab = lambda self: dict(
    sorted(_get_vocab(self).items(), key=lambda kv: kv[1]))

def referenced_models(self):
    seq = [self.base_model] if self.base_model else []
    seq += [m.model for m in self.models or []]
    seq += [src.model for s in self.slices or [] for src in s.sources]
    for m in (self.modules or {}).values():
        seq += [mi.model for mi in m.models or []]
        seq += [src.model for s in m.slices or [] for src in s.sources]
    return list(dict.fromkeys(seq))

MergeConfiguration.referenced_models = referenced_models
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
main()
"""


def tokenize_record(out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    rec = {"text": TEST_STRING, "vocab_size": len(tok.get_vocab())}
    for key, flag in (("with_special_tokens", True), ("without_special_tokens", False)):
        ids = tok(TEST_STRING, add_special_tokens=flag)["input_ids"]
        rec[key] = {"ids": ids, "tokens": tok.convert_ids_to_tokens(ids)}
    rec["vocab"] = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return rec


KEEP = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def main():
    make_models()
    (ROOT / "configs").mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ROOT / "expected", ignore_errors=True)
    (ROOT / "expected").mkdir()
    for name, yaml_text in CASES.items():
        cfg = ROOT / "configs" / f"{name}.yml"
        cfg.write_text(yaml_text.lstrip())
        out = ROOT / "expected" / name
        log = subprocess.run(
            [str(PY), "-c", LAUNCHER, str(cfg.relative_to(ROOT)), str(out.relative_to(ROOT)),
             "--no-write-model-card", "--allow-crimes", "--device", "cpu", "--quiet"],
            cwd=ROOT, capture_output=True, text=True,
        )
        if log.returncode != 0:
            sys.stderr.write(log.stdout + log.stderr)
            raise RuntimeError(f"{name}: mergekit exited with {log.returncode}")
        for f in out.iterdir():
            if f.name not in KEEP and not f.name.startswith("model"):
                f.unlink()
        if not (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists():
            raise RuntimeError(f"{name}: no weights written")
        rec = tokenize_record(out)
        if name == "ties_union_pad":
            w = load_file(str(out / "model.safetensors"))
            n = rec["vocab_size"]
            for k in ("model.embed_tokens.weight", "lm_head.weight"):
                if not all(torch.equal(w[k][n], w[k][i]) for i in range(n, w[k].shape[0])):
                    raise RuntimeError(f"{name}: pad rows of {k} differ (top-k tie); change densities")
        (out / "tokenize.json").write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
        print("ok", name)
        for line in log.stderr.splitlines():
            if "WARNING" in line or "ERROR" in line or "warn" in line.lower():
                print("   ", line)


if __name__ == "__main__":
    main()
