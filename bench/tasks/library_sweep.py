#!/usr/bin/env python3
"""Store the five task fine-tunes of all-MiniLM-L6-v2 as amalgam task libraries, evaluate them.

Every storage scheme (a small sweep where the scheme has parameters) builds one library of the
five fine-tunes; each task's model is rebuilt from it and evaluated on its task with its
fine-tuned head; the script writes the table and the plot.

Prerequisite (once, outside CI, ~45 min on 2 cores): the fine-tunes and heads

    python3 bench/tasks/finetune.py --out /tmp/amalgam-tasks

Then, with a release build of amalgam (`cargo build --release -p amalgam-cli`):

    python3 bench/tasks/library_sweep.py --work /tmp/amalgam-tasks [--reuse] [--threads N]

For every setting of SETTINGS below: `amalgam library build CONFIG LIB --overwrite -q` into
WORK/libraries/NAME (config next to it, NAME.yml), `amalgam library info LIB --json` for the
size (bits per parameter of each task's module) and each task's reconstruction error
‖τ̂_t − τ_t‖ / ‖τ_t‖, then per task `amalgam eval LIB --library-task TASK --task
TASK.test.jsonl --head heads/TASK.safetensors --json`: the rebuilt model is evaluated without
being written. Normalized accuracy is acc(rebuilt t, t) / acc(fine-tune t, t), averaged over
tasks; the fine-tunes' own accuracies are measured here too, with the same `amalgam eval`.

Validation. One setting is chosen on data: TALL's λ_t (the mask threshold, per task). The
validation split is WORK/val/TASK.val.jsonl, the LAST 500 ROWS of TASK.train.jsonl (written by
this script; the test rows are never used for a choice). The fine-tunes of finetune.py trained
on those rows too, so validation accuracies are optimistic in absolute terms; they only rank
the candidates. One TALL library is built per candidate λ (the same λ for every task), each
task is evaluated on its validation file, the λ with the best validation accuracy is kept per
task (ties: the smaller λ), and the final TALL library is built with those λ_t (each under its
task's `parameters:`); only that library's TEST accuracy is reported. No other setting is
chosen: every sweep point is listed.

References: the fine-tunes (100 %) and the single best merged model (one model for all tasks):
the best normalized merge in merge_sweep.py's WORK/results.json if it is there (an oracle pick
on the test average, as merge_sweep makes it), else the best point of BENCHMARKS.md's tasks
section (BEST_MERGE below) merged and evaluated here (`--merge-reference`).

Writes WORK/library_results.json (after every step, so `--reuse` resumes an interrupted run),
bench/tasks/library_accuracy.png and the section between the `<!-- library:begin -->` /
`<!-- library:end -->` markers of BENCHMARKS.md (appended at the end the first time). Only the
standard library is needed, plus matplotlib for the plot (skipped with a notice if missing).
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import merge_sweep as ms  # noqa: E402  (its config, run, describe and BENCHMARKS helpers)
TASKS = ["sentiment_rt", "topic_bbc", "spam_sa", "supersense_wordnet", "author_austen_book"]
SHORT = {"sentiment_rt": "sentiment", "topic_bbc": "topic", "spam_sa": "spam",
         "supersense_wordnet": "supersense", "author_austen_book": "austen"}

# The sweep: (name, label, scheme, scheme parameters, merge block or None, chosen on
# validation or None). `name` is the library's folder under WORK/libraries and the key in the
# results. `merge` is the config's `merge:` block (scheme twin only). `chosen` is
# (per-task parameter, candidates): that parameter is picked per task on the validation split
# (see the docstring); only TALL's λ is.
TA_03 = {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.3, "weight": 1.0}}
SETTINGS = [
    ("emr_paper", "EMR, rescale paper", "emr", {"rescale": "paper"}, None, None),
    ("emr_code", "EMR, rescale code", "emr", {"rescale": "code"}, None, None),
    ("tall_val", "TALL (TA), λ_t on val", "tall", {"merged": "task_arithmetic"}, None,
     ("lambda", [0.2, 0.3, 0.4, 0.5, 0.6])),
    ("sign_matrix", "sign, scale matrix", "sign", {"scale": "matrix"}, None, None),
    ("sign_row", "sign, scale row", "sign", {"scale": "row"}, None, None),
    ("ternary_d0.05", "ternary, density 0.05", "ternary", {"density": 0.05, "select": "sign"},
     None, None),
    ("ternary_d0.1", "ternary, density 0.1", "ternary", {"density": 0.1, "select": "sign"},
     None, None),
    ("ternary_d0.2", "ternary, density 0.2", "ternary", {"density": 0.2, "select": "sign"},
     None, None),
    ("quant_b2", "quant, 2 bits", "quant", {"bits": 2}, None, None),
    ("quant_b4", "quant, 4 bits", "quant", {"bits": 4}, None, None),
    ("quant_b2_residual", "quant, 2 bits residual", "quant", {"bits": 2, "residual": True},
     None, None),
    ("tsv_c_default", "TSV-C, default rank", "tsv_c", {"rank": 0}, None, None),
    ("tsv_c_energy0.5", "TSV-C, energy 0.5", "tsv_c", {"energy": 0.5}, None, None),
    ("tsv_c_rank8", "TSV-C, rank 8", "tsv_c", {"rank": 8}, None, None),
    ("twin_rf0.1", "Twin, rank 0.1", "twin", {"rank_fraction": 0.1}, TA_03, None),
    ("twin_rf0.02", "Twin, rank 0.02", "twin", {"rank_fraction": 0.02}, TA_03, None),
    ("twin_rf0.1_bf16", "Twin, rank 0.1, bf16 factors", "twin",
     {"rank_fraction": 0.1, "factor_dtype": "bfloat16"}, TA_03, None),
    ("dense", "dense (lossless)", "dense", {}, None, None),
]
VAL_ROWS = 500  # the last VAL_ROWS rows of TASK.train.jsonl

# The merged-model reference when WORK/results.json is absent: the best normalized point of
# BENCHMARKS.md's tasks section (merge_sweep.py, run 2026-11): Iso-C, λ 3.0, 98.9 %.
# (label, merge_method, global parameters, per-model parameters), as in merge_sweep's SWEEP.
BEST_MERGE = ("Iso-C", "iso_c", {"lambda": 3.0}, {})


def yaml_block(d, indent):
    """A mapping of scalars or mappings as YAML block lines."""
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"{' ' * indent}{k}:")
            lines += yaml_block(v, indent + 2)
        else:
            lines.append(f"{' ' * indent}{k}: {ms.yaml_value(v)}")
    return lines


def library_config(base, work, scheme, params, merge, task_params):
    """The `amalgam library build` config; task_params: {task: {param: value}} or {}."""
    lines = [f"base_model: {base}", "tasks:"]
    for t in TASKS:
        lines += [f"  - name: {t}", f"    model: {os.path.join(work, 'finetuned', t)}"]
        if task_params.get(t):
            lines.append("    parameters:")
            lines += yaml_block(task_params[t], 6)
    lines.append(f"scheme: {scheme}")
    if params:
        lines.append("parameters:")
        lines += yaml_block(params, 2)
    if merge:
        lines.append("merge:")
        lines += yaml_block(merge, 2)
    return "\n".join(lines) + "\n"


def write_val_splits(args, work):
    """WORK/val/TASK.val.jsonl: the last VAL_ROWS rows of TASK.train.jsonl."""
    folder = os.path.join(work, "val")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for t in TASKS:
        with open(os.path.join(args.data, f"{t}.train.jsonl")) as f:
            rows = [line.rstrip("\n") for line in f if line.strip()]
        text = "\n".join(rows[-VAL_ROWS:]) + "\n"
        path = os.path.join(folder, f"{t}.val.jsonl")
        if not (os.path.exists(path) and open(path).read() == text):
            with open(path, "w") as f:
                f.write(text)
        paths[t] = path
    return paths


class Sweep:
    """Builds, evaluations and their cache (WORK/library_results.json)."""

    def __init__(self, args, base):
        self.args = args
        self.base = base
        self.work = args.work
        self.libs = os.path.join(self.work, "libraries")
        os.makedirs(self.libs, exist_ok=True)
        self.path = os.path.join(self.work, "library_results.json")
        previous = {}
        if args.reuse and os.path.exists(self.path):
            previous = json.load(open(self.path))
        # Builds do not depend on --limit/--max-len; evaluations do.
        self.builds = previous.get("builds", {})
        same_eval = (previous.get("max_len") == args.max_len
                     and previous.get("limit", 0) == args.limit)
        self.evals = previous.get("evals", {}) if same_eval else {}
        self.results = {"max_len": args.max_len, "limit": args.limit, "val_rows": VAL_ROWS,
                        "builds": self.builds, "evals": self.evals}
        self.built_now = set()

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.path)

    def amalgam(self, *rest, threads=True):
        cmd = [self.args.amalgam]
        if threads:
            cmd += ["--threads", str(self.args.threads)]
        return ms.run(cmd + list(rest))

    def build(self, name, config):
        """Build library `name` from `config` unless --reuse finds it built from the same
        config; returns its build record {config, info, build_s}."""
        lib = os.path.join(self.libs, name)
        cfg = os.path.join(self.libs, f"{name}.yml")
        rec = self.builds.get(name)
        if (rec and rec.get("config") == config and os.path.isdir(lib)
                and os.path.exists(cfg) and open(cfg).read() == config):
            return rec
        # A rebuild invalidates the evaluations of the old library.
        self.evals.pop(name, None)
        with open(cfg, "w") as f:
            f.write(config)
        t0 = time.time()
        self.amalgam("library", "build", cfg, lib, "--overwrite", "-q")
        build_s = time.time() - t0
        info = json.loads(self.amalgam("library", "info", lib, "--json", threads=False))
        rec = {"config": config, "info": info, "build_s": round(build_s, 2)}
        self.builds[name] = rec
        self.built_now.add(name)
        self.save()
        print(f"  built {name} in {build_s:.1f} s", flush=True)
        return rec

    def eval_cmd(self, model, task_file, head, library_task=None):
        cmd = ["eval", model]
        if library_task:
            cmd += ["--library-task", library_task]
        cmd += ["--task", task_file, "--head", head, "--max-len", str(self.args.max_len),
                "--json", "-q"]
        if self.args.limit:
            cmd += ["--limit", str(self.args.limit)]
        return cmd

    def evaluate(self, name, split, task, model, task_file, library_task=None):
        """Accuracy of task `task` (one eval call); cached as evals[name][split][task]."""
        cached = self.evals.get(name, {}).get(split, {}).get(task)
        if cached is not None:
            return cached
        head = os.path.join(self.work, "heads", f"{task}.safetensors")
        t0 = time.time()
        out = json.loads(self.amalgam(*self.eval_cmd(model, task_file, head, library_task)))
        rec = {"accuracy": out["tasks"][0]["accuracy"], "examples": out["tasks"][0]["examples"],
               "eval_s": round(time.time() - t0, 2)}
        self.evals.setdefault(name, {}).setdefault(split, {})[task] = rec
        self.save()
        return rec

    def eval_library(self, name, split, files):
        lib = os.path.join(self.libs, name)
        return {t: self.evaluate(name, split, t, lib, files[t], library_task=t) for t in TASKS}


def test_files(args):
    return {t: os.path.join(args.data, f"{t}.test.jsonl") for t in TASKS}


def summarize(info):
    """Per-task bits/parameter and reconstruction error from `library info --json`, and the
    bits per parameter per task with the shared part spread over the tasks."""
    by_task = {t["name"]: t for t in info["tasks"]}
    missing = [t for t in TASKS if t not in by_task or not by_task[t].get("present", True)]
    if missing:
        print(f"  warning: library info lists no module for {missing}", file=sys.stderr)
    bits = {t: by_task[t]["bits_per_parameter"] for t in TASKS if t in by_task}
    err = {t: by_task[t]["relative_error"] for t in TASKS if t in by_task}
    p = info["base_parameters"]
    all_bytes = info["shared_bytes"] + sum(by_task[t]["bytes"] for t in TASKS if t in by_task)
    return {"bits_per_parameter_tasks": bits,
            "bits_per_parameter": sum(bits.values()) / len(bits),
            "bits_incl_shared": all_bytes * 8 / (p * len(TASKS)),
            "relative_error_tasks": err,
            "relative_error": sum(err.values()) / len(err),
            "shared_bytes": info["shared_bytes"], "total_bytes": info.get("total_bytes"),
            "full_models_bytes": info.get("full_models_bytes"),
            "base_parameters": p}


def normalized(acc, ft):
    per = {t: acc[t] / ft[t] for t in TASKS}
    return per, sum(per.values()) / len(per), min(per.values())


def choose_on_val(sweep, name, scheme, params, merge, chosen, val_files):
    """Build one library per candidate (the same value for every task), evaluate every task
    on its validation file, keep per task the candidate with the best validation accuracy
    (ties: the first candidate)."""
    param, candidates = chosen
    record = {"parameter": param, "candidates": candidates, "val_rows": VAL_ROWS, "builds": []}
    best = {}
    for value in candidates:
        cand = f"{name}_cand_{param}{value}"
        config = library_config(sweep.base, sweep.work, scheme, params, merge,
                                {t: {param: value} for t in TASKS})
        b = sweep.build(cand, config)
        acc = {t: r["accuracy"] for t, r in sweep.eval_library(cand, "val", val_files).items()}
        val_s = sum(r["eval_s"] for r in sweep.evals[cand]["val"].values())
        record["builds"].append({"name": cand, "value": value, "val_accuracy": acc,
                                 "build_s": b["build_s"], "eval_s": round(val_s, 2),
                                 **{k: v for k, v in summarize(b["info"]).items()
                                    if k in ("bits_per_parameter", "relative_error")}})
        for t in TASKS:
            if t not in best or acc[t] > best[t][1]:
                best[t] = (value, acc[t])
        print(f"  {param} {value}: val " + ", ".join(f"{SHORT[t]} {acc[t] * 100:.1f}"
                                                   for t in TASKS), flush=True)
    record["chosen"] = {t: best[t][0] for t in TASKS}
    print(f"  chosen on val: {record['chosen']}", flush=True)
    return record


def best_from_merge_sweep(args, ft):
    """The best normalized merge in merge_sweep's WORK/results.json, or None."""
    path = os.path.join(args.work, "results.json")
    if not os.path.exists(path):
        print(f"no {path} (merge_sweep.py not run on this folder)", flush=True)
        return None
    res = json.load(open(path))
    if res.get("max_len") != args.max_len or not res.get("merges"):
        print(f"{path}: max_len {res.get('max_len')} ≠ {args.max_len} or no merges; not used",
              flush=True)
        return None
    their_ft = res.get("finetuned") or ft
    best = None
    for m in res["merges"]:
        _, norm, low = normalized(m["accuracy"], their_ft)
        if best is None or norm > best["normalized"]:
            best = {"source": "WORK/results.json (merge_sweep.py; best of its sweep on the "
                              "test average)",
                    "label": m["label"], "method": m["method"], "global": m["global"],
                    "model": m["model"], "accuracy": m["accuracy"], "normalized": norm,
                    "normalized_min": low, "limit": res.get("limit", 0)}
    if best["limit"] != args.limit:
        print(f"warning: {path} was evaluated with --limit {best['limit']}, this run with "
              f"{args.limit}", file=sys.stderr)
    return best


def run_best_merge(sweep, args, ft):
    label, method, gparams, mparams = BEST_MERGE
    finetunes = [os.path.join(args.work, "finetuned", t) for t in TASKS]
    config = ms.config_text(method, sweep.base, finetunes, gparams, mparams)
    name = f"merge:{method}:{json.dumps([gparams, mparams], sort_keys=True)}"
    out = os.path.join(args.work, "library_merged")
    cached = sweep.evals.get(name, {})
    if cached.get("config") != config or len(cached.get("test", {})) < len(TASKS):
        sweep.evals[name] = {"config": config}
        cfg = os.path.join(args.work, "library_merge.yml")
        with open(cfg, "w") as f:
            f.write(config)
        t0 = time.time()
        sweep.amalgam("merge", cfg, out, "--overwrite", "-q")
        sweep.evals[name]["merge_s"] = round(time.time() - t0, 2)
        for t in TASKS:
            sweep.evaluate(name, "test", t, out, test_files(args)[t])
    acc = {t: sweep.evals[name]["test"][t]["accuracy"] for t in TASKS}
    _, norm, low = normalized(acc, ft)
    return {"source": "merged and evaluated by this script (BEST_MERGE: the best point of "
                      "BENCHMARKS.md's tasks section)",
            "label": label, "method": method, "global": gparams, "model": mparams,
            "accuracy": acc, "normalized": norm, "normalized_min": low, "limit": args.limit}


