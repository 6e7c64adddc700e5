#!/usr/bin/env python3
"""Generate the routing parity fixtures: SMILE (FusionBench) over dense BERT fine-tunes and Arrow
(PEFT) over Llama LoRA adapters, with what the reference implementations compute.

Peers: fusion-bench 0.2.33 (`/tmp/peers/bin/pip install --no-deps fusion-bench==0.2.33`; only
`fusion_bench/models/smile_moe/` is used, loaded from its files because importing the
`fusion_bench` package pulls omegaconf, hydra and lightning), peft 0.21.2, transformers 5.24,
torch 2.15, tokenizers 0.23. Seed: torch.manual_seed(20261125) before each model, fixed
generators for the deltas, adapters and ids, PYTHONHASHSEED=0 (the script re-executes itself with
it, as PEFT writes target_modules in set order). Everything in float32, eval mode. Run from the
repository root (after gen_eval_fixtures.py, whose bert/ and llama/ configs and tokenizers it
reuses):

    /tmp/peers/bin/python scripts/gen_routing_fixtures.py

It writes under crates/amalgam-eval/tests/fixtures/routing/:

- `smile/`: `base/` (a random 2-layer BertModel, hidden 32, the config of fixtures/bert, with
  encoder linear weights of std 1/√in and perturbed LayerNorms and biases) and
  `ft0/`, `ft1/`, `ft2/` (the base plus a task delta on the weight and bias of every encoder
  linear: query, key, value, attention.output.dense, intermediate.dense, output.dense; embeddings
  and LayerNorms unchanged). Each weight delta is Σ_j 0.5·0.6^j u_j v_jᵀ with expert-specific
  random orthonormal u, v, plus noise 1e-4, so the spectra decay clearly. Every folder holds
  config.json, tokenizer.json (copied from fixtures/bert) and model.safetensors.
  `expected.safetensors`: `ids` [2, 10] (I64, first token [CLS]); `hidden_base` [2, 10, 32], the
  base's last hidden state; and per setting S in `g2k4t1` (gate_k 2, k 4, top_k 1) and `g3k6t2`
  (gate_k 3, k 6, top_k 2): `hidden_S` [2, 10, 32], the last hidden state of the base with every
  one of those linears replaced by FusionBench's `SmileMoELinear(pretrained, [ft0, ft1, ft2],
  gate_k, k, top_k, routing_use_diff=True)` (all-ones mask, token types 0), and `routing_S`
  [20, 3], the routing weights of `encoder.layer.0.attention.self.query` (rows = tokens,
  batch-major; the renormalised top-k weights in the chosen experts' columns, 0 elsewhere).
- `arrow/`: `base/` (a random 2-layer LlamaForCausalLM with the config of fixtures/llama and its
  tokenizer.json), `adapters/task0..task2` (PEFT LoRA adapters, r 4, lora_alpha 8, 4, 16,
  targets q_proj, v_proj, up_proj, random A and B with one direction of A scaled by 5 so that
  B·A has a dominant singular value) and `adapters/general0`, `general1` (the general adapters
  of GenKnowSub: same r and targets, lora_alpha 8, 2, random A and B of std 0.05 from a generator
  of their own, drawn after the task adapters with the global RNG restored afterwards, so that
  everything else is as without them). `expected.safetensors`: `ids` [2, 8] (I64); `logits_base`
  [2, 8, 300]; `proto_q0` [3, 32], PEFT's prototypes of `model.layers.0.self_attn.q_proj`
  (without GenKnowSub); and per setting S in `k2t1` (top_k 2, router_temperature 1.0), `k3t05`
  (top_k 3, temperature 0.5), both use_gks False, and `gks_k2t1` (top_k 2, temperature 1.0,
  use_gks True, general adapters general0 and general1), built with PEFT's
  `create_arrow_model`: `logits_S` [2, 8, 300] and `coeff_S` [16, 3], the routing coefficients
  of that q_proj per token.

PEFT's GenKnowSub (`ArrowLoraLinearLayer.gen_know_sub`, run in each layer's first forward before
the prototypes are built) subtracts the plain mean of the general adapters' raw A (and of their
raw B) from every task adapter's A (and B) in place: the prototypes are those of
(B − mean B_g)(A − mean A_g) and the routed delta is Σ_e coeff_e · (alpha_e / r) · (B_e − mean
B_g)(A_e − mean A_g) x, the task adapter's own scaling; the general adapters' lora_alpha plays no
part.

The script checks that PEFT's power-iteration prototypes equal the top right singular vectors of
B·A (with GenKnowSub of (B − mean B_g)(A − mean A_g)) up to sign to 1e-5, with σ1/σ2 > 2, that
PEFT's delta is the one of those factors, and that no routing decision of any routed module is a
near-tie (the chosen and rejected scores differ by at least 1e-4), and fails otherwise.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from copy import deepcopy

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FIXTURES = os.path.join("crates", "amalgam-eval", "tests", "fixtures")
ROOT = os.path.join(FIXTURES, "routing")
SEED = 20261125

SMILE_LINEARS = ["attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense", "intermediate.dense", "output.dense"]
SMILE_SETTINGS = {"g2k4t1": dict(gate_k=2, k=4, top_k=1), "g3k6t2": dict(gate_k=3, k=6, top_k=2)}
SMILE_PROBE = "encoder.layer.0.attention.self.query"

ARROW_TARGETS = ["q_proj", "v_proj", "up_proj"]
ARROW_ALPHAS = [8, 4, 16]
ARROW_RANK = 4
# General adapters for GenKnowSub: random A and B (no dominant direction) of std ARROW_GKS_STD,
# small enough that every (B − mean B_general)(A − mean A_general) keeps σ1/σ2 > 2.
ARROW_GKS_ALPHAS = [8, 2]
ARROW_GKS_STD = 0.05
ARROW_SETTINGS = {"k2t1": dict(top_k=2, router_temperature=1.0),
                  "k3t05": dict(top_k=3, router_temperature=0.5),
                  "gks_k2t1": dict(top_k=2, router_temperature=1.0, use_gks=True)}
ARROW_PROBE = "model.layers.0.self_attn.q_proj"

# Smallest allowed gap between the last chosen and the first rejected expert score (SMILE's
# softmaxed weights, Arrow's |x·v|): far above what float32 rounding or another SVD routine can
# move them (~1e-6), so that no routing decision of the fixtures is a near-tie.
MIN_MARGIN = 1e-4


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def keys_of(path):
    with safe_open(path, "pt") as f:
        return set(f.keys())


def save_folder(model, folder, tokenizer_from, arch):
    """config.json + tokenizer.json + model.safetensors (safetensors save_file of the state dict)."""
    os.makedirs(folder, exist_ok=True)
    model.config.architectures = [arch]
    model.config.save_pretrained(folder)
    shutil.copy(os.path.join(tokenizer_from, "tokenizer.json"), os.path.join(folder, "tokenizer.json"))
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    path = os.path.join(folder, "model.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    reference = keys_of(os.path.join(tokenizer_from, "model.safetensors"))
    assert set(state) == reference, f"{folder}: tensor names differ from {tokenizer_from}"


def load_smile_moe_linear():
    """FusionBench's real SmileMoELinear, loaded from the installed package's files.

    `import fusion_bench` runs its package __init__ (omegaconf, hydra, lightning, ...), so the
    self-contained `fusion_bench/models/smile_moe/` folder (torch only) is loaded as a package of
    its own under an alias."""
    version = importlib.metadata.version("fusion-bench")
    assert version == "0.2.33", f"fusion-bench {version} installed, 0.2.33 expected"
    top = importlib.util.find_spec("fusion_bench").submodule_search_locations[0]
    folder = os.path.join(top, "models", "smile_moe")
    alias = "_fusion_bench_smile_moe"
    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules[alias] = package
    spec.loader.exec_module(package)
    module = importlib.import_module(alias + ".linear_from_module")
    assert os.path.samefile(module.__file__, os.path.join(folder, "linear_from_module.py"))
    return module.SmileMoELinear


def orthonormal(n, m, gen):
    """n×m with orthonormal columns (m ≤ n)."""
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))
    return q


def min_margin(scores, top_k):
    """Gap between the top_k-th and the (top_k+1)-th score per row (inf when all are chosen)."""
    if top_k >= scores.shape[1]:
        return float("inf")
    s = scores.sort(dim=1, descending=True).values
    return float((s[:, top_k - 1] - s[:, top_k]).min())


# ---------------------------------------------------------------------------------------------
# SMILE


def gen_smile():
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    SmileMoELinear = load_smile_moe_linear()
    src = os.path.join(FIXTURES, "bert")
    folder = os.path.join(ROOT, "smile")
    os.makedirs(folder)
    cfg = BertConfig.from_pretrained(src)

    torch.manual_seed(SEED)
    base = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        # Random init leaves LayerNorms at 1/0 and biases at 0; perturb them so they are tested.
        for n, p in base.named_parameters():
            if "LayerNorm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
        # Std 1/√in instead of 0.02 for the encoder linears: activations of order one reach
        # every routed linear, so the routers' scores are well spread.
        for n, m in base.encoder.named_modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, m.in_features ** -0.5)
    save_folder(base, os.path.join(folder, "base"), src, "BertModel")

    gen = torch.Generator().manual_seed(SEED + 1)
    for e in range(3):
        ft = deepcopy(base)
        with torch.no_grad():
            for layer in ft.encoder.layer:
                for name in SMILE_LINEARS:
                    lin = layer.get_submodule(name)
                    out_f, in_f = lin.weight.shape
                    r = min(out_f, in_f)
                    u, v = orthonormal(out_f, r, gen), orthonormal(in_f, r, gen)
                    s = 0.5 * 0.6 ** torch.arange(r, dtype=torch.float64)
                    delta = (u * s) @ v.T + 1e-4 * torch.randn(out_f, in_f, generator=gen,
                                                                 dtype=torch.float64)
                    lin.weight.add_(delta.float())
                    lin.bias.add_(0.05 * torch.randn(out_f, generator=gen))
        save_folder(ft, os.path.join(folder, f"ft{e}"), src, "BertModel")

    # Reload what was written, so the expectations are those of the files.
    base = BertModel.from_pretrained(os.path.join(folder, "base"), add_pooling_layer=False).eval()
    fts = [BertModel.from_pretrained(os.path.join(folder, f"ft{e}"), add_pooling_layer=False).eval()
           for e in range(3)]
    for ft in fts:
        for (n, p), (_, q) in zip(base.named_parameters(), ft.named_parameters()):
            changed = not torch.equal(p, q)
            assert changed == any(f".{lin}." in n for lin in SMILE_LINEARS), n

    tok = Tokenizer.from_file(os.path.join(folder, "base", "tokenizer.json"))
    g = torch.Generator().manual_seed(SEED + 2)
    ids = torch.randint(5, cfg.vocab_size, (2, 10), generator=g)
    ids[:, 0] = tok.token_to_id("[CLS]")
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  token_type_ids=torch.zeros_like(ids))
    out = {"ids": ids.to(torch.int64)}
    with torch.no_grad():
        out["hidden_base"] = base(**inputs).last_hidden_state

    margins = {}
    for tag, st in SMILE_SETTINGS.items():
        # As FusionBench's SmileUpscalingAlgorithm: every targeted nn.Linear of a copy of the
        # pretrained model becomes a SmileMoELinear (the constructor mutates the fine-tuned
        # modules, so it gets copies).
        model = deepcopy(base)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear):
                assert any(name.endswith(lin) for lin in SMILE_LINEARS), name
                experts = [deepcopy(ft.get_submodule(name)) for ft in fts]
                moe = SmileMoELinear(deepcopy(module), experts, routing_use_diff=True, **st)
                model.set_submodule(name, moe)
        model.eval()
        moes = {n: m for n, m in model.named_modules() if isinstance(m, SmileMoELinear)}
        assert len(moes) == len(SMILE_LINEARS) * cfg.num_hidden_layers
        logits = {}
        hooks = [m.gate.register_forward_hook(
            lambda mod, args, res, n=n: logits.__setitem__(n, res.detach().clone()))
            for n, m in moes.items()]
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        for h in hooks:
            h.remove()
        # The routing weights exactly as SmileMoELinear.forward computes them from the gate.
        for n, lg in logits.items():
            probs = torch.nn.functional.softmax(lg, dim=1)
            margins[(tag, n)] = min_margin(probs, st["top_k"])
        probs = torch.nn.functional.softmax(logits[SMILE_PROBE], dim=1)
        w, sel = torch.topk(probs, st["top_k"], dim=-1)
        w /= w.sum(dim=-1, keepdim=True)
        routing = torch.zeros_like(probs).scatter_(1, sel, w)
        assert routing.shape == (ids.numel(), 3)
        out[f"hidden_{tag}"] = hidden
        out[f"routing_{tag}"] = routing
        diff = (hidden - out["hidden_base"]).abs().max().item()
        chosen = routing.gt(0).sum(0).tolist()
        print(f"smile {tag}: max |hidden - base| {diff:.3f}, probe picks per expert {chosen}")
    worst = min(margins.values())
    print(f"smile: smallest top-k margin of the softmaxed routing weights {worst:.2e}")
    assert worst > MIN_MARGIN, f"SMILE routing near-tie: {min(margins, key=margins.get)}"

    save_file({k: (v if v.dtype == torch.int64 else v.float()).contiguous() for k, v in out.items()},
              os.path.join(folder, "expected.safetensors"))
    write_text(os.path.join(folder, "README.md"), f"""\
