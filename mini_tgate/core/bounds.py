"""Every bound of the project in one place, and the checks of numbers every module shares.

A library is called from threads, servers and notebooks with input from anywhere: every size,
count and file it is given is bounded before anything is allocated or read, including what a
config implies. Each limit lies far beyond what any real model, checkpoint or run needs; past
it, the input is a typo or an attack. Where the command line allows less than the library,
the name says whose bound it is (CLI_, BATCH_, MACS_).
"""

from __future__ import annotations

import math
import numbers

# ----------------------------------------------------------------------------- one generation call
# SD is trained at 512-768 px and SDXL at 1024 px; 8192 px per side is 8x beyond that (one
# 8192x8192 image already needs tens of GB in the UNet), and 256 images in one batch is more
# than any GPU holds at 512 px: call again for more.
MAX_SIDE = 8192
MAX_IMAGES_PER_CALL = 256  # prompts x num_images_per_prompt
MAX_SEQUENCE_LENGTH = 1024  # PixArt's T5 text (120 Alpha, 300 Sigma); T5 attention over L tokens costs L^2
SEED_RANGE = 2**63  # torch.Generator.manual_seed takes any 64-bit value; A1111 draws in [0, 2**32)

# ----------------------------------------------------------------------------- the command line
# SD checkpoints are trained on 1000 timesteps (no schedule has more distinct steps), and 4096 px
# is 4x SDXL's trained size (one such SD-1.5 image needs a 262,144-token self-attention in its
# first block). An image takes seconds (tiny model) to minutes (SDXL on a CPU): 1000 images is a
# day's work. One UNet batch holds --batch-size images (twice that with CFG): 64 fits SD-1.5 at
# 512 px on an 80 GB GPU; more only risks running out of memory for no speed gain. A prompt file
# of the paper's size (10K MS-COCO captions) is about 1 MB; CLIP reads 77 tokens of a prompt.
CLI_MAX_SIDE = 4096  # generate/batch --height/--width
CLI_MAX_STEPS = 1000
CLI_MAX_IMAGES = 1000  # images of one `generate` run
CLI_MAX_BATCH_SIZE = 64  # --batch-size: images denoised together
CLI_MAX_THREADS = 1024  # batch --threads: CPU threads of one process
BATCH_MAX_IMAGES = 1_000_000  # images of one `batch` job
BATCH_MAX_PROMPT_FILE = 64 << 20  # bytes of a prompt file
BATCH_MAX_PROMPT_CHARS = 2000  # characters of a prompt or negative prompt
BATCH_MAX_RECORD = 1 << 20  # bytes of one manifest line
BATCH_MAX_MANIFEST = 4 << 30  # bytes of one manifest or part file
BATCH_MAX_PATH = 4096  # characters of a line's image path

# ----------------------------------------------------------------------------- counting MACs
# counting runs on the meta device: no memory; the bounds only keep the numbers sane
MACS_MAX_STEPS = 1000
MACS_MAX_SIDE = 4096
MACS_MAX_BATCH = 4096
MACS_MAX_TEXT_LEN = 4096
MACS_MAX_FRAMES = 4096  # frames of one SVD video (SVD-XT: 25)

# ----------------------------------------------------------------------------- files read
# Configs are a few KB and SDXL's largest shard index ~100 KB. A real safetensors header is
# 100-400 KB (SDXL with an EMA copy: ~6,000 tensors); the largest real files (SDXL in float32
# with EMA) are ~14 GB.
MAX_JSON_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 20_000
MAX_FILE_BYTES = 64 * 2**30
MAX_LORA_BYTES = 4 * 2**30  # the largest LoRAs in use (SDXL, rank 256) are under 2 GB
MAX_LORA_TENSORS = 20_000  # an SDXL LoRA of every layer, kohya's: ~3,000
MAX_LORA_METADATA_BYTES = 2**20  # diffusers' lora_adapter_metadata: a LoraConfig per model, kilobytes
MAX_SPIECE_BYTES = 64 * 2**20  # T5's spiece.model is 0.8 MB, mT5's 4.3 MB
MAX_EXTRA_IDS = 10_000  # T5's sentinel tokens (100)
MAX_PNG_TEXT = 1 << 20  # bytes of one PNG text value (after decompression)
MAX_PNG_TOTAL_TEXT = 8 << 20  # bytes of all text values of one PNG together
MAX_PNG_CHUNKS = 100_000  # chunks of one PNG (64 KiB IDAT chunks: 6.4 GB of image data)
MAX_APNG_FRAMES = 10_000  # frames of one APNG written (SVD makes 14-25; 10,000: 6.7 min at 25 fps;
# two chunks a frame, well within MAX_PNG_CHUNKS, so the reader reads every APNG written)

