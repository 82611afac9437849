"""mini_tgate: minimal Stable Diffusion inference with TGATE temporal attention gating."""

from .checkpoint import CheckpointError
from .config import ConfigError
