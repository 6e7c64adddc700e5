"""The Ray backend of `amalgam.search`: each trial is a Ray task (merge into the node's local
scratch, evaluate, delete the model, return the scores); the driver alone records outcomes in
the results file, in the order they finish, and CMA-ES sees each generation in trial order, so a
Ray search gives the trials and best config a local one gives for the same seed.

A task whose worker dies (killed, out of memory, a node lost) is retried by Ray (`max_retries`);
the retry removes what the dead attempt left in scratch. Models and task files must be at paths
every node sees (a shared file system, or the same copy on each node): the config's relative
paths are made absolute against the driver's working directory.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from . import _amalgam


def _trial(config: str, name: str, cwd: str, trial: int, x, scratch: str, threads: Optional[int]) -> str:
    from amalgam import _amalgam as native  # imported on the worker

    return native.search_trial(config, name, cwd, trial, list(x), scratch, threads=threads)


def run(
    search: "_amalgam.Search",
    config_text: str,
    config_name: str,
    cwd: str,
    scratch: str,
    *,
    address: Optional[str],
    threads: Optional[int],
    max_retries: int,
    progress: Optional[Callable[[dict], Any]],
) -> None:
    import ray

    if not ray.is_initialized():
        # address None: the cluster in RAY_ADDRESS, else a local one.
        ray.init(address=address)
    task = ray.remote(num_cpus=threads or 1, max_retries=max_retries)(_trial)
    while not search.finished:
        refs = {
            task.remote(config_text, config_name, cwd, t, x, scratch, threads): t
            for t, x in search.pending()
        }
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            trial = refs.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except Exception:
                for r in refs:
                    ray.cancel(r, force=True)
                raise
            record = json.loads(search.record(trial, outcome))
            if progress is not None:
                progress(record)
