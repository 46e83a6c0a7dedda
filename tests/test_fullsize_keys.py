"""Full-size key compatibility: the complete key sets real SD1.5 LoRAs carry, against SD1.5's
published architecture built on the meta device (no weights allocated).

The key sets are enumerated the way kohya-ss sd-scripts (``networks/lora.py``) enumerates them:
every Linear / 1x1 Conv2d inside a ``Transformer2DModel`` (UNet) and inside ``CLIPAttention`` /
``CLIPMLP`` (text encoder); LoCon (``conv_dim`` set) adds ``ResnetBlock2D``, ``Downsample2D`` and
``Upsample2D`` -- their 3x3 convs, ``time_emb_proj`` and the 1x1 ``conv_shortcut``.
Loading is proven with diffusers' own loader (kohya conversion + peft injection) on meta models.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from lorafind_utils.models import hub_configs as C
from lorafind_utils.models.loras import LoraError, check_lora_against_model, inspect_lora

KOHYA_UNET = ("Transformer2DModel",)
KOHYA_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
KOHYA_TE = ("CLIPAttention", "CLIPMLP")
RANK = 4

# The numbers a standard kohya SD1.5 LoRA carries: 16 transformer blocks x (attn1 4 + attn2 4 + ff 2)
# + 16 x (proj_in, proj_out) = 192 UNet modules; 12 CLIP layers x (q, k, v, out, fc1, fc2) = 72.
N_UNET, N_TE = 192, 72
# LoCon adds, per resnet (4x2 down + 2 mid + 4x3 up = 22): conv1, conv2, time_emb_proj; 14 resnets
# change width and carry conv_shortcut; 3 downsampler + 3 upsampler convs.
LOCON_EXTRA = {"conv1": 22, "conv2": 22, "time_emb_proj": 22, "conv_shortcut": 14, "downsamplers_0_conv": 3,
               "upsamplers_0_conv": 3}
N_LOCON_UNET = N_UNET + sum(LOCON_EXTRA.values())  # 278


# ---------------------------------------------------------------------------------------------
# fixtures: meta models and key sets
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15():
    """Pristine full-size SD1.5 UNet + text encoder on the meta device (never loaded into)."""
    return C.meta_sd15_unet(), C.meta_sd15_text_encoder()


@pytest.fixture(scope="module")
def sdxl():
    """SDXL base's UNet and second text encoder on the meta device (its first text encoder is SD1.5's)."""
    return C.meta_sdxl_unet(), C.meta_sdxl_text_encoder_2()


@pytest.fixture(scope="module")
def sd21():
    return C.meta_sd21_unet(), C.meta_sd21_text_encoder()


def kohya_modules(model, targets, conv3x3: bool = False) -> dict[str, torch.nn.Module]:
    """``{dotted module name: module}`` that kohya's LoRA network wraps inside modules of class ``targets``."""
    out = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ not in targets:
            continue
        for child_name, child in mod.named_modules():
            is_conv = isinstance(child, torch.nn.Conv2d)
            if isinstance(child, torch.nn.Linear) or (is_conv and (child.kernel_size == (1, 1) or conv3x3)):
                out[f"{name}.{child_name}" if child_name else name] = child
    return out


def sd15_modules(unet, te, locon: bool = False) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """kohya key prefix -> (component, module name in the meta model, module)."""
    out = {}
    targets = KOHYA_UNET + (KOHYA_UNET_CONV if locon else ())
    for name, m in kohya_modules(unet, targets, conv3x3=locon).items():
        out["lora_unet_" + name.replace(".", "_")] = ("unet", name, m)
    for name, m in kohya_modules(te, KOHYA_TE).items():
        # Real files were made with transformers 4, whose CLIPTextModel nests everything in text_model.
        out["lora_te_text_model_" + name.replace(".", "_")] = ("text_encoder", name, m)
    return out


def _down_up(m: torch.nn.Module, rank: int) -> tuple[tuple, tuple]:
    if isinstance(m, torch.nn.Linear):
        return (rank, m.in_features), (m.out_features, rank)
    return (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)


