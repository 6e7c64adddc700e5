"""FusionBench 0.2.33's Iso-C, Iso-CTS and TSV-M on safetensors models, for bench/svd_methods.sh.

    /tmp/peers/bin/python bench/svd_fusionbench.py METHOD BASE_DIR OUT_DIR FT_DIR... [--threads N]

Does what the algorithms' `run()` does, without the model pool's transformers round trip (which
only adds time and memory to the peer): the pretrained state dict, task vectors
`state_dict_sub(ft, base)` for every fine-tune held in memory, the method's merge function on the
CPU, `base + lambda * merged` (lambda 1.0, the bench's setting), written as one f32 safetensors
file (f32 so that the update can be compared with amalgam's; bf16 rounding of `base + update`
would swamp the difference). Iso-C and Iso-CTS call `torch.linalg.svd` on the task vectors' own dtype,
which has no bf16 kernel on the CPU, so their state dicts are loaded as f32 (what a FusionBench
user runs them on); TSV-M upcasts per tensor itself, so it gets the models' dtype.

torch's CPU SVD (LAPACK gesdd) sometimes fails to converge on the f32 stacked bases of these
Gaussian task vectors (seen on layers.0.v_proj of the small set); FusionBench then stops with
`_LinAlgError`. So that the peer finishes, a failed SVD is retried once in f64 and cast back
(the count is printed); everything else is FusionBench's code as shipped.

Compare with `--compare A B BASE`: the worst and the overall norm-relative difference between two
merged models' update (A - base vs B - base), per tensor, in f64.

Against the truth with `--truth METHOD BASE KEYS OUT... --models FT...`: FusionBench's own merge
function run in f64 on the f64 task vectors of the comma-separated KEYS is the reference; prints
each output's norm-relative difference from it per key (what the f32 routes lose to rounding).
"""

import argparse
import contextlib
import glob
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def load(model_dir, dtype=None):
    sd = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        sd.update(load_file(f))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return sd


RETRIES = 0


def svd_retrying_in_f64(svd):
    def wrapped(a, *args, **kwargs):
        global RETRIES
        try:
            return svd(a, *args, **kwargs)
        except torch.linalg.LinAlgError:
            RETRIES += 1
            return tuple(x.to(a.dtype) for x in svd(a.double(), *args, **kwargs))

    return wrapped


def merge(args):
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

    torch.set_num_threads(args.threads)
    torch.linalg.svd = svd_retrying_in_f64(torch.linalg.svd)
    with torch.no_grad():
        dtype = None if args.method == "tsv_m" else torch.float32
        base = load(args.base, dtype)
        tvs = []
        for ft in args.models:
            model = load(ft, dtype)
            tvs.append(state_dict_sub(model, base))
            del model
        merged = run_method(args.method, tvs)
        del tvs
        result = state_dict_add(base, state_dict_mul(merged, 1.0))
        os.makedirs(args.out, exist_ok=True)
        save_file(
            {k: v.to(torch.float32).contiguous() for k, v in result.items()},
            os.path.join(args.out, "model.safetensors"),
            metadata={"format": "pt"},
        )
    print(f"SVDs retried in f64 after torch's f32 SVD failed to converge: {RETRIES}", file=sys.stderr)


def run_method(method, tvs):
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils import TSVM_utils

    if method == "iso_c":
        return iso_c(tvs, accelerator="cpu")
    if method == "iso_cts":
        return iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu")
    if method == "tsv_m":
        return TSVM_utils.compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    sys.exit(f"unknown method {method}")


def truth(method, base_dir, keys, outs, models):
    torch.set_num_threads(2)
    base_t = tensors(base_dir)
    with torch.no_grad():
        base = {k: base_t[k]() for k in keys}
        tvs = []
        for ft in models:
            t = tensors(ft)
            tvs.append({k: t[k]() - base[k] for k in keys})
        with contextlib.redirect_stdout(sys.stderr):
            want = run_method(method, tvs)
    report = {}
    for out in outs:
        o = tensors(out)
        report[out] = {k: ((o[k]() - base[k]) - want[k]).norm().item() / want[k].norm().item() for k in keys}
    print(json.dumps(report))


def tensors(model_dir):
    """Tensor name -> a loader of it (in f64), one at a time."""
    out = {}
    for f in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = (lambda f=f, k=k: safe_open(f, "pt").get_tensor(k).to(torch.float64))
    return out


def compare(a_dir, b_dir, base_dir):
    a, b, base = tensors(a_dir), tensors(b_dir), tensors(base_dir)
    worst, num, den = ("", 0.0), 0.0, 0.0
    for k in sorted(base):
        theta0 = base[k]()
        da, db = a[k]() - theta0, b[k]() - theta0
        d, n = (da - db).norm().item(), db.norm().item()
        num, den = num + d * d, den + n * n
        if n > 0 and d / n > worst[1]:
            worst = (k, d / n)
    print(json.dumps({"overall": (num / den) ** 0.5 if den else 0.0, "worst_tensor": worst[0], "worst": worst[1]}))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--compare", nargs=3, metavar=("A", "B", "BASE"))
    p.add_argument("--truth", action="store_true")
    p.add_argument("--models", nargs="*", dest="ft_models")
    p.add_argument("method", nargs="?")
    p.add_argument("base", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("models", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
    elif args.truth:
        # METHOD BASE KEYS OUT...: the positionals are reused.
        truth(args.method, args.base, args.out.split(","), args.models, args.ft_models)
    else:
        merge(args)
