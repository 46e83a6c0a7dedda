"""An ipywidgets 8 panel for JupyterLab: upload a style image, see the LoRAs ranked, generate.

    from lorafind_utils.widget import RankWidget
    RankWidget.from_profile("tiny")        # the last expression of a cell displays it

Upload an image (any common format) and the catalog's LoRAs appear ranked, with a score bar
and an image that each LoRA made (from stage 01). Pick a LoRA and a base image (one of the
profile's or an upload) and press *Generate*: the LoRA restyles the base image and the result
appears beside the query with its style similarity. Bad input is a short message in the panel,
never a traceback. The classifier and the diffusion pipeline load on first use; under
papermill the panel is inert output and never blocks a headless run.
"""
from __future__ import annotations

import html
import io
from pathlib import Path

import ipywidgets as W
from PIL import Image

from . import layout
from .config import load_catalog, load_profile, stage_params
from .images import ImageError, load_rgb_bytes, read_base_set

#: Uploads larger than this many bytes are refused before decoding.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024


def _png(im: Image.Image, size: int = 96) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").resize((size, size), Image.Resampling.NEAREST if im.width < size else Image.Resampling.BICUBIC).save(buf, "PNG")
    return buf.getvalue()


def _image(im: Image.Image, size: int = 96) -> W.Image:
    return W.Image(value=_png(im, size), format="png", width=size, height=size)


