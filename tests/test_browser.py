"""End to end in a real browser: JupyterLab on 127.0.0.1, headless Chromium, upload through the widget.

Needs Debian's ``chromium`` and the ``playwright`` package (driving that Chromium through its
``executable_path``; no browser download). Outside CI the test skips with the reason when
Chromium is missing; with ``LORAFIND_REQUIRE_BROWSER=1`` (set by ``.ci/run``) it must run.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image

from lorafind_utils.core.config import load_catalog, load_profile, project_root, stage_params
from lorafind_utils.models.classifier import build_model, save_checkpoint
from lorafind_utils.rank import index_ops as indexing
from lorafind_utils.rank.classifier_ranker import Ranker
from lorafind_utils.rank.style_index import StyleIndex

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _require_browser():
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append("Debian's chromium (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install playwright)")
    if missing:
        if os.environ.get("LORAFIND_REQUIRE_BROWSER") == "1":
            pytest.fail("browser test required here but missing: " + ", ".join(missing))
        pytest.skip("browser test needs " + ", ".join(missing))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _screenshot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("LORAFIND_SCREENSHOT_DIR"):
        Path(os.environ["LORAFIND_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / name, Path(os.environ["LORAFIND_SCREENSHOT_DIR"]) / name)


@pytest.mark.slow
def test_upload_in_jupyterlab_shows_the_ranked_loras(tmp_path, request):
    _require_browser()
    tiny_root, tiny_pipe = request.getfixturevalue("tiny_root"), request.getfixturevalue("tiny_pipe")  # after the skip
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from lorafind_utils.stages.synthesis import synthesize

    # a trained classifier where stage 02 puts it (random weights: the ranking is still a ranking), stage 01's
    # images of 3 base images (each row's samples) and a style index calibrated so that "none of these" applies
    runs = tmp_path / "runs"
    overrides = {
        **tiny_overrides(tiny_root),
        "runs_dir": str(runs),
        "stages": {
            "01_synthesize": {"sets": ["variety"], "max_images": 3},
            "02_finetune": {"val_fraction": 0.34},
            "08_index": {"encoder": "imagenet"},
        },
    }
    cfg = load_profile("standin", overrides)
    slugs = [e["slug"] for e in load_catalog(cfg)]
    save_checkpoint(build_model(len(slugs), hidden=32, weights="none", backbone="efficientnet_lite0", seed=9), slugs,
                    runs / "train" / "finetune_variety", {"hidden": 32, "image_size": 32})
    (runs / "train" / "finetune_variety" / "metrics.json").write_text("{}")  # a finished run
    query = tmp_path / "my_style.png"
    rng = np.random.default_rng(4)
    Image.fromarray((rng.integers(0, 80, (64, 64, 3)) + [150, 40, 90]).clip(0, 255).astype(np.uint8)).save(query)
    expected = Ranker.from_profile(cfg).rank([query])[0].names[:5]
    synthesize(cfg, stage_params(cfg, "01_synthesize"), pipe=tiny_pipe, progress=False)
    folder = indexing.build(cfg, progress=False, log=lambda *a: None)["folder"]
    ix = StyleIndex.load(folder)
    ix.params["calibration"].update(coef=[0.0, 0.0], intercept=-30.0)  # P(match) ~ 1e-13 for any query
    ix.save(folder)
    by_index = indexing.IndexRanker.from_profile(cfg).rank_files([query])[0]
    assert by_index.match is False

    # the committed notebook, pointed at this run folder
    nb_dir = tmp_path / "lab"
    nb_dir.mkdir()
    nb = nbformat.read(project_root() / "notebooks" / "rank_my_image.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = (params.source.replace("overrides: dict = {}", f"overrides: dict = {overrides!r}")
                     .replace('profile: str = "tiny"', 'profile: str = "standin"'))
    assert repr(overrides) in params.source and '"standin"' in params.source
    nbformat.write(nb, nb_dir / "rank_my_image.ipynb")

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={nb_dir}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--allow-root",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=nb_dir,
    )
    t0 = time.perf_counter()
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail("JupyterLab exited: " + (tmp_path / "jupyterlab.log").read_text()[-2000:])
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/lab/tree/rank_my_image.ipynb?token={token}")
            page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=90_000)
            page.wait_for_function(
                "() => { const w = window.jupyterapp.shell.currentWidget;"
                " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
                " && w.sessionContext.session.kernel.status === 'idle'; }", timeout=90_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector(".widget-upload", timeout=120_000)
            with page.expect_file_chooser() as chooser:  # the user's path: click the button, pick a file
                page.locator(".widget-upload").first.click()
            chooser.value.set_files(str(query))
            page.wait_for_selector(".lorafind-ranking .lorafind-name", timeout=60_000)
            shown = [t.strip() for t in page.locator(".lorafind-ranking .lorafind-name").all_inner_texts()]
            # each ranked row shows 3 of its LoRA's own stage-01 images, decoded by the browser
            page.wait_for_function("document.querySelectorAll('.lorafind-ranking .lorafind-samples').length === 5"
                                   " && [...document.querySelectorAll('.lorafind-ranking img.lorafind-sample')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
            first_row = page.locator(".lorafind-ranking .lorafind-samples").first.locator("img.lorafind-sample")
            samples = [first_row.nth(i).get_attribute("title") or "" for i in range(first_row.count())]
            n_sample_imgs = page.locator(".lorafind-ranking img.lorafind-sample").count()
            none_before = page.locator(".lorafind-none-of-these").first.inner_text().strip()
            status = page.locator(".widget-html-content").all_inner_texts()
            _screenshot(page, tmp_path, "jupyterlab_rank.png")
            # Rank by: style index -> the "none of these" answer above the ranking, with the closest LoRA
            page.locator(".widget-toggle-button", has_text="style index").first.click()
            page.wait_for_function(
                "(document.querySelector('.lorafind-none-of-these') || {}).innerText"
                " && document.querySelector('.lorafind-none-of-these').innerText.includes('None of these')",
                timeout=60_000,
            )
            none_text = page.locator(".lorafind-none-of-these").first.inner_text()
            try:  # the rows are other widgets: they may arrive a moment after the message
                page.wait_for_function("want => JSON.stringify([...document.querySelectorAll('.lorafind-ranking "
                                       ".lorafind-name')].map(e => e.innerText.trim())) === JSON.stringify(want)",
                                       arg=by_index.names[:5], timeout=30_000)
            except PlaywrightTimeout:
                pass  # reported by the assertion below
            shown_index = [t.strip() for t in page.locator(".lorafind-ranking .lorafind-name").all_inner_texts()]
            _screenshot(page, tmp_path, "jupyterlab_none_of_these.png")
            browser.close()
        assert shown == expected, (shown, expected)
        assert any("my_style.png: LoRAs ranked" in s for s in status)
        assert n_sample_imgs == 5 * 3, n_sample_imgs
        top_slug = next(e["slug"] for e in load_catalog(cfg) if e["short"] == expected[0])
        assert len(samples) == 3 and all(t.startswith(f"{top_slug}: stage 01, variety/") for t in samples), samples
        assert none_before == "", none_before  # the classifier ranking: no "none of these"
        assert (f"None of these LoRAs paints this style (P(match) = < 1 %); closest: {by_index.names[0]}"
                in none_text), none_text
        assert shown_index == by_index.names[:5], (shown_index, by_index.names[:5])  # still listed below it
        print(f"browser test: {time.perf_counter() - t0:.1f} s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
