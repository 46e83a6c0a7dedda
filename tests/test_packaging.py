"""The project's files agree with each other."""
import ast
import re
from pathlib import Path

import nbformat
import tomllib
import yaml

from lorafind_utils.core.config import load_profile, stage_params

ROOT = Path(__file__).resolve().parent.parent


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {_norm(d) for d in deps} == {_norm(d) for d in pip if d != "-e ."}
    assert "python=3.11" in env["dependencies"]


def test_notebooks_committed_without_outputs():
    nbs = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert nbs
    for p in nbs:
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert c.outputs == [] and c.execution_count is None, f"{p.name} has outputs; strip them"


def _parameters(p: Path) -> dict:
    nb = nbformat.read(p, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{p.name}: exactly one 'parameters' cell"
    out = {}
    for node in ast.parse(cells[0].source).body:
        assert isinstance(node, ast.AnnAssign), f"{p.name}: parameters must be annotated literals"
        out[node.target.id] = ast.literal_eval(node.value)
    for line in cells[0].source.splitlines():
        assert "#" in line, f"{p.name}: parameter without a comment: {line}"
    return out


def test_notebook_defaults_match_tiny_profile():
    cfg = load_profile("tiny")
    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        params = _parameters(p)
        assert params["profile"] == "tiny" and params["overrides"] == {}
        for k, v in stage_params(cfg, p.stem).items():
            assert params[k] == v, f"{p.name}: default {k}={params[k]!r} but configs/tiny.yaml says {v!r}"


def test_notebooks_are_thin():
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for c in nbformat.read(p, as_version=4).cells:
            if c.cell_type == "code":
                assert not re.search(r"^\s*(def|class)\s", c.source, re.M), (
                    f"{p.name}: move functions into lorafind_utils"
                )


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:1500]
    assert "make study" in head and "make test" in head


def test_paper_profile_lists_the_papers_models():
    cfg = load_profile("paper")
    assert cfg["models"]["base"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg["models"]["controlnet"] == "lllyasviel/sd-controlnet-canny"
    assert cfg["stages"]["01_synthesize"]["resolution"] == 512
    cat = yaml.safe_load((ROOT / cfg["catalog"]).read_text())["loras"]
    assert len(cat) == 12
    ids = {e["civitai_version_id"] for e in cat}
    assert ids == {60568, 19065, 25661, 42314, 169568, 269819, 30572, 180175, 231819, 188417, 113534, 228470}
    for e in cat:
        assert str(e["civitai_version_id"]) in e["url"]


def test_papermill_understands_every_parameter():
    import papermill as pm

    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        seen = pm.inspect_notebook(str(p))
        assert set(seen) == set(_parameters(p)), f"{p.name}: papermill --help-notebook misses some parameters"
        assert all(v["help"] for v in seen.values())


def test_notebook_parameters_are_not_shadowed_by_imports():
    """A parameter that a later import rebinds (``make_queries`` once was) silently stops working."""
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        params = set(_parameters(p))
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type != "code" or "parameters" in c.metadata.get("tags", []):
                continue
            for node in ast.walk(ast.parse(c.source)):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound = {(a.asname or a.name).split(".")[0] for a in node.names}
                    assert not bound & params, f"{p.name}: import rebinds parameter(s) {bound & params}"
                elif isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            assert t.id not in params, f"{p.name}: assignment rebinds parameter {t.id}"
