"""mini_tgate: minimal Stable Diffusion inference with TGATE temporal attention gating."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, save_pipeline
from .config import ConfigError
from .macs import count_macs
from .schedulers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                         scheduler_from_config)
from .schedulers import EulerAncestralDiscreteScheduler, SCHEDULER_NAMES, a1111_names, scheduler_by_name
from .text_encoder import CLIPTextModel, CLIPTextOutput
from .pipeline import load_pipeline, PipelineOutput, StableDiffusionPipeline, StableDiffusionXLPipeline
from .tgate import TGate
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL
