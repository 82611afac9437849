"""Tiny random-weight SD / SDXL / LCM checkpoints built with diffusers and transformers and saved
in the real diffusers layout, with the real CLIP vocabulary (mini_tgate/clip).

Each checkpoint is built once per test session (`built_once`) and copied into the folder each
caller asks for, so that a test may change its copy."""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP = Path(__file__).resolve().parent.parent / "mini_tgate" / "clip"


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight off its initial value (diffusers zero-inits some)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def text_encoder(hidden, act, projection=None, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         projection_dim=projection or hidden, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tokenizer(pad="<|endoftext|>"):
    return CLIPTokenizer(str(CLIP / "vocab.json"), str(CLIP / "merges.txt"), pad_token=pad, model_max_length=77)


def vae(seed=0):
    torch.manual_seed(seed)
    return perturb(AutoencoderKL(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=64), seed)


def sd_unet(cross_dim=32, lcm=False, linear=False, seed=0):
    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=cross_dim, attention_head_dim=4, use_linear_projection=linear,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        time_cond_proj_dim=16 if lcm else None), seed)


def sdxl_unet(lcm=False, seed=0):
    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=64, attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2],
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), time_cond_proj_dim=16 if lcm else None), seed)


_BUILT = tempfile.TemporaryDirectory(prefix="tiny-models-")  # removed when the session ends
_TEMPLATES: dict[str, tuple[Path, torch.Tensor]] = {}


def built_once(make):
    """`make(folder, ...)` runs once per session for each set of arguments; every call copies that
    folder into its own, and leaves torch's global random state as `make` itself would."""
    @functools.wraps(make)
    def save(folder, *args, **kwargs):
        key = f"{make.__name__}{args}{sorted(kwargs.items())}"
        if key not in _TEMPLATES:
            template = Path(_BUILT.name) / str(len(_TEMPLATES))
            make(template, *args, **kwargs)
            _TEMPLATES[key] = template, torch.random.get_rng_state()
        template, state = _TEMPLATES[key]
        shutil.copytree(template, folder, dirs_exist_ok=True)
        torch.random.set_rng_state(state)
        return folder
    return save


SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)


@built_once
def save_sd(folder, prediction_type="epsilon", lcm=False):
    """An SD-1 style checkpoint (SD-2 style linear projections and gelu when v-prediction)."""
    v = prediction_type == "v_prediction"
    pipe = StableDiffusionPipeline(
        unet=sd_unet(lcm=lcm, linear=v), vae=vae(), text_encoder=text_encoder(32, "gelu" if v else "quick_gelu"),
        tokenizer=tokenizer("!" if v else "<|endoftext|>"),
        scheduler=DDIMScheduler(prediction_type=prediction_type, **SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@built_once
def save_sdxl(folder, lcm=False):
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(lcm=lcm), vae=vae(), text_encoder=text_encoder(32, "quick_gelu"),
        text_encoder_2=text_encoder(32, "gelu", projection=32, seed=1), tokenizer=tokenizer(),
        tokenizer_2=tokenizer("!"), scheduler=DDIMScheduler(**SD_SCHEDULER))
    pipe.save_pretrained(folder)
    index = json.loads((Path(folder) / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True
    return folder