SMILE routing fixture (FusionBench 0.2.33 `SmileMoELinear`), from `scripts/gen_routing_fixtures.py`.

- `base/`: random 2-layer BertModel (hidden 32, the config of `../../bert`; encoder linear
  weights of std 1/√in, LayerNorms and biases perturbed), float32.
- `ft0/`, `ft1/`, `ft2/`: the base plus a delta on the weight and bias of every encoder linear
  (query, key, value, attention.output.dense, intermediate.dense, output.dense); the weight delta
  is Σ_j 0.5·0.6^j u_j v_jᵀ (expert-specific random orthonormal u, v) + 1e-4 noise. Embeddings
  and LayerNorms equal the base's.
- `expected.safetensors`: `ids` [2, 10] (I64), `hidden_base` [2, 10, 32], and per setting
  `hidden_<s>` [2, 10, 32] (last hidden state of the SMILE model, all-ones mask, token types 0)
  and `routing_<s>` [20, 3] (routing weights of `{SMILE_PROBE}`, rows = tokens
  batch-major, renormalised top-k weights in the chosen columns, 0 elsewhere).

Settings (`SmileMoELinear(pretrained, [ft0, ft1, ft2], gate_k, k, top_k, routing_use_diff=True)`
on all 12 linears, full_matrices=True):

