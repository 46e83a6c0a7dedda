"""Published architecture configs of the paper profile's models, and weight-free builds of them.

No model hub is reachable in tests, so the configs are written out here as Python
dicts, transcribed field by field from the public files (not downloaded; their
faithfulness is checked by the parameter counts below and in the tests):

* ``SD15_UNET_CONFIG``: ``unet/config.json`` of ``runwayml/stable-diffusion-v1-5``
  (mirrored unchanged as ``stable-diffusion-v1-5/stable-diffusion-v1-5``).
* ``SD15_TEXT_ENCODER_CONFIG``: ``text_encoder/config.json`` of the same repository
  (OpenAI CLIP ViT-L/14's text tower; note its legacy ``bos/eos/pad`` ids 0/2/1).
* ``SD15_CONTROLNET_CANNY_CONFIG``: ``config.json`` of ``lllyasviel/sd-controlnet-canny``.
* ``SDXL_UNET_CONFIG`` / ``SDXL_TEXT_ENCODER_2_CONFIG``: ``unet/config.json`` and
  ``text_encoder_2/config.json`` of ``stabilityai/stable-diffusion-xl-base-1.0``
  (only used to make "SDXL LoRA" fixtures; its first text encoder is SD1.5's).
* ``SD21_UNET_CONFIG`` / ``SD21_TEXT_ENCODER_CONFIG``: ``unet/config.json`` and
  ``text_encoder/config.json`` of ``stabilityai/stable-diffusion-2-1`` (for "SD 2.x
  LoRA" fixtures).

Bookkeeping fields (``_class_name``, ``_diffusers_version``, ``architectures``,
``torch_dtype``, ...) are left out; every architectural field is kept, including
those equal to the diffusers/transformers defaults, so the dicts read like the
files. ``tests/test_fullsize_keys.py`` checks the builds against the published
parameter counts (SD1.5 UNet 859,520,964; CLIP ViT-L/14 text encoder 123,060,480;
SDXL UNet 2,567,463,684 and text encoder 2 694,659,840; SD 2.1 UNet 865,910,724 and
text encoder 340,387,840) and the ControlNet against ``ControlNetModel.from_unet``
of the SD1.5 UNet.

``meta_*`` build a model on the ``meta`` device: every parameter has its real
shape but no storage, so the full-size architecture costs no memory and about a
second to build. Such a model cannot run; it serves for names and shapes (LoRA
key checks, parameter counts).
"""
from __future__ import annotations

import torch

_SD15_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD15_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

#: runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD15_DOWN),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD15_UP),
}

#: runwayml/stable-diffusion-v1-5 text_encoder/config.json (CLIP ViT-L/14 text model)
SD15_TEXT_ENCODER_CONFIG: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

#: lllyasviel/sd-controlnet-canny config.json
SD15_CONTROLNET_CANNY_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": list(_SD15_DOWN),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": False,
    "use_linear_projection": True,
}

#: stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower;
#: kohya prefix ``lora_te2_``). Its text_encoder (``lora_te1_``) is SD15_TEXT_ENCODER_CONFIG.
SDXL_TEXT_ENCODER_2_CONFIG: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

#: stabilityai/stable-diffusion-2-1 unet/config.json
SD21_UNET_CONFIG: dict = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": list(_SD15_DOWN),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": list(_SD15_UP),
    "upcast_attention": True,
    "use_linear_projection": True,
}

#: stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14 text tower, last layer dropped)
SD21_TEXT_ENCODER_CONFIG: dict = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}