def setting_row(s):
    return (f"| {s['label']} | {s['bits_per_parameter']:.3g} | {s['bits_incl_shared']:.3g} | "
            f"{s['normalized_avg'] * 100:.1f} | {s['normalized_min'] * 100:.1f} | "
            f"{s['relative_error']:.3f} |")


def markdown(results, args):
    ft = results["finetuned"]
    rows = sorted(results["settings"], key=lambda s: (s["bits_per_parameter"], s["name"]))
    n_rows = f"first {args.limit}" if args.limit else "500"
    lines = [
        f"Each fine-tune stored as a task module of one library over the shared base, rebuilt "
        f"by `amalgam eval LIB --library-task TASK` and evaluated on its task's {n_rows} test "
        f"rows with its fine-tuned head (max length {args.max_len}). Normalized accuracy: "
        f"acc(rebuilt t, t) / acc(fine-tune t, t), averaged over the {len(TASKS)} tasks (min: "
        "the worst task). Bits/param/task: the task's module (`library info`'s "
        "`bits_per_parameter`, mean over tasks), per parameter of the base; \"incl. shared\" adds "
        f"the shared part (EMR's unified vector, TALL's or Twin's merged vector) spread over the "
        f"{len(TASKS)} tasks. The fine-tunes keep the word embeddings frozen (about half the "
        "parameters), so no module stores them: a b-bit code of the changed tensors costs about "
        "b/2 bits per base parameter, and `dense` (lossless) about 16. Reconstruction error: "
        "‖τ̂_t − τ_t‖ / ‖τ_t‖ of the task vector, mean over tasks.",
        "",
        "| setting | bits/param/task | incl. shared | normalized acc. (%) | min per-task (%) "
        "| reconstruction error |",
        "|---|---|---|---|---|---|",
    ]
    lines += [setting_row(s) for s in rows]
    ft_bits = 32.0  # float32 fine-tunes, every tensor
    lines.append(f"| *reference: the {len(TASKS)} fine-tunes* | {ft_bits:.3g} | {ft_bits:.3g} | "
                 "100.0 | 100.0 | 0 |")
    m = results.get("merge_reference")
    if m:
        lines.append(f"| *reference: best merged model, {m['label']} "
                     f"({ms.describe(m['global'], m['model'])})* | 0 | "
                     f"{ft_bits / len(TASKS):.3g} | {m['normalized'] * 100:.1f} | "
                     f"{m['normalized_min'] * 100:.1f} | – |")
    lines.append("")
    ch = results.get("chosen_on_val", {})
    for name, rec in ch.items():
        per = ", ".join(f"{SHORT[t]} {rec['chosen'][t]}" for t in TASKS)
        cands = ", ".join(str(c) for c in rec["candidates"])
        lines.append(
            f"`{name}`: {rec['parameter']} per task chosen from {{{cands}}} on a validation "
            f"split, the last {rec['val_rows']} rows of each TASK.train.jsonl (rows the "
            f"fine-tunes trained on; the test rows were not used): {per}. Every other row is a "
            "fixed setting, none chosen on data.")
    if m:
        lines.append(f"Best merged model: {m['source']}.")
    else:
        lines.append("Best merged model: not available (no WORK/results.json from "
                     "merge_sweep.py and `--merge-reference` did not run one); line left out.")
    lines.append("Fine-tunes' own accuracies (%): " + ", ".join(
        f"{SHORT[t]} {ft[t] * 100:.1f}" for t in TASKS) + ".")
    build_s = sum(s["build_s"] for s in results["settings"])
    eval_s = sum(s["eval_s"] for s in results["settings"])
    cands = [b for rec in ch.values() for b in rec["builds"]]
    extra = ""
    if cands:
        extra = (f" (plus {len(cands)} validation candidates: built in "
                 f"{sum(b['build_s'] for b in cands) / 60:.1f} min, evaluated on the validation "
                 f"splits in {sum(b['eval_s'] for b in cands) / 60:.1f} min)")
    lines += ["", f"{len(rows)} libraries built in {build_s / 60:.1f} min in all, their "
              f"evaluations in {eval_s / 60:.1f} min{extra}, at {args.threads} threads; per "
              "setting, parameters, per-task accuracies, `build_s` and `eval_s` in "
              "WORK/library_results.json."]
    cmd = "python3 bench/tasks/library_sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines.append(f"Produced by `{cmd.strip()}` on {datetime.date.today().isoformat()}"
                 f"{' (' + results['amalgam_version'] + ')' if results.get('amalgam_version') else ''}.")
    return "\n".join(lines)


