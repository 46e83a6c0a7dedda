"""Independent jobs (a LoRA's images, an ablation run) in worker processes on CPU.

A small convolutional network or a 64-pixel diffusion step barely uses a second core: on
2 cores, two single-threaded processes do 1.5-1.6x the work of one process with two
threads (measured: ``lorafind bench workers``). On a GPU there is one device and
``workers`` is 1: the jobs then run in this process, through the same job function.

Workers are spawned (not forked: safe with torch's thread pools and inside Jupyter), each
with a fixed number of torch threads; results come back in job order.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager


def resolve_workers(workers, device: str, n_jobs: int, threads: int | None = 1) -> int:
    """How many worker processes: ``auto``/0 -> cores / threads per job on CPU; always 1 on a GPU;
    never more than the jobs."""
    if not str(device).startswith("cpu"):
        return 1
    if workers in (None, 0, "auto"):
        w = (os.cpu_count() or 1) // max(1, int(threads or 1))
    else:
        w = int(workers)
        if w < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {workers!r}")
    return max(1, min(w, n_jobs))


def job_threads(device: str, threads: int | None) -> int | None:
    """Torch threads per job: on CPU ``threads`` (None: this process's count); None on a GPU,
    where the CPU's thread count changes no number."""
    if not str(device).startswith("cpu"):
        return None
    import torch

    return int(threads) if threads else torch.get_num_threads()


@contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch threads (None: leave as is), restoring the old count."""
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))
    from lorafind_utils.models.pipelines import quiet_libraries

    quiet_libraries()


def run_jobs(fn: Callable, jobs: Sequence, workers: int = 1, threads: int | None = None,
             on_done: Callable | None = None, order: Iterable[int] | None = None) -> list:
    """``[fn(job) for job in jobs]``, in ``workers`` processes when ``workers > 1``.

    :param fn: a module-level function (it is sent to the workers by name).
    :param threads: torch threads per job (workers and this process alike).
    :param on_done: called with (job index, result) as each job finishes (progress bars).
    :param order: submission order (e.g. longest job first); results keep job order.
    :raises: the first job error, after the other workers are stopped.
    """
    order = list(order) if order is not None else list(range(len(jobs)))
    results: list = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        with torch_threads(threads):
            for i in order:
                results[i] = fn(jobs[i])
                if on_done:
                    on_done(i, results[i])
        return results
    import multiprocessing as mp

    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads or 1,))
    try:
        futures = {ex.submit(fn, jobs[i]): i for i in order}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                i = futures[f]
                results[i] = f.result()  # re-raises a worker's error here
                if on_done:
                    on_done(i, results[i])
    except BaseException:
        # a failed job or Ctrl-C: stop now (outputs are written atomically, so a killed job
        # leaves nothing half-written and its work is redone on the next run)
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        raise
    ex.shutdown(wait=True)
    return results
