"""Run the study headlessly: papermill executes ``notebooks/NN_*.ipynb`` in order with profile parameters."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_profile, project_root, stage_params
from lorafind_utils.core.files import tree_bytes
from lorafind_utils.core.records import append_record


class StageFailed(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


def discover_notebooks(nb_dir: str | Path | None = None) -> list[Path]:
    """The study's notebooks, ``NN_name.ipynb``, in numeric order."""
    nb_dir = Path(nb_dir) if nb_dir else project_root() / "notebooks"
    return sorted(p for p in nb_dir.glob("[0-9][0-9]_*.ipynb"))


def select(notebooks: list[Path], only: list[str] | None = None, start: str | None = None) -> list[Path]:
    """Filter by ``--only 01 03`` (numbers or names) and ``--from 02``."""
    def num(p: Path) -> str:
        return p.name[:2]

    if only:
        keep = [p for p in notebooks if num(p) in only or p.stem in only]
        unknown = [o for o in only if not any(num(p) == o or p.stem == o for p in notebooks)]
        if unknown:
            raise ValueError(f"no notebook {unknown}; available: {[p.stem for p in notebooks]}")
        notebooks = keep
    if start:
        if not any(num(p) == start or p.stem == start for p in notebooks):
            raise ValueError(f"--from {start}: no such notebook; available: {[p.stem for p in notebooks]}")
        i = next(i for i, p in enumerate(notebooks) if num(p) == start or p.stem == start)
        notebooks = notebooks[i:]
    return notebooks


class PeakRSS:
    """Peak resident memory, sampled: of this process's children (``children=True``: the notebook kernel
    and its workers, RSS summed) or of this process itself."""

    def __init__(self, interval: float = 0.25, children: bool = True):
        import psutil

        self.proc, self.interval, self.children, self.peak = psutil.Process(), interval, children, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        if not self.children:
            return self.proc.memory_info().rss
        total = 0
        for c in self.proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self._rss()
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def run_study(profile: str = "tiny", only: list[str] | None = None, start: str | None = None,
              overrides: dict | None = None, notebooks_dir: str | Path | None = None,
              output_dir: str | Path | None = None, kernel_name: str = "python3", log=print) -> list[dict]:
    """Execute the study's notebooks with papermill, stopping at the first failure.

    :param profile: ``tiny`` | ``paper`` | path to a profile YAML.
    :param only: run just these notebooks (``["01"]``); ``start``: from this one on.
    :param overrides: profile entries to replace (passed to every notebook as ``overrides``).
    :param output_dir: executed notebooks (default ``papermill_runs/<profile>/``).
    :return: the stage records (also appended to ``<runs_dir>/records.jsonl``).
    :raises StageFailed: naming notebook, cell and error.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    overrides = overrides or {}
    cfg = load_profile(profile, overrides)
    name = cfg["name"]
    out_dir = Path(output_dir) if output_dir else layout.papermill_dir(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    records_path = layout.records_file(cfg)
    nbs = select(discover_notebooks(notebooks_dir), only, start)
    if not nbs:
        raise ValueError("no notebooks to run")
    records = []
    for nb in nbs:
        # a notebook that is not a declared stage (a user's own) gets only the profile
        params = {"profile": str(profile), "overrides": overrides,
                  **(stage_params(cfg, nb.stem) if nb.stem in cfg["stages"] else {})}
        out_nb = out_dir / nb.name
        log(f"[{nb.stem}] running ({name} profile) -> {out_nb}")
        t0 = time.perf_counter()
        error = None
        watched = [layout.runs_dir(cfg), layout.figures_dir(cfg), out_dir]
        disk0 = sum(tree_bytes(d) for d in watched)
        with PeakRSS() as mem:
            try:
                pm.execute_notebook(str(nb), str(out_nb), parameters=params, kernel_name=kernel_name,
                                    cwd=str(project_root()), progress_bar=False)
            except PapermillExecutionError as e:
                error = (
                    f"{nb.name} failed in cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}"
                )
        rec = {"stage": nb.stem, "profile": name, "notebook": str(out_nb), "parameters": params,
               "wall_s": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(mem.peak / 2**20, 1),
               # growth of the runs, figures and executed-notebook folders (files rewritten count their change)
               "disk_written_mb": round((sum(tree_bytes(d) for d in watched) - disk0) / 2**20, 1),
               "status": "failed" if error else "ok"}
        if error:
            rec["error"] = error
        records.append(append_record(records_path, rec))
        if error:
            raise StageFailed(f"{error} -- executed notebook: {out_nb}")
        log(
            f"[{nb.stem}] done in {rec['wall_s']} s, peak memory {rec['peak_rss_mb']} MB "
            "(kernel and its workers, RSS summed)"
        )
    return records
