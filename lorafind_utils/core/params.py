"""What every stage's parameters are: names, types and allowed values -- never their defaults.

The values live in one place, the profile (``configs/<profile>.yaml``); the notebooks' parameters
cells mirror the tiny profile (a test keeps them in step). This module declares each stage's keys
so that a profile, a notebook run or a CLI override is checked once, up front: an unknown key
(``strenght``), a missing one or a bad value (``steps: -1``, ``resolution: "abc"``) is a
:class:`ParamError` naming the key, the file and what is allowed, before any work starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class ParamError(ValueError):
    """A profile or stage parameter that is unknown, missing or out of range (names all three)."""


@dataclass(frozen=True)
class Param:
    """One declared parameter: its kind, bounds and allowed values.

    :param kind: ``int`` | ``float`` | ``bool`` | ``str`` | ``name`` (a safe folder name) |
        ``list[int]`` | ``list[str]`` | ``workers`` (``auto`` or an int >= 1).
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    empty: bool = True  # str: "" allowed; list: [] allowed

    def describe(self) -> str:
        if self.choices:
            return " | ".join(map(str, self.choices))
        bounds = []
        if self.lo is not None:
            bounds.append(f">= {self.lo}")
        if self.hi is not None:
            bounds.append(f"<= {self.hi}")
        extra = "" if self.empty else ", not empty"
        return f"{self.kind}" + (f" ({', '.join(bounds)})" if bounds else "") + extra

    def check(self, v: Any) -> Any:
        """The value if it is allowed, else raise ``ValueError`` (the caller adds key and file)."""
        k = self.kind
        if k == "workers":
            if v == "auto":
                return v
            v = _int(v)
            if v < 1:
                raise ValueError("expected 'auto' or an integer >= 1")
            return v
        if k.startswith("list["):
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"expected a list of {k[5:-1]}")
            if not v and not self.empty:
                raise ValueError("expected a non-empty list")
            item = Param(k[5:-1], self.lo, self.hi, self.choices)
            return [item.check(x) for x in v]
        if k == "int":
            v = _int(v)
        elif k == "float":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise ValueError("expected a number")
            v = float(v)
        elif k == "bool":
            if not isinstance(v, bool):
                raise ValueError("expected true or false")
        elif k in ("str", "name"):
            if not isinstance(v, str):
                raise ValueError("expected a string")
            if not v and not self.empty:
                raise ValueError("expected a non-empty string")
            if k == "name" and v and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
                raise ValueError("expected a plain name (letters, digits, '.', '_', '-'; no '/' or '..')")
        if self.choices and v not in self.choices:
            raise ValueError(f"expected one of {', '.join(map(str, self.choices))}")
        if self.lo is not None and v < self.lo:
            raise ValueError(f"expected >= {self.lo}")
        if self.hi is not None and v > self.hi:
            raise ValueError(f"expected <= {self.hi}")
        return v


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("expected an integer")
    return v


INT, BOOL, STR = Param("int"), Param("bool"), Param("str")
POS = Param("int", lo=1)
NONNEG = Param("int", lo=0)
SEED = Param("int", lo=0)
SET = Param("str", empty=False)
RUN = Param("name", empty=False)
WORKERS = Param("workers")
THREADS = Param("int", lo=1)
SHARE = Param("float", lo=0.0, hi=1.0)
DTYPE = Param("str", choices=("float32", "float16", "bfloat16"))

