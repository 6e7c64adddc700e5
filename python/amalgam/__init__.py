"""amalgam: compose fine-tunes of one base model, from Python.

The work runs in amalgam's Rust library (the `_amalgam` extension), without the GIL; Ctrl-C
stops it and removes the partial output. Errors raise `AmalgamError` with the message the
`amalgam` command prints.

    import amalgam
    out = amalgam.merge("examples/ties.yml", "/tmp/merged", overwrite=True)
    model = amalgam.open(out)
    w = model["model.layers.0.mlp.down_proj.weight"]      # a numpy array
"""

from __future__ import annotations

import builtins
import json
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Union

from . import _amalgam
from ._amalgam import AmalgamError, Model

__all__ = [
    "AmalgamError", "Model", "merge", "moe", "open", "inspect", "diff", "convert", "eval", "lora",
    "library", "search",
]

Progress = Optional[Callable[[int, int], Any]]


def _config_file(config: Union[str, os.PathLike, Dict[str, Any]], tmp: str) -> str:
    """A path to the config: `config` itself if it is a file, else it written as YAML (a dict is
    written as JSON, which is YAML)."""
    if isinstance(config, dict):
        text = json.dumps(config)
    else:
        path = os.fspath(config)
        if _amalgam._is_file(path):
            return path
        if "\n" not in path and ":" not in path:
            raise AmalgamError(f"{path}: no such config file")
        text = path
    target = os.path.join(tmp, "config.yml")
    with builtins.open(target, "w", encoding="utf-8") as f:
        f.write(text)
    return target


def merge(
    config: Union[str, os.PathLike, Dict[str, Any]],
    out: Union[str, os.PathLike],
    *,
    threads: Optional[int] = None,
    seed: int = 0,
    out_shard_size: str = "5B",
    overwrite: bool = False,
    allow_crimes: bool = False,
    progress: Progress = None,
) -> str:
    """Merge as a mergekit YAML config says (a path, YAML text, or a dict) into `out`; returns the
    output directory. `progress(done_bytes, total_bytes)` is called as tensors are written."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _config_file(config, tmp)
        return _amalgam.merge(
            path,
            os.fspath(out),
            threads=threads,
            seed=seed,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            allow_crimes=allow_crimes,
            progress=progress,
        )


def moe(
    config: Union[str, os.PathLike, Dict[str, Any]],
    out: Union[str, os.PathLike],
    *,
    layout: str = "v5",
    seed: int = 0,
    allow_identical_experts: bool = False,
    out_shard_size: str = "5B",
    overwrite: bool = False,
    threads: Optional[int] = None,
    progress: Progress = None,
) -> Dict[str, Any]:
    """Build a mixture-of-experts model from a mergekit-moe config (a path, YAML text or a dict);
    returns what `amalgam moe --json` prints. `layout` is "v5" (fused experts, mergekit 0.1.5's)
    or "legacy" (one tensor per expert)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _config_file(config, tmp)
        return json.loads(
            _amalgam.moe(
                path,
                os.fspath(out),
                layout=layout,
                seed=seed,
                allow_identical_experts=allow_identical_experts,
                out_shard_size=out_shard_size,
                overwrite=overwrite,
                threads=threads,
                progress=progress,
            )
        )


def open(path: Union[str, os.PathLike]) -> Model:  # noqa: A001 (amalgam.open, like io.open)
    """Open a model folder, `.safetensors` file or shard index for reading: a lazy mapping from
    tensor names to numpy arrays (bfloat16 read as float32)."""
    return Model(os.fspath(path))


def inspect(path: Union[str, os.PathLike], *, top: int = 10) -> Dict[str, Any]:
    """`amalgam inspect --json`: architecture, tensors, parameters, dtypes, shards."""
    return json.loads(_amalgam.inspect_json(os.fspath(path), top=top))


def diff(a: Union[str, os.PathLike], b: Union[str, os.PathLike], *, rtol: float = 0.0) -> Dict[str, Any]:
    """`amalgam diff --json`: the two models compared tensor by tensor."""
    return json.loads(_amalgam.diff_json(os.fspath(a), os.fspath(b), rtol=rtol))


def convert(
    input: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    dtype: Optional[str] = None,
    out_shard_size: Optional[str] = None,
    overwrite: bool = False,
    threads: Optional[int] = None,
    progress: Progress = None,
) -> str:
    """Rewrite a model with another float dtype (bf16, f16, f32, f64) and/or sharding."""
    return _amalgam.convert(
        os.fspath(input),
        os.fspath(out),
        dtype=dtype,
        out_shard_size=out_shard_size,
        overwrite=overwrite,
        threads=threads,
        progress=progress,
    )


def eval(  # noqa: A001 (amalgam.eval, the CLI's `amalgam eval`)
    model: Union[str, os.PathLike],
    tasks: Union[str, os.PathLike, List[Union[str, os.PathLike]]],
    *,
    heads: Optional[List[Union[str, os.PathLike]]] = None,
    max_len: Optional[int] = None,
    limit: Optional[int] = None,
    batch_size: int = 32,
    library_task: Optional[str] = None,
    base: Optional[Union[str, os.PathLike]] = None,
    threads: Optional[int] = None,
) -> Dict[str, Any]:
    """`amalgam eval --json`: each JSONL task's accuracy (classification, with one head per
    labelled task or a folder of NAME.safetensors heads) or loss and perplexity (language
    modelling), on the model folder or, with `library_task`, a task of a library rebuilt in
    memory."""
    if isinstance(tasks, (str, os.PathLike)):
        tasks = [tasks]
    return json.loads(
        _amalgam.eval_json(
            os.fspath(model),
            [os.fspath(t) for t in tasks],
            heads=[os.fspath(h) for h in heads or []],
            max_len=max_len,
            limit=limit,
            batch_size=batch_size,
            library_task=library_task,
            base=None if base is None else os.fspath(base),
            threads=threads,
        )
    )


class lora:  # noqa: N801 (a namespace: amalgam.lora.apply)
    """LoRA adapters (PEFT format)."""

    @staticmethod
    def extract(
        base: Union[str, os.PathLike],
        model: Union[str, os.PathLike],
        out: Union[str, os.PathLike],
        *,
        rank: int = 128,
        energy: Optional[float] = None,
        distribute_scale: bool = True,
        embed_lora: bool = False,
        save_modules: Optional[List[str]] = None,
        include: Optional[List[str]] = None,
        exclude: Optional[List[str]] = None,
        sv_epsilon: float = 0.0,
        skip_undecomposable: bool = False,
        exact: bool = False,
        seed: int = 0,
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> Dict[str, Any]:
        """A PEFT adapter approximating `model − base` by truncated SVDs (mergekit-extract-lora's
        conventions); returns `lora extract --json`'s report."""
        return json.loads(
            _amalgam.lora_extract(
                os.fspath(base),
                os.fspath(model),
                os.fspath(out),
                rank=rank,
                energy=energy,
                distribute_scale=distribute_scale,
                embed_lora=embed_lora,
                save_modules=save_modules or [],
                include=include or [],
                exclude=exclude or [],
                sv_epsilon=sv_epsilon,
                skip_undecomposable=skip_undecomposable,
                exact=exact,
                seed=seed,
                overwrite=overwrite,
                threads=threads,
                progress=progress,
            )
        )

    @staticmethod
    def merge(
        config: Union[str, os.PathLike, Dict[str, Any]],
        out: Union[str, os.PathLike],
        *,
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> Dict[str, int]:
        """Compose adapters as a `lora merge` config says; returns each module's rank."""
        with tempfile.TemporaryDirectory() as tmp:
            path = _config_file(config, tmp)
            return json.loads(
                _amalgam.lora_merge(
                    path, os.fspath(out), overwrite=overwrite, threads=threads, progress=progress
                )
            )

    @staticmethod
    def apply(
        base: Union[str, os.PathLike],
        adapter: Union[str, os.PathLike],
        out: Union[str, os.PathLike],
        *,
        scale: float = 1.0,
        out_shard_size: Optional[str] = None,
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> str:
        """Bake `adapter` into `base`: W + scale·(α/r)·B·A, streaming."""
        return _amalgam.lora_apply(
            os.fspath(base),
            os.fspath(adapter),
            os.fspath(out),
            scale=scale,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            threads=threads,
            progress=progress,
        )


class library:  # noqa: N801 (a namespace: amalgam.library.build)
    """Task libraries: one base plus a compact module per task, any task rebuilt on demand."""

    @staticmethod
    def build(
        config: Union[str, os.PathLike, Dict[str, Any]],
        out: Union[str, os.PathLike],
        *,
        seed: int = 0,
        shard_size: str = "5B",
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> Dict[str, Any]:
        """Build a library from its config (a path, YAML text or a dict); returns what
        `library info --json` prints."""
        with tempfile.TemporaryDirectory() as tmp:
            path = _config_file(config, tmp)
            return json.loads(
                _amalgam.library_build(
                    path,
                    os.fspath(out),
                    seed=seed,
                    shard_size=shard_size,
                    overwrite=overwrite,
                    threads=threads,
                    progress=progress,
                )
            )

    @staticmethod
    def rebuild(
        lib: Union[str, os.PathLike],
        task: str,
        out: Union[str, os.PathLike],
        *,
        base: Optional[Union[str, os.PathLike]] = None,
        dtype: Optional[str] = None,
        out_shard_size: str = "5B",
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> str:
        """Rebuild task `task` of library `lib` as a model folder at `out`."""
        return _amalgam.library_rebuild(
            os.fspath(lib),
            task,
            os.fspath(out),
            base=None if base is None else os.fspath(base),
            dtype=dtype,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            threads=threads,
            progress=progress,
        )

    @staticmethod
    def export_lora(
        lib: Union[str, os.PathLike],
        task: str,
        out: Union[str, os.PathLike],
        *,
        rank: int,
        energy: Optional[float] = None,
        base: Optional[Union[str, os.PathLike]] = None,
        exact: bool = False,
        embed_lora: bool = False,
        overwrite: bool = False,
        threads: Optional[int] = None,
        progress: Progress = None,
    ) -> Dict[str, Any]:
        """Task `task` of library `lib` as a PEFT adapter of rank at most `rank`; returns the
        extraction report."""
        return json.loads(
            _amalgam.library_export_lora(
                os.fspath(lib),
                task,
                os.fspath(out),
                rank=rank,
                energy=energy,
                base=None if base is None else os.fspath(base),
                exact=exact,
                embed_lora=embed_lora,
                overwrite=overwrite,
                threads=threads,
                progress=progress,
            )
        )

    @staticmethod
    def info(lib: Union[str, os.PathLike]) -> Dict[str, Any]:
        """`library info --json`."""
        return json.loads(_amalgam.library_info_json(os.fspath(lib)))


def search(
    config: Union[str, os.PathLike, Dict[str, Any]],
    *,
    results: Optional[Union[str, os.PathLike]] = None,
    best: Optional[Union[str, os.PathLike]] = None,
    plot: Optional[Union[str, os.PathLike]] = None,
    backend: str = "local",
    address: Optional[str] = None,
    jobs: int = 1,
    threads: Optional[int] = None,
    scratch: Optional[Union[str, os.PathLike]] = None,
    max_retries: int = 3,
    progress: Optional[Callable[[Dict[str, Any]], Any]] = None,
) -> Dict[str, Any]:
    """`amalgam search`: CMA-ES over a merge genome, each trial a merge scored by evaluation
    tasks. `config` is a search config (a path, YAML text or a dict); every trial is appended to
    `results` (JSON lines; an existing file of the same config resumes the search), the best
    trial's merge config written to `best` and a plot of the objective to `plot` (SVG).

    `backend="local"` runs `jobs` trials at a time here; `backend="ray"` runs each trial as a
    Ray task (on the cluster at `address`, in `RAY_ADDRESS`, or a local one), retried up to
    `max_retries` times if its worker dies, with the same trials and best config as a local
    run. `progress(record)` is called after each trial. Returns what `amalgam search --json`
    prints."""
    if backend not in ("local", "ray"):
        raise AmalgamError(f"backend {backend!r}: use 'local' or 'ray'")
    with tempfile.TemporaryDirectory() as tmp:
        path = _config_file(config, tmp)
        stem = os.path.splitext(path)[0] if path != os.path.join(tmp, "config.yml") else "search"
        results = os.fspath(results) if results is not None else stem + ".results.jsonl"
        best = os.fspath(best) if best is not None else stem + ".best.yml"
        plot = os.fspath(plot) if plot is not None else os.path.splitext(results)[0] + ".svg"
        s = _amalgam.Search(path, results)
        for w in s.warnings:
            import warnings

            warnings.warn(w)
        if scratch is None:
            scratch = os.path.join(tempfile.gettempdir(), f"amalgam-search-{s.config_hash}")
        scratch = os.path.abspath(os.fspath(scratch))
        try:
            if backend == "local":
                cb = None if progress is None else (lambda line: progress(json.loads(line)))
                s.run_local(scratch=scratch, jobs=jobs, threads=threads, progress=cb)
            else:
                from . import _ray

                with builtins.open(path, encoding="utf-8") as f:
                    text = f.read()
                _ray.run(s, text, path, os.getcwd(), scratch, address=address, threads=threads,
                         max_retries=max_retries, progress=progress)
        finally:
            # What finished is kept whatever happened.
            wrote = s.write_best(best)
            s.write_plot(plot)
        summary = json.loads(s.summary_json())
        summary["best_config"] = best if wrote else None
        summary["plot"] = plot
        return summary