- `g2k4t1`: gate_k 2, k 4, top_k 1
- `g3k6t2`: gate_k 3, k 6, top_k 2
""")


# ---------------------------------------------------------------------------------------------
# Arrow


def gen_arrow():
    from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    src = os.path.join(FIXTURES, "llama")
    folder = os.path.join(ROOT, "arrow")
    base_dir = os.path.join(folder, "base")
    os.makedirs(folder)
    cfg = LlamaConfig.from_pretrained(src)

    torch.manual_seed(SEED)
    base = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save_folder(base, base_dir, src, "LlamaForCausalLM")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    # The adapters: random A (r×in) and B (out×r), A's first row scaled by 5.
    adapter_dirs = []
    gen = torch.Generator().manual_seed(SEED + 3)
    for e, alpha in enumerate(ARROW_ALPHAS):
        peft_model = get_peft_model(load_base(), LoraConfig(
            r=ARROW_RANK, lora_alpha=alpha, target_modules=ARROW_TARGETS, lora_dropout=0.0,
            init_lora_weights=False))
        with torch.no_grad():
            for n, m in peft_model.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                    a.copy_(torch.randn(a.shape, generator=gen) * 0.2)
                    a[0] *= 5
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.2)
                    s = torch.linalg.svdvals((b @ a).double())
                    assert s[0] / s[1] > 2.0, f"task{e} {n}: σ1/σ2 = {s[0] / s[1]:.2f}"
        d = os.path.join(folder, "adapters", f"task{e}")
        peft_model.save_pretrained(d)
        adapter_dirs.append(d)

    # The general adapters of GenKnowSub, after the task adapters and from a generator of their
    # own; the global RNG (which get_peft_model and loading draw from) is put back as it was, so
    # everything after is generated exactly as without them.
    general_dirs = []
    rng_state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(SEED + 5)
    for e, alpha in enumerate(ARROW_GKS_ALPHAS):
        peft_model = get_peft_model(load_base(), LoraConfig(
            r=ARROW_RANK, lora_alpha=alpha, target_modules=ARROW_TARGETS, lora_dropout=0.0,
            init_lora_weights=False))
        with torch.no_grad():
            for n, m in peft_model.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
                    a.copy_(torch.randn(a.shape, generator=gen) * ARROW_GKS_STD)
                    b.copy_(torch.randn(b.shape, generator=gen) * ARROW_GKS_STD)
        d = os.path.join(folder, "adapters", f"general{e}")
        peft_model.save_pretrained(d)
        general_dirs.append(d)
    torch.set_rng_state(rng_state)

    g = torch.Generator().manual_seed(SEED + 4)
    ids = torch.randint(3, cfg.vocab_size, (2, 8), generator=g)
    out = {"ids": ids.to(torch.int64)}
    with torch.no_grad():
        out["logits_base"] = load_base()(input_ids=ids).logits

    margins = {}
    names = [f"task_{e}" for e in range(len(ARROW_ALPHAS))]
    gks_names = [f"gks_{e}" for e in range(len(ARROW_GKS_ALPHAS))]
    for tag, st in ARROW_SETTINGS.items():
        st = dict(st)
        use_gks = st.pop("use_gks", False)
        arrow_cfg = ArrowConfig(use_gks=use_gks, rng_seed=SEED, **st)
        model = create_arrow_model(load_base(), adapter_dirs, arrow_cfg,
                                   general_adapter_paths=general_dirs if use_gks else None).eval()
        routers = {}
        for n, m in model.base_model.model.named_modules():
            if isinstance(m, ArrowLoraLinearLayer):
                routers[n.rsplit(".lora_arrow.", 1)[0]] = (m, model.base_model.model.get_submodule(
                    n.rsplit(".lora_arrow.", 1)[0]))
        assert len(routers) == len(ARROW_TARGETS) * cfg.num_hidden_layers, sorted(routers)
        # The factors as loaded, before the first forward (where PEFT's GenKnowSub subtracts the
        # general mean from the task factors in place).
        loaded = {(n, name): (lora.lora_A[name].weight.detach().clone(),
                              lora.lora_B[name].weight.detach().clone())
                  for n, (_, lora) in routers.items()
                  for name in names + (gks_names if use_gks else [])}
        captured = {}
        hooks = [m.register_forward_hook(
            lambda mod, args, kwargs, res, n=n: captured.__setitem__(
                n, (args[0].detach().clone(), res.detach().clone())), with_kwargs=True)
            for n, (m, _) in routers.items()]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        for h in hooks:
            h.remove()

        worst_ratio, worst_proto = float("inf"), 0.0
        for n, (arrow, lora) in routers.items():
            assert arrow.task_adapter_names == names, arrow.task_adapter_names
            assert arrow.gks_adapter_names == (gks_names if use_gks else [])
            assert arrow.gks_done == use_gks
            # The task factors (float64) that PEFT routes over and builds its prototypes from:
            # with GenKnowSub A − mean_g A_g and B − mean_g B_g (plain means of the general
            # adapters' raw factors, no scaling), else A and B as loaded.
            if use_gks:
                mean_a = torch.stack([loaded[(n, g)][0].double() for g in gks_names]).mean(0)
                mean_b = torch.stack([loaded[(n, g)][1].double() for g in gks_names]).mean(0)
                for g in gks_names:  # the general adapters themselves are left as loaded
                    assert torch.equal(lora.lora_A[g].weight, loaded[(n, g)][0]), (n, g)
                    assert torch.equal(lora.lora_B[g].weight, loaded[(n, g)][1]), (n, g)
            factors = {}
            for name in names:
                a, b = (t.double() for t in loaded[(n, name)])
                if use_gks:
                    a, b = a - mean_a, b - mean_b
                factors[name] = (a, b)
                # PEFT left the layer's task factors as those, in place (up to float32 rounding).
                err = max((lora.lora_A[name].weight.double() - a).abs().max().item(),
                          (lora.lora_B[name].weight.double() - b).abs().max().item())
                assert err < 1e-6, f"{tag} {n} {name}: task factors off by {err}"
                if not use_gks:
                    assert torch.equal(lora.lora_A[name].weight, loaded[(n, name)][0])
                    assert torch.equal(lora.lora_B[name].weight, loaded[(n, name)][1])
            # PEFT's prototypes are the exact top right singular vectors of B·A (with GenKnowSub
            # of (B − mean B_g)(A − mean A_g)), up to sign; σ1 dominates so that 15 power steps
            # reach them.
            for e, name in enumerate(names):
                a, b = factors[name]
                svd = torch.linalg.svd(b @ a)
                ratio = (svd.S[0] / svd.S[1]).item()
                assert ratio > 2.0, f"{tag} {n} {name}: σ1/σ2 = {ratio:.2f}"
                v = svd.Vh[0]
                p = arrow.prototypes[e].double()
                err = min((p - v).abs().max(), (p + v).abs().max()).item()
                assert err < 1e-5, f"{tag} {n} {name}: prototype off the top singular vector ({err})"
                worst_ratio, worst_proto = min(worst_ratio, ratio), max(worst_proto, err)
            # The coefficients, recomputed with ArrowLoraLinearLayer.forward's exact steps.
            x, delta = captured[n]
            tok = x.view(-1, x.shape[-1])
            sim = torch.abs(tok @ arrow.prototypes.T)
            top_v, idx = torch.topk(sim, arrow.top_k, dim=1)
            full = tok.new_full(sim.shape, float("-inf")).scatter_(1, idx, top_v)
            coeff = torch.softmax(full / arrow.temperature, dim=1)
            margins[(tag, n)] = min_margin(sim, arrow.top_k)
            # Self-check: Σ_e coeff_e · scaling_e · B_e A_e x is what the layer returned, with
            # the task adapters' own scaling (lora_alpha / r) and, under GenKnowSub, the
            # subtracted factors (the general adapters' scaling plays no part).
            again = sum(coeff[:, e:e + 1].double() * lora.scaling[name]
                        * (tok.double() @ factors[name][0].T @ factors[name][1].T)
                        for e, name in enumerate(names))
            err = (again - delta.view(again.shape).double()).abs().max().item()
            assert err < 1e-5, f"{tag} {n}: recomputed delta off by {err}"
            if n == ARROW_PROBE:
                out[f"coeff_{tag}"] = coeff
                if not use_gks:
                    if "proto_q0" in out:
                        assert torch.equal(out["proto_q0"], arrow.prototypes)
                    out["proto_q0"] = arrow.prototypes.detach().clone()
                else:
                    assert not torch.allclose(out["proto_q0"], arrow.prototypes, atol=1e-3)
        out[f"logits_{tag}"] = logits
        diff = (logits - out["logits_base"]).abs().max().item()
        print(f"arrow {tag}: max |logits - base| {diff:.3f}, smallest σ1/σ2 {worst_ratio:.2f}, "
              f"largest prototype error {worst_proto:.1e}")
    worst = min(margins.values())
    print(f"arrow: smallest top-k margin of |x·v| {worst:.2e}")
    assert worst > MIN_MARGIN, f"Arrow routing near-tie: {min(margins, key=margins.get)}"
    assert out["coeff_k2t1"].shape == (ids.numel(), 3) and out["proto_q0"].shape == (3, 32)
    assert out["coeff_gks_k2t1"].shape == (ids.numel(), 3)
    assert out["logits_gks_k2t1"].shape == out["logits_base"].shape

    save_file({k: (v if v.dtype == torch.int64 else v.float()).contiguous() for k, v in out.items()},
              os.path.join(folder, "expected.safetensors"))
    gks_alphas = ", ".join(map(str, ARROW_GKS_ALPHAS))
    write_text(os.path.join(folder, "README.md"), f"""\
