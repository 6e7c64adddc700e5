#!/usr/bin/env python3
"""Routed evaluation of the five task fine-tunes of all-MiniLM-L6-v2: one shared model plus
per-task experts chosen per input, against the fine-tunes themselves.

Prerequisite (once, outside CI, ~45 min on 2 cores): the fine-tunes and heads

    python3 bench/tasks/finetune.py --out /tmp/amalgam-tasks

Then, with a release build of amalgam (`cargo build --release -p amalgam-cli`):

    python3 bench/tasks/routing_sweep.py --work /tmp/amalgam-tasks [--reuse] [--threads N]

Every setting of SETTINGS is one `amalgam eval SHARED --task T.test.jsonl ... --head HEADS
--experts FT... --route ROUTE ... --json` over the five test files, each task with its
fine-tuned head; the experts are the five fine-tunes (named like the tasks), as truncated SVDs
of their weight deltas against the shared model. SHARED is the pre-trained model (smile,
oracle, uniform) or, for twin (Twin-Merging), the task-arithmetic merge of the fine-tunes at
λ 0.3 (written by this script with `amalgam merge`). Reported per setting: accuracy per task,
normalized accuracy (acc(routed, t) / acc(fine-tune t, t), averaged), router accuracy (the
fraction of inputs whose top expert is their own task's; token gates: summed over tokens and
layers), the memory held (shared model + experts, as a multiple of one model) and the
evaluation time per example against evaluating one plain model (the pre-trained one) on the
same rows, both from the per-task times amalgam reports (model loading and expert
construction excluded; the construction time is listed apart).

Data. The twin router is calibrated on the FIRST 300 rows of each TASK.train.jsonl (task ids
only; the tasks' labels are not read). Validation is the LAST 500 rows of each train file
(WORK/val/TASK.val.jsonl, as library_sweep.py writes them; disjoint from the calibration rows;
the test rows are never used for a choice). Within each router family (smile, twin) the
setting with the best normalized accuracy on the validation split is marked as the family's
choice; every setting's test result is listed.

Writes WORK/routing_results.json (after every step; `--reuse` resumes), bench/tasks/
routing_accuracy.png and the section between `<!-- routing:begin -->` / `<!-- routing:end -->`
of BENCHMARKS.md.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import merge_sweep as ms  # noqa: E402
import library_sweep as ls  # noqa: E402

TASKS = ls.TASKS
SHORT = ls.SHORT
CAL_ROWS = 300

# (name, label, route, shared model, options, family chosen on validation or None)
SETTINGS = [
    ("uniform_full", "uniform 1/N, exact deltas (= TA λ 0.2)", "uniform", "base",
     ["--rank", "full"], None),
    ("oracle_full", "oracle, exact deltas", "oracle", "base", ["--rank", "full"], None),
    ("oracle_r32", "oracle, rank 32", "oracle", "base", ["--rank", "32"], None),
    ("smile_g4_k16", "SMILE gate_k 4, k 16, top-1", "smile", "base",
     ["--gate-k", "4", "--rank", "16"], "smile"),
    ("smile_g16_k32", "SMILE gate_k 16, k 32, top-1", "smile", "base",
     ["--gate-k", "16", "--rank", "32"], "smile"),
    ("smile_g16_k64", "SMILE gate_k 16, k 64, top-1", "smile", "base",
     ["--gate-k", "16", "--rank", "64"], "smile"),
    ("smile_g16_k32_t2", "SMILE gate_k 16, k 32, top-2", "smile", "base",
     ["--gate-k", "16", "--rank", "32", "--top-k", "2"], "smile"),
    ("twin_log_r32", "Twin (TA 0.3), logistic, rank 32", "twin", "ta03",
     ["--rank", "32", "--router", "logistic"], "twin"),
    ("twin_log_r32_top1", "Twin (TA 0.3), logistic, rank 32, top-1", "twin", "ta03",
     ["--rank", "32", "--router", "logistic", "--top-k", "1"], "twin"),
    ("twin_cen_r32", "Twin (TA 0.3), centroid, rank 32", "twin", "ta03",
     ["--rank", "32", "--router", "centroid"], "twin"),
    ("twin_log_r16", "Twin (TA 0.3), logistic, rank 16", "twin", "ta03",
     ["--rank", "16", "--router", "logistic"], "twin"),
]

TIME_RE = re.compile(r"^eval: (\S+): .* in ([0-9.]+) s$")
ATTACH_RE = re.compile(r"^eval: \d+ experts on \d+ layers .* in ([0-9.]+) s$")


def run(cmd):
    """stdout and stderr of `cmd` (exits on failure)."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p.stdout, p.stderr