#: Every stage's parameters. A profile's ``stages.<name>`` section holds exactly these keys.
STAGE_PARAMS: dict[str, dict[str, Param]] = {
    "01_synthesize": {
        "sets": Param("list[str]", empty=False),
        "resolution": Param("int", lo=8),
        "steps": POS,
        "strength": Param("float", lo=0.01, hi=1.0),
        "controlnet_scale": Param("float", lo=0.0),
        "guidance_scale": Param("float", lo=0.0),
        "canny_low": Param("int", lo=0, hi=255),
        "canny_high": Param("int", lo=0, hi=255),
        "batch_size": POS,
        "seed": SEED,
        "max_images": NONNEG,
        "dtype": DTYPE,
        "workers": WORKERS,
        "threads": THREADS,
        "grid_images": POS,
    },
    "02_finetune": {
        "train_set": SET,
        "val_set": SET,
        "n_train": NONNEG,
        "val_fraction": Param("float", lo=0.01, hi=0.99),
        "split_seed": SEED,
        "image_size": Param("int", lo=16),
        "backbone": Param("str", choices=("resnet50", "efficientnet_lite0")),
        "weights": Param("str", empty=False),
        "hidden": POS,
        "epochs": POS,
        "lr": Param("float", lo=1e-12),
        "batch_size": POS,
        "patience": POS,
        "seed": SEED,
        "linear_probe": BOOL,
        "run_name": RUN,
    },
    "03_ablate_sizes": {
        "sizes": Param("list[int]", lo=1, empty=False),
        "seeds": Param("list[int]", lo=0, empty=False),
        "epochs": POS,
        "patience": POS,
        "train_set": SET,
        "workers": WORKERS,
        "threads": THREADS,
    },
    "04_domain_vs_variety": {
        "domain_set": SET,
        "variety_set": SET,
        "n": POS,
        "seeds": Param("list[int]", lo=0, empty=False),
        "epochs": POS,
        "patience": POS,
        "workers": WORKERS,
        "threads": THREADS,
    },
    "05_retrieve_thumbnails": {
        "queries_dir": STR,
        "make_queries": BOOL,
        "prompts": Param("list[str]"),
        "query_set": SET,
        "images_per_lora": NONNEG,
        "query_seed": SEED,
        "strength": Param("float", lo=0.01, hi=1.0),
        "guidance_scale": Param("float", lo=0.0),
        "run_name": Param("name"),
        "figure_queries": POS,
        "figure_top": POS,
        "style_query_set": STR,
        "style_query_images": NONNEG,
    },
    "06_generate": {
        "queries": Param("list[int]", lo=0, empty=False),
        "base_set": SET,
        "base_image": STR,
        "seed": SEED,
    },
    "07_train_style_lora": {
        "style_dir": STR,
        "style_name": Param("str", empty=False),
        "caption_template": STR,
        "n_style_images": POS,
        "holdout": Param("float", lo=0.01, hi=0.99),
        "ranks": Param("list[int]", lo=1, empty=False),
        "alpha": Param("float", lo=0.0),
        "steps": POS,
        "lr": Param("float", lo=1e-12),
        "batch_size": POS,
        "resolution": Param("int", lo=8),
        "seed": SEED,
        "checkpoint_every": POS,
        "eval_prompts": Param("list[str]", empty=False),
        "eval_seeds": Param("list[int]", lo=0, empty=False),
        "infer_steps": POS,
        "guidance_scale": Param("float", lo=0.0),
        "feature_net": Param("str", choices=("inception", "efficientnet_lite0")),
        "lpips_backbone": Param("str", choices=("imagenet", "random")),
        "clip_model": STR,
        "run_name": RUN,
        "snr_gamma": Param("float", lo=0.0),
    },
    "08_index": {
        "encoder": Param("str", empty=False),
        "variant": Param("str", choices=("prototype", "content_cancelled")),
        "compare": Param("list[str]", empty=False),
        "embed_dim": POS,
        "hidden": POS,
        "epochs": POS,
        "lr": Param("float", lo=1e-12),
        "bases_per_batch": Param("int", lo=2),
        "temperature": Param("float", lo=1e-4),
        "seeds": Param("list[int]", lo=0, empty=False),
        "open_set_styles": Param("list[str]"),
        "open_set_sets": Param("list[str]", empty=False),
        "open_set_images": POS,
        "add_images": POS,
        "folds": NONNEG,
        "latency_queries": POS,
        "latency_entries": NONNEG,
        "run_name": RUN,
    },
}

#: A profile's top level (``models`` and ``base_images`` are checked inside too).
PROFILE_KEYS: dict[str, Param] = {
    "name": RUN,
    "description": STR,
    "device": Param("str", empty=False),
    "catalog": Param("str", empty=False),
    "lora_dir": Param("str", empty=False),
    "runs_dir": Param("str", empty=False),
    "figures_dir": Param("str", empty=False),
}
MODEL_KEYS: dict[str, Param] = {
    "kind": Param("str", choices=("standin", "local", "hub")),
    "base": Param("str", empty=False),
    "controlnet": Param("str", empty=False),
}
#: seed: the stand-ins' seed (kind standin); loras: the folder of shipped LoRA files that kind local installs
#: into lora_dir
OPTIONAL_MODEL_KEYS: dict[str, Param] = {"seed": SEED, "loras": Param("str", empty=False)}


