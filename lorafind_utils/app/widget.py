"""An ipywidgets 8 panel for JupyterLab: upload a style image, see the LoRAs ranked, generate.

    from lorafind_utils.app.widget import RankWidget
    RankWidget.from_profile("tiny")        # the last expression of a cell displays it

Upload an image (any common format) and the catalog's LoRAs appear ranked, each with a score bar
and a few images of its own, so one sees what it paints: stage 01's restyles of the same base
images in every row (read once, cached), or -- for a style-index entry that has none, such as one
added from preview images (the index keeps only their embedding) -- a "no images stored" note.
*Rank by: style index* also answers "none of these": when P(match) is below the calibrated
threshold, a message above the ranking says so and names the closest LoRA. Pick a LoRA and a base image (one of the
profile's or an upload) and press *Generate*: the LoRA restyles the base image and the result
appears beside the query with its style similarity. Bad input is a short message in the panel,
never a traceback. The classifier and the diffusion pipeline load on first use; under
papermill the panel is inert output and never blocks a headless run.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import ipywidgets as W
from PIL import Image

from lorafind_utils.core import layout
from lorafind_utils.core.config import load_catalog, load_profile, stage_params
from lorafind_utils.core.images import ImageError, load_rgb_bytes, read_base_set

#: Uploads larger than this many bytes are refused before decoding.
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
#: Images of its own shown beside each ranked LoRA, and their size in pixels.
SAMPLES_PER_LORA = 3
SAMPLE_SIZE = 56


def _png(im: Image.Image, size: int = 96) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").resize(
        (size, size), Image.Resampling.NEAREST if im.width < size else Image.Resampling.BICUBIC
    ).save(buf, "PNG")
    return buf.getvalue()


def _image(im: Image.Image, size: int = 96) -> W.Image:
    return W.Image(value=_png(im, size), format="png", width=size, height=size)


@dataclass
class LoraSamples:
    """What a ranked row shows of one LoRA: thumbnails of its own images (PNG bytes, with the file
    each came from), or, when it has none to show, why (``note``)."""

    pngs: list[bytes] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)
    note: str = ""


def _percent(p: float) -> str:
    return "< 1 %" if 0 < p < 0.005 else "> 99 %" if 0.995 < p < 1 else f"{100 * p:.0f} %"


def none_of_these_message(ranking) -> str | None:
    """The "none of these" answer of an index ranking whose P(match) is below the threshold, else None."""
    if ranking is None or ranking.match is not False or not ranking.names:
        return None
    return (f"None of these LoRAs paints this style (P(match) = {_percent(float(ranking.match_p or 0.0))}); "
            f"closest: {ranking.names[0]}")


class RankWidget:
    """Upload -> ranked LoRAs (score bars, sample images) -> generate with a chosen LoRA."""

    def __init__(self, cfg: dict, run_name: str | None = None, top: int = 5, sample_set: str = "variety",
                 method: str = "classifier", n_samples: int = SAMPLES_PER_LORA):
        self.cfg = cfg
        self.run_name = run_name
        self.catalog = load_catalog(cfg)
        self.entries = {e["slug"]: e for e in self.catalog}
        self.sample_set = sample_set
        self.n_samples = max(0, int(n_samples))
        self._rankers: dict = {}
        self._pipe = None
        self._stage01: tuple[dict, str] | None = None  # slug -> (its stage-01 files, their LoRA file); or why none
        self._sample_cache: dict[str, LoraSamples] = {}
        self.query: Image.Image | None = None
        self.ranking = None

        self.upload = W.FileUpload(accept="image/*", multiple=False, description="Style image")
        self.top = W.IntSlider(value=min(top, len(self.catalog)), min=1, max=len(self.catalog), description="Show top",
                               continuous_update=False)
        self.status = W.HTML(value="Upload an image in the style you want.")
        self.method = W.ToggleButtons(
            options=[("classifier (stage 02)", "classifier"), ("style index (stage 08)", "index")],
            value=method,
            description="Rank by",
            tooltips=["the paper's classifier", "the embedding index: also says 'none of these'"],
        )
        self.query_view = W.Box()
        self.none_of_these = W.HTML(layout=W.Layout(display="none"))
        self.none_of_these.add_class("lorafind-none-of-these")
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
            W.HBox([self.query_view, W.VBox([self.none_of_these, self.results])]),
            W.HTML("<b>Generate</b> with a LoRA from a base image (same settings as stage 01)"),
            W.HBox([self.lora, self.base, self.base_upload]),
            W.HBox([self.generate_button, self.progress]),
            self.generated,
        ])

    @classmethod
    def from_profile(cls, profile: str = "tiny", overrides: dict | None = None, **kw) -> RankWidget:
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
                from lorafind_utils.rank.index_ops import IndexRanker

                self._rankers[m] = IndexRanker.from_profile(self.cfg)
            else:
                from lorafind_utils.rank.classifier_ranker import Ranker

                self._rankers[m] = Ranker.from_profile(self.cfg, self.run_name)
        return self._rankers[m]

    def _stage01_files(self) -> tuple[dict, str]:
        """({slug: ([its stage-01 images of the same n base images], its LoRA file name)}, why empty),
        from stage 01's manifest, read once. Base images spread over ``sample_set`` (else the first set)."""
        if self._stage01 is None or (
            not self._stage01[0] and layout.synth_manifest(layout.synth_dir(self.cfg)).exists()
        ):
            files, why = {}, ""  # (stage 01 finished since the last look: read it now)
            try:
                from lorafind_utils.rank.classifier_ranker import lora_sample_files

                files = lora_sample_files(self.cfg, self.sample_set, self.n_samples, fallback=True)
            except FileNotFoundError:
                why = "no stage-01 images yet (run stage 01: `lorafind synthesize`)"
            except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:
                why = f"stage 01's images cannot be read ({type(e).__name__}: {e})"
            self._stage01 = (files, why)
        return self._stage01

    def _index_meta(self, slug: str) -> dict | None:
        """The style-index entry's metadata when the ranking came from the index, else None."""
        ranker = self._rankers.get("index")
        if self.ranking is None or self.ranking.method != "index" or ranker is None:
            return None
        try:
            index = ranker.index
            return index.entry(slug).meta if slug in index else None
        except (OSError, ValueError, KeyError):
            return None

    def lora_samples(self, slug: str) -> LoraSamples:
        """A few of this LoRA's own images as the ranking shows them (cached: each file is read once),
        or why there are none: stage 01 has not run, or an index entry whose images are not stored."""
        meta = self._index_meta(slug)
        if meta is not None and meta.get("source") == "thumbnails":
            return LoraSamples(note=f"no images stored: added from {meta.get('n_images', 'its')} preview images, "
                                    "of which the index keeps only the mean embedding")
        files, why = self._stage01_files()
        if slug not in files or (meta is not None and meta.get("file") and files[slug][1]
                                 and meta["file"] != files[slug][1]):
            if meta is not None:  # added by `lorafind index add`: its restyles are embedded, not kept
                return LoraSamples(note="no images stored: the index keeps only this LoRA's embedding")
            return LoraSamples(note=why or "no images stored: stage 01 did not restyle with this LoRA")
        if slug not in self._sample_cache:
            from lorafind_utils.core.images import load_rgb

            out = LoraSamples()
            for path in files[slug][0]:
                try:
                    out.pngs.append(_png(load_rgb(path), SAMPLE_SIZE))
                    out.sources.append(path)
                except (ImageError, OSError) as e:
                    out.note = f"unreadable: {e}"
            if not out.pngs:
                out.note = out.note or "no images stored: stage 01's images of this LoRA are missing"
            self._sample_cache[slug] = out
        return self._sample_cache[slug]

    @staticmethod
    def _sample_title(slug: str, src: Path) -> str:
        """The hover text of a sample: whose image it is and what it restyled (``<set>/<lora>/<base id>.png``)."""
        return f"{slug}: stage 01, {src.parent.parent.name}/{src.stem}"

    def _samples_view(self, slug: str) -> W.Widget:
        s = self.lora_samples(slug)
        if s.pngs:  # one HTML widget of data-URI images: a hover names each image (a widget `tooltip` breaks
            # the view in jupyterlab_widgets 3.0), and one widget per row instead of one per image
            box = W.HTML("".join(
                f'<img class="lorafind-sample" src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                f'width="{SAMPLE_SIZE}" height="{SAMPLE_SIZE}" style="margin-right:4px" alt="{html.escape(slug)}" '
                f'title="{html.escape(self._sample_title(slug, src), quote=True)}">'
                for png, src in zip(s.pngs, s.sources)), layout=W.Layout(margin="0 0 0 6px"))
        else:
            why = s.note.removeprefix("no images stored").lstrip(": ")
            box = W.HTML(f'<span style="color:#777; font-size:85%; line-height:1.2" title="{html.escape(s.note)}">'
                         f'<i>no images stored</i><br>{html.escape(why)}</span>',
                         layout=W.Layout(width=f"{self.n_samples * (SAMPLE_SIZE + 4)}px", margin="0 0 0 6px"))
            box.add_class("lorafind-no-samples")
        return box.add_class("lorafind-samples")

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
        how = (
            ranker.backbone if self.ranking.method == "index" else f"classifier ({ranker.backbone})"
        )  # "style index (…)"
        self._say(
            f"{name}: LoRAs ranked by the {how}"
            + (": none of these paints this style." if self.ranking.match is False else ".")
        )
        self._show_ranking()

    def _show_ranking(self) -> None:
        if self.ranking is None:
            return
        none = none_of_these_message(self.ranking)
        self.none_of_these.value = "" if none is None else (
            '<div style="color:#8a4b00; background:#fff4e0; border:1px solid #e0b060; padding:4px 8px">'
            f"<b>{html.escape(none)}</b>. Train one with <code>lorafind train-lora</code>, or add one with "
            "<code>lorafind index add</code>.</div>")
        self.none_of_these.layout.display = "none" if none is None else ""
        rows = []
        for i, (slug, name, score) in enumerate(self.ranking.top(self.top.value), 1):
            bar = W.FloatProgress(value=min(max(score, 0.0), 1.0), min=0.0, max=1.0, layout=W.Layout(width="160px"))
            shown = f"{100 * score:.1f} %" if self.ranking.method == "classifier" else f"cos {score:.3f}"
            parts = [W.HTML(f"<b>{i}.</b>", layout=W.Layout(width="28px")),
                     W.HTML(html.escape(name), layout=W.Layout(width="150px")).add_class("lorafind-name"), bar,
                     W.HTML(shown, layout=W.Layout(width="72px"))]
            if self.n_samples:
                parts.append(self._samples_view(slug))
            rows.append(W.HBox(parts, layout=W.Layout(align_items="center")))
        self.results.children = rows

    # ----------------------------------------------------------------------------------------
    def _base_image(self) -> tuple[str, Image.Image]:
        from lorafind_utils.core.images import load_rgb

        if self.base_upload.value:
            name, data = self._read_upload(self.base_upload.value)
            return name, load_rgb_bytes(data, name)
        if not self.base.value:
            raise ImageError("choose a base image or upload one")
        return Path(self.base.value).stem, load_rgb(self.base.value)

    def _on_generate(self, _=None) -> None:
        from lorafind_utils.core.images import BaseImage
        from lorafind_utils.models.pipelines import load_pipeline
        from lorafind_utils.models.restyle import prepare_image
        from lorafind_utils.stages.generation import generate

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
            views += [
                W.VBox([_image(init, 160), W.Label(f"base {base_name}")]),
                W.VBox([_image(out, 160), W.Label(caption)]),
            ]
            self.generated.children = views
            self.last_generated = out
            self._say(f"Done: {base_name} restyled with {entry['short']}.")
        except Exception as e:  # shown in the panel, never as a traceback
            self._say(f"Generation failed: {type(e).__name__}: {e}", error=True)
        finally:
            self.progress.layout.visibility = "hidden"
            self.generate_button.disabled = False