def eval_run(args, model, files, extra):
    """One `amalgam eval` over `files` (task -> path): accuracies, router accuracies, the
    routing report, per-task seconds and the experts' construction seconds."""
    cmd = [args.amalgam, "--threads", str(args.threads), "eval", model, "--max-len",
           str(args.max_len), "--json"]
    for t in TASKS:
        cmd += ["--task", files[t]]
    cmd += ["--head", os.path.join(args.work, "heads")] + extra
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    out, err = run(cmd)
    v = json.loads(out)
    seconds = {}
    attach_s = None
    for line in err.splitlines():
        m = TIME_RE.match(line.strip())
        if m:
            seconds[m.group(1)] = float(m.group(2))
        m = ATTACH_RE.match(line.strip())
        if m:
            attach_s = float(m.group(1))
    rec = {
        "accuracy": {t["name"]: t["accuracy"] for t in v["tasks"]},
        "examples": {t["name"]: t["examples"] for t in v["tasks"]},
        "seconds": seconds,
    }
    if "routing" in v:
        rec["router_accuracy"] = {t["name"]: t.get("router_accuracy") for t in v["tasks"]}
        rec["routing"] = v["routing"]
        rec["attach_s"] = attach_s
    return rec


def files_of(args, split):
    """Each task's file of `split`. The validation rows are copied to WORK/val_tasks/TASK.jsonl:
    amalgam names a task after its file (without .test.jsonl / .jsonl), and the experts, heads
    and router accuracy go by that name."""
    if split == "test":
        return ls.test_files(args)
    folder = os.path.join(args.work, "val_tasks")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for t in TASKS:
        text = open(os.path.join(args.work, "val", f"{t}.val.jsonl")).read()
        path = os.path.join(folder, f"{t}.jsonl")
        if not (os.path.exists(path) and open(path).read() == text):
            with open(path, "w") as f:
                f.write(text)
        paths[t] = path
    return paths


def cal_files(args):
    """WORK/cal/TASK.cal.jsonl: the first CAL_ROWS rows of TASK.train.jsonl."""
    folder = os.path.join(args.work, "cal")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for t in TASKS:
        with open(os.path.join(args.data, f"{t}.train.jsonl")) as f:
            rows = [line for line in f if line.strip()][:CAL_ROWS]
        path = os.path.join(folder, f"{t}.cal.jsonl")
        with open(path, "w") as f:
            f.writelines(rows)
        paths[t] = path
    return paths


def normalized(acc, ft):
    return sum(acc[t] / ft[t] for t in TASKS) / len(TASKS)


def markdown(res, args):
    ft = res["finetuned"]["test"]["accuracy"]
    plain = res["plain"]["test"]
    plain_rate = sum(plain["seconds"].values()) / sum(plain["examples"].values())
    lines = [
        "| router | setting | " + " | ".join(SHORT[t] for t in TASKS)
        + " | norm. avg | router acc. | memory (× model) | time/example (× plain) |",
        "|" + "---|" * (len(TASKS) + 6),
        "| fine-tunes (5 models) | – | " + " | ".join(f"{100 * ft[t]:.1f}" for t in TASKS)
        + " | 100.0 % | – | 5.00 | – |",
    ]
    chosen = res.get("chosen", {})
    for name, label, route, _, _, family in SETTINGS:
        r = res["settings"].get(name, {}).get("test")
        if not r:
            continue
        acc = r["accuracy"]
        racc = r.get("router_accuracy", {}) if route != "uniform" else {}
        ra = [racc[t] for t in TASKS if racc.get(t) is not None]
        rate = sum(r["seconds"].values()) / sum(r["examples"].values())
        mark = " **(chosen on val)**" if family and chosen.get(family) == name else ""
        lines.append(
            f"| {route} | {label}{mark} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in TASKS)
            + f" | {100 * normalized(acc, ft):.1f} % | "
            + (f"{100 * sum(ra) / len(ra):.1f} %" if ra else "–")
            + f" | {r['routing']['memory_multiple']:.2f} | {rate / plain_rate:.2f} |")
    return "\n".join(lines)


