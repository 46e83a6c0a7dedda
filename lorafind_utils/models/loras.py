"""LoRA files: inspect, check against a base model, load through diffusers, and make tiny seeded ones.

Loading always goes through diffusers' own ``pipe.load_lora_weights`` (which
converts Civitai/kohya keys). What diffusers does not do for us, we do first:

* refuse pickles (``.ckpt``/``.pt``/``.bin``) -- a LoRA is only ever read with safetensors;
* a truncated or non-safetensors file gets a clear error naming it;
* every key must match a module of the base model with a compatible shape
  (diffusers/peft drop unmatched keys with only a warning, and an SDXL or SD2 LoRA
  would otherwise fail deep inside peft or load half-way);
* after loading, the number of LoRA-wrapped modules must equal the number of
  modules the file names, and a DoRA file's magnitude vectors must have arrived;
* kohya DoRA files (``dora_scale`` keys) are refused: diffusers' SD1.5 loader drops
  those scales with only a warning and would apply the rest as a plain LoRA.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
#: cross-attention (text) width -> base model family, to name the model a LoRA was made for.
TEXT_WIDTH_FAMILY = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL (text encoder 2)"}


class LoraError(ValueError):
    """A LoRA file that cannot be used with the chosen base model; the message says why."""


@dataclass
class LoraInfo:
    """What a LoRA file contains, read from its safetensors header only."""

    path: Path
    layout: str  # kohya | kohya-locon | diffusers-peft | diffusers-peft+dora
    modules: dict[str, dict] = field(default_factory=dict)  # module prefix -> {down, up shapes, alpha?}
    rank: int = 0
    components: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.path.name}: layout {self.layout}, rank {self.rank}, {len(self.modules)} modules "
            f"({', '.join(self.components)})"
        )


def read_safetensors_header(path: str | Path) -> tuple[dict, dict]:
    """Read a safetensors header without loading tensors (and without unpickling anything).

    :return: (tensor entries {name: {dtype, shape, data_offsets}}, ``__metadata__`` dict)
    :raises LoraError: for a pickle, a truncated file or anything that is not safetensors.
    """
    path = Path(path)
    if not path.exists():
        raise LoraError(f"{path}: file not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(
            f"{path.name}: '{path.suffix}' files are Python pickles, which can run arbitrary code when loaded; "
            "refused. Download the .safetensors version of this LoRA instead."
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise LoraError(f"{path.name}: empty or truncated file ({size} bytes); not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        # A zip (torch.save) or a raw pickle (protocol 2+ starts with 0x80). A safetensors header length
        # may also end in 0x80 (its JSON then starts at byte 8), so the pickle test looks past it.
        if head[:2] == b"PK" or (head[:1] == b"\x80" and (n > size - 8 or f.read(1) != b"{")):
            raise LoraError(f"{path.name}: this is a pickle (torch.save) file, not safetensors; refused")
        f.seek(8)
        if n > min(size - 8, 100 * 2**20):
            raise LoraError(
                f"{path.name}: not a safetensors file, or truncated (header says {n} bytes, file has {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(f"{path.name}: corrupt safetensors header ({e})") from None
    meta = header.pop("__metadata__", {}) or {}
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise LoraError(f"{path.name}: truncated ({size} bytes on disk, {8 + n + end} expected); download it again")
    return header, meta


def _split_key(key: str) -> tuple[str, str]:
    """``lora_unet_x.lora_down.weight`` -> (``lora_unet_x``, ``lora_down.weight``)."""
    for marker in (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".alpha", ".hada_", ".lokr_", ".dora_scale",
                   ".lora_magnitude_vector", ".lora_mid.", ".diff", ".w_norm", ".b_norm"):
        i = key.find(marker)
        if i > 0:
            return key[:i], key[i + 1 :]
    return key, ""


def inspect_lora(path: str | Path) -> LoraInfo:
    """Describe a LoRA file (layout, rank, modules) from its header; no tensor is loaded.

    :raises LoraError: unsupported layouts (LyCORIS LoHa/LoKr, SDXL) and unreadable files.
    """
    path = Path(path)
    header, meta = read_safetensors_header(path)
    keys = list(header)
    if not keys:
        raise LoraError(f"{path.name}: contains no tensors")
    if any(".hada_" in k for k in keys):
        raise LoraError(f"{path.name}: LyCORIS LoHa layout (hada_* keys) is not supported by diffusers' LoRA loader")
    if any(".lokr_" in k for k in keys):
        raise LoraError(f"{path.name}: LyCORIS LoKr layout (lokr_* keys) is not supported by diffusers' LoRA loader")
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) or any(
        "add_embedding" in k for k in keys
    ):
        raise LoraError(f"{path.name}: an SDXL LoRA (two text encoders); this profile's base model is SD 1.5")
    if any(k.endswith(".dora_scale") for k in keys):
        raise LoraError(
            f"{path.name}: kohya DoRA layout (dora_scale keys) is not supported: diffusers' SD 1.5 LoRA loader drops "
            "the DoRA scales and would apply the file as a plain LoRA"
        )
    modules: dict[str, dict] = {}
    for k, v in header.items():
        prefix, part = _split_key(k)
        entry = modules.setdefault(prefix, {})
        if part.startswith(("lora_down", "lora_A")):
            entry["down"] = tuple(v["shape"])
        elif part.startswith(("lora_up", "lora_B")):
            entry["up"] = tuple(v["shape"])
        elif part == "alpha":
            entry["alpha"] = True
        elif part in ("lora_magnitude_vector", "lora_magnitude_vector.weight"):
            entry["dora"] = True
        elif part.startswith("lora_mid"):
            raise LoraError(f"{path.name}: LoCon with CP decomposition (lora_mid keys) is not supported by diffusers")
        else:
            raise LoraError(f"{path.name}: unrecognised key '{k}'; not a LoRA file this tool can load")
    broken = [p for p, e in modules.items() if "down" not in e or "up" not in e]
    if broken:
        raise LoraError(f"{path.name}: {len(broken)} modules lack a down/up pair, e.g. '{broken[0]}'")
    if all(p.startswith(("lora_unet_", "lora_te_")) for p in modules):
        conv = any(len(e["down"]) == 4 and e["down"][2:] != (1, 1) for e in modules.values())
        layout = "kohya-locon" if conv else "kohya"
    elif all(p.startswith(("unet.", "text_encoder.")) for p in modules):
        layout = "diffusers-peft"
    else:
        bad = next(p for p in modules if not p.startswith(("lora_unet_", "lora_te_", "unet.", "text_encoder.")))
        raise LoraError(
            f"{path.name}: key '{bad}' is neither kohya (lora_unet_/lora_te_) nor diffusers (unet./text_encoder.)"
        )
    if any(e.get("dora") for e in modules.values()):
        layout += "+dora"
    comps = sorted({"unet" if p.startswith(("lora_unet_", "unet.")) else "text_encoder" for p in modules})
    rank = max(e["down"][0] for e in modules.values())
    return LoraInfo(path=path, layout=layout, modules=modules, rank=rank, components=tuple(comps), metadata=meta)


def module_map(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """Every LoRA-able module of a base model under every name a LoRA file may use for it.

    Kohya names flatten the module path with ``_`` (``lora_unet_down_blocks_0_…``);
    its text-encoder names carry ``text_model_`` (transformers 5 has no such
    submodule, so both spellings are accepted). Diffusers/PEFT names keep dots.
    """
    out: dict[str, tuple[str, str, torch.nn.Module]] = {}
    parts = [("unet", unet, ["lora_unet_"])]
    if text_encoder is not None:
        parts.append(("text_encoder", text_encoder, ["lora_te_", "lora_te_text_model_"]))
    for comp, model, prefixes in parts:
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            flat = name.replace(".", "_")
            for p in prefixes:
                out[p + flat] = (comp, name, m)
            out[f"{comp}.{name}"] = (comp, name, m)
            if comp == "text_encoder" and not name.startswith("text_model"):
                out[f"text_encoder.text_model.{name}"] = (comp, name, m)
    return out


def _family_hint(info: LoraInfo) -> str:
    widths = [e["down"][1] for p, e in info.modules.items() if ("attn2_to_k" in p or "attn2.to_k" in p)]
    ldm = any(k in p for p in info.modules for k in ("input_blocks", "output_blocks", "middle_block"))
    if ldm and widths and widths[0] == 768:
        return (" (its UNet keys use the original LDM block names -- input_blocks/middle_block/output_blocks -- "
                "which diffusers' SD 1.x LoRA loader cannot map; convert it to the kohya/diffusers naming)")
    if widths and widths[0] in TEXT_WIDTH_FAMILY:
        return f" (its cross-attention takes {widths[0]}-d text: a {TEXT_WIDTH_FAMILY[widths[0]]} LoRA)"
    return ""


def check_lora_against_model(info: LoraInfo, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict:
    """Check that every module a LoRA names exists in the base model with a matching shape.

    Works on meta-device models too (only names and shapes are read).

    :return: {"unet": n, "text_encoder": n} modules touched per component.
    :raises LoraError: naming the first unmatched key or shape mismatch.
    """
    mm = module_map(unet, text_encoder)
    touched = {"unet": 0, "text_encoder": 0}
    missing = [p for p in info.modules if p not in mm]
    if missing:
        raise LoraError(
            f"{info.path.name}: {len(missing)} of {len(info.modules)} LoRA modules match nothing in the base model, "
            f"e.g. '{missing[0]}'{_family_hint(info)}"
        )
    for prefix, e in info.modules.items():
        comp, name, m = mm[prefix]
        if isinstance(m, torch.nn.Linear):
            want_in, want_out = m.in_features, m.out_features
        else:
            want_in, want_out = m.in_channels, m.out_channels
        if e["down"][1] != want_in or e["up"][0] != want_out:
            raise LoraError(
                f"{info.path.name}: '{prefix}' has shape {want_in}->{want_out} in the base model but "
                f"{e['down'][1]}->{e['up'][0]} in the LoRA{_family_hint(info)}"
            )
        touched[comp] += 1
    return touched


def count_loaded_modules(pipe, adapter_name: str) -> int:
    """How many modules of ``pipe`` carry LoRA layers of ``adapter_name`` after loading."""
    n = 0
    for comp in ("unet", "text_encoder"):
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for m in model.modules():
            la = getattr(m, "lora_A", None)
            if isinstance(la, torch.nn.ModuleDict) and adapter_name in la:
                n += 1
    return n


def load_lora(pipe, path: str | Path, adapter_name: str, weight: float = 1.0) -> LoraInfo:
    """Check a LoRA file against ``pipe``'s base model, load it through diffusers and activate it.

    :param pipe: a diffusers Stable Diffusion pipeline.
    :param path: the LoRA ``.safetensors`` file (kohya/Civitai or diffusers layout).
    :param adapter_name: name of the peft adapter (the LoRA's slug).
    :param weight: LoRA scale on both UNet and text encoder (the paper uses 1.0).
    :raises LoraError: before anything is loaded if the file cannot apply cleanly.
    """
    info = inspect_lora(path)
    check_lora_against_model(info, pipe.unet, getattr(pipe, "text_encoder", None))
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    loaded = count_loaded_modules(pipe, adapter_name)
    if loaded != len(info.modules):
        pipe.delete_adapters(adapter_name)
        raise LoraError(f"{Path(path).name}: diffusers applied {loaded} of the {len(info.modules)} modules in the file")
    if info.layout.endswith("+dora"):
        missed = _dora_magnitudes_not_loaded(pipe, path, adapter_name)
        if missed:
            pipe.delete_adapters(adapter_name)
            raise LoraError(
                f"{Path(path).name}: diffusers did not load the DoRA magnitudes of {len(missed)} modules, e.g. "
                f"'{missed[0]}' (they would stay at their initial value); this DoRA file cannot be applied faithfully"
            )
    # Set explicitly on every load: a call at scale 0 can reset adapter weights.
    pipe.set_adapters([adapter_name], adapter_weights=[weight])
    return info


def _dora_magnitudes_not_loaded(pipe, path: str | Path, adapter_name: str) -> list[str]:
    """Keys of the file's DoRA magnitude vectors that did not arrive in the loaded adapter.

    (With transformers 5, diffusers 0.42 leaves the text encoder's magnitudes at their
    initial value: peft's key and the model's parameter name differ by ``.weight``.)
    """
    from safetensors import safe_open

    missed = []
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if ".lora_magnitude_vector" not in k:
                continue
            comp, name = k[: k.index(".lora_magnitude_vector")].split(".", 1)  # diffusers-peft: unet.<path>
            model = getattr(pipe, comp)
            if comp == "text_encoder" and not hasattr(model, "text_model"):
                name = name.removeprefix("text_model.")
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            mv = getattr(module, "lora_magnitude_vector", None)
            ok = False
            if isinstance(mv, torch.nn.ModuleDict) and adapter_name in mv:
                got = mv[adapter_name].weight.detach()
                want = f.get_tensor(k).to(device=got.device, dtype=got.dtype).reshape(got.shape)
                ok = bool(torch.allclose(got.float(), want.float()))
            if not ok:
                missed.append(k)
    return missed
