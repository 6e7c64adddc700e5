"""Inputs for bench/tokensurgeon.sh, from the real SmolLM2-135M-Instruct (converted by amalgam).

MODEL: SmolLM2 as converted (f32, tied embeddings, 49152 tokens, hidden 576).
DONOR: the same model with N new tokens appended to its tokenizer (plain added tokens
"<bench_i>") and N new embedding rows, each a random sparse combination of 8 real rows plus
5 % noise, so OMP has structure to find. Every SmolLM2 token is shared; the N new ones are
approximated. Then `compare` checks amalgam's output against mergekit's: shared rows bit-equal,
new rows within 1e-4 x max|x| or, where mergekit's f32 OMP picked other atoms than an exact
computation would, within 1e-6 of a float64 reference.

    python bench/tokensurgeon_prep.py make SMOL_DIR DONOR_DIR N
    python bench/tokensurgeon_prep.py compare AMALGAM_OUT MERGEKIT_OUT DONOR_DIR N
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

EMBED = "model.embed_tokens.weight"


def make(smol, donor, n):
    smol, donor = Path(smol), Path(donor)
    if donor.exists():
        shutil.rmtree(donor)
    donor.mkdir(parents=True)
    for f in smol.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, donor / f.name)
    t = load_file(str(smol / "model.safetensors"))
    e = t[EMBED]
    rng = np.random.default_rng(20261204)
    rows = []
    for _ in range(n):
        idx = rng.choice(e.shape[0], 8, replace=False)
        w = rng.normal(size=8)
        r = w @ e[idx]
        rows.append(r + 0.05 * np.linalg.norm(r) / np.sqrt(e.shape[1]) * rng.normal(size=e.shape[1]))
    t[EMBED] = np.concatenate([e, np.array(rows, dtype=e.dtype)])
    save_file(t, str(donor / "model.safetensors"), metadata={"format": "pt"})
    tok = json.loads((donor / "tokenizer.json").read_text())
    base = max([v for v in tok["model"]["vocab"].values()] + [a["id"] for a in tok["added_tokens"]]) + 1
    for i in range(n):
        tok["added_tokens"].append({"id": base + i, "content": f"<bench_{i}>", "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": True, "special": False})
    (donor / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((donor / "config.json").read_text())
    cfg["vocab_size"] = base + n
    (donor / "config.json").write_text(json.dumps(cfg, indent=2))


def omp64(y, atoms, k, eps=1e-8):
    """mergekit's batch_omp for one target, in float64 (the generator's reference)."""
    r, sel = y.copy(), []
    q, rr = np.zeros((len(y), k)), np.zeros((k, k))
    for t in range(k):
        c = np.abs(atoms @ r)
        c[sel] = -np.inf
        j = int(np.argmax(c))
        sel.append(j)
        a = atoms[j]
        p = q[:, :t].T @ a
        v = a - q[:, :t] @ p
        nv = max(np.linalg.norm(v), eps)
        rr[:t, t], rr[t, t], q[:, t] = p, nv, v / nv
        r = y - q[:, : t + 1] @ (q[:, : t + 1].T @ y)
    return np.linalg.solve(np.triu(rr), q.T @ y) @ atoms[sel]


def compare(ours, theirs, donor, n):
    """Shared rows bit-equal; new rows within 1e-4 x max|x| of mergekit's, except where
    mergekit's float32 OMP picked other atoms: there, within 1e-6 of a float64 reference."""
    a = load_file(str(Path(ours) / "model.safetensors"))
    b = load_file(str(Path(theirs) / "model.safetensors"))
    assert sorted(a) == sorted(b), (sorted(set(a) ^ set(b)))[:5]
    for k in a:
        if k != EMBED:
            assert np.array_equal(a[k], b[k]), k
    x, y = a[EMBED], b[EMBED]
    assert x.shape == y.shape, (x.shape, y.shape)
    shared = x.shape[0] - n
    exact = np.array_equal(x[:shared].view(np.uint32), y[:shared].view(np.uint32))
    scale = np.abs(y).max()
    rel = np.abs(x[shared:].astype(np.float64) - y[shared:]).max(1) / scale
    off = np.nonzero(rel > 1e-4)[0]
    d = load_file(str(Path(donor) / "model.safetensors"))[EMBED].astype(np.float64)
    ref_rel = [np.abs(omp64(d[shared + i], d[:shared], 64) - x[shared + i]).max() / scale for i in off]
    print(f"shared rows bit-equal: {exact}; new rows within 1e-4 x max|x| of mergekit: "
          f"{n - len(off)}/{n} (largest {rel[rel <= 1e-4].max():.1e}); the other {len(off)} "
          f"(mergekit's f32 OMP picked other atoms, off by up to {rel.max():.1e}) within "
          f"{max(ref_rel, default=0):.1e} of a float64 reference")
    assert exact and all(r <= 1e-6 for r in ref_rel)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        compare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