def kohya_state_dict(mods: dict, rank: int = RANK) -> dict[str, torch.Tensor]:
    sd = {}
    for key, (_, _, m) in mods.items():
        down, up = _down_up(m, rank)
        sd[f"{key}.lora_down.weight"] = torch.zeros(down, dtype=torch.float16)
        sd[f"{key}.lora_up.weight"] = torch.zeros(up, dtype=torch.float16)
        sd[f"{key}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return sd


def diffusers_state_dict(mods: dict, rank: int = RANK, te_prefix: str = "text_encoder.text_model.",
                         dora: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The same modules in diffusers/PEFT naming; ``dora``: components that carry magnitude vectors."""
    sd = {}
    for _, (comp, name, m) in mods.items():
        key = f"unet.{name}" if comp == "unet" else f"{te_prefix}{name}"
        down, up = _down_up(m, rank)
        sd[f"{key}.lora_A.weight"] = torch.zeros(down, dtype=torch.float16)
        sd[f"{key}.lora_B.weight"] = torch.zeros(up, dtype=torch.float16)
        if comp in dora:  # peft's DoRA magnitude: (out,) for Linear, (1, out, 1, 1) for Conv2d
            shape = (up[0],) if isinstance(m, torch.nn.Linear) else (1, up[0], 1, 1)
            sd[f"{key}.lora_magnitude_vector"] = torch.ones(shape, dtype=torch.float16)
    return sd


def save(sd: dict, path) -> str:
    save_file(sd, str(path))
    return str(path)


class _Log(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diffusers_load_on_meta(sd: dict, adapter: str = "x"):
    """Load a LoRA state dict with diffusers' SD1.5 loader into fresh meta models.

    Exactly what ``pipe.load_lora_weights`` does (``lora_state_dict`` -> ``load_lora_into_unet`` ->
    ``load_lora_into_text_encoder``), minus a pipeline object.

    :return: (unet, text encoder, {component: {module name: wrapped module}}, warnings logged)
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    unet, te = C.meta_sd15_unet(), C.meta_sd15_text_encoder()
    log = _Log()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(log)
    try:
        converted, alphas = M.lora_state_dict(dict(sd))
        M.load_lora_into_unet(converted, alphas, unet=unet, adapter_name=adapter, low_cpu_mem_usage=True)
        M.load_lora_into_text_encoder(converted, alphas, text_encoder=te, adapter_name=adapter, low_cpu_mem_usage=True)
    finally:
        for lg in loggers:
            lg.removeHandler(log)
    wrapped = {
        comp: {n: m for n, m in model.named_modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter in m.lora_A}
        for comp, model in (("unet", unet), ("text_encoder", te))
    }
    return unet, te, wrapped, log.messages


def _assert_loaded_exactly(mods: dict, wrapped: dict, messages: list[str], adapter: str = "x"):
    """Every module the file names is wrapped, nothing else is, with the file's shapes and alpha/rank scaling."""
    for comp in ("unet", "text_encoder"):
        want = {name for c, name, _ in mods.values() if c == comp}
        assert set(wrapped[comp]) == want, comp
    for c, name, m in mods.values():
        w = wrapped[c][name]
        down, up = _down_up(m, RANK)
        assert tuple(w.lora_A[adapter].weight.shape) == down
        assert tuple(w.lora_B[adapter].weight.shape) == up
        assert w.scaling[adapter] == 1.0  # alpha == rank
    bad = [msg for msg in messages if re.search(r"unexpected|not found|missing|No LoRA keys", msg, re.I)]
    assert not bad, bad[:3]


# ---------------------------------------------------------------------------------------------
# the architectures themselves
# ---------------------------------------------------------------------------------------------


def test_meta_models_have_published_parameter_counts(sd15, sdxl, sd21):
    unet, te = sd15
    assert C.n_params(unet) == C.SD15_UNET_PARAMS == 859_520_964
    assert C.n_params(te) == C.SD15_TEXT_ENCODER_PARAMS == 123_060_480
    assert {p.device.type for p in list(unet.parameters()) + list(te.parameters())} == {"meta"}
    assert unet.config.cross_attention_dim == 768 and tuple(unet.config.block_out_channels) == (320, 640, 1280, 1280)
    assert te.config.hidden_size == 768 and te.config.num_hidden_layers == 12 and te.config.hidden_act == "quick_gelu"
    assert C.n_params(sdxl[0]) == C.SDXL_UNET_PARAMS == 2_567_463_684
    assert C.n_params(sdxl[1]) == C.SDXL_TEXT_ENCODER_2_PARAMS == 694_659_840
    assert sdxl[0].config.cross_attention_dim == 2048
    assert C.n_params(sd21[0]) == C.SD21_UNET_PARAMS == 865_910_724
    assert C.n_params(sd21[1]) == C.SD21_TEXT_ENCODER_PARAMS == 340_387_840


def test_meta_controlnet_is_the_sd15_unet_encoder(sd15):
    from diffusers import ControlNetModel

    cn = C.meta_sd15_controlnet()
    with torch.device("meta"):
        ref = ControlNetModel.from_unet(sd15[0])
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(cn) == shapes(ref)
    assert C.n_params(cn) == 361_279_120
    assert tuple(cn.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    assert cn.config.cross_attention_dim == 768


# ---------------------------------------------------------------------------------------------
# supported layouts: every key maps, and diffusers' loader wraps exactly those modules
# ---------------------------------------------------------------------------------------------


def test_full_kohya_lora_key_set_maps_onto_sd15(sd15, tmp_path):
    unet, te = sd15
    mods = sd15_modules(unet, te)
    keys = set(mods)
    assert len([k for k in keys if k.startswith("lora_unet_")]) == N_UNET
    assert len([k for k in keys if k.startswith("lora_te_")]) == N_TE
    for suffix, n in {"attn1_to_q": 16, "attn1_to_out_0": 16, "attn2_to_k": 16, "attn2_to_v": 16, "ff_net_0_proj": 16,
                      "ff_net_2": 16, "proj_in": 16, "proj_out": 16, "self_attn_q_proj": 12, "mlp_fc2": 12}.items():
        assert sum(k.endswith(suffix) for k in keys) == n, suffix
    for k in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
              "lora_unet_mid_block_attentions_0_proj_in",
              "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2",
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
              "lora_te_text_model_encoder_layers_11_mlp_fc1"):
        assert k in keys
    info = inspect_lora(save(kohya_state_dict(mods), tmp_path / "full_lora.safetensors"))
    assert info.layout == "kohya" and info.rank == RANK and info.components == ("text_encoder", "unet")
    assert len(info.modules) == N_UNET + N_TE == 264
    assert all(e.get("alpha") for e in info.modules.values())
    assert check_lora_against_model(info, unet, te) == {"unet": N_UNET, "text_encoder": N_TE}


def test_full_kohya_locon_key_set_maps_onto_sd15(sd15, tmp_path):
    unet, te = sd15
    mods = sd15_modules(unet, te, locon=True)
    extra = set(mods) - set(sd15_modules(unet, te))
    assert {s: sum(k.endswith(s) for k in extra) for s in LOCON_EXTRA} == LOCON_EXTRA
    assert len(extra) == 86
    assert "lora_unet_up_blocks_0_resnets_2_conv_shortcut" in extra
    assert "lora_unet_down_blocks_2_downsamplers_0_conv" in extra
    info = inspect_lora(save(kohya_state_dict(mods), tmp_path / "full_locon.safetensors"))
    assert info.layout == "kohya-locon" and len(info.modules) == N_LOCON_UNET + N_TE == 350
    assert info.modules["lora_unet_mid_block_resnets_1_conv2"]["down"] == (RANK, 1280, 3, 3)
    assert check_lora_against_model(info, unet, te) == {"unet": N_LOCON_UNET, "text_encoder": N_TE}


@pytest.mark.parametrize("locon", [False, True], ids=["lora", "locon"])
def test_diffusers_loader_wraps_every_module_of_a_full_kohya_file(sd15, locon):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    mods = sd15_modules(*sd15, locon=locon)
    sd = kohya_state_dict(mods)
    converted, alphas = M.lora_state_dict(dict(sd))
    assert len(converted) == 2 * len(mods) and len(alphas) == len(mods)  # the converter dropped nothing
    unet, te, wrapped, messages = diffusers_load_on_meta(sd)
    assert (len(wrapped["unet"]), len(wrapped["text_encoder"])) == ((N_LOCON_UNET if locon else N_UNET), N_TE)
    _assert_loaded_exactly(mods, wrapped, messages)
    if locon:
        assert wrapped["unet"]["down_blocks.0.resnets.0.conv1"].lora_A["x"].kernel_size == (3, 3)


@pytest.mark.parametrize(
    "te_prefix", ["text_encoder.text_model.", "text_encoder."], ids=["transformers4", "transformers5"]
)
def test_full_diffusers_peft_file_maps_and_loads(sd15, tmp_path, te_prefix):
    unet, te = sd15
    mods = sd15_modules(unet, te)
    sd = diffusers_state_dict(mods, te_prefix=te_prefix)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in sd
    assert f"{te_prefix}encoder.layers.0.self_attn.q_proj.lora_B.weight" in sd
    info = inspect_lora(save(sd, tmp_path / "peft.safetensors"))
    assert info.layout == "diffusers-peft" and len(info.modules) == 264
    assert check_lora_against_model(info, unet, te) == {"unet": N_UNET, "text_encoder": N_TE}
    _, _, wrapped, messages = diffusers_load_on_meta(sd)
    _assert_loaded_exactly(mods, wrapped, messages)


def test_full_diffusers_dora_file_maps_and_loads_as_dora(sd15, tmp_path):
    unet, te = sd15
    mods = sd15_modules(unet, te)
    sd = diffusers_state_dict(mods, dora=("unet", "text_encoder"))
    assert sum(k.endswith(".lora_magnitude_vector") for k in sd) == 264
    info = inspect_lora(save(sd, tmp_path / "dora.safetensors"))
    assert info.layout == "diffusers-peft+dora" and len(info.modules) == 264
    assert sum(bool(e.get("dora")) for e in info.modules.values()) == 264
    assert check_lora_against_model(info, unet, te) == {"unet": N_UNET, "text_encoder": N_TE}
    _, _, wrapped, messages = diffusers_load_on_meta(sd)
    assert all(m.use_dora["x"] for c in wrapped for m in wrapped[c].values())
    m = wrapped["unet"]["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert tuple(m.lora_magnitude_vector["x"].weight.shape) == (1280,)
    # The UNet takes its magnitudes cleanly; transformers' own load report on the text encoder (if
    # any) is about the magnitudes, which load_lora then checks by value (next test).
    te_report = [msg for msg in messages if "CLIPTextModel LOAD REPORT" in msg]
    assert all("lora_magnitude_vector" in msg for msg in te_report)
    _assert_loaded_exactly(mods, wrapped, [msg for msg in messages if msg not in te_report])


def test_dora_magnitudes_that_diffusers_does_not_load_are_refused(tmp_path):
    """load_lora checks, after loading, that a DoRA file's magnitudes arrived (tiny CPU pipeline)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorafind_utils.models.loras import load_lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2))

    def pipe():
        return StableDiffusionPipeline(vae=None, text_encoder=te, tokenizer=None, unet=unet, scheduler=DDIMScheduler(),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    mods = sd15_modules(unet, te)
    sd = {k: torch.randn(v.shape) for k, v in diffusers_state_dict(mods, dora=("unet", "text_encoder")).items()}
    sd = {k: (v.abs() + 0.5 if k.endswith("magnitude_vector") else v) for k, v in sd.items()}
    p = pipe()
    unet_file = save({k: v for k, v in sd.items() if k.startswith("unet.")}, tmp_path / "dora_unet.safetensors")
    info = load_lora(p, unet_file, "du")
    assert info.layout == "diffusers-peft+dora"
    q = p.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.use_dora["du"]
    torch.testing.assert_close(q.lora_magnitude_vector["du"].weight.detach(),
                               sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"])
    p.unload_lora_weights()
    both = save(sd, tmp_path / "dora_both.safetensors")
    p.load_lora_weights(both, adapter_name="probe")  # what diffusers itself does with the text encoder's magnitudes
    tq = p.text_encoder.encoder.layers[0].self_attn.q_proj
    te_arrived = torch.equal(tq.lora_magnitude_vector["probe"].weight.detach(),
                             sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector"])
    p.unload_lora_weights()
    if te_arrived:  # a later transformers/diffusers that loads them: load_lora must accept the file
        assert load_lora(p, both, "db").layout == "diffusers-peft+dora"
    else:  # diffusers 0.42.1 + transformers 5.x: the text encoder's DoRA magnitudes stay at their init value
        with pytest.raises(LoraError, match=r"did not load the DoRA magnitudes of 12 modules, e\.g\. 'text_encoder\."):
            load_lora(p, both, "db")
        assert not any(
            "db" in getattr(m, "lora_A", {}) for m in list(p.unet.modules()) + list(p.text_encoder.modules())
        )


# ---------------------------------------------------------------------------------------------
# unsupported layouts at full size: each refused with its message, before anything is loaded
# ---------------------------------------------------------------------------------------------


def test_kohya_dora_is_refused_because_diffusers_drops_its_scales(sd15, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    mods = sd15_modules(*sd15)
    sd = kohya_state_dict(mods)
    for key, (_, _, m) in mods.items():
        sd[f"{key}.dora_scale"] = torch.ones(_down_up(m, RANK)[1][0], 1, dtype=torch.float16)
    with pytest.raises(LoraError, match=r"kohya DoRA layout \(dora_scale keys\) is not supported: diffusers' SD 1\.5 "
                                         r"LoRA loader drops the DoRA scales"):
        inspect_lora(save(sd, tmp_path / "kohya_dora.safetensors"))
    converted, _ = M.lora_state_dict(dict(sd))  # the reason: diffusers filters them out with a warning
    assert len(converted) == 2 * 264 and not any("magnitude" in k or "dora" in k for k in converted)


def _lycoris(mods: dict, kind: str) -> dict:
    sd = {}
    for key, (_, _, m) in mods.items():
        (r, fan_in, *k), (fan_out, *_) = _down_up(m, RANK)
        fan_in = fan_in * (k[0] * k[1] if k else 1)
        if kind == "loha":
            for i in (1, 2):
                sd[f"{key}.hada_w{i}_a"] = torch.zeros(fan_out, r, dtype=torch.float16)
                sd[f"{key}.hada_w{i}_b"] = torch.zeros(r, fan_in, dtype=torch.float16)
        elif kind == "lokr":
            sd[f"{key}.lokr_w1"] = torch.zeros(4, 4, dtype=torch.float16)
            sd[f"{key}.lokr_w2_a"] = torch.zeros(fan_out // 4, r, dtype=torch.float16)
            sd[f"{key}.lokr_w2_b"] = torch.zeros(r, fan_in // 4, dtype=torch.float16)
        sd[f"{key}.alpha"] = torch.tensor(float(r))
    return sd


@pytest.mark.parametrize("kind,message", [
    ("loha", r"LyCORIS LoHa layout \(hada_\* keys\) is not supported by diffusers' LoRA loader"),
    ("lokr", r"LyCORIS LoKr layout \(lokr_\* keys\) is not supported by diffusers' LoRA loader"),
    ("cp", r"LoCon with CP decomposition \(lora_mid keys\) is not supported by diffusers"),
])
def test_lycoris_layouts_are_refused_and_diffusers_cannot_convert_them(sd15, tmp_path, kind, message):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as M

    mods = sd15_modules(*sd15, locon=True)
    if kind == "cp":  # LoCon with use_tucker: a lora_mid core for every 3x3 conv
        sd = kohya_state_dict(mods)
        for key, (_, _, m) in mods.items():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                sd[f"{key}.lora_mid.weight"] = torch.zeros(RANK, RANK, 3, 3, dtype=torch.float16)
                sd[f"{key}.lora_down.weight"] = torch.zeros(RANK, m.in_channels, 1, 1, dtype=torch.float16)
    else:
        sd = _lycoris(mods, kind)
    with pytest.raises(LoraError, match=message):
        inspect_lora(save(sd, tmp_path / f"{kind}.safetensors"))
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        M.lora_state_dict(dict(sd))  # diffusers' SD loader has no conversion for these keys either


def _sgm_name(name: str, layers_per_block: int = 2) -> str:
    """diffusers UNet attention path -> the sgm/LDM path kohya uses for SDXL (input_blocks_4_1_...)."""
    n = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{n * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    raise ValueError(name)


@pytest.fixture(scope="module")
def sdxl_kohya(sd15, sdxl):
    """A full kohya SDXL LoRA (sgm UNet names, te1 + te2), checked against diffusers' own SDXL loader."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin as XL
    from diffusers.utils import convert_unet_state_dict_to_peft

    (unet, te2), te1 = sdxl, sd15[1]
    mods = {}
    for name, m in kohya_modules(unet, KOHYA_UNET).items():
        mods["lora_unet_" + _sgm_name(name).replace(".", "_")] = ("unet", name, m)
    for prefix, te in (("lora_te1_", te1), ("lora_te2_", te2)):
        for name, m in kohya_modules(te, KOHYA_TE).items():
            mods[prefix + "text_model_" + name.replace(".", "_")] = (prefix, name, m)
    sd = kohya_state_dict(mods)
    converted, _ = XL.lora_state_dict(dict(sd), unet_config=unet.config)
    peft_unet = convert_unet_state_dict_to_peft({k[5:]: v for k, v in converted.items() if k.startswith("unet.")})
    targets = {k.rsplit(".lora_", 1)[0] for k in peft_unet}
    assert targets == {name for c, name, _ in mods.values() if c == "unet"}  # the fixture is a genuine SDXL layout
    return mods, sd


def test_sdxl_lora_counts_and_refusal_at_full_size(sdxl_kohya, sd15, tmp_path):
    mods, sd = sdxl_kohya
    comps = [c for c, _, _ in mods.values()]
    assert (comps.count("unet"), comps.count("lora_te1_"), comps.count("lora_te2_")) == (722, 72, 192)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k" in mods
    assert sd["lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.lora_down.weight"].shape == (RANK, 2048)
    with pytest.raises(LoraError, match=r"an SDXL LoRA \(two text encoders\); this profile's base model is SD 1\.5"):
        inspect_lora(save(sd, tmp_path / "sdxl.safetensors"))
    # Many SDXL LoRAs are UNet-only: no te1/te2 keys, so the names and widths must give it away.
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    info = inspect_lora(save(unet_only, tmp_path / "sdxl_unet.safetensors"))
    assert info.layout == "kohya" and len(info.modules) == 722
    with pytest.raises(LoraError, match=r"722 of 722 LoRA modules match nothing in the base model, e\.g\. "
                                         r"'lora_unet_(input|middle|output)_block.*2048-d text: a SDXL LoRA"):
        check_lora_against_model(info, *sd15)


def test_sdxl_lora_in_diffusers_format_is_named(tmp_path, sd15, sdxl):
    unet, te2 = sdxl
    mods = {f"u{n}": ("unet", n, m) for n, m in kohya_modules(unet, KOHYA_UNET).items()}
    sd = diffusers_state_dict(mods)
    assert len(sd) == 2 * 722
    info = inspect_lora(save(sd, tmp_path / "sdxl_unet_peft.safetensors"))
    with pytest.raises(LoraError, match=r"LoRA modules match nothing.*2048-d text: a SDXL LoRA"):
        check_lora_against_model(info, *sd15)
    for n, m in kohya_modules(te2, KOHYA_TE).items():
        down, up = _down_up(m, RANK)
        sd[f"text_encoder_2.text_model.{n}.lora_A.weight"] = torch.zeros(down, dtype=torch.float16)
        sd[f"text_encoder_2.text_model.{n}.lora_B.weight"] = torch.zeros(up, dtype=torch.float16)
    with pytest.raises(LoraError, match=r"an SDXL LoRA \(two text encoders\)"):
        inspect_lora(save(sd, tmp_path / "sdxl_peft.safetensors"))


def test_sd2_lora_is_named_at_full_size(sd15, sd21, tmp_path):
    mods = sd15_modules(*sd21)
    assert (sum(c == "unet" for c, _, _ in mods.values()), sum(c == "text_encoder" for c, _, _ in mods.values())) == (
        192,
        138,
    )
    sd = kohya_state_dict(mods)
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 320)  # linear proj_in
    info = inspect_lora(save(sd, tmp_path / "sd2.safetensors"))
    assert info.layout == "kohya" and len(info.modules) == 330
    # Text-encoder layers 12..22 exist only in SD 2's OpenCLIP-H: 11 x 6 = 66 modules match nothing.
    with pytest.raises(LoraError, match=r"66 of 330 LoRA modules match nothing in the base model, e\.g\. "
                                         r"'lora_te_text_model_encoder_layers_(1[2-9]|2[0-2])_.*"
                                         r"1024-d text: a SD 2\.x LoRA"):
        check_lora_against_model(info, *sd15)
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    info = inspect_lora(save(unet_only, tmp_path / "sd2_unet.safetensors"))
    with pytest.raises(LoraError, match=r"has shape 768->\d+ in the base model but 1024->\d+ in the LoRA "
                                         r"\(its cross-attention takes 1024-d text: a SD 2\.x LoRA\)"):
        check_lora_against_model(info, *sd15)


class _Trap:
    """Unpickling this creates a file: proof of whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_lora_weights.bin", "civitai_download.safetensors"])
def test_full_size_pickle_is_refused_without_unpickling(sd15, tmp_path, name):
    marker = tmp_path / "unpickled"
    sd = kohya_state_dict(sd15_modules(*sd15))
    sd["trap"] = _Trap(marker)
    p = tmp_path / name
    torch.save(sd, p)
    with pytest.raises(LoraError, match=r"pickle"):
        inspect_lora(p)
    assert not marker.exists()
    with open(p, "rb") as f:  # the trap is live: a loader that unpickles would have run it
        torch.load(f, weights_only=False)
    assert marker.exists()


def test_full_size_truncated_download_names_the_byte_counts(sd15, tmp_path):
    p = tmp_path / "full.safetensors"
    save(kohya_state_dict(sd15_modules(*sd15, locon=True)), p)
    data = p.read_bytes()
    assert len(data) > 2_000_000  # a full-size file: several MB even at rank 4
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-4096])
    with pytest.raises(LoraError, match=rf"cut\.safetensors: truncated \({len(data) - 4096} bytes on disk, "
                                         rf"{len(data)} expected\); download it again"):
        inspect_lora(cut)
    head = tmp_path / "head.safetensors"
    head.write_bytes(data[:50_000])  # the download stopped inside the JSON header
    with pytest.raises(
        LoraError, match=r"not a safetensors file, or truncated \(header says \d+ bytes, file has 50000\)"
    ):
        inspect_lora(head)


def test_sd15_lora_with_ldm_block_names_is_refused_with_the_right_hint(tmp_path):
    """An SD 1.x LoRA keyed by the original LDM blocks (input_blocks_1_1_...) cannot be mapped by
    diffusers' SD1.5 loader; the message says why instead of calling it an SD 1.x LoRA that does not fit."""
    from safetensors.torch import save_file

    from lorafind_utils.models.hub_configs import meta_sd15_text_encoder, meta_sd15_unet
    from lorafind_utils.models.loras import LoraError, check_lora_against_model, inspect_lora

    sd = {}
    for key, (i, o) in {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (768, 320),
                        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (320, 320)}.items():
        sd[f"{key}.lora_down.weight"] = torch.zeros(4, i)
        sd[f"{key}.lora_up.weight"] = torch.zeros(o, 4)
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    f = tmp_path / "ldm_names.safetensors"
    save_file(sd, str(f))
    with pytest.raises(LoraError, match="original LDM block names") as e:
        check_lora_against_model(inspect_lora(f), meta_sd15_unet(), meta_sd15_text_encoder())
    assert "a SD 1.x LoRA)" not in str(e.value)
