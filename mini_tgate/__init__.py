"""mini_tgate: minimal Stable Diffusion inference with TGATE temporal attention gating."""

from .checkpoint import CheckpointError
from .config import ConfigError
from .macs import count_macs
from .schedulers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler,
                         scheduler_from_config)
from .text_encoder import CLIPTextModel, CLIPTextOutput
from .tgate import TGate
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL
