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
from PIL import Image

from lorafind_utils.classifier import build_model, save_checkpoint
from lorafind_utils.config import load_catalog, load_profile, project_root
from lorafind_utils.retrieval import Ranker

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


@pytest.mark.slow
def test_upload_in_jupyterlab_shows_the_ranked_loras(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    # a trained classifier where stage 02 puts it (random weights: the ranking is still a ranking)
    runs = tmp_path / "runs"
    cfg = load_profile("standin", {"runs_dir": str(runs)})
    slugs = [e["slug"] for e in load_catalog(cfg)]
    save_checkpoint(build_model(len(slugs), hidden=32, weights="none", backbone="efficientnet_lite0", seed=9), slugs,
                    runs / "train" / "finetune_variety", {"hidden": 32, "image_size": 32})
    (runs / "train" / "finetune_variety" / "metrics.json").write_text("{}")  # a finished run
    query = tmp_path / "my_style.png"
    rng = np.random.default_rng(4)
    Image.fromarray((rng.integers(0, 80, (64, 64, 3)) + [150, 40, 90]).clip(0, 255).astype(np.uint8)).save(query)
    expected = Ranker.from_profile(cfg).rank([query])[0].names[:5]

    # the committed notebook, pointed at this run folder
    nb_dir = tmp_path / "lab"
    nb_dir.mkdir()
    nb = nbformat.read(project_root() / "notebooks" / "rank_my_image.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source = params.source.replace("overrides: dict = {}", f"overrides: dict = {{'runs_dir': {str(runs)!r}}}")
    nbformat.write(nb, nb_dir / "rank_my_image.ipynb")

    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={nb_dir}",
                               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", "--allow-root", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=nb_dir)
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
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
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
            page.screenshot(path=str(tmp_path / "jupyterlab_rank.png"), full_page=True)
            if os.environ.get("LORAFIND_SCREENSHOT_DIR"):
                Path(os.environ["LORAFIND_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "jupyterlab_rank.png", Path(os.environ["LORAFIND_SCREENSHOT_DIR"]) / "jupyterlab_rank.png")
            status = page.locator(".widget-html-content").all_inner_texts()
            browser.close()
        assert shown == expected, (shown, expected)
        assert any("my_style.png: LoRAs ranked" in s for s in status)
        print(f"browser test: {time.perf_counter() - t0:.1f} s")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