# ----------------------------------------------------------------------------- configs and text
# No width, count or token id of a supported model comes near these (the largest: T5-XXL's
# 10,240-wide MLP, mT5's 250,112 tokens, SDXL's 10 transformer layers per block, CLIP bigG's 32
# layers); a model of 10^9 layers would take minutes to build even on the meta device.
MAX_INT = 2**20  # every integer of a config, lists included
MAX_LAYERS = 256  # the layers of one stack
MAX_BLOCKS = 16  # UNet / VAE resolution levels (SD: 4)
MAX_TRAIN_TIMESTEPS = 100_000  # a scheduler config's abar_t table (1000 in practice)
# What a whole config implies, estimated arithmetically before anything is built (config.py's
# Size): the largest real models have 4.8 B parameters (T5-XXL's encoder; SDXL's UNet 2.6 B,
# SVD-XT's 1.5 B, PixArt's 0.6 B), 87 resnet and transformer blocks (SDXL's UNet; SVD-XT's 76)
# and 44 TMACs in one denoiser call on one input at its trained size (SVD-XT's 25 frames at
# 768x768; SDXL 3.8 T, PixArt 3.5 T). Building on the meta device and counting MACs there take
# time in the number of blocks: about 25 ms a block per distinct step, seconds at the bound.
MAX_PARAMS = 20 * 10**9
MAX_MODEL_LAYERS = 256
MAX_STEP_MACS = 10**15
SCALING_FACTOR_BOUND = 1e6  # a VAE's |scaling_factor| lies in [1 / this, this] (SD: 0.18215, SDXL: 0.13025)
MAX_SIGMA = 2.0**63  # a scheduler's sigma_max: init_noise_sigma = sqrt(sigma_max^2 + 1) must fit a float32 (SVD: 700)
# Prompts are padded to model_max_length tokens (CLIP 77, T5 512): at least BOS + EOS, at most
# this. transformers writes int(1e30) (or int(1e20)) when a tokenizer has no limit.
MAX_MODEL_MAX_LENGTH = 16384
MAX_T5_PROMPT_CHARS = 2**16  # far beyond any max_length of tokens, and quick to tokenize

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ----------------------------------------------------------------------------- checks of numbers

def is_int(x) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite real number (Python or numpy), not a bool; a Python int too large for a float is not."""
    try:
        return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))
    except OverflowError:
        return False


def int_in(x, low: int, high: int) -> bool:
    """An integer in [low, high]."""
    return is_int(x) and low <= x <= high


def some(items, n: int = 5) -> str:
    """The first n items, joined, and how many more: for error messages that name what is wrong."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(map(str, items[:n])) + more

# ----------------------------------------------------------------------------- LoRA scales
# A1111's multipliers lie in [-2, 2] in practice (slider LoRAs: about +-10). A scale of 1e30
# keeps merged float32 weights finite while the UNet's activations overflow to inf: refused.
MAX_LORA_SCALE = 100  # |--lora PATH:SCALE|, |<lora:NAME:MULTIPLIER>|, |load_lora_weights(scale=)|

# ----------------------------------------------------------------------------- batch's folder lock
# The lock file holds one line (pid, host name of at most 255 bytes, start time): a run refused
# reads this much of it to say which process holds the folder.
BATCH_MAX_LOCK_TEXT = 1024  # bytes read of a folder's lock file

# ----------------------------------------------------------------------------- generate's notes
# A model makes images of more pixels than it was trained at slowly (attention's work grows with
# their square) and badly (repeated subjects): past 4x them (twice a side), generate says so first.
CLI_NOTE_PIXELS = 4

# ----------------------------------------------------------------------------- generate --compare
# The speed-up is timed on the first batch, this many more times a path after the warm-up pair;
# runs of one path more than COMPARE_NOISE apart (of the faster) make it too noisy to trust.
COMPARE_TIMED_RUNS = 2
COMPARE_NOISE = 0.10
CLI_LABEL_PIXELS = 256  # the panels' labels are drawn 1x per this many pixels of image height

# ----------------------------------------------------------------------------- A1111 prompt emphasis
# With emphasis=True a prompt is not cut at 75 tokens but split into chunks of 75 (A1111's way);
# each chunk adds 77 tokens every cross-attention layer attends to. 16 chunks (1,200 tokens of
# text) is far beyond any prompt A1111 users write. A chunk about to overflow ends at its last
# comma when that comma is at most this many tokens back (A1111's comma_padding_backtrack, 20).
MAX_PROMPT_CHUNKS = 16
A1111_COMMA_BACKTRACK = 20
