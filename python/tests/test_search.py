"""`amalgam.search` against the CLI, and its Ray backend against the local one (a local Ray
cluster; a worker killed mid-trial). Run as test_amalgam.py says."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

import amalgam

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("AMALGAM_BIN", str(ROOT / "target" / "release" / "amalgam"))
FX = ROOT / "crates" / "amalgam-eval" / "tests" / "fixtures"
STAGING = ".amalgam-tmp-"
MARKER = ".amalgam-staging.json"


def config(tmp_path, max_evals=8, repeat=1):
    """Three dense fine-tunes of a tiny BERT, TIES per layer, scored by a labelled task."""
    task = FX / "bert" / "task.jsonl"
    if repeat > 1:
        rows = task.read_text().splitlines()
        task = tmp_path / "task.jsonl"
        task.write_text("\n".join(rows * repeat) + "\n")
    smile = FX / "routing" / "smile"
    return {
        "genome": {"models": [str(smile / f"ft{i}") for i in range(3)], "merge_method": "ties",
                   "base_model": str(smile / "base"), "layer_granularity": 1},
        "tasks": [{"task": str(task), "head": str(FX / "bert" / "head.safetensors")}],
        "search": {"population": 4, "max_evals": max_evals, "seed": 5},
    }


def trials(results):
    """The recorded trials without their timings, in trial order."""
    lines = Path(results).read_text().splitlines()
    recs = sorted((json.loads(line) for line in lines[1:]), key=lambda r: r["trial"])
    return [(r["trial"], r["x"], r["objective"], r["tasks"]) for r in recs]


def test_search_is_the_clis(tmp_path):
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(config(tmp_path)))
    seen = []
    out = amalgam.search(cfg, results=tmp_path / "py.jsonl", best=tmp_path / "py.yml",
                         scratch=tmp_path / "scratch", progress=seen.append)
    r = subprocess.run([BIN, "search", cfg, "--results", tmp_path / "cli.jsonl", "--best",
                        tmp_path / "cli.yml", "--scratch", tmp_path / "scratch", "--json", "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    assert trials(tmp_path / "py.jsonl") == trials(tmp_path / "cli.jsonl")
    assert (tmp_path / "py.yml").read_text() == (tmp_path / "cli.yml").read_text()
    assert out["best"] == want["best"] and out["trials"] == want["trials"] == 8
    assert [s["trial"] for s in seen] == list(range(8))
    assert (tmp_path / "py.svg").exists()
    assert os.listdir(tmp_path / "scratch") == []
    # A finished search reopened runs nothing; errors carry the message.
    again = amalgam.search(cfg, results=tmp_path / "py.jsonl", best=tmp_path / "py.yml")
    assert again["best"] == out["best"]
    bad = config(tmp_path)
    bad["search"]["sigma0"] = 0
    with pytest.raises(amalgam.AmalgamError, match="sigma0"):
        amalgam.search(bad, results=tmp_path / "bad.jsonl")


def test_ray_gives_the_local_trials_and_survives_a_killed_worker(tmp_path):
    ray = pytest.importorskip("ray")
    cfg = config(tmp_path, max_evals=8, repeat=400)
    amalgam.search(cfg, results=tmp_path / "local.jsonl", best=tmp_path / "local.yml",
                   scratch=tmp_path / "s1")

    scratch = tmp_path / "s2"
    killed = []
    stop = threading.Event()

    def kill_one_trial():
        # The first trial seen running in scratch: SIGKILL its worker process.
        while not stop.is_set() and not killed:
            for d in scratch.glob(STAGING + "trial-*") if scratch.exists() else []:
                try:
                    owner = json.loads((d / MARKER).read_text())
                except (OSError, ValueError):
                    continue
                if owner["pid"] != os.getpid():
                    os.kill(owner["pid"], signal.SIGKILL)
                    killed.append(d.name)
                    return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_one_trial)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killer.start()
        out = amalgam.search(cfg, results=tmp_path / "ray.jsonl", best=tmp_path / "ray.yml",
                             backend="ray", scratch=scratch, threads=1)
    finally:
        stop.set()
        killer.join()
        ray.shutdown()
    assert killed, "no trial was caught running"
    assert out["trials"] == 8
    assert trials(tmp_path / "ray.jsonl") == trials(tmp_path / "local.jsonl")
    assert (tmp_path / "ray.yml").read_text() == (tmp_path / "local.yml").read_text()
    assert len((tmp_path / "ray.jsonl").read_text().splitlines()) == 9
    assert os.listdir(scratch) == [], "the killed trial's model was removed"