Arrow routing fixture (PEFT 0.21.2 `create_arrow_model`), from `scripts/gen_routing_fixtures.py`.

- `base/`: random 2-layer LlamaForCausalLM (the config of `../../llama`: hidden 32, llama3 RoPE,
  attention and MLP biases, untied lm_head), float32.
- `adapters/task0`, `task1`, `task2`: PEFT LoRA adapters (saved by PEFT), r {ARROW_RANK},
  lora_alpha {", ".join(map(str, ARROW_ALPHAS))}, targets {", ".join(ARROW_TARGETS)}; random A and
  B with A's first row scaled by 5, so B·A has a dominant singular value and PEFT's 15-step power
  iteration gives its exact top right singular vector (checked to 1e-5).
- `adapters/general0`, `general1`: the general adapters of GenKnowSub (saved by PEFT),
  r {ARROW_RANK}, lora_alpha {gks_alphas}, the same targets; random A and B of std {ARROW_GKS_STD}.
- `expected.safetensors`: `ids` [2, 8] (I64), `logits_base` [2, 8, 300] (no adapters),
  `proto_q0` [3, 32] (PEFT's prototypes of `{ARROW_PROBE}` without GenKnowSub,
  sign as PEFT's power iteration left it), and per setting `logits_<s>` [2, 8, 300] and
  `coeff_<s>` [16, 3] (routing coefficients of `{ARROW_PROBE}`, rows = tokens
  batch-major).

Settings (`ArrowConfig(top_k, router_temperature, use_gks)`, task adapters loaded as task_0..2
in that order, general adapters as gks_0, gks_1):

- `k2t1`: top_k 2, router_temperature 1.0, use_gks False
- `k3t05`: top_k 3, router_temperature 0.5, use_gks False
- `gks_k2t1`: top_k 2, router_temperature 1.0, use_gks True, general adapters general0, general1

GenKnowSub as PEFT does it (`gen_know_sub`, in each layer's first forward, before the prototypes
are built): every task adapter's A becomes A − mean(A_general0, A_general1) and its B
B − mean(B_general0, B_general1), the raw factors (no alpha / r), in place. The prototypes are
then the top right singular vectors of (B − mean B_g)(A − mean A_g) (checked to 1e-5, σ1/σ2 > 2)
and the delta is Σ_e coeff_e · (lora_alpha_e / r) · (B_e − mean B_g)(A_e − mean A_g) x with the
task adapter's own lora_alpha; the general adapters' lora_alpha is not used.
""")


def main():
    # PEFT writes target_modules from a set, whose order follows the string hash: fix it.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable] + sys.argv)
    start = time.time()
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    gen_smile()
    gen_arrow()
    total = 0
    for dirpath, _, files in sorted(os.walk(ROOT)):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            size = os.path.getsize(p)
            total += size
            print(f"{size:>9}  {os.path.relpath(p, ROOT)}")
    print(f"{total:>9}  total ({time.time() - start:.1f} s)")
    for sub in ("smile", "arrow"):
        with safe_open(os.path.join(ROOT, sub, "expected.safetensors"), "pt") as f:
            for k in sorted(f.keys()):
                t = f.get_slice(k)
                print(f"{sub}/expected.safetensors {k} {t.get_dtype()} {t.get_shape()}")


if __name__ == "__main__":
    main()
