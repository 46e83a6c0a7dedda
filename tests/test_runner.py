"""The study runner: papermill runs notebook 01 end to end; failures name notebook and cell; no secrets recorded."""
import json

import nbformat
import pytest
from conftest import tiny_overrides
from PIL import Image

from lorafind_utils.core.records import read_records, scrub
from lorafind_utils.engines.runner import StageFailed, discover_notebooks, run_study, select


def test_select_only_and_from():
    nbs = discover_notebooks()
    assert nbs[0].name == "01_synthesize.ipynb"
    assert select(nbs, only=["01"]) == nbs[:1]
    assert select(nbs, start="01") == nbs
    with pytest.raises(ValueError, match="no notebook"):
        select(nbs, only=["99"])


def test_scrub_removes_secrets(monkeypatch):
    monkeypatch.setenv("CIVITAI_TOKEN", "s3cr3t-value")
    out = scrub({"api_token": "abc", "url": "https://x/?token=s3cr3t-value", "n": 1})
    assert out == {"api_token": "<redacted>", "url": "https://x/?token=<redacted>", "n": 1}


@pytest.mark.slow
def test_study_runs_all_notebooks_end_to_end(tiny_root, catalog, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("CIVITAI_TOKEN", "s3cr3t-value")
    runs = tmp_path / "runs"
    ov = {**tiny_overrides(tiny_root), "runs_dir": str(runs), "figures_dir": str(tmp_path / "fig"),
          "stages": {"01_synthesize": {"sets": ["variety", "faces"], "max_images": 3},
                     "02_finetune": {"epochs": 2, "val_fraction": 0.5},
                     "03_ablate_sizes": {"sizes": [1], "seeds": [0, 1], "epochs": 1},
                     "04_domain_vs_variety": {"n": 1, "seeds": [0], "epochs": 1},
                     "05_retrieve_thumbnails": {"prompts": ["a red house"], "images_per_lora": 1},
                     "06_generate": {"queries": [0, 5]},
                     "07_train_style_lora": {"ranks": [2], "steps": 4, "n_style_images": 8, "batch_size": 2,
                                             "checkpoint_every": 2, "eval_seeds": [0, 1],
                                             "eval_prompts": ["a red house, in the style of duotone poster", "a cat"]},
                     "08_index": {"encoder": "gram", "compare": ["gram"], "folds": 0, "open_set_images": 2,
                                  "add_images": 2, "latency_queries": 2}}}
    recs = run_study("standin", overrides=ov, output_dir=tmp_path / "pm", log=lambda *a: None)
    assert [r["stage"] for r in recs] == ["01_synthesize", "02_finetune", "03_ablate_sizes", "04_domain_vs_variety",
                                          "05_retrieve_thumbnails", "06_generate", "07_train_style_lora", "08_index"]
    assert all(r["status"] == "ok" for r in recs)
    fig = tmp_path / "fig"
    # stage 02 artifacts: checkpoint + label map, history, metrics with both baselines, split by base image
    tr = runs / "train" / "finetune_variety"
    metrics = json.loads((tr / "metrics.json").read_text())
    split = json.loads((tr / "split.json").read_text())
    assert split["train_ids"] and split["val_ids"] and not set(split["train_ids"]) & set(split["val_ids"])
    assert metrics["n_val"] == 12 * len(split["val_ids"]) and metrics["n_train"] == 12 * len(split["train_ids"])
    assert {"finetuned", "pretrained", "linear_probe"} <= set(metrics) and "ImageNet weights" in metrics["backbone"]
    assert metrics["backbone_name"] == "efficientnet_lite0"
    assert (
        0 <= metrics["finetuned"]["accuracy"] <= 1 and metrics["finetuned"]["mrr"] >= metrics["finetuned"]["accuracy"]
    )
    assert (tr / "model.safetensors").exists() and json.loads((tr / "labels.json").read_text())["classes"] == [
        e["slug"] for e in catalog
    ]
    assert len((tr / "history.csv").read_text().splitlines()) == 1 + metrics["finetuned"]["epochs_run"]
    for f in (
        "figure6_curves.png",
        "confusion_matrix.png",
        "table2_rows12.csv",
        "table2_rows12.md",
        "ablation_sizes.png",
        "domain_vs_variety.png",
        "table2.csv",
        "table2.md",
        "table2.png",
        "table3.csv",
        "table3.md",
        "table3.png",
        "retrieval_examples.png",
        "figure8.png",
        "style_lora_ranks.csv",
        "style_lora_ranks.md",
        "style_lora_loss.png",
        "style_lora_grid.png",
        "style_lora_base_vs_ft.png",
        "style_lora_metrics.png",
        "index_methods.md",
        "index_methods.png",
        "index_open_set.md",
        "index_open_set.png",
        "index_costs.md",
        "index_style_lora.md",
    ):
        assert (fig / f).exists(), f
    # stage 07's LoRAs joined (copies of) the index from their kohya files and were ranked for held-out style images
    s08 = json.loads((runs / "index" / "results" / "stage08.json").read_text())["style_lora"]
    assert s08["heldout"] >= 1 and set(s08["per_rank"]) == {"2"}
    assert all(1 <= r <= 13 and v["entries"] == 13 for v in s08["per_rank"].values() for r in v["ranks"])
    # stages 03-04: every run validated on stage 02's validation set; the faces run trained on faces
    import pandas as pd

    sizes, domain = pd.read_csv(runs / "ablate" / "sizes.csv"), pd.read_csv(runs / "ablate" / "domain.csv")
    assert len(sizes) == 2 and set(sizes["val_ids"]) | set(domain["val_ids"]) == {"|".join(split["val_ids"])}
    faces_run = domain[domain["train_set"] == "faces"]["run_dir"].iloc[0]
    assert json.loads(open(f"{faces_run}/split.json").read())["train_ids"][0].endswith("_face")
    t2 = pd.read_csv(fig / "table2.csv")
    assert "Fine-tuned EfficientNet-Lite0" in set(t2["model"]) and "1 human face images" in set(t2["train data"])
    assert (t2["paper_accuracy"] == 8.30).any()  # the paper's values only where its setting was run (n=1 was not)
    # stage 05: rankings are permutations with scores summing to 1; no query image was used in training or validation
    ranked = json.loads((runs / "retrieval" / "rankings.json").read_text())
    assert len(ranked["queries"]) == 12 * 2
    slugs = sorted(e["slug"] for e in catalog)
    for q in ranked["queries"]:
        assert sorted(x["lora"] for x in q["ranking"]) == slugs
        assert sum(x["score"] for x in q["ranking"]) == pytest.approx(1, abs=1e-4)
    used = set(split["train_ids"]) | set(split["val_ids"])
    bases = {
        q["base_image"].split("/")[1]
        for q in json.loads((runs / "thumbnails" / "manifest.json").read_text())["queries"]
        if "base_image" in q
    }
    assert bases and not bases & used
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    synth_hashes = {digest(p) for p in (runs / "synth").rglob("*.png")}
    assert not {digest(p) for p in (runs / "thumbnails").rglob("*.png")} & synth_hashes
    assert set(ranked["metrics"]) >= {"all", "text-to-image", "img2img"}
    # stage 06: two generations per chosen query, each with a style similarity
    f8 = json.loads((runs / "generate" / "figure8.json").read_text())
    assert [r["query"] for r in f8["records"]] == ["Image1", "Image6"]
    assert all(len(r["generations"]) == 2 and all(0 < g["style_similarity"] <= 1 + 1e-6 for g in r["generations"])
               for r in f8["records"])
    # stage 07: one LoRA per rank in both layouts, each model scored per seed
    sweep = json.loads((runs / "style_lora" / "style_lora" / "sweep.json").read_text())
    assert [r["model"] for r in sweep["rows"]] == ["base", "base", "rank 2", "rank 2"]
    assert all({"fid", "kid", "lpips", "clip", "is"} <= set(r) for r in sweep["rows"])
    assert (runs / "style_lora" / "style_lora" / "rank2" / "lora_kohya.safetensors").exists()
    # stage 08: the index rows against the classifier's on the same queries;
    # the saved index answers `rank --method index`
    methods = pd.read_csv(fig / "index_methods.csv")
    assert len(methods) == 3 and methods["method"].iloc[-1].startswith("classifier")
    assert methods["top1_mean"].iloc[-1] == pytest.approx(100 * ranked["metrics"]["all"]["top1"])
    assert (runs / "index" / "gram-prototype" / "index.json").exists()
    nb = nbformat.read(tmp_path / "pm" / "01_synthesize.ipynb", as_version=4)
    assert nb.metadata["papermill"]["parameters"]["max_images"] == 3
    man = json.loads((runs / "synth" / "manifest.json").read_text())
    assert len(man["items"]) == 12 * 6 and man["params"]["max_images"] == 3
    assert len(list((runs / "synth" / "variety").rglob("*.png"))) == 36
    grid = Image.open(fig / "synthesis_grid_variety.png")
    assert grid.size[0] > 100
    from lorafind_utils.core.files import tree_bytes

    r01 = next(r for r in read_records(runs / "records.jsonl") if r["stage"] == "01_synthesize")
    assert r01["disk_written_mb"] >= round(tree_bytes(runs / "synth") / 2**20, 1) > 0  # its images at least
    rec = read_records(runs / "records.jsonl")[-1]
    assert rec["wall_s"] > 0 and rec["peak_rss_mb"] > 50 and "torch" in rec["versions"] and "git_sha" in rec
    text = (runs / "records.jsonl").read_text() + "".join(p.read_text() for p in (tmp_path / "pm").glob("*.ipynb"))
    assert "s3cr3t-value" not in text


def test_failure_names_notebook_and_cell(tmp_path):
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    )
    nb.cells = [
        nbformat.v4.new_code_cell("profile = 'tiny'  # p\noverrides = {}  # o", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise RuntimeError('stage exploded')"),
    ]
    d = tmp_path / "nbs"
    d.mkdir()
    nbformat.write(nb, d / "01_broken.ipynb")
    with pytest.raises(StageFailed, match=r"01_broken.ipynb failed in cell \d.*RuntimeError: stage exploded"):
        run_study(
            "tiny",
            overrides={"runs_dir": str(tmp_path / "r")},
            notebooks_dir=d,
            output_dir=tmp_path / "o",
            log=lambda *a: None,
        )
    rec = read_records(tmp_path / "r" / "records.jsonl")[-1]
    assert rec["status"] == "failed" and "stage exploded" in rec["error"]