#: Published parameter counts the builds are checked against.
SD15_UNET_PARAMS = 859_520_964
SD15_TEXT_ENCODER_PARAMS = 123_060_480
SDXL_UNET_PARAMS = 2_567_463_684
SDXL_TEXT_ENCODER_2_PARAMS = 694_659_840
SD21_UNET_PARAMS = 865_910_724
SD21_TEXT_ENCODER_PARAMS = 340_387_840


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _meta_clip_text(config: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def meta_sd15_unet():
    """SD1.5's ``UNet2DConditionModel`` at full size on the meta device (no weights allocated)."""
    return _meta_unet(SD15_UNET_CONFIG)


def meta_sd15_text_encoder():
    """SD1.5's CLIP ViT-L/14 ``CLIPTextModel`` at full size on the meta device."""
    return _meta_clip_text(SD15_TEXT_ENCODER_CONFIG)


def meta_sd15_controlnet():
    """``lllyasviel/sd-controlnet-canny``'s ``ControlNetModel`` at full size on the meta device."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel.from_config(dict(SD15_CONTROLNET_CANNY_CONFIG))


def meta_sdxl_unet():
    """SDXL base 1.0's UNet on the meta device (for SDXL-LoRA fixtures)."""
    return _meta_unet(SDXL_UNET_CONFIG)


def meta_sdxl_text_encoder_2():
    """SDXL base 1.0's second text encoder (``CLIPTextModelWithProjection``, OpenCLIP bigG) on the meta device."""
    return _meta_clip_text(SDXL_TEXT_ENCODER_2_CONFIG, with_projection=True)


def meta_sd21_unet():
    """SD 2.1's UNet on the meta device (for SD 2.x-LoRA fixtures)."""
    return _meta_unet(SD21_UNET_CONFIG)


def meta_sd21_text_encoder():
    """SD 2.1's OpenCLIP ViT-H text encoder on the meta device."""
    return _meta_clip_text(SD21_TEXT_ENCODER_CONFIG)


def n_params(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The rest of the SD1.5 snapshot (for seeded full-size stand-ins: ``lorafind_utils.dryrun``)
# ---------------------------------------------------------------------------------------------

#: runwayml/stable-diffusion-v1-5 vae/config.json (``scaling_factor`` is absent there: the
#: diffusers default 0.18215, written out here)
SD15_VAE_CONFIG: dict = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

#: runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (``_class_name``: PNDMScheduler)
SD15_SCHEDULER_CLASS = "PNDMScheduler"
SD15_SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

#: runwayml/stable-diffusion-v1-5 feature_extractor/preprocessor_config.json (CLIPImageProcessor)
SD15_FEATURE_EXTRACTOR_CONFIG: dict = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}

#: runwayml/stable-diffusion-v1-5 model_index.json (components; the safety checker is listed
#: there, but ``lorafind fetch`` does not download it and every pipeline loads with ``safety_checker=None``)
SD15_MODEL_INDEX: dict = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

#: openai/clip-vit-large-patch14 config.json (stage 07's CLIP score model): text and vision towers
CLIP_VIT_L14_TEXT_CONFIG: dict = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
    "hidden_size": 768, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12,
    "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408,
}
CLIP_VIT_L14_VISION_CONFIG: dict = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 224,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
    "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
}
CLIP_VIT_L14_CONFIG: dict = {"projection_dim": 768, "logit_scale_init_value": 2.6592,
                             "text_config": CLIP_VIT_L14_TEXT_CONFIG, "vision_config": CLIP_VIT_L14_VISION_CONFIG}
#: openai/clip-vit-large-patch14 preprocessor_config.json
CLIP_VIT_L14_PROCESSOR_CONFIG: dict = {
    "crop_size": {"height": 224, "width": 224}, "size": {"shortest_edge": 224}, "do_center_crop": True,
    "do_normalize": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
}

SD15_VAE_PARAMS = 83_653_863
SD15_CONTROLNET_PARAMS = 361_279_120
CLIP_VIT_L14_PARAMS = 427_616_513


def meta_sd15_vae():
    """SD1.5's ``AutoencoderKL`` at full size on the meta device."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(dict(SD15_VAE_CONFIG))


def clip_vit_l14_config():
    """``transformers.CLIPConfig`` of openai/clip-vit-large-patch14."""
    from transformers import CLIPConfig

    c = CLIP_VIT_L14_CONFIG
    return CLIPConfig(text_config=dict(c["text_config"]), vision_config=dict(c["vision_config"]),
                      projection_dim=c["projection_dim"], logit_scale_init_value=c["logit_scale_init_value"])


def meta_clip_vit_l14():
    """openai/clip-vit-large-patch14's ``CLIPModel`` on the meta device."""
    from transformers import CLIPModel

    with torch.device("meta"):
        return CLIPModel(clip_vit_l14_config())
