"""Stages 03-04: one validation set for every setting, faces train on faces only, exact reruns, Table 2."""
import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lorafind_utils.core.config import load_catalog, load_profile
from lorafind_utils.stages.ablation import run_settings, summarize, table2, write_table2
from lorafind_utils.stages.fine_tuning import make_split

N_VARIETY, N_FACES = 10, 8


@pytest.fixture(scope="module")
def synth_cfg(tmp_path_factory):
    """A stage-01-shaped output with small class-tinted images (no diffusion needed)."""
    root = tmp_path_factory.mktemp("ablate")
    cfg = load_profile("standin", {"runs_dir": str(root / "runs"), "figures_dir": str(root / "fig"),
                                "stages": {"02_finetune": {"image_size": 32, "epochs": 1, "batch_size": 16}}})
    slugs = [e["slug"] for e in load_catalog(cfg)]
    synth = root / "runs" / "synth"
    sets = {"variety": [f"{i:03d}_thing" for i in range(N_VARIETY)], "faces": [f"{i:03d}_face" for i in range(N_FACES)]}
    rng = np.random.default_rng(0)
    for s, ids in sets.items():
        for k, slug in enumerate(slugs):
            (synth / s / slug).mkdir(parents=True)
            for i in ids:
                px = rng.integers(0, 120, (32, 32, 3)) + np.array([10 * k, 200 - 15 * k, 60], dtype=np.int64)
                Image.fromarray(px.clip(0, 255).astype(np.uint8)).save(synth / s / slug / f"{i}.png")
    (synth / "manifest.json").write_text(json.dumps({"sets": sets, "loras": [{"slug": s} for s in slugs], "items": []}))
    return cfg, sets


def test_all_settings_share_one_validation_set_and_faces_train_on_faces(synth_cfg):
    cfg, sets = synth_cfg
    df = run_settings(cfg, [("variety", 3), ("variety", 6), ("faces", 3)], seeds=[0, 1], progress=False)
    assert len(df) == 6 and df["val_ids"].nunique() == 1
    val_ids = df["val_ids"].iloc[0].split("|")
    assert len(val_ids) == math.ceil(0.2 * N_VARIETY) and set(val_ids) <= set(sets["variety"])
    assert (df["n_val_images"] == 12 * len(val_ids)).all()
    assert (df["n_train_images"] == 12 * df["n"]).all()
    for r in df.to_dict("records"):
        split = json.loads(open(f"{r['run_dir']}/split.json").read())
        assert split["train_set"] == r["train_set"] and split["val_ids"] == val_ids
        assert set(split["train_ids"]) <= set(sets[r["train_set"]]) and len(split["train_ids"]) == r["n"]
        assert not set(split["train_ids"]) & set(val_ids)
        if r["train_set"] == "faces":  # trains on faces only
            assert all(i.endswith("_face") for i in split["train_ids"])
    # the seed also draws which base images train
    s0, s1 = (
        json.loads(open(f"{d}/split.json").read())["train_ids"]
        for d in df[(df.n == 3) & (df.train_set == "variety")].run_dir
    )
    assert s0 != s1


def test_rerun_reproduces_every_number_and_finished_runs_are_reused(synth_cfg):
    cfg, _ = synth_cfg
    cols = ["accuracy", "macro_f1", "mrr", "top3_accuracy", "pretrained_accuracy", "best_epoch"]
    a = run_settings(cfg, [("variety", 4)], seeds=[5], reuse=False, progress=False)
    b = run_settings(cfg, [("variety", 4)], seeds=[5], reuse=False, progress=False)
    pd.testing.assert_frame_equal(a[cols], b[cols])
    c = run_settings(cfg, [("variety", 4)], seeds=[5], progress=False)
    assert c["reused"].all() and not b["reused"].any()
    pd.testing.assert_frame_equal(a[cols], c[cols])
    # a half-written metrics.json (killed run) is trained again, not trusted
    with open(a["run_dir"].iloc[0] + "/metrics.json", "w") as f:
        f.write('{"params": {"trunc')
    d = run_settings(cfg, [("variety", 4)], seeds=[5], progress=False)
    assert not d["reused"].any()
    pd.testing.assert_frame_equal(a[cols], d[cols])
    # new stage-01 images (another manifest) -> trained again, not reused
    man = json.loads(open(f"{cfg['runs_dir']}/synth/manifest.json").read())
    open(f"{cfg['runs_dir']}/synth/manifest.json", "w").write(json.dumps({**man, "params": {"rerun": 1}}))
    assert not run_settings(cfg, [("variety", 4)], seeds=[5], progress=False)["reused"].any()
    open(f"{cfg['runs_dir']}/synth/manifest.json", "w").write(json.dumps(man))
    # different parameters -> trained again
    e = run_settings(cfg, [("variety", 4)], seeds=[5], epochs=2, progress=False)
    assert not e["reused"].any() and e["epochs_run"].iloc[0] == 2


def test_subset_is_a_seeded_draw_of_the_training_ids(synth_cfg):
    cfg, _ = synth_cfg
    from lorafind_utils.core.config import stage_params

    p = dict(stage_params(cfg, "02_finetune"), n_train=4)
    full = make_split(cfg, dict(p, n_train=0))["train_ids"]
    a, b, a2 = (make_split(cfg, dict(p, seed=s))["train_ids"] for s in (0, 1, 0))
    assert a == a2 and a != b and len(a) == 4 and set(a) <= set(full)
    with pytest.raises(ValueError, match="n_train=99 but only 8 training base images"):
        make_split(cfg, dict(p, n_train=99))


def _runs(train_set, n, accs, val="a|b"):
    return pd.DataFrame([{"train_set": train_set, "n": n, "seed": s, "val_set": "variety", "backbone": "resnet50",
                          "accuracy": acc, "macro_f1": acc / 2, "mrr": 0.9, "top3_accuracy": 1.0,
                          "pretrained_accuracy": 1 / 12, "pretrained_macro_f1": 0.01, "pretrained_mrr": 0.25,
                          "pretrained_top3_accuracy": 0.25, "val_ids": val, "run_dir": f"/r/x_{train_set}{n}_s{s}"}
                         for s, acc in enumerate(accs)])


def test_table2_mean_sd_and_paper_columns_against_hand_computed_values(tmp_path):
    sizes = pd.concat([_runs("variety", 100, [0.5, 0.7]), _runs("variety", 30, [0.2, 0.4, 0.3])])
    domain = pd.concat([_runs("faces", 70, [0.1, 0.3]), _runs("variety", 70, [0.6, 0.6])])
    t = table2(sizes, domain)
    assert list(t["model"]) == ["Fine-tuned ResNet50", "Pretrained ResNet50 (head untrained)", "Fine-tuned ResNet50",
                                "Fine-tuned ResNet50", "Fine-tuned ResNet50"]
    assert list(t["train data"]) == ["100 variety images", "", "70 variety images", "30 variety images",
                                     "70 human face images"]
    r100 = t.iloc[0]
    assert r100["accuracy_mean"] == pytest.approx(60.0) and r100["accuracy_sd"] == pytest.approx(
        100 * np.std([0.5, 0.7], ddof=1)
    )
    assert r100["macro_f1_mean"] == pytest.approx(30.0) and r100["paper_accuracy"] == 79.50
    assert t.iloc[3]["accuracy_sd"] == pytest.approx(10.0) and t.iloc[3]["paper_mrr"] == 60.42
    assert t.iloc[1]["accuracy_mean"] == pytest.approx(100 / 12) and t.iloc[1]["paper_accuracy"] == 8.30
    assert t.iloc[4]["paper_accuracy"] == 50.30 and t.iloc[4]["runs"] == "x_faces70_s0 x_faces70_s1"
    assert t.iloc[0]["validation data"] == "2 variety images"
    out = write_table2(t, tmp_path / "table2")
    md = open(out["md"]).read()
    assert "60.00 ± 14.14" in md and "| 79.50 |" in md
    assert pd.read_csv(out["csv"])["accuracy_mean"].iloc[0] == pytest.approx(60.0)
    s = summarize(sizes)
    assert s.set_index("n").loc[30, "accuracy_mean"] == pytest.approx(30.0)
    with pytest.raises(ValueError, match="different sets"):
        table2(sizes, _runs("faces", 70, [0.1], val="a|c"))
    with pytest.raises(ValueError, match="different numbers of epochs"):
        table2(sizes.assign(epochs=5), domain.assign(epochs=15))


def test_parallel_workers_give_the_same_numbers_as_one_process(synth_cfg):
    """Two spawned workers (one thread each) = the same runs one after another in this process."""
    cfg, _ = synth_cfg
    cols = [
        "train_set",
        "n",
        "seed",
        "accuracy",
        "macro_f1",
        "mrr",
        "top3_accuracy",
        "pretrained_accuracy",
        "best_epoch",
        "threads",
        "val_ids",
    ]
    settings = [("variety", 5), ("faces", 4)]
    par = run_settings(cfg, settings, seeds=[3], reuse=False, progress=False, workers=2, threads=1)
    seq = run_settings(cfg, settings, seeds=[3], reuse=False, progress=False, workers=1, threads=1)
    pd.testing.assert_frame_equal(par[cols], seq[cols])
    assert (par["threads"] == 1).all()
    # the thread count is part of a run's parameters: another count trains again
    assert not run_settings(cfg, settings[:1], seeds=[3], progress=False, workers=1, threads=2)["reused"].any()
    assert run_settings(cfg, settings[:1], seeds=[3], progress=False, workers=1, threads=2)["reused"].all()


def test_a_failing_run_in_a_worker_raises_here(synth_cfg):
    cfg, _ = synth_cfg
    with pytest.raises(ValueError, match="n_train=99"):
        run_settings(
            cfg, [("variety", 2), ("variety", 99)], seeds=[0], reuse=False, progress=False, workers=2, threads=1
        )