def plot(res, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    ft = res["finetuned"]["test"]["accuracy"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"smile": "tab:blue", "twin": "tab:green", "oracle": "tab:gray",
              "uniform": "tab:orange"}
    for name, label, route, _, _, _ in SETTINGS:
        r = res["settings"].get(name, {}).get("test")
        if not r:
            continue
        x = r["routing"]["memory_multiple"]
        y = 100 * normalized(r["accuracy"], ft)
        ax.scatter([x], [y], color=colors[route], s=40)
        ax.annotate(label, (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axhline(100, color="black", lw=0.8, ls="--")
    ax.annotate("fine-tunes (5 models, 5× memory)", (1.0, 100), fontsize=7,
                xytext=(2, 3), textcoords="offset points")
    ax.set_xlabel("memory held (shared model + experts), × one model")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title("Routed all-MiniLM-L6-v2, five tasks (test splits)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/amalgam-tasks")
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "benchmark"))
    p.add_argument("--amalgam", default=os.path.join(REPO, "target", "release", "amalgam"))
    p.add_argument("--base", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    args = p.parse_args()
    base = ms.base_model_path(args)
    path = os.path.join(args.work, "routing_results.json")
    res = {}
    if args.reuse and os.path.exists(path):
        res = json.load(open(path))
    if res.get("max_len") != args.max_len or res.get("limit", 0) != args.limit:
        res = {}
    res.update({"max_len": args.max_len, "limit": args.limit, "cal_rows": CAL_ROWS,
                "val_rows": ls.VAL_ROWS})
    res.setdefault("settings", {})

    def save():
        with open(path + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(path + ".tmp", path)

    ls.write_val_splits(args, args.work)
    cals = cal_files(args)
    fts = {t: os.path.join(args.work, "finetuned", t) for t in TASKS}
    # The fine-tunes, each on its own task (the 100 % reference), and the plain pre-trained
    # model on the same rows (the time reference).
    for split in ("test", "val"):
        if split not in res.setdefault("finetuned", {}):
            acc, ex, secs = {}, {}, {}
            for t in TASKS:
                one = {k: v for k, v in files_of(args, split).items()}
                cmd = [args.amalgam, "--threads", str(args.threads), "eval", fts[t],
                       "--max-len", str(args.max_len), "--task", one[t], "--head",
                       os.path.join(args.work, "heads", f"{t}.safetensors"), "--json"]
                if args.limit:
                    cmd += ["--limit", str(args.limit)]
                out, err = run(cmd)
                v = json.loads(out)["tasks"][0]
                acc[t], ex[t] = v["accuracy"], v["examples"]
                for line in err.splitlines():
                    m = TIME_RE.match(line.strip())
                    if m:
                        secs[t] = float(m.group(2))
            res["finetuned"][split] = {"accuracy": acc, "examples": ex, "seconds": secs}
            save()
    if "test" not in res.setdefault("plain", {}):
        res["plain"]["test"] = eval_run(args, base, files_of(args, "test"), [])
        save()
    # The twin's shared model: task arithmetic of the fine-tunes at λ 0.3.
    ta = os.path.join(args.work, "merged_ta03")
    if not os.path.exists(os.path.join(ta, "config.json")):
        cfg = os.path.join(args.work, "merged_ta03.yml")
        with open(cfg, "w") as f:
            f.write(ms.config_text("task_arithmetic", base, [fts[t] for t in TASKS],
                                   {"lambda": 0.3, "weight": 1.0}, {}))
        run([args.amalgam, "merge", cfg, ta, "--overwrite", "-q"])
    shared = {"base": base, "ta03": ta}
    for name, label, route, sh, opts, family in SETTINGS:
        if args.only and name not in args.only:
            continue
        extra = ["--experts"] + [fts[t] for t in TASKS] + ["--route", route] + opts
        if route == "twin":
            for t in TASKS:
                extra += ["--calibrate", f"{t}={cals[t]}"]
            extra += ["--calibrate-rows", str(CAL_ROWS)]
        splits = ("test", "val") if family else ("test",)
        for split in splits:
            if split in res["settings"].get(name, {}):
                continue
            t0 = time.time()
            rec = eval_run(args, shared[sh], files_of(args, split), extra)
            rec["wall_s"] = round(time.time() - t0, 1)
            res["settings"].setdefault(name, {})[split] = rec
            save()
            ft = res["finetuned"][split]["accuracy"]
            print(f"{name} {split}: norm {100 * normalized(rec['accuracy'], ft):.2f} % "
                  f"({rec['wall_s']} s)", flush=True)
    # The choice per family, on validation.
    chosen = {}
    for family in ("smile", "twin"):
        cands = [(normalized(res["settings"][n]["val"]["accuracy"],
                             res["finetuned"]["val"]["accuracy"]), n)
                 for n, _, _, _, _, f in SETTINGS
                 if f == family and "val" in res["settings"].get(n, {})]
        if cands:
            chosen[family] = max(cands)[1]
    res["chosen"] = chosen
    save()
    md = markdown(res, args)
    print(md)
    plot(res, os.path.join(HERE, "routing_accuracy.png"))
    cmd = "python3 bench/tasks/routing_sweep.py --work /tmp/amalgam-tasks"
    day = datetime.date.today().isoformat()
    section = (
        f"## Routing: one shared model plus per-task experts (issue #16)\n\n"
        f"`{cmd}` (run {day}, {args.threads} threads, max length {args.max_len}): "
        f"all-MiniLM-L6-v2, the five fine-tunes of finetune.py as experts (truncated SVDs of "
        f"their weight deltas against the shared model), each task with its fine-tuned head "
        f"on its 500 test rows. Twin's router is calibrated on the first {CAL_ROWS} rows of "
        f"each train file; the choice per router family is on the last {ls.VAL_ROWS} rows "
        f"(validation), never on the test rows. Memory: the shared model plus the experts' "
        f"parameters, × one model. Time per example: amalgam's per-task evaluation times "
        f"against evaluating the plain pre-trained model on the same rows in the same run "
        f"(expert construction excluded: "
        + ", ".join(f"{n} {r['test'].get('attach_s')} s" for n, r in res["settings"].items()
                    if r.get("test", {}).get("attach_s") is not None)
        + f"). The routed evaluations took {sum(r[s]['wall_s'] for r in res['settings'].values() for s in r) / 60:.1f} min in all (test and validation, wall time).\n\n"
        + md + "\n\n![normalized accuracy against memory](bench/tasks/routing_accuracy.png)\n")
    ms.update_benchmarks(section, None, marker="routing")


if __name__ == "__main__":
    main()