FAMILY_COLORS = {"emr": "#d62728", "tall": "#ff7f0e", "sign": "#2ca02c", "ternary": "#17becf",
                 "quant": "#9467bd", "tsv_c": "#1f77b4", "twin": "#8c564b", "dense": "#555555"}


def place_labels(fig, ax, points):
    """Label every (x, y, text, color) point, trying a few offsets for each so that labels overlap
    neither one another nor the markers (greedy, highest point first)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = []
    for x, y, _, _ in points:  # the markers, as small boxes
        px, py = ax.transData.transform((x, y))
        taken.append((px - 4, py - 4, px + 4, py + 4))

    def free(b):
        if b.x0 < frame.x0 or b.x1 > frame.x1 or b.y0 < frame.y0 or b.y1 > frame.y1:
            return False
        return not any(b.x0 < t[2] and b.x1 > t[0] and b.y0 < t[3] and b.y1 > t[1]
                       for t in taken)

    offsets = [(5, 2), (5, -9), (-5, 2), (-5, -9), (5, 9), (5, -16), (-5, 9), (-5, -16),
               (5, 16), (5, -23), (-5, 16), (-5, -23)]
    def text_box(ann):  # the text alone, not the leader line
        from matplotlib.text import Text
        ann.update_positions(renderer)
        return Text.get_window_extent(ann, renderer)

    def label(x, y, text, color, i):
        dx, dy = offsets[i]
        # A leader line from the marker when the label is not at its usual place.
        line = {} if i == 0 else {"arrowprops": {"arrowstyle": "-", "lw": 0.5, "color": color,
                                                 "shrinkA": 0, "shrinkB": 3}}
        return ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy),
                           ha="left" if dx > 0 else "right", va="center", fontsize=7,
                           color=color, **line)

    offsets = [(6, 5), (6, -7), (-6, 5), (-6, -7), (10, 13), (10, -15), (-10, 13), (-10, -15),
               (14, 21), (14, -23), (-14, 21), (-14, -23)]
    for x, y, text, color in sorted(points, key=lambda p: -p[1]):
        for i in range(len(offsets)):
            ann = label(x, y, text, color, i)
            b = text_box(ann)
            if free(b):
                break
            ann.remove()
        else:  # nowhere free: the usual place
            ann = label(x, y, text, color, 0)
            b = text_box(ann)
        taken.append((b.x0, b.y0, b.x1, b.y1))


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(10, 6))
    settings = [s for s in results["settings"] if s["bits_per_parameter"] > 0]
    points = []
    for s in settings:
        x, y = s["bits_per_parameter"], s["normalized_avg"] * 100
        color = FAMILY_COLORS.get(s["scheme"], "black")
        ax.scatter([x], [y], color=color, s=28, zorder=3)
        points.append((x, y, s["label"], color))
    ax.set_xscale("log")
    xs = [p[0] for p in points]
    if xs:  # room for the labels on both sides
        ax.set_xlim(min(xs) / 1.6, max(xs) * 3.5)
    ax.axhline(100, color="black", linewidth=0.8, linestyle="--",
               label=f"the {len(TASKS)} fine-tunes (100 %; 32 bits/param/task)")
    m = results.get("merge_reference")
    lows = [p[1] for p in points] + [100]
    if m:
        v = m["normalized"] * 100
        lows.append(v)
        ax.axhline(v, color="#3572b0", linewidth=0.8, linestyle=":",
                   label=f"best merged model, one for all tasks: {m['label']} "
                         f"{ms.describe(m['global'], m['model'])} ({v:.1f} %)")
    ax.set_xlabel("bits per parameter per task (task module only; log scale)")
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_ylim(max(0, min(lows) - 3), max(102, max(p[1] for p in points) + 1) if points else 102)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"all-MiniLM-L6-v2, {len(TASKS)} text tasks stored as an amalgam task library "
                 "(100 = fine-tuned)", fontsize=9)
    fig.tight_layout()
    place_labels(fig, ax, points)
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="finetune.py's --out folder")
    ap.add_argument("--amalgam", default=os.path.join(REPO, "target", "release", "amalgam"))
    ap.add_argument("--base", default=None, help="base model folder (default: the PyPI package's)")
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "benchmark"))
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="passed as `amalgam --threads N`")
    ap.add_argument("--limit", type=int, default=0, help="rows per task file (0: all)")
    ap.add_argument("--settings", nargs="*", default=None,
                    help="names of SETTINGS to run (default: all; none: only the references)")
    ap.add_argument("--merge-reference", choices=["auto", "results", "run", "none"],
                    default="auto",
                    help="best merged model: from WORK/results.json (results), merged here "
                         "(run), the first else the second (auto, the default), or none")
    ap.add_argument("--no-benchmarks-md", action="store_true")
    ap.add_argument("--reuse", action="store_true",
                    help="take builds and evaluations already in WORK/library_results.json "
                         "(same config, same --max-len/--limit; same binary and fine-tunes "
                         "assumed) instead of recomputing them")
    args = ap.parse_args()
    args.work = os.path.abspath(args.work)
    args.data = os.path.normpath(os.path.abspath(args.data))
    if args.settings is not None:
        unknown = set(args.settings) - {s[0] for s in SETTINGS}
        if unknown:
            ap.error(f"unknown settings {sorted(unknown)}; known: {[s[0] for s in SETTINGS]}")
    start = time.time()
    base = ms.base_model_path(args)
    sweep = Sweep(args, base)
    results = sweep.results
    try:
        results["amalgam_version"] = ms.run([args.amalgam, "--version"]).strip()
    except OSError as e:
        sys.exit(f"cannot run {args.amalgam}: {e}")
    val_files = write_val_splits(args, args.work)
    tests = test_files(args)

    ft = {t: sweep.evaluate("finetuned", "test", t, os.path.join(args.work, "finetuned", t),
                            tests[t])["accuracy"] for t in TASKS}
    results["finetuned"] = ft
    print("fine-tuned: " + ", ".join(f"{SHORT[t]} {ft[t] * 100:.1f}" for t in TASKS), flush=True)

    ref = None
    if args.merge_reference in ("auto", "results"):
        ref = best_from_merge_sweep(args, ft)
    if ref is None and args.merge_reference in ("auto", "run"):
        ref = run_best_merge(sweep, args, ft)
    results["merge_reference"] = ref
    if ref:
        print(f"best merged model: {ref['label']} {ms.describe(ref['global'], ref['model'])}"
              f" {ref['normalized'] * 100:.1f} % normalized", flush=True)
    else:
        print("best merged model: none (line left out)", flush=True)
    sweep.save()

    results["settings"] = []
    results["chosen_on_val"] = {}
    for name, label, scheme, params, merge, chosen in SETTINGS:
        if args.settings is not None and name not in args.settings:
            continue
        print(f"{label} [{name}]", flush=True)
        task_params = {}
        if chosen:
            rec = choose_on_val(sweep, name, scheme, params, merge, chosen, val_files)
            results["chosen_on_val"][name] = rec
            task_params = {t: {chosen[0]: rec["chosen"][t]} for t in TASKS}
        config = library_config(base, args.work, scheme, params, merge, task_params)
        b = sweep.build(name, config)
        evals = sweep.eval_library(name, "test", tests)
        acc = {t: evals[t]["accuracy"] for t in TASKS}
        per, norm, low = normalized(acc, ft)
        s = {"name": name, "label": label, "scheme": scheme, "parameters": params,
             "merge": merge, "task_parameters": task_params, "accuracy": acc,
             "normalized": per, "normalized_avg": norm, "normalized_min": low,
             **summarize(b["info"]), "build_s": b["build_s"],
             "eval_s": round(sum(e["eval_s"] for e in evals.values()), 2)}
        results["settings"].append(s)
        sweep.save()
        print(f"  bits/param/task {s['bits_per_parameter']:.3g} (incl. shared "
              f"{s['bits_incl_shared']:.3g}), rec. error {s['relative_error']:.3f}, normalized "
              f"{norm * 100:.1f} % (min {low * 100:.1f}) [build {s['build_s']:.1f} s, "
              f"eval {s['eval_s']:.1f} s]", flush=True)
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)
    sweep.save()
    if not results["settings"]:
        return
    md = markdown(results, args)
    print(md)
    plotted = plot(results, os.path.join(HERE, "library_accuracy.png"))
    if not args.no_benchmarks_md:
        ms.update_benchmarks(md, "bench/tasks/library_accuracy.png" if plotted else None,
                             marker="library",
                             alt="normalized accuracy against bits per parameter per task")


if __name__ == "__main__":
    main()
