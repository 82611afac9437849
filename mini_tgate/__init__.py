"""mini_tgate: minimal diffusion inference (text to image: SD, SDXL, LCM, PixArt; image to video: SVD) with TGATE
temporal attention gating.

The package by role (dependencies point inward: cli -> loading, macs -> families -> formats -> core):
  core/              the method and the shared models: TGate and plan(), Attention, UNet, VAE, CLIP,
                     schedulers, weights, bounds, the one pipeline and its denoising loop
  stable_diffusion/  SD 1.x/2.x, LCM and SDXL pipelines
  pixart/            PixArt-Alpha/-Sigma: T5, the transformer, the pipelines
  svd/               Stable Video Diffusion: the spatio-temporal UNet, temporal VAE, CLIP vision, the pipeline
  formats/           hub hashes, single files, LoRA, PNG parameters, saving
  loading.py         load_pipeline: picks a family's pipeline for a checkpoint
  macs.py            count_macs
  cli/               python -m mini_tgate generate | batch | info | macs
"""

from .core.clip import CLIPTextModel, CLIPTextOutput
from .core.config import ConfigError
from .core.pipeline import DiffusionPipeline, PipelineOutput
from .core.schedulers import (SCHEDULER_NAMES, DDIMScheduler, DPMSolverMultistepScheduler,
                              EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                              LCMScheduler, LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler, a1111_names,
                              scheduler_by_name, scheduler_from_config)
from .core.tgate import DeepCache, TGate
from .core.tokenizer import CLIPTokenizer
from .core.unet import UNet2DConditionModel
from .core.vae import AutoencoderKL
from .core.weights import CheckpointError, snapshot_commit
from .formats.emphasis import parse_prompt_attention
from .formats.hub import model_hash
from .formats.save import save_pipeline
from .loading import AutoPipelineForImage2Image, AutoPipelineForText2Image, load_pipeline, load_single_file
from .macs import count_macs
from .pixart.config import PixArtTransformerConfig, T5Config
from .pixart.pipeline import PixArtAlphaPipeline, PixArtSigmaPipeline
from .pixart.t5 import T5EncoderModel
from .pixart.tokenizer import T5Tokenizer
from .pixart.transformer import PixArtTransformer2DModel
from .stable_diffusion.pipeline import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                                        StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from .svd.clip_vision import CLIPVisionModelWithProjection
from .svd.pipeline import StableVideoDiffusionPipeline
from .svd.unet import UNetSpatioTemporalConditionModel
from .svd.vae import AutoencoderKLTemporalDecoder
from .version import __version__
