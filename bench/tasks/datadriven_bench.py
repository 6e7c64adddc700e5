#!/usr/bin/env python3
"""Data-driven merges on the MiniLM task benchmark (issue #19): RegMean and Fisher merging,
from statistics `amalgam measure` takes on the train files, against task arithmetic, TIES and
Iso-C, every setting of every method chosen on validation and then reported on the test rows;
and AdaMerging task- and layer-wise, coefficients learned on the same calibration rows' texts.

Validation is the last VAL_ROWS rows of each TASK.train.jsonl (library_sweep.py's split); the
statistics come from the first --rows rows of the same train files (never the validation or
test rows; the fine-tunes trained on every train row, as for the other sweeps).

    python3 bench/tasks/datadriven_bench.py --work /tmp/amalgam-tasks [--rows 256] [--ada-steps 500] [--reuse]

Also times each step and its peak RSS (/usr/bin/time), and `measure --stats gram` against
`amalgam eval` over the same rows (the issue's ≤ 1.3× target). Writes WORK/datadriven/results.json
and prints a markdown table. Needs the fine-tunes of bench/tasks/finetune.py in WORK and a
release build of amalgam.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import merge_sweep as ms  # noqa: E402
import library_sweep as ls  # noqa: E402

REGMEAN_ALPHAS = (0.5, 0.7, 0.9, 0.95, 1.0)
BASELINES = (
    [("task arithmetic", "task_arithmetic", {"lambda": lam}, {"weight": 1.0})
     for lam in (0.3, 0.5, 0.7, 1.0)]
    + [("TIES", "ties", {"lambda": lam}, {"weight": 1.0, "density": d})
       for d in (0.2, 0.5) for lam in (0.5, 1.0)]
    + [("Iso-C", "iso_c", {"lambda": lam}, {}) for lam in (1.0, 2.0, 3.0)]
)


def timed(cmd):
    """Run `cmd` under /usr/bin/time: (stdout, wall seconds, peak RSS MiB)."""
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "RSS %M"] + cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    rss = int(re.findall(r"RSS (\d+)", p.stderr)[-1]) / 1024
    return p.stdout, wall, rss


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = os.path.join(args.work, "datadriven")
        os.makedirs(self.work, exist_ok=True)
        self.path = os.path.join(self.work, "results.json")
        self.cache = {}
        if args.reuse and os.path.exists(self.path):
            with open(self.path) as f:
                self.cache = json.load(f)
        self.cache.setdefault("evals", {})
        self.cache.setdefault("steps", {})

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.cache, f, indent=1)

    def amalgam(self, *rest):
        return [self.args.amalgam, "--threads", str(self.args.threads), *rest]

    def step(self, key, cmd):
        """A timed command, cached under `key`: {"seconds", "rss_mib"}."""
        if key not in self.cache["steps"]:
            _, wall, rss = timed(cmd)
            self.cache["steps"][key] = {"seconds": wall, "rss_mib": rss}
            self.save()
        return self.cache["steps"][key]

    def evaluate(self, name, split, model, files):
        key = f"{name}|{split}"
        if key not in self.cache["evals"]:
            cmd = self.amalgam("eval", model, "--max-len", str(self.args.max_len), "--json", "-q")
            tasks = [t for t in ms.TASKS if t in files]
            for t in tasks:
                cmd += ["--task", files[t]]
            for t in tasks:
                cmd += ["--head", os.path.join(self.args.work, "heads", f"{t}.safetensors")]
            out = json.loads(ms.run(cmd))
            self.cache["evals"][key] = {t: r["accuracy"] for t, r in zip(tasks, out["tasks"])}
            self.save()
        return self.cache["evals"][key]


def calibration_files(args, work):
    """WORK/datadriven/calib/TASK.jsonl: the first --rows rows of TASK.train.jsonl."""
    folder = os.path.join(work, "calib")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for t in ms.TASKS:
        with open(os.path.join(args.data, f"{t}.train.jsonl")) as f:
            rows = [line.rstrip("\n") for line in f if line.strip()]
        assert len(rows) >= args.rows + ls.VAL_ROWS, t
        path = os.path.join(folder, f"{t}.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(rows[: args.rows]) + "\n")
        paths[t] = path
    return paths


def normalized(accs, ft):
    return sum(accs[t] / ft[t] for t in ms.TASKS) / len(ms.TASKS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=os.path.join(HERE, "..", "..", "..", "shared", "benchmark"))
    ap.add_argument("--amalgam", default=os.path.join(ms.REPO, "target", "release", "amalgam"))
    ap.add_argument("--base", default=None)
    ap.add_argument("--rows", type=int, default=256, help="train rows measured per task")
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ada-steps", type=int, default=500, help="AdaMerging steps")
    ap.add_argument("--no-benchmarks-md", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse cached steps and evaluations")
    args = ap.parse_args()
    args.limit = None
    bench = Bench(args)
    base = ms.base_model_path(args)
    val = ls.write_val_splits(args, args.work)
    test = {t: os.path.join(args.data, f"{t}.test.jsonl") for t in ms.TASKS}
    calib = calibration_files(args, bench.work)
    fts = {t: os.path.join(args.work, "finetuned", t) for t in ms.TASKS}
    heads = os.path.join(args.work, "heads")

    # Each fine-tune on its own task: the normalisation.
    ft = {"val": {}, "test": {}}
    for t in ms.TASKS:
        for split, files in (("val", val), ("test", test)):
            accs = bench.evaluate(f"ft:{t}", split, fts[t], {t: files[t]})
            ft[split][t] = accs[t]

    # Statistics, with time and memory; `eval` over the same rows for the ratio.
    stats = os.path.join(bench.work, "stats")
    os.makedirs(stats, exist_ok=True)
    timing = {}
    for t in ms.TASKS:
        common = ["--data", calib[t], "--max-len", str(args.max_len), "--overwrite", "-q"]
        g = os.path.join(stats, f"{t}.gram.safetensors")
        timing[f"gram {t}"] = bench.step(f"gram:{t}", bench.amalgam(
            "measure", fts[t], "--stats", "gram", g, *common))
        f = os.path.join(stats, f"{t}.fisher.safetensors")
        timing[f"fisher {t}"] = bench.step(f"fisher:{t}", bench.amalgam(
            "measure", fts[t], "--stats", "fisher", f, "--head",
            os.path.join(heads, f"{t}.safetensors"), *common))
        timing[f"eval {t}"] = bench.step(f"eval:{t}", bench.amalgam(
            "eval", fts[t], "--task", calib[t], "--head", os.path.join(heads, f"{t}.safetensors"),
            "--max-len", str(args.max_len), "-q"))

    # The sweep: (label, merge method, global parameters, per-model parameters, stats kind).
    sweep = [("RegMean", "regmean", {"alpha": a}, {}, "gram") for a in REGMEAN_ALPHAS]
    sweep += [("Fisher", "fisher", {"normalize": n}, {}, "fisher") for n in (True, False)]
    sweep += [(label, m, g, p, None) for label, m, g, p in BASELINES]
    rows = []
    configs = os.path.join(bench.work, "configs")
    models = os.path.join(bench.work, "models")
    os.makedirs(configs, exist_ok=True)
    os.makedirs(models, exist_ok=True)
    for label, method, gp, mp, kind in sweep:
        name = ms.key(method, gp, mp)
        slug = re.sub(r"[^a-z0-9]+", "_", f"{method} {json.dumps(gp)} {json.dumps(mp)}".lower())
        text = ms.config_text(method, base, [fts[t] for t in ms.TASKS], gp, mp)
        if kind:
            # Each model's stats file goes right after its `- model:` line.
            for t in ms.TASKS:
                text = text.replace(f"  - model: {fts[t]}\n",
                                    f"  - model: {fts[t]}\n    stats: "
                                    f"{os.path.join(stats, f'{t}.{kind}.safetensors')}\n")
        cfg = os.path.join(configs, f"{slug}.yml")
        with open(cfg, "w") as f:
            f.write(text)
        out = os.path.join(models, slug)
        merge = bench.step(f"merge:{name}", bench.amalgam("merge", cfg, out, "--overwrite", "-q"))
        v = bench.evaluate(name, "val", out, val)
        te = bench.evaluate(name, "test", out, test)
        rows.append({"label": label, "params": ms.describe(gp, mp), "val": v, "test": te,
                     "val_norm": normalized(v, ft["val"]), "test_norm": normalized(te, ft["test"]),
                     "merge": merge})
    # AdaMerging: coefficients learned on the calibration rows' texts (labels unused), its
    # defaults but --ada-steps steps; nothing to choose on validation.
    cfg = os.path.join(configs, "adamerge_base.yml")
    with open(cfg, "w") as f:
        f.write(ms.config_text("task_arithmetic", base, [fts[t] for t in ms.TASKS], {}, {}))
    for granularity in ("task", "layer"):
        label = f"AdaMerging {granularity}-wise"
        out = os.path.join(models, f"adamerge_{granularity}")
        cmd = bench.amalgam("adamerge", cfg, out, "--granularity", granularity,
                            "--steps", str(args.ada_steps), "--max-len", str(args.max_len),
                            "--head", heads, "--overwrite", "-q")
        for t in ms.TASKS:
            cmd += ["--data", f"{t}={calib[t]}"]
        step = bench.step(f"adamerge:{granularity}:{args.ada_steps}", cmd)
        name = f"adamerge {granularity} {args.ada_steps}"
        v = bench.evaluate(name, "val", out, val)
        te = bench.evaluate(name, "test", out, test)
        rows.append({"label": label, "params": f"{args.ada_steps} steps", "val": v, "test": te,
                     "val_norm": normalized(v, ft["val"]), "test_norm": normalized(te, ft["test"]),
                     "merge": step})
    bench.cache["table"] = rows
    bench.cache["timing"] = timing
    bench.save()

    lines = [f"Accuracy (%) on each task's 500-row test split, max length {args.max_len}; "
             f"statistics and AdaMerging's rows: the first {args.rows} rows of each train file; "
             "every setting chosen on validation (the last 500 train rows), its test result "
             "reported. Normalized: mean over tasks of merged ÷ fine-tuned accuracy.", ""]
    lines.append("| method | setting (chosen on val) | " + " | ".join(ms.SHORT[t] for t in ms.TASKS)
                 + " | test norm. avg | val norm. avg | merge s | merge MiB |")
    lines.append("|" + "---|" * (len(ms.TASKS) + 6))
    lines.append("| fine-tunes | – | " + " | ".join(f"{100 * ft['test'][t]:.1f}" for t in ms.TASKS)
                 + " | 100.0 % | 100.0 % | – | – |")
    best_by = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        best = max((r for r in rows if r["label"] == label), key=lambda r: r["val_norm"])
        best_by[label] = best
        lines.append(f"| {label} | {best['params']} | "
                     + " | ".join(f"{100 * best['test'][t]:.1f}" for t in ms.TASKS)
                     + f" | {100 * best['test_norm']:.1f} % | {100 * best['val_norm']:.1f} % | "
                     f"{best['merge']['seconds']:.1f} | {best['merge']['rss_mib']:.0f} |")
    lines += ["", "Every sweep point (val norm. / test norm.):", ""]
    for r in rows:
        lines.append(f"- {r['label']} {r['params']}: {100 * r['val_norm']:.1f} / "
                     f"{100 * r['test_norm']:.1f}")
    lines += ["", f"Statistics of {args.rows} rows per task, time (s) / peak RSS (MiB), "
              f"{args.threads} threads; `eval` is `amalgam eval` over the same rows:", ""]
    lines.append("| step | " + " | ".join(ms.SHORT[t] for t in ms.TASKS) + " |")
    lines.append("|" + "---|" * (len(ms.TASKS) + 1))
    for what in ("gram", "fisher", "eval"):
        lines.append(f"| `{what}` | " + " | ".join(
            f"{timing[f'{what} {t}']['seconds']:.1f} / {timing[f'{what} {t}']['rss_mib']:.0f}"
            for t in ms.TASKS) + " |")
    lines.append("| gram ÷ eval | " + " | ".join(
        f"{timing[f'gram {t}']['seconds'] / timing[f'eval {t}']['seconds']:.2f}"
        for t in ms.TASKS) + " |")
    md = "\n".join(lines)
    print(md)
    plot_rel = None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = list(best_by)
        vals = [100 * best_by[k]["test_norm"] for k in labels]
        colors = ["#c0504d" if k.startswith(("RegMean", "Fisher", "AdaMerging")) else "#3572b0"
                  for k in labels]
        ms.bar_plot(plt, labels, vals, colors,
                    "all-MiniLM-L6-v2, 5 tasks: data-driven (red) and data-free merges, "
                    "settings chosen on validation", "test normalized accuracy (%)",
                    os.path.join(HERE, "datadriven_accuracy.png"), size=(8, 3.8), rotation=30)
        plot_rel = "bench/tasks/datadriven_accuracy.png"
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    if not args.no_benchmarks_md:
        ms.update_benchmarks(md, plot_rel, marker="datadriven",
                             alt="test normalized accuracy per method")


if __name__ == "__main__":
    main()
