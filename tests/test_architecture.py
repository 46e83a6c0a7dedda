"""The package's shape: no import cycle, no private names across modules, one owner of the layout,
every stage's parameters declared once and checked up front."""
import ast
import re
from pathlib import Path

import nbformat
import pytest

from lorafind_utils.core.config import load_profile
from lorafind_utils.core.params import STAGE_PARAMS, ParamError, check_stage_params

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "lorafind_utils"


#: the concerns, lowest first: a module may import from its own concern and from those below it, never above.
LAYERS = ["core", "models", "engines", "rank", "stages", "catalog", "dryrun", "bench", "app"]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    """dotted name (``rank.style_index``, ``stages`` for a package's __init__) -> file"""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(package module imported, names) for every import of the package, at any depth (function bodies too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, (
                f"{path.relative_to(ROOT)}: a relative import; spell lorafind_utils.<concern>.<module>"
            )
            mod = node.module or ""
            if (
                mod == "lorafind_utils"
            ):  # from lorafind_utils import stages / from lorafind_utils.rank import style_index
                out.extend((a.name, []) for a in node.names)
            elif mod.startswith("lorafind_utils."):
                sub = mod[len("lorafind_utils."):]
                mods = _modules()
                for a in node.names:
                    if f"{sub}.{a.name}" in mods:  # a module imported by name
                        out.append((f"{sub}.{a.name}", []))
                    else:
                        out.append((sub, [a.name]))
        elif isinstance(node, ast.Import):
            out.extend(
                (a.name[len("lorafind_utils.") :], []) for a in node.names if a.name.startswith("lorafind_utils.")
            )
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: {n for n, _ in _imports(p) if n in mods and n != m} for m, p in mods.items()}


def _concern(mod: str) -> str:
    return mod.split(".")[0] if mod.split(".")[0] in LAYERS else "core"  # the package's own __init__


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_every_module_sits_in_a_concern_and_imports_only_downwards():
    mods = _modules()
    assert {m.split(".")[0] for m in mods if m} <= set(LAYERS), sorted({m.split(".")[0] for m in mods} - set(LAYERS))
    wrong = []
    for m, deps in _graph().items():
        if not m:
            continue
        for d in deps:
            if LAYERS.index(_concern(d)) > LAYERS.index(_concern(m)):
                wrong.append(f"{m} imports {d}")
    assert not wrong, "imports against the layers " + " < ".join(LAYERS) + ": " + "; ".join(sorted(wrong))


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """The rule above is not vacuous: the graph sees imports inside functions, and stages sit above rank."""
    graph = _graph()
    assert "rank.index_ops" in graph["stages.index_study"]  # a function-level import of the index operations
    assert LAYERS.index(_concern("stages.index_study")) > LAYERS.index(_concern("rank.index_ops"))
    assert not any(d.startswith("stages") for d in graph["rank.index_ops"])


def test_no_module_over_600_lines():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_module_imports_another_modules_private_names():
    for p in _modules().values():
        for mod, names in _imports(p):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{p.relative_to(ROOT)} imports {private} from {mod}"


def test_only_the_layout_module_joins_run_folders():
    pattern = re.compile(r"""/\s*["'](synth|train|ablate|retrieval|thumbnails|generate|style_lora|models|index)["']|"""
                         r"""["'](manifest|metrics|labels|params|rankings|split)\.json["']""")
    for p in list(PKG.rglob("*.py")) + list((ROOT / "notebooks").glob("*.ipynb")):
        if p.name == "layout.py":
            continue
        text = p.read_text()
        hits = [m.group(0) for m in pattern.finditer(text)]
        assert not hits, f"{p.name} names run files by hand: {hits}; use lorafind_utils.core.layout"


def test_plotting_lives_in_figures_only():
    for p in PKG.rglob("*.py"):
        if p.name in ("figures.py",):
            continue
        assert "plt.subplots" not in p.read_text() and "sns." not in p.read_text(), (
            f"{p.name} draws; move it to figures.py"
        )


def _nb_params(p: Path) -> dict:
    nb = nbformat.read(p, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    return {n.target.id: ast.literal_eval(n.value) for n in ast.parse(cell.source).body}


def test_each_notebook_declares_exactly_its_stages_parameters():
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in nbs] == list(STAGE_PARAMS)
    for p in nbs:
        keys = set(_nb_params(p)) - {"profile", "overrides"}
        assert keys == set(STAGE_PARAMS[p.stem]), f"{p.name}: {sorted(keys ^ set(STAGE_PARAMS[p.stem]))}"
        # and they pass the stage's own check (the values mirror the tiny profile)
        check_stage_params(p.stem, {k: v for k, v in _nb_params(p).items() if k in keys}, p.name)


def test_the_notebooks_call_one_entry_point_and_stay_short():
    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        code = [c.source for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code"
                and "parameters" not in c.metadata.get("tags", [])]
        assert sum(s.count("stages.") for s in code) >= 1 and sum(len(s.splitlines()) for s in code) <= 12, p.name


@pytest.mark.parametrize("stage,key,value,msg", [
    ("01_synthesize", "steps", -1, "steps = -1: expected >= 1"),
    ("01_synthesize", "resolution", 0, "resolution = 0: expected >= 8"),
    ("01_synthesize", "resolution", "abc", "resolution = 'abc': expected an integer"),
    ("01_synthesize", "workers", "abc", "workers = 'abc': expected an integer"),
    ("01_synthesize", "dtype", "float64", "expected one of float32, float16, bfloat16"),
    ("02_finetune", "linear_probe", "yes", "expected true or false"),
    ("02_finetune", "run_name", "../x", "expected a plain name"),
    ("03_ablate_sizes", "sizes", [], "expected a non-empty list"),
])
def test_a_bad_value_names_the_key_the_file_and_what_is_allowed(tmp_path, stage, key, value, msg):
    with pytest.raises(ParamError, match=re.escape(msg)) as e:
        load_profile("tiny", {"stages": {stage: {key: value}}})
    assert "configs/tiny.yaml" in str(e.value) and f"stages.{stage}.{key}" in str(e.value)


def test_an_unknown_or_missing_key_is_an_error_naming_it(tmp_path):
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg["stages"]["01_synthesize"]["strenght"] = 0.5
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(
        ParamError, match=r"typo\.yaml: unknown key in stages\.01_synthesize: 'strenght' \(did you mean 'strength'\?\)"
    ):
        load_profile(bad)
    del cfg["stages"]["01_synthesize"]["strenght"], cfg["stages"]["01_synthesize"]["steps"]
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ParamError, match=r"stages\.01_synthesize is missing steps"):
        load_profile(bad)
    del cfg["models"]
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ParamError, match="missing models"):
        load_profile(bad)
    for text, msg in (("", "an empty file"), ("- a\n- b\n", "got list"), ("a: [", "not valid YAML")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_profile(bad)


def test_the_cli_reports_a_bad_profile_without_a_traceback(tmp_path, capsys):
    from lorafind_utils.app.cli import main

    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\n")
    assert main(["synthesize", "--profile", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "p.yaml: the profile is missing" in err and "Traceback" not in err
