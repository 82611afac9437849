"""Build the embedded default checkpoint, `weights/tiny-random/`, with mini_tgate itself.

    python examples/make_default.py [FOLDER]      # default: weights/tiny-random

A Stable Diffusion 1.x pipeline in miniature: the real CLIP vocabulary (mini_tgate/clip/), a
2-layer text encoder 32 wide, a UNet with SD-1's topology (three cross-attention down blocks
and a plain one, a cross-attention mid block, the mirror image going up) at 32 channels, a VAE
with 4 levels (8x smaller latents, 4 channels) and SD-1.5's noise schedule with DDIM. The
weights are random (normal(0, 0.02), a fixed seed), so it draws noise: it exists to show that
the whole machinery runs, in seconds on a CPU, with no download. It is stored in float16 (load
it in any dtype): about 7 MB, most of it the 49408 x 32 token embedding (3.2 MB) and the
tokenizer's vocab.json and merges.txt (1.4 MB).
"""

import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mini_tgate import (AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler,  # noqa: E402
                        StableDiffusionPipeline, UNet2DConditionModel)
from mini_tgate.core.config import CLIPTextConfig, UNetConfig, VAEConfig  # noqa: E402
from mini_tgate.formats.save import save_pipeline  # noqa: E402

TEXT = CLIPTextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32, architectures=["CLIPTextModel"])  # vocabulary: CLIP's 49408
UNET = UNetConfig(sample_size=16,  # latents 16x16: 128x128 px images
                  block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                  attention_head_dim=4, cross_attention_dim=32)  # SD-1's block types are the defaults
VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=128)
# SD-1.5's noise schedule (its scheduler_config.json), with DDIM as the sampler
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                timestep_spacing="leading")


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """GPT-2-style random init: N(0, 0.02) weights, zero biases, unit norms; module order fixes it."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            m.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            m.weight.fill_(1.0)
        if isinstance(getattr(m, "bias", None), torch.Tensor):
            m.bias.zero_()
    return model.eval()


def build(seed: int = 0) -> StableDiffusionPipeline:
    g = torch.Generator().manual_seed(seed)
    return StableDiffusionPipeline(
        unet=init_weights(UNet2DConditionModel(UNET), g),
        vae=init_weights(AutoencoderKL(VAE), g),
        text_encoder=init_weights(CLIPTextModel(TEXT), g),
        tokenizer=CLIPTokenizer.from_files(ROOT / "mini_tgate/clip/vocab.json", ROOT / "mini_tgate/clip/merges.txt"),
        scheduler=DDIMScheduler(**SCHEDULE))


def export(pipe: StableDiffusionPipeline, folder: Path) -> float:
    """Save as a diffusers folder with float16 weights; returns its size in MB."""
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.half()  # float16 storage: the 49408 x 32 token embedding alone is 3.2 MB
    save_pipeline(pipe, folder)
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


if __name__ == "__main__":
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "weights" / "tiny-random"
    print(f"saved {folder} ({export(build(), folder):.1f} MB)")