class RankWidget:
    """Upload -> ranked LoRAs (score bars, sample images) -> generate with a chosen LoRA."""

    def __init__(self, cfg: dict, run_name: str | None = None, top: int = 5, sample_set: str = "variety",
                 method: str = "classifier"):
        self.cfg = cfg
        self.run_name = run_name
        self.catalog = load_catalog(cfg)
        self.entries = {e["slug"]: e for e in self.catalog}
        self.sample_set = sample_set
        self._rankers: dict = {}
        self._pipe = None
        self._samples: dict | None = None
        self.query: Image.Image | None = None
        self.ranking = None

        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Style image")
        self.top = W.IntSlider(value=min(top, len(self.catalog)), min=1, max=len(self.catalog), description="Show top",
                               continuous_update=False)
        self.status = W.HTML(value="Upload an image in the style you want.")
        self.method = W.ToggleButtons(options=[("classifier (stage 02)", "classifier"), ("style index (stage 08)", "index")],
                                      value=method, description="Rank by",
                                      tooltips=["the paper's classifier", "the embedding index: also says 'none of these'"])
        self.query_view = W.Box()
        self.results = W.VBox()
        self.results.add_class("lorafind-ranking")
        self.lora = W.Dropdown(options=[(e["short"], e["slug"]) for e in self.catalog], description="LoRA")
        self.bases = self._base_images()
        self.base = W.Dropdown(options=[("(upload below)", "")] + [(b.id, str(b.path)) for b in self.bases],
                               value=str(self.bases[0].path) if self.bases else "", description="Base image")
        self.base_upload = W.FileUpload(accept="image/*", multiple=False, description="Own base")
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="paint-brush",
                                        disabled=True, tooltip="restyle the base image with the chosen LoRA")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(visibility="hidden"))
        self.generated = W.HBox()

        self.upload.observe(self._on_upload, names="value")
        self.method.observe(lambda _: self._on_upload() if self.upload.value else None, names="value")
        self.top.observe(lambda _: self._show_ranking(), names="value")
        self.generate_button.on_click(self._on_generate)
        self.ui = W.VBox([
            W.HTML("<b>Find the LoRAs that paint in this style</b>"),
            W.HBox([self.upload, self.top]),
            self.method,
            self.status,
            W.HBox([self.query_view, self.results]),
            W.HTML("<b>Generate</b> with a LoRA from a base image (same settings as stage 01)"),
            W.HBox([self.lora, self.base, self.base_upload]),
            W.HBox([self.generate_button, self.progress]),
            self.generated,
        ])

    @classmethod
    def from_profile(cls, profile: str = "tiny", overrides: dict | None = None, **kw) -> "RankWidget":
        return cls(load_profile(profile, overrides), **kw)

    def _ipython_display_(self):
        from IPython.display import display

        display(self.ui)

    # ----------------------------------------------------------------------------------------
    def _say(self, text: str, error: bool = False) -> None:
        color = "#b00020" if error else "#333"
        self.status.value = f'<span style="color:{color}">{html.escape(text)}</span>'

    def _base_images(self):
        try:
            return read_base_set(layout.base_set_dir(self.cfg, self.sample_set))
        except (OSError, ValueError, KeyError):
            return []

    @property
    def ranker(self):
        """The chosen method's ranker, loaded once; the index re-reads itself when it changes on disk,
        so a LoRA added with `lorafind index add` is found by the next upload."""
        m = self.method.value
        if m not in self._rankers:
            if m == "index":
                from .indexing import IndexRanker

                self._rankers[m] = IndexRanker.from_profile(self.cfg)
            else:
                from .retrieval import Ranker

                self._rankers[m] = Ranker.from_profile(self.cfg, self.run_name)
        return self._rankers[m]

    def samples(self) -> dict:
        """One stage-01 image per LoRA, or none if stage 01 has not run."""
        if self._samples is None:
            from .retrieval import lora_samples

            try:
                self._samples = lora_samples(self.cfg, self.sample_set)
            except (OSError, KeyError, ValueError):
                self._samples = {}
        return self._samples

    @staticmethod
    def _read_upload(value) -> tuple[str, bytes]:
        """(name, bytes) of a FileUpload value (ipywidgets 8: a tuple of dicts)."""
        if not value:
            raise ImageError("no file uploaded")
        item = value[0]
        name = str(item.get("name", "upload"))
        data = bytes(item.get("content", b""))
        size = len(data)  # the bytes received, not the size the browser declared
        if size > MAX_UPLOAD_BYTES:
            raise ImageError(f"{name}: {size / 2**20:.0f} MB is too large (limit {MAX_UPLOAD_BYTES // 2**20} MB)")
        return name, data

    def _on_upload(self, change=None) -> None:
        try:
            name, data = self._read_upload(self.upload.value)
            self._say(f"Ranking {name} …")
            im = load_rgb_bytes(data, name)
        except ImageError as e:
            self._say(str(e), error=True)
            return
        try:
            ranker = self.ranker
        except FileNotFoundError as e:
            if self.method.value == "index":
                self._say(f"No LoRA index yet: {e}", error=True)
            else:
                self._say("No trained classifier yet: run stage 02 first (notebook 02_finetune, or `lorafind train "
                          f"--profile {self.cfg['name']}`).", error=True)
            return
        except (ValueError, OSError, RuntimeError) as e:  # e.g. a checkpoint that does not fit the catalog
            self._say(f"The classifier cannot be used: {e}", error=True)
            return
        try:
            ranking = ranker.rank([im], names=[name])[0]
        except (ValueError, OSError, RuntimeError) as e:
            self._say(f"{name}: ranking failed: {type(e).__name__}: {e}", error=True)
            return
        self.query = im
        self.ranking = ranking
        self.query_view.children = [W.VBox([_image(im, 160), W.Label(name)])]
        if self.ranking.slugs[0] in self.entries:  # an index entry may be a LoRA outside the catalog
            self.lora.value = self.ranking.slugs[0]
        self.generate_button.disabled = False
        if self.ranking.match is False:
            self._say(f"{name}: {self.ranking.verdict()}.", error=True)
        else:
            self._say(f"{name}: LoRAs ranked by the {'style index' if self.ranking.method == 'index' else 'classifier'} "
                      f"({ranker.backbone}).")
        self._show_ranking()

    def _show_ranking(self) -> None:
        if self.ranking is None:
            return
        rows, samples = [], self.samples()
        for i, (slug, name, score) in enumerate(self.ranking.top(self.top.value), 1):
            bar = W.FloatProgress(value=min(max(score, 0.0), 1.0), min=0.0, max=1.0, layout=W.Layout(width="160px"))
            shown = f"{100 * score:.1f} %" if self.ranking.method == "classifier" else f"cos {score:.3f}"
            parts = [W.HTML(f"<b>{i}.</b>", layout=W.Layout(width="28px")),
                     W.HTML(html.escape(name), layout=W.Layout(width="150px")).add_class("lorafind-name"), bar,
                     W.HTML(shown, layout=W.Layout(width="72px"))]
            if slug in samples:
                parts.append(_image(samples[slug], 56))
            rows.append(W.HBox(parts, layout=W.Layout(align_items="center")))
        self.results.children = rows

    # ----------------------------------------------------------------------------------------
    def _base_image(self) -> tuple[str, Image.Image]:
        from .images import load_rgb

        if self.base_upload.value:
            name, data = self._read_upload(self.base_upload.value)
            return name, load_rgb_bytes(data, name)
        if not self.base.value:
            raise ImageError("choose a base image or upload one")
        return Path(self.base.value).stem, load_rgb(self.base.value)

    def _on_generate(self, _=None) -> None:
        from .generation import generate
        from .images import BaseImage
        from .models import load_pipeline
        from .synthesis import prepare_image

        p = stage_params(self.cfg, "01_synthesize")
        try:
            base_name, base_im = self._base_image()
        except ImageError as e:
            self._say(str(e), error=True)
            return
        slug = self.lora.value
        entry = self.entries[slug]
        self.generate_button.disabled = True
        self.progress.layout.visibility = "visible"
        # img2img runs steps x strength denoising steps; +1 for loading
        self.progress.max, self.progress.value = 1 + max(1, int(int(p["steps"]) * float(p["strength"]))), 0
        try:
            if self._pipe is None:
                self._say("Loading the diffusion models (first time only) …")
                self._pipe = load_pipeline(self.cfg, self.cfg["device"], p["dtype"])
            self.progress.value = 1
            self._say(f"Generating with {entry['short']} …")
            prepared = prepare_image(BaseImage(base_name, Path(base_name)), base_im, int(p["resolution"]),
                                     int(p["canny_low"]), int(p["canny_high"]))
            init = prepared.init

            def step(pipe, i, t, kw):
                self.progress.value = min(self.progress.max, 2 + i)
                return kw

            out = generate(self._pipe, entry, prepared, int(p["seed"]), p, callback=step)
            views = []
            if self.query is not None:
                sim = self.ranker.style_similarity(self.query, out)
                views = [W.VBox([_image(self.query, 160), W.Label("query")])]
                caption = f"{entry['short']} — style sim. {sim:.3f}"
            else:
                caption = entry["short"]
            views += [W.VBox([_image(init, 160), W.Label(f"base {base_name}")]), W.VBox([_image(out, 160), W.Label(caption)])]
            self.generated.children = views
            self.last_generated = out
            self._say(f"Done: {base_name} restyled with {entry['short']}.")
        except Exception as e:  # shown in the panel, never as a traceback
            self._say(f"Generation failed: {type(e).__name__}: {e}", error=True)
        finally:
            self.progress.layout.visibility = "hidden"
            self.generate_button.disabled = False