def _check_section(values, spec: dict[str, Param], where: str, source: str, optional: dict | None = None) -> dict:
    optional = optional or {}
    if not isinstance(values, dict):
        raise ParamError(f"{source}: {where} must be a mapping of {', '.join(spec)}; got {type(values).__name__}")
    unknown = sorted(set(values) - set(spec) - set(optional))
    if unknown:
        close = {u: _closest(u, list(spec) + list(optional)) for u in unknown}
        hint = "; ".join(f"'{u}'" + (f" (did you mean '{c}'?)" if c else "") for u, c in close.items())
        raise ParamError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} in {where}: {hint}. "
                         f"Allowed: {', '.join(sorted(spec) + sorted(optional))}")
    missing = [k for k in spec if k not in values]
    if missing:
        raise ParamError(f"{source}: {where} is missing {', '.join(missing)}")
    out = {}
    for k, v in values.items():
        p = spec.get(k) or optional[k]
        try:
            out[k] = p.check(v)
        except ValueError as e:
            raise ParamError(f"{source}: {where}.{k} = {v!r}: {e} (allowed: {p.describe()})") from None
    return out


def _closest(word: str, options: list[str]) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, options, n=1, cutoff=0.75)
    return m[0] if m else None


def check_stage_params(stage: str, params: dict, source: str = "parameters") -> dict:
    """A stage's parameters, type-checked; exactly the declared keys.

    :param source: where the values came from (a profile file, a notebook), for the message.
    :raises ParamError: unknown stage, unknown/missing key or bad value, naming key and source.
    """
    if stage not in STAGE_PARAMS:
        raise ParamError(f"unknown stage '{stage}'; the stages are {', '.join(STAGE_PARAMS)}")
    return _check_section(params, STAGE_PARAMS[stage], f"stages.{stage}", source)


def check_profile(cfg, source: str) -> dict:
    """A whole profile, checked once when it is loaded (every stage section included).

    :raises ParamError: naming the file, the key and the allowed values.
    """
    if not isinstance(cfg, dict):
        raise ParamError(f"{source}: a profile is a YAML mapping (name, models, stages, ...); got "
                         f"{'an empty file' if cfg is None else type(cfg).__name__}")
    top = dict(PROFILE_KEYS, models=None, base_images=None, stages=None)
    unknown = sorted(set(cfg) - set(top))
    if unknown:
        raise ParamError(f"{source}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(top))}")
    missing = [k for k in top if k not in cfg]
    if missing:
        raise ParamError(f"{source}: the profile is missing {', '.join(missing)}")
    for k, p in PROFILE_KEYS.items():
        try:
            p.check(cfg[k])
        except ValueError as e:
            raise ParamError(f"{source}: {k} = {cfg[k]!r}: {e} (allowed: {p.describe()})") from None
    if not (cfg["device"] in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?|mps", str(cfg["device"]))):
        raise ParamError(f"{source}: device = {cfg['device']!r}: expected auto | cpu | cuda | cuda:N | mps")
    _check_section(cfg["models"], MODEL_KEYS, "models", source, OPTIONAL_MODEL_KEYS)
    sets = cfg["base_images"]
    if not isinstance(sets, dict) or not sets or not all(isinstance(v, str) and v for v in sets.values()):
        raise ParamError(f"{source}: base_images must map set names to folders, e.g. variety: data/images/variety")
    stages = cfg["stages"]
    if not isinstance(stages, dict):
        raise ParamError(f"{source}: stages must be a mapping of stage names ({', '.join(STAGE_PARAMS)})")
    unknown = sorted(set(stages) - set(STAGE_PARAMS))
    if unknown:
        raise ParamError(f"{source}: unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGE_PARAMS)}")
    for stage in STAGE_PARAMS:
        if stage not in stages:
            raise ParamError(f"{source}: stages.{stage} is missing")
        cfg["stages"][stage] = check_stage_params(stage, stages[stage], source)
    return cfg


def notebook_params(stage: str, namespace: dict) -> dict:
    """A stage's parameters picked from a notebook's namespace (papermill injects them there), so
    a notebook lists each parameter once, in its parameters cell."""
    missing = [k for k in STAGE_PARAMS[stage] if k not in namespace]
    if missing:
        raise ParamError(f"notebook {stage}: the parameters cell lacks {', '.join(missing)}")
    return {k: namespace[k] for k in STAGE_PARAMS[stage]}
