"""LoRA files: layouts, key checks, loading through diffusers, and bad files."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafind_utils.core.config import resolve
from lorafind_utils.core.images import read_base_set
from lorafind_utils.models.loras import LoraError, check_lora_against_model, inspect_lora, load_lora
from lorafind_utils.models.restyle import prepare_base_images, restyle


@pytest.fixture(scope="module")
def prepared(tiny_cfg, stage_params):
    imgs = read_base_set(resolve(tiny_cfg["base_images"]["variety"]))[:2]
    ok, _ = prepare_base_images(imgs, stage_params["resolution"], 100, 200)
    return ok


def test_tiny_loras_are_kohya_files_with_alpha_and_text_encoder(catalog, tiny_pipe):
    assert len(catalog) == 12
    layouts = []
    for e in catalog:
        info = inspect_lora(e["path"])
        layouts.append(info.layout)
        keys = load_file(e["path"])
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in keys)
        assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)
        touched = check_lora_against_model(info, tiny_pipe.unet, tiny_pipe.text_encoder)
        assert touched["unet"] > 0 and touched["text_encoder"] > 0
    assert layouts.count("kohya-locon") >= 2 and layouts.count("kohya") >= 2


def test_lora_changes_output_and_unload_restores(tiny_pipe, catalog, prepared, stage_params):
    base = np.asarray(restyle(tiny_pipe, prepared, [1, 2], stage_params)[0], dtype=float)
    outs = []
    for e in catalog[:3]:
        load_lora(tiny_pipe, e["path"], e["slug"])
        outs.append(np.asarray(restyle(tiny_pipe, prepared, [1, 2], stage_params)[0], dtype=float))
        tiny_pipe.unload_lora_weights()
    again = np.asarray(restyle(tiny_pipe, prepared, [1, 2], stage_params)[0], dtype=float)
    assert np.array_equal(base, again)
    for o in outs:
        assert np.abs(o - base).mean() > 2.0  # mean change of >2 grey levels
    assert np.abs(outs[0] - outs[2]).mean() > 2.0  # and differently per LoRA


def test_loaded_weights_equal_hand_merged_lora(tiny_pipe, catalog):
    e = catalog[2]
    sd = load_file(e["path"])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    mod = tiny_pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    w0 = mod.weight.detach().clone()
    r = sd[f"{key}.lora_down.weight"].shape[0]
    expected = w0 + sd[f"{key}.alpha"] / r * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
    # fuse + unfuse restores the weights only to float precision: put the exact ones back after,
    # so that later tests on this session-wide pipeline are not perturbed
    saved = {
        name: {k: v.clone() for k, v in getattr(tiny_pipe, name).state_dict().items()}
        for name in ("unet", "text_encoder")
    }
    try:
        load_lora(tiny_pipe, e["path"], e["slug"])
        tiny_pipe.fuse_lora(lora_scale=1.0)
        fused = mod.base_layer.weight.detach().clone() if hasattr(mod, "base_layer") else mod.weight.detach().clone()
        tiny_pipe.unfuse_lora()
        tiny_pipe.unload_lora_weights()
        torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mod.weight.detach(), w0)
    finally:
        for name, sd0 in saved.items():
            getattr(tiny_pipe, name).load_state_dict(sd0)


def _copy_with(catalog, tmp_path, name, fn):
    sd = load_file(catalog[0]["path"])
    sd = fn(sd)
    p = tmp_path / name
    save_file(sd, str(p))
    return p


def test_pickle_is_refused_without_loading(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"x": torch.zeros(1)}, p)
    with pytest.raises(LoraError, match="pickle"):
        inspect_lora(p)
    q = tmp_path / "disguised.safetensors"
    q.write_bytes(p.read_bytes())
    with pytest.raises(LoraError, match="pickle"):
        inspect_lora(q)


def test_truncated_and_garbage_files(tmp_path, catalog):
    data = open(catalog[0]["path"], "rb").read()
    p = tmp_path / "cut.safetensors"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraError, match="truncated"):
        inspect_lora(p)
    g = tmp_path / "text.safetensors"
    g.write_bytes(b"hello world, definitely not a tensor file" * 10)
    with pytest.raises(LoraError, match="not a safetensors"):
        inspect_lora(g)
    e = tmp_path / "empty.safetensors"
    e.write_bytes(b"")
    with pytest.raises(LoraError, match="empty"):
        inspect_lora(e)


def test_sdxl_lora_is_refused(tmp_path, catalog):
    p = _copy_with(catalog, tmp_path, "sdxl.safetensors",
                   lambda sd: {k.replace("lora_te_", "lora_te1_"): v for k, v in sd.items()})
    with pytest.raises(LoraError, match="SDXL"):
        inspect_lora(p)


def test_keys_matching_nothing_are_refused(tmp_path, catalog, tiny_pipe):
    def add(sd):
        sd = dict(sd)
        sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
        sd["lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
        return sd

    p = _copy_with(catalog, tmp_path, "extra.safetensors", add)
    with pytest.raises(LoraError, match="match nothing.*down_blocks_7"):
        check_lora_against_model(inspect_lora(p), tiny_pipe.unet, tiny_pipe.text_encoder)


def test_lora_for_another_base_model_names_it(tmp_path, catalog, tiny_pipe):
    def widen(sd):
        sd = dict(sd)
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
        sd[f"{k}.lora_down.weight"] = torch.zeros(4, 768)
        return sd

    p = _copy_with(catalog, tmp_path, "sd1.safetensors", widen)
    with pytest.raises(LoraError, match="768-d text: a SD 1.x LoRA"):
        check_lora_against_model(inspect_lora(p), tiny_pipe.unet, tiny_pipe.text_encoder)


def test_lycoris_loha_is_refused(tmp_path):
    p = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)}, str(p))
    with pytest.raises(LoraError, match="LoHa"):
        inspect_lora(p)
