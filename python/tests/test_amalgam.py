"""The Python package against the CLI and safetensors' own reader.

Run from the repository root after `pip install .[test]`, with the CLI built
(`cargo build --release -p amalgam-cli`; `AMALGAM_BIN` overrides its path):

    python -m pytest python/tests
"""

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import amalgam

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("AMALGAM_BIN", str(ROOT / "target" / "release" / "amalgam"))


def cli(*args):
    return subprocess.run([BIN, *map(str, args)], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(autouse=True)
def from_root(monkeypatch):
    # The example config names its models relative to the repository root, as the CLI runs it.
    monkeypatch.chdir(ROOT)


def files(d):
    """Every file under `d`, by relative path, with its bytes."""
    d = Path(d)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_merge_writes_the_bytes_the_cli_writes(tmp_path):
    ours = amalgam.merge("examples/ties.yml", tmp_path / "py")
    assert Path(ours) == tmp_path / "py"
    r = cli("merge", "examples/ties.yml", tmp_path / "cli", "-q")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "py") == files(tmp_path / "cli")


def test_merge_takes_yaml_text_and_dicts_and_reports_progress(tmp_path):
    text = (ROOT / "examples" / "ties.yml").read_text()
    seen = []
    amalgam.merge(text, tmp_path / "text", progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    config = {
        "merge_method": "linear",
        "models": [
            {"model": "examples/models/llama_ft1", "parameters": {"weight": 0.5}},
            {"model": "examples/models/llama_ft2", "parameters": {"weight": 0.5}},
        ],
    }
    out = amalgam.merge(config, tmp_path / "dict", threads=1)
    a = amalgam.open(out)
    b1, b2 = amalgam.open("examples/models/llama_ft1"), amalgam.open("examples/models/llama_ft2")
    name = a.keys()[0]
    np.testing.assert_allclose(a[name], (b1[name] + b2[name]) / 2, rtol=1e-6, atol=1e-7)
    assert files(tmp_path / "text") == files(Path(amalgam.merge("examples/ties.yml", tmp_path / "again")))


def test_errors_carry_the_cli_message(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: linear\nmodels:\n  - model: /nonexistent/model\n")
    r = cli("merge", bad, tmp_path / "cli")
    assert r.returncode == 2
    with pytest.raises(amalgam.AmalgamError) as e:
        amalgam.merge(bad, tmp_path / "py")
    assert "error: " + str(e.value) == r.stderr.strip()
    assert not (tmp_path / "py").exists()
    # An existing output is refused unless overwrite is given, as in the CLI.
    amalgam.merge("examples/ties.yml", tmp_path / "out")
    with pytest.raises(amalgam.AmalgamError, match="exists"):
        amalgam.merge("examples/ties.yml", tmp_path / "out")
    amalgam.merge("examples/ties.yml", tmp_path / "out", overwrite=True)
    with pytest.raises(amalgam.AmalgamError):
        amalgam.open(tmp_path / "missing")


def test_open_reads_every_dtype_as_safetensors_does(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.standard_normal((3, 4)),
        "f32": rng.standard_normal((2, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-9, 9, (2, 2)).astype(np.int64),
        "i32": rng.integers(-9, 9, (3,)).astype(np.int32),
        "i16": rng.integers(-9, 9, (3,)).astype(np.int16),
        "i8": rng.integers(-9, 9, (4,)).astype(np.int8),
        "u8": rng.integers(0, 255, (4,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
    }
    path = tmp_path / "all.safetensors"
    save_file(arrays, str(path))
    m = amalgam.open(path)
    want = load_file(str(path))
    assert sorted(m.keys()) == sorted(want)
    assert len(m) == len(want) and "f32" in m and "nope" not in m
    for name, w in want.items():
        got = m[name]
        assert got.dtype == w.dtype and got.shape == w.shape, name
        np.testing.assert_array_equal(got, w)
    with pytest.raises(KeyError):
        m["nope"]
    assert m.dtype("f16") == "F16" and m.shape("f64") == [3, 4]


def test_open_reads_bfloat16_as_float32(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0, 1e-3], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)   # exact: these are bf16 values
    header = json.dumps({"w": {"dtype": "BF16", "shape": [5], "data_offsets": [0, 10]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes())
    got = amalgam.open(path)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (bits.astype(np.uint32) << 16).view(np.float32))


def test_inspect_and_diff_are_the_clis_json(tmp_path):
    r = cli("inspect", "examples/models/llama_base", "--json")
    assert r.returncode == 0, r.stderr
    assert amalgam.inspect("examples/models/llama_base") == json.loads(r.stdout)
    d = amalgam.diff("examples/models/llama_base", "examples/models/llama_ft1")
    r = cli("diff", "examples/models/llama_base", "examples/models/llama_ft1", "--json")
    assert d == json.loads(r.stdout)
    assert amalgam.diff("examples/models/llama_base", "examples/models/llama_base")["tensors"]


def test_convert_and_lora_apply_match_the_cli(tmp_path):
    amalgam.convert("examples/models/llama_base", tmp_path / "py", dtype="bf16")
    cli("convert", "examples/models/llama_base", tmp_path / "cli", "--dtype", "bf16", "-q")
    assert files(tmp_path / "py") == files(tmp_path / "cli")
    with pytest.raises(amalgam.AmalgamError, match="dtype"):
        amalgam.convert("examples/models/llama_base", tmp_path / "x", dtype="int7")
    fx = ROOT / "crates" / "amalgam-cli" / "tests" / "fixtures"
    base, adapter = fx / "merge" / "models" / "llama_base", fx / "lora" / "adapters" / "qv"
    amalgam.lora.apply(base, adapter, tmp_path / "lpy", scale=0.5)
    cli("lora", "apply", base, adapter, tmp_path / "lcli", "--scale", "0.5", "-q")
    assert files(tmp_path / "lpy") == files(tmp_path / "lcli")


def test_library_build_rebuild_info_match_the_cli(tmp_path):
    info = amalgam.library.build("examples/library.yml", tmp_path / "py")
    r = cli("library", "build", "examples/library.yml", tmp_path / "cli", "-q")
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "py") == files(tmp_path / "cli")
    r = cli("library", "info", tmp_path / "cli", "--json")
    want = json.loads(r.stdout)
    want["library"] = str(tmp_path / "py")
    assert info == want == amalgam.library.info(tmp_path / "py")
    amalgam.library.rebuild(tmp_path / "py", "ft2", tmp_path / "ft2-py")
    cli("library", "rebuild", tmp_path / "cli", "ft2", tmp_path / "ft2-cli", "-q")
    assert files(tmp_path / "ft2-py") == files(tmp_path / "ft2-cli")
    with pytest.raises(amalgam.AmalgamError, match="nope"):
        amalgam.library.rebuild(tmp_path / "py", "nope", tmp_path / "x")


def test_a_raising_progress_callback_stops_the_merge(tmp_path):
    def stop(done, total):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        amalgam.merge("examples/ties.yml", tmp_path / "out", progress=stop)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".amalgam-tmp")]
    # The next call runs normally: the cancellation does not outlive its call.
    amalgam.merge("examples/ties.yml", tmp_path / "out")


def test_ctrl_c_interrupts_and_leaves_no_output(tmp_path):
    import signal
    import sys
    import time

    out = tmp_path / "out"
    # A callback that sleeps makes the tiny merge last seconds.
    script = (
        "import time, amalgam\n"
        f"amalgam.merge('examples/ties.yml', {str(out)!r}, threads=1,\n"
        "              progress=lambda d, t: (print('started', flush=True), time.sleep(0.2)))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "KeyboardInterrupt" in err, err
    assert not out.exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".amalgam-tmp")]


def test_eval_is_the_clis_json(tmp_path):
    fx = ROOT / "crates" / "amalgam-eval" / "tests" / "fixtures"
    moe = ROOT / "crates" / "amalgam-cli" / "tests" / "fixtures" / "moe" / "mixtral_cheap.out"
    cases = [
        (fx / "bert", [fx / "bert" / "task.jsonl"], [fx / "bert" / "head.safetensors"]),
        (fx / "llama", [fx / "llama" / "lm.jsonl"], []),
        (moe, [fx / "llama" / "lm.jsonl"], []),
    ]
    for model, tasks, heads in cases:
        args = [a for t in tasks for a in ("--task", t)] + [a for h in heads for a in ("--head", h)]
        r = cli("eval", model, *args, "--json", "-q")
        assert r.returncode == 0, r.stderr
        assert amalgam.eval(model, tasks, heads=heads) == json.loads(r.stdout), model
    # The same error as the CLI's: a labelled task without a head.
    r = cli("eval", fx / "bert", "--task", fx / "bert" / "task.jsonl")
    with pytest.raises(amalgam.AmalgamError) as e:
        amalgam.eval(fx / "bert", fx / "bert" / "task.jsonl")
    assert "error: " + str(e.value) == r.stderr.strip()
    with pytest.raises(amalgam.AmalgamError, match="--limit"):
        amalgam.eval(fx / "llama", fx / "llama" / "lm.jsonl", limit=0)


def test_moe_writes_the_bytes_the_cli_writes(tmp_path):
    fx = ROOT / "crates" / "amalgam-cli" / "tests" / "fixtures" / "moe"
    for case in ["mixtral_cheap", "llama_hidden"]:
        config = fx / f"{case}.yml"
        report = amalgam.moe(config, tmp_path / f"{case}-py", layout="legacy")
        r = cli("moe", config, tmp_path / f"{case}-cli", "--layout", "legacy", "--json", "-q")
        assert r.returncode == 0, r.stderr
        want = json.loads(r.stdout)
        for k in ("output", "gate_seconds", "seconds"):
            report.pop(k), want.pop(k)
        assert report == want
        assert files(tmp_path / f"{case}-py") == files(tmp_path / f"{case}-cli")
    with pytest.raises(amalgam.AmalgamError, match="layout"):
        amalgam.moe(fx / "mixtral_cheap.yml", tmp_path / "x", layout="v4")


def test_lora_extract_merge_and_export_match_the_cli(tmp_path, monkeypatch):
    base, ft = "examples/models/llama_base", "examples/models/llama_ft1"
    report = amalgam.lora.extract(base, ft, tmp_path / "py", rank=4)
    r = cli("lora", "extract", "--base", base, "--model", ft, "--rank", "4", tmp_path / "cli", "--json")
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    report.pop("path"), want.pop("path")
    assert report == want
    assert files(tmp_path / "py") == files(tmp_path / "cli")
    amalgam.library.build("examples/library.yml", tmp_path / "lib")
    exported = amalgam.library.export_lora(tmp_path / "lib", "ft1", tmp_path / "epy", rank=4)
    r = cli("library", "export-lora", tmp_path / "lib", "ft1", tmp_path / "ecli", "--rank", "4", "--json")
    want = json.loads(r.stdout)
    exported.pop("path"), want.pop("path")
    assert exported == want
    # The adapters' README names the task's model, rebuilt in a temporary folder per run.
    a, b = files(tmp_path / "epy"), files(tmp_path / "ecli")
    a.pop("README.md"), b.pop("README.md")
    assert a == b
    # lora merge configs name their paths relative to the working directory.
    monkeypatch.chdir(ROOT / "crates" / "amalgam-cli" / "tests" / "fixtures" / "lora")
    ranks = amalgam.lora.merge("merged/linear.yml", tmp_path / "mpy")
    r = subprocess.run([BIN, "lora", "merge", "merged/linear.yml", str(tmp_path / "mcli"), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert ranks and files(tmp_path / "mpy") == files(tmp_path / "mcli")
