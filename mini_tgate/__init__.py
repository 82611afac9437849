"""mini_tgate: minimal text-to-image diffusion inference (SD, SDXL, LCM, PixArt) with TGATE temporal attention gating."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, model_hash, save_pipeline, snapshot_commit
from .config import ConfigError, PixArtTransformerConfig, T5Config
from .macs import count_macs
from .schedulers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                         EulerDiscreteScheduler, LCMScheduler, SCHEDULER_NAMES, a1111_names, scheduler_by_name,
                         scheduler_from_config)
from .text_encoder import CLIPTextModel, CLIPTextOutput
from .pipeline import (DiffusionPipeline, load_pipeline, PipelineOutput, PixArtAlphaPipeline, PixArtSigmaPipeline,
                       StableDiffusionPipeline, StableDiffusionXLPipeline)
from .tgate import DeepCache, TGate
from .pixart import PixArtTransformer2DModel
from .t5 import T5EncoderModel
from .tokenizer import CLIPTokenizer, T5Tokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL
