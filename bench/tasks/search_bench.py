#!/usr/bin/env python3
"""`amalgam search` on the MiniLM task benchmark: CMA-ES over per-task weights of
task_arithmetic (or TIES), scored on validation, against merge_sweep.py's grid for the same
method scored on the same validation rows; both choices then reported on the test rows.

Validation is the last VAL_ROWS rows of each TASK.train.jsonl (library_sweep.py's split; the
fine-tunes trained on every train row, as for the other sweeps). Nothing is chosen on test.

    python3 bench/tasks/search_bench.py --work /tmp/amalgam-tasks [--method task_arithmetic]
        [--max-evals 64] [--layer-granularity 0]

Needs the fine-tunes of bench/tasks/finetune.py in WORK and a release build of amalgam.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import merge_sweep as ms  # noqa: E402
import library_sweep as ls  # noqa: E402


def eval_files(args, model, files):
    """Mean accuracy and per-task accuracies of `model` on `files` (task -> path)."""
    cmd = [args.amalgam, "--threads", str(args.threads), "eval", model, "--max-len",
           str(args.max_len), "--json", "-q"]
    for t in ms.TASKS:
        cmd += ["--task", files[t]]
    cmd += ["--head", os.path.join(args.work, "heads")]
    out = json.loads(ms.run(cmd))
    accs = {t["name"]: t["accuracy"] for t in out["tasks"]}
    return sum(accs.values()) / len(accs), accs


def merged(args, config, name):
    out = os.path.join(args.work, "search_bench", name)
    ms.run([args.amalgam, "--threads", str(args.threads), "merge", config, out, "--overwrite", "-q"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "..", "shared", "benchmark"))
    ap.add_argument("--amalgam", default=os.path.join(ms.REPO, "target", "release", "amalgam"))
    ap.add_argument("--base", default=None)
    ap.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties"])
    ap.add_argument("--max-evals", type=int, default=64)
    ap.add_argument("--layer-granularity", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    args.limit = None
    base = ms.base_model_path(args)
    work = os.path.join(args.work, "search_bench")
    os.makedirs(work, exist_ok=True)
    # Validation rows under the task's own name (the heads folder is looked up by task name).
    val = {}
    os.makedirs(os.path.join(work, "val"), exist_ok=True)
    for t, path in ls.write_val_splits(args, args.work).items():
        val[t] = os.path.join(work, "val", f"{t}.jsonl")
        with open(path) as src, open(val[t], "w") as dst:
            dst.write(src.read())
    test = {t: os.path.join(args.data, f"{t}.test.jsonl") for t in ms.TASKS}
    fts = [os.path.join(args.work, "finetuned", t) for t in ms.TASKS]

    # The grid: merge_sweep's points of this method, each scored on validation.
    grid = []
    for label, method, gp, mp in ms.SWEEP:
        if method != args.method:
            continue
        cfg = os.path.join(work, f"grid_{len(grid)}.yml")
        ms.write_config(cfg, method, base, fts, gp, mp)
        model = merged(args, cfg, "grid")
        v, _ = eval_files(args, model, val)
        grid.append({"params": ms.describe(gp, mp), "config": cfg, "val": v})
        print(f"grid {ms.describe(gp, mp)}: validation {v:.4f}", flush=True)
    chosen = max(grid, key=lambda g: g["val"])
    chosen["test"], chosen["test_tasks"] = eval_files(args, merged(args, chosen["config"], "grid"), test)

    # The search, on the same validation rows.
    cfg = os.path.join(work, f"search_{args.method}.yml")
    genome = {"models": fts, "merge_method": args.method, "base_model": base,
              "layer_granularity": args.layer_granularity, "dtype": "float32"}
    tasks = [{"task": val[t], "head": os.path.join(args.work, "heads", f"{t}.safetensors")}
             for t in ms.TASKS]
    with open(cfg, "w") as f:
        json.dump({"genome": genome, "tasks": tasks, "max_len": args.max_len,
                   "search": {"max_evals": args.max_evals, "seed": args.seed}}, f, indent=1)
    results = os.path.join(work, f"search_{args.method}.results.jsonl")
    if os.path.exists(results):
        os.remove(results)
    best = os.path.join(work, f"search_{args.method}.best.yml")
    start = time.time()
    p = subprocess.run([args.amalgam, "--threads", str(args.threads), "search", cfg, "--results",
                        results, "--best", best, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr)
    total = time.time() - start
    summary = json.loads(p.stdout)
    s_test, s_tasks = eval_files(args, merged(args, best, "search_best"), test)
    trials = summary["trials"]
    report = {
        "method": args.method, "layer_granularity": args.layer_granularity,
        "grid": grid, "grid_chosen": chosen,
        "search": {"trials": trials, "val": summary["best"]["objective"], "test": s_test,
                   "test_tasks": s_tasks, "best_trial": summary["best"]["trial"],
                   "config": summary["best"]["config"], "seconds": total,
                   "seconds_per_trial": total / trials,
                   "mean_merge_seconds": summary["mean_merge_seconds"],
                   "mean_eval_seconds": summary["mean_eval_seconds"]},
    }
    with open(os.path.join(work, f"report_{args.method}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n| {args.method} | validation (mean acc) | test (mean acc) |\n|---|---|---|")
    print(f"| best grid point of merge_sweep.py ({chosen['params']}), chosen on validation "
          f"| {chosen['val']:.4f} | {chosen['test']:.4f} |")
    print(f"| amalgam search, {trials} trials (best: trial {summary['best']['trial']}) "
          f"| {summary['best']['objective']:.4f} | {s_test:.4f} |")
    print(f"\nsearch: {total:.0f} s in all, {total / trials:.1f} s per trial "
          f"(merge {summary['mean_merge_seconds']:.2f} s, eval {summary['mean_eval_seconds']:.2f} s)")


if __name__ == "__main__":
    main()
