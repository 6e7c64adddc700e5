#!/usr/bin/env python3
"""Generate the fixtures of the data-driven merges (issue #19): two fine-tunes of the tiny BERT
of `gen_eval_fixtures.py`, data for each, and float64 references for what `amalgam measure`
and the `regmean` and `fisher` merges compute.

Peers: torch 2.x, transformers 5.x, tokenizers, safetensors, fusion-bench 0.2.33 (its merge
functions are called where they import). Seed: torch.manual_seed(20261203). Run from the
repository root, after gen_eval_fixtures.py:

    /tmp/peers/bin/python scripts/gen_datadriven_fixtures.py

It writes under crates/amalgam-eval/tests/fixtures/datadriven/:

- `bert_a/`, `bert_b/`: `fixtures/bert` with Gaussian noise (σ 0.05) on every weight, each with
  its own random classification head (`head.safetensors`, 3 and 4 classes) and the same
  `tokenizer.json`; `data_a.jsonl`, `data_b.jsonl`: 10 labelled rows each. Everything is cut at
  16 tokens, as the tests measure.
- `gram_{a,b}.safetensors`: for every `nn.Linear` of the encoder, the mean of `xᵀx` over its
  inputs, as `{weight}:gram:masked` (token positions only, metadata `tokens_masked`) and
  `{weight}:gram:padded` (the whole file as one padded batch, every position counted: what
  FusionBench's RegMean hook computes).
- `regmean.safetensors`: FusionBench's `merging_with_regmean_weights` of bert_a and bert_b with
  the masked Grams, as `alpha_1.0/{tensor}` and `alpha_0.5/{tensor}` (its
  `reduce_non_diagonal_ratio`).
- `fisher_{a,b}.safetensors`: the diagonal Fisher of every parameter with the model's head:
  `{tensor}:fisher`, the exact one (per example alone, `Σ_c p_c (∇ log p_c)²`, the Fisher
  authors' `_compute_exact_fisher_for_batch`), and `{tensor}:fisher:batch`, FusionBench's
  (`Σ_rows Σ_c √p_c·log p_c` over the whole file as one padded batch, `p` detached, gradient
  squared); both divided by the rows.
- `fisher_llama.safetensors`, `fisher_qwen2.safetensors`: `{tensor}:fisher`, the empirical
  Fisher of `fixtures/llama` (separate output projection) and `fixtures/qwen2` (tied
  embeddings: one parameter for both ends) on the first 6 rows of their `lm.jsonl`: per row,
  the squared gradient of the row's summed next-token log-likelihood, divided by 6.
- `ada_task.safetensors`, `ada_layer.safetensors`: AdaMerging of bert_a and bert_b onto
  `fixtures/bert` (task vectors θₖ − θ₀, coefficients clamped to [0, 1] in the merge, initial
  0.3), each step every row of data_a (bert_a's head) and data_b (bert_b's head), loss the sum
  over tasks of FusionBench 0.2.33's `entropy_loss`, torch's Adam: `grad` (the coefficients'
  gradient at the start, `[2, 1]` task-wise, `grad/{tensor}` `[2]` layer-wise) and
  `lambda_lr{lr}` after 20 steps at lr 0.001 and 0.05.
- `fisher_merge.safetensors`: FusionBench's `merging_with_fisher_weights` of bert_a and bert_b
  with the exact Fishers above (equal scaling coefficients, minimal weight 1e-6), normalised
  (`{tensor}`) and not (`unnormalized/{tensor}`).
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

FIX = os.path.join("crates", "amalgam-eval", "tests", "fixtures")
OUT = os.path.join(FIX, "datadriven")
SEED = 20261203
MAX_LEN = 16

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "model merging combines task vectors into one model without training",
    "sparse masks keep the largest entries",
    "a merge is only as good as its accuracy on the tasks it combines and more words to cut",
    "language models predict the next token",
    "évaluation rapide",
    "Numbers 12345 and punctuation!?",
    "fresh or rotten",
    "the dog",
    "x",
    "why would a review be rotten",
    "one model keeps what each fine-tune learned",
]

try:
    from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    FB = True
except Exception as e:  # fusion-bench installed --no-deps may miss an import
    print(f"fusion_bench not importable ({e}): using the restatements below")
    FB = False


def regmean_restated(params, grams, ratio):
    """FusionBench 0.2.33 `merging_with_regmean_weights`, restated."""
    out = {}
    for name, values in params.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module in grams[0]:
            gs = []
            for g in grams:
                g = g[module]
                keep = torch.full_like(g, ratio)
                keep.fill_diagonal_(1.0)
                gs.append(g * keep)
            num = sum(g @ w.T for g, w in zip(gs, values))
            out[name] = (torch.inverse(sum(gs)) @ num).T
        else:
            out[name] = torch.stack(values).mean(0)
    return out


def fisher_restated(params, fishers, coeffs, normalize, minimal):
    """FusionBench 0.2.33 `merging_with_fisher_weights`, restated."""
    if normalize:
        norms = torch.stack([torch.sqrt(sum((f[n] ** 2).sum() for n in params)) for f in fishers])
        inv = 1.0 / (norms + minimal)
        coeffs = coeffs * inv / inv.sum()
    out = {}
    for name, values in params.items():
        num = sum(c * (f[name] + minimal) * v for c, f, v in zip(coeffs, fishers, values))
        den = sum(c * (f[name] + minimal) for c, f in zip(coeffs, fishers))
        out[name] = num / den
    return out


def tokenizer():
    tok = Tokenizer.from_file(os.path.join(FIX, "bert", "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    return tok


def make_models():
    from transformers import BertModel
    torch.manual_seed(SEED)
    tok = tokenizer()
    models, heads, data = {}, {}, {}
    for name, classes, texts in (("a", 3, TEXTS[:10]), ("b", 4, TEXTS[2:])):
        folder = os.path.join(OUT, f"bert_{name}")
        shutil.rmtree(folder, ignore_errors=True)
        model = BertModel.from_pretrained(os.path.join(FIX, "bert"), add_pooling_layer=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.save_pretrained(folder, safe_serialization=True)
        shutil.copy(os.path.join(FIX, "bert", "tokenizer.json"), folder)
        w = torch.randn(classes, 32) * 2
        b = torch.randn(classes)
        save_file({"weight": w.contiguous(), "bias": b.contiguous()},
                  os.path.join(folder, "head.safetensors"))
        labels = torch.randint(0, classes, (len(texts),)).tolist()
        with open(os.path.join(OUT, f"data_{name}.jsonl"), "w") as f:
            for t, l in zip(texts, labels):
                f.write(json.dumps({"text": t, "label": l}) + "\n")
        models[name] = BertModel.from_pretrained(folder, add_pooling_layer=False).double().eval()
        heads[name] = (w.double(), b.double())
        data[name] = [tok.encode(t) for t in texts]
    return models, heads, data


def padded(encs):
    width = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(encs), width, dtype=torch.long)
    types = torch.zeros(len(encs), width, dtype=torch.long)
    mask = torch.zeros(len(encs), width, dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        types[i, :n] = torch.tensor(e.type_ids)
        mask[i, :n] = 1
    return ids, types, mask


def linear_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def grams(model, encs):
    """Per linear module: (Σ over token positions of xᵀx, positions) and (Σ over every position
    of the padded batch, positions)."""
    ids, types, mask = padded(encs)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, inp[0]))
             for n, m in linear_modules(model).items()]
    with torch.no_grad():
        model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    for h in hooks:
        h.remove()
    flat = mask.reshape(-1).bool()
    out = {}
    for n, x in seen.items():
        x = x.reshape(-1, x.shape[-1])
        xm = x[flat]
        out[n] = (xm.T @ xm / xm.shape[0], x.T @ x / x.shape[0])
    return out, int(flat.sum())


def pooled_logp(model, head, ids, types, mask):
    hidden = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).double()
    pooled = (hidden * m).sum(1) / m.sum(1)
    w, b = head
    return torch.log_softmax(pooled @ w.T + b, dim=-1)


def sq_grads(model, scalar, acc, weight):
    model.zero_grad()
    scalar.backward(retain_graph=True)
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        acc[n] = acc.get(n, torch.zeros_like(p)) + weight * g.detach() ** 2


def fisher_exact(model, head, encs):
    acc = {}
    for e in encs:
        ids, types, mask = padded([e])
        logp = pooled_logp(model, head, ids, types, mask)[0]
        p = logp.exp().detach()
        for c in range(logp.shape[0]):
            sq_grads(model, logp[c], acc, float(p[c]))
    return {n: v / len(encs) for n, v in acc.items()}


def fisher_batch(model, head, encs):
    acc = {}
    logp = pooled_logp(model, head, *padded(encs))
    s = (logp.exp().detach().sqrt() * logp).sum()
    sq_grads(model, s, acc, 1.0)
    return {n: v / len(encs) for n, v in acc.items()}


def fisher_lm(name):
    from transformers import AutoModelForCausalLM
    folder = os.path.join(FIX, name)
    model = AutoModelForCausalLM.from_pretrained(folder).double().eval()
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    with open(os.path.join(folder, "lm.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f][:6]
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for t in texts:
        ids = torch.tensor([tok.encode(t).ids])
        if ids.shape[1] < 2:
            continue
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        s = logp.gather(1, ids[0, 1:].unsqueeze(1)).sum()
        sq_grads(model, s, acc, 1.0)
    tensors = {f"{n}:fisher": (v / len(texts)).contiguous() for n, v in acc.items()}
    save_file(tensors, os.path.join(OUT, f"fisher_{name}.safetensors"))


def adamerging(layer_wise):
    """AdaMerging restated from FusionBench 0.2.33 (`LayerWiseMergedModel.merge_weights`,
    `entropy_loss`, the test-time adaptation loop) for the tiny BERT, in float64."""
    from torch.func import functional_call
    from transformers import BertModel
    tok = tokenizer()
    base = BertModel.from_pretrained(os.path.join(FIX, "bert"), add_pooling_layer=False).double()
    names = [n for n, _ in base.named_parameters()]
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    taus, heads, batches = [], [], []
    for m in ("a", "b"):
        folder = os.path.join(OUT, f"bert_{m}")
        ft = BertModel.from_pretrained(folder, add_pooling_layer=False).double()
        taus.append({n: p.detach() - theta0[n] for n, p in ft.named_parameters()})
        from safetensors.torch import load_file
        h = load_file(os.path.join(folder, "head.safetensors"))
        heads.append((h["weight"].double(), h["bias"].double()))
        with open(os.path.join(OUT, f"data_{m}.jsonl")) as f:
            texts = [json.loads(line)["text"] for line in f]
        batches.append(padded([tok.encode(t) for t in texts]))
    groups = len(names) if layer_wise else 1

    def loss_and_grad(lam):
        lam = lam.detach().requires_grad_(True)
        c = lam.clamp(0, 1)
        params = {n: theta0[n] + sum(c[k, i if layer_wise else 0] * taus[k][n]
                                     for k in range(2))
                  for i, n in enumerate(names)}
        total = 0.0
        for (ids, types, mask), (w, b) in zip(batches, heads):
            hidden = functional_call(base, params, (), dict(
                input_ids=ids, token_type_ids=types, attention_mask=mask)).last_hidden_state
            mm = mask.unsqueeze(-1).double()
            pooled = (hidden * mm).sum(1) / mm.sum(1)
            p = torch.softmax(pooled @ w.T + b, dim=-1)
            total = total + (-(p * torch.log(p + 1e-8)).sum(-1).mean())
        total.backward()
        return total.item(), lam.grad.detach()

    out = {}
    init = torch.full((2, groups), 0.3, dtype=torch.float64)
    _, g = loss_and_grad(init)
    if layer_wise:
        for i, n in enumerate(names):
            out[f"grad/{n}"] = g[:, i].contiguous()
    else:
        out["grad"] = g.contiguous()
    for lr in (0.001, 0.05):
        lam = torch.nn.Parameter(init.clone())
        opt = torch.optim.Adam([lam], lr=lr)
        for _ in range(20):
            _, g = loss_and_grad(lam)
            lam.grad = g
            opt.step()
        final = lam.detach().clamp(0, 1)
        if layer_wise:
            for i, n in enumerate(names):
                out[f"lambda_lr{lr}/{n}"] = final[:, i].contiguous()
        else:
            out[f"lambda_lr{lr}"] = final.contiguous()
    save_file(out, os.path.join(OUT, "ada_layer.safetensors" if layer_wise else "ada_task.safetensors"))


def main():
    os.makedirs(OUT, exist_ok=True)
    models, heads, data = make_models()
    torch.set_default_dtype(torch.float64)
    names = ["a", "b"]
    masked = {}
    for m in names:
        g, tokens = grams(models[m], data[m])
        masked[m] = {n: v[0] for n, v in g.items()}
        out = {}
        for n, (gm, gp) in g.items():
            out[f"{n}.weight:gram:masked"] = gm.contiguous()
            out[f"{n}.weight:gram:padded"] = gp.contiguous()
        save_file(out, os.path.join(OUT, f"gram_{m}.safetensors"),
                  metadata={"tokens_masked": str(tokens)})

    params = {n: [dict(models[m].named_parameters())[n].detach() for m in names]
              for n, _ in models["a"].named_parameters()}
    ref = {}
    for ratio in (1.0, 0.5):
        gl = [masked[m] for m in names]
        merged = (merging_with_regmean_weights(params, gl, reduce_non_diagonal_ratio=ratio)
                  if FB else regmean_restated(params, gl, ratio))
        check = regmean_restated(params, gl, ratio)
        for n, v in merged.items():
            assert torch.allclose(v, check[n], rtol=1e-9, atol=1e-12), n
            ref[f"alpha_{ratio}/{n}"] = v.contiguous()
    save_file(ref, os.path.join(OUT, "regmean.safetensors"))

    exact = {}
    for m in names:
        exact[m] = fisher_exact(models[m], heads[m], data[m])
        batch = fisher_batch(models[m], heads[m], data[m])
        out = {f"{n}:fisher": v.contiguous() for n, v in exact[m].items()}
        out.update({f"{n}:fisher:batch": v.contiguous() for n, v in batch.items()})
        save_file(out, os.path.join(OUT, f"fisher_{m}.safetensors"))

    ref = {}
    coeffs = torch.ones(2) / 2
    fl = [exact[m] for m in names]
    for normalize, prefix in ((True, ""), (False, "unnormalized/")):
        merged = (merging_with_fisher_weights(params, fl, coeffs, normalize, 1e-6) if FB
                  else fisher_restated(params, fl, coeffs, normalize, 1e-6))
        check = fisher_restated(params, fl, coeffs, normalize, 1e-6)
        for n, v in merged.items():
            assert torch.allclose(v, check[n], rtol=1e-9, atol=1e-12), n
            ref[f"{prefix}{n}"] = v.detach().contiguous()
    save_file(ref, os.path.join(OUT, "fisher_merge.safetensors"))

    fisher_lm("llama")
    fisher_lm("qwen2")
    adamerging(False)
    adamerging(True)


if __name__ == "__main__":
    main()
