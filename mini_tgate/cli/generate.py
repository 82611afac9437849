"""`generate`: prompts to PNG files, with TGATE (and with --compare, without it too).

Image i is made from prompt i // --num-images with seed + i and its own generator, so any image
comes out the same when made alone with `--seed <its seed> --num-images 1` (exactly so with
--batch-size 1). Each PNG records how it was made (formats/png.py); `info` reads it back.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm  # comes with huggingface-hub

from ..core.bounds import CLI_MAX_IMAGES, CLI_NOTE_PIXELS, COMPARE_TIMED_RUNS, SEED_RANGE, int_in
from ..core.schedulers import a1111_names
from ..core.tgate import TGate
from ..formats.hub import model_hash
from ..formats.png import format_parameters, image_grid, save_png, to_uint8
from ..macs import count_macs
from ..svd.pipeline import StableVideoDiffusionPipeline
from .compare import NO_PILLOW, compared, has_pillow, speedup
from .loras import lora_hashes, loras_from, tag_loras, untagged
from .options import (call_options, check_options, check_text, check_writable, deepcache_from, emphasis_name,
                      gate_from, image_option, load_from_options, next_number, note_literal_emphasis, pick_device,
                      pick_dtype, random_seed, si, with_image)
from .video import video_command, video_run


# ----------------------------------------------------------------------------- the command

def generate_command(args) -> None:
    """`generate`, in five steps; with an image-to-video model (SVD), video.py's run."""
    start = time.perf_counter()
    if video_run(args):
        return video_command(args, start)
    # 1. Check every option, before the model loads
    inputs = check_generate(args)
    if args.compare and not has_pillow():
        print(NO_PILLOW, file=sys.stderr)
    # 2. The seed
    seed = random_seed() if args.seed == -1 else args.seed  # A1111's -1: random
    n = inputs.n_images
    print(f"seed {seed}" + (f" (images get {seed} to {seed + n - 1})" if n > 1 else "")
          + (": random; rerun with --seed to get the same" if args.seed == -1 else ""))
    # 3. Load
    pipe = load_from_options(args, inputs.device, inputs.dtype, inputs.tagged)
    if isinstance(pipe, StableVideoDiffusionPipeline):  # a hub repo that was not in the cache
        raise ValueError(f"{args.model} is an image-to-video model: it takes no prompt; give --image PATH alone")
    load_time = time.perf_counter() - start
    print(f"loaded {args.model} ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) on {inputs.device} "
          f"in {str(inputs.dtype).removeprefix('torch.')}: {load_time:.1f} s")
    # 4. Make and save the images, batch by batch, under one progress bar
    images, timed = plan_images(args, pipe, inputs, seed), None
    note_size(pipe, images.call, args.batch_size)
    note_literal_emphasis(pipe, images.call, images.prompts + (images.negatives or []))
    images = dataclasses.replace(images, bar=run_bar(pipe, images.call, n, args.batch_size, args.compare))
    try:
        for first in range(0, n, args.batch_size):
            batch = range(first, min(first + args.batch_size, n))
            out, pictures, timed = make_batch(images, inputs.gate, batch, args.compare, timed)
            for i, image in zip(batch, pictures):
                inputs.output.save(i, image, images.parameters(i, batch, image))
    finally:
        images.bar.close()
    inputs.output.save_grid()
    # 5. Report the times (the whole run's) and the MACs
    steps = len(out.steps)  # the steps run: img2img runs the last int(--steps * strength)
    if timed is not None:
        print_compare(timed, steps)
    t = images.totals
    print(f"done: {n} image{'s' * (n > 1)} in {time.perf_counter() - start:.1f} s: load {load_time:.2f} s, then "
          f"{t['calls']} pipeline call{'s' * (t['calls'] > 1)}" + (" (--compare's included)" if args.compare else "")
          + f": text {t['text']:.2f} s, denoise {t['denoise']:.2f} s ({t['image_steps'] / t['denoise']:.1f} "
          f"image-steps/s), decode {t['decode']:.2f} s")
    print_macs(pipe, images.call, inputs.gate, deepcache_from(args), steps)


# ----------------------------------------------------------------------------- the checks

@dataclass(frozen=True)
class Inputs:
    """What generate's options come to, every one checked, before the model loads."""
    gate: TGate | None
    tagged: list[tuple[str, float]]  # the LoRA files the prompts' <lora:...> tags name, and their scales
    init_image: torch.Tensor | None  # img2img's starting image (not `image`: that names the outputs)
    n_images: int                    # prompts x --num-images
    device: torch.device
    dtype: torch.dtype
    output: Output


def check_generate(args) -> Inputs:
    """Everything the arguments alone decide is checked here, before the model (minutes for SDXL) loads."""
    gate = gate_from(args)
    if args.compare and gate is None:
        raise ValueError("--compare runs without and with the gate: drop --no-tgate")
    check_text(args.prompt, "prompt")
    check_text(args.negative or [], "negative prompt")
    if args.negative and len(args.negative) not in (1, len(args.prompt)):
        raise ValueError(f"{len(args.negative)} negative prompts for {len(args.prompt)} prompts "
                         "(give one for all prompts, or one per prompt)")
    check_options(args)
    tagged = tag_loras(args.prompt, args.lora_dir, lambda k: f"prompt {k + 1}")
    init_image = image_option(args)
    n_images = len(args.prompt) * args.num_images
    if not int_in(args.num_images, 1, CLI_MAX_IMAGES // len(args.prompt)):
        raise ValueError(f"--num-images {args.num_images}: from 1 to {CLI_MAX_IMAGES // len(args.prompt)} "
                         f"for {len(args.prompt)} prompt(s) ({CLI_MAX_IMAGES} images a run at most)")
    if args.seed != -1 and not int_in(args.seed, 0, SEED_RANGE - n_images):
        raise ValueError(f"--seed {args.seed}: must be -1 (random) or from 0 to 2**63 - {n_images} "
                         f"(image i gets seed + i)")
    device = pick_device(args.device)
    return Inputs(gate, tagged, init_image, n_images, device, pick_dtype(args.dtype, device),
                  Output(args.out, n_images, args.overwrite))


# ----------------------------------------------------------------------------- the images

@dataclass(frozen=True)
class Images:
    """The images of one run: the pipeline call that makes a batch of them, and what each one's
    PNG records."""
    pipe: object
    prompts: list[str]         # image i's prompt, with its LoRA tags
    negatives: list[str] | None
    seed: int                  # image i gets seed + i
    call: dict                 # the pipeline call's keyword arguments
    shared: dict               # the PNG parameters of every image: steps ... loras
    dtype: torch.dtype
    extra: dict                # and after the image's own: deepcache, img2img's image and strength, layout
    bar: object                # the run's one progress bar, over every image's steps (run_bar; tqdm)
    totals: collections.Counter  # the run's pipeline calls: their count, phases' seconds, image-steps

    def make(self, tgate: TGate | None, batch: range):
        """Images `batch` (a range of indices). The PNGs keep the LoRA tags; the text encoder reads
        the text without them (A1111). The run's bar moves on a step of every image of the batch."""
        def step_done(pipe, i, t, tensors):
            self.bar.update(len(batch))

        out = self.pipe([untagged(self.prompts[i]) for i in batch],
                        negative_prompt=None if self.negatives is None else [self.negatives[i] for i in batch],
                        **self.call, generator=[torch.Generator(device="cpu").manual_seed(self.seed + i) for i in batch],
                        tgate=tgate, progress=False, callback_on_step_end=step_done)
        self.totals.update(out.timings)
        self.totals.update(calls=1, image_steps=len(out.steps) * len(batch))
        return out

    def parameters(self, i: int, batch: range, image) -> dict:
        """What image i's PNG records (format_parameters)."""
        p = dict(prompt=self.prompts[i], seed=self.seed + i, batch_size=len(batch), batch_pos=i - batch.start,
                 **self.shared, width=image.shape[1], height=image.shape[0], dtype=self.dtype)
        if self.negatives is not None:
            p["negative_prompt"] = self.negatives[i]
        return {**p, **self.extra}


def plan_images(args, pipe, inputs: Inputs, seed: int) -> Images:
    """The pipeline call's options, each image's prompts, and what every PNG records: the model
    with A1111's short model hash (the SHA-256 of the UNet's weights: free for hub downloads,
    whose file names are their SHA-256; about 2 s per GB read otherwise), once per run."""
    info = pipe.model_info
    sampler, schedule_type = a1111_names(pipe.scheduler)
    call = with_image(call_options(args, pipe), inputs.init_image)
    if inputs.init_image is not None and args.strength is not None:  # else the pipeline's default strength
        call["strength"] = args.strength
    shared = dict(steps=args.steps, guidance_scale=call["guidance_scale"], scheduler=type(pipe.scheduler).__name__,
                  sampler=sampler, schedule_type=schedule_type, tgate=inputs.gate, model=info["name"],
                  model_hash=model_hash(info["folder"], args.variant), model_revision=info.get("revision"),
                  rng="CPU", emphasis=emphasis_name(call))  # each image's noise: its own CPU generator
    if loras := loras_from(args) + inputs.tagged:  # kept in the PNG's JSON
        shared["loras"] = [{"lora": path, "scale": scale} for path, scale in loras]
        shared["lora_hashes"] = lora_hashes(args, inputs.tagged)
    extra = {"deepcache": call["deepcache"]} if "deepcache" in call else {}
    if inputs.init_image is not None:  # the file's name only, never a local path
        extra.update(image=Path(args.image).name, strength=args.strength or pipe.default_strength)
    if args.compare:
        extra["layout"] = "no gate | TGATE | difference"
    n, per_prompt = inputs.n_images, args.num_images
    prompts = [args.prompt[i // per_prompt] for i in range(n)]
    negatives = None if not args.negative else [args.negative[min(i // per_prompt, len(args.negative) - 1)]
                                                for i in range(n)]
    return Images(pipe, prompts, negatives, seed, call, shared, inputs.dtype, extra, None, collections.Counter())


def run_bar(pipe, call: dict, n: int, batch_size: int, compare: bool):
    """The run's one progress bar (tqdm, on stderr), over the steps of every image it denoises:
    n images x the steps each runs (img2img: the last int(steps * strength)); with --compare each
    image twice, and the first batch's timed runs too."""
    steps = call["num_inference_steps"]
    if "image" in call:  # diffusers' rule, as the pipeline applies it
        steps = min(int(steps * call.get("strength", pipe.default_strength)), steps)
    images = n if not compare else 2 * n + 2 * COMPARE_TIMED_RUNS * min(batch_size, n)
    return tqdm(total=images * steps, unit="step", desc=f"{images} image{'s' * (images > 1)} x {steps} steps")


def make_batch(images: Images, gate: TGate | None, batch: range, compare: bool, timed):
    """One batch: (the pipeline's output, the images to save, the timed runs). With --compare
    each image is [no gate | TGATE | difference], labelled (compare.py), and the first batch is
    made again COMPARE_TIMED_RUNS times a path, in turn, after its first pair warmed both paths up
    (caches, kernels): `timed`, [(no gate, TGATE), ...]."""
    if not compare:
        out = images.make(gate, batch)
        return out, list(out.images), timed
    plain, out = images.make(None, batch), images.make(gate, batch)
    pictures = [compared(a, b) for a, b in zip(plain.images, out.images)]
    if timed is None:
        timed = [(images.make(None, batch), images.make(gate, batch)) for _ in range(COMPARE_TIMED_RUNS)]
    return out, pictures, timed


# ----------------------------------------------------------------------------- the report

def note_size(pipe, call: dict, batch_size: int) -> None:
    """Before a run at far more pixels than the model was trained at (a large --image, say), one
    line on stderr: how much larger, the work of a step against one at the trained size (about
    as many times as long) and the memory of one full-size VAE activation, so a user can stop it."""
    side = pipe.denoiser.config.sample_size * pipe.vae_scale_factor
    height, width = call["height"], call["width"]
    if height * width <= CLI_NOTE_PIXELS * side * side:
        return

    def step_macs(h, w):  # of the denoiser, attention products included
        h, w, _ = pipe.working_size(h, w, {})  # the size denoised (PixArt bins it)
        return count_macs(pipe.denoiser.config, h, w, 1, call["guidance_scale"])["denoiser_macs_with_attention"]

    macs, trained = step_macs(height, width), step_macs(side, side)
    vae = pipe.vae.config.block_out_channels[0] * height * width * batch_size * next(pipe.vae.parameters()).itemsize
    print(f"note: {width}x{height} is {height * width / side ** 2:,.0f}x the pixels of the {side}x{side} the model "
          f"was trained at: a step is {si(macs)} MACs, {macs / trained:,.0f}x one at {side}x{side} (about as many "
          f"times as long), and one full-size VAE activation takes {vae / 2**30:.2f} GiB (Ctrl-C stops the run)",
          file=sys.stderr, flush=True)


def print_compare(timed: list, steps: int) -> None:
    """--compare's report: each path's best timed run, phase by phase, and the speed-up plainly;
    a warning when the timed runs were too noisy to trust it (compare.speedup)."""
    best = [min((pair[k] for pair in timed), key=lambda out: out.timings["denoise"]) for k in (0, 1)]
    print(f"no gate: {phases(best[0], steps)}")
    print(f"TGATE:   {phases(best[1], steps)}")
    line, noisy = speedup([p.timings["denoise"] for p, _ in timed], [g.timings["denoise"] for _, g in timed])
    print(line)
    if noisy:
        warnings.warn(noisy)


def phases(out, steps: int) -> str:
    t = out.timings
    return (f"text {t['text']:.2f} s, denoise {t['denoise']:.2f} s ({steps / t['denoise']:.1f} steps/s), "
            f"decode {t['decode']:.2f} s")


def print_macs(pipe, call: dict, gate: TGate | None, deepcache, steps: int) -> None:
    """The denoiser's MACs per image, and with the gate or DeepCache how many fewer."""
    guidance = call["guidance_scale"]
    height, width, _ = pipe.working_size(call["height"], call["width"], {})  # the size denoised (PixArt bins it)
    base = count_macs(pipe.denoiser.config, height, width, steps, guidance, None)["denoiser_macs"]
    name = "UNet" if hasattr(pipe, "unet") else "transformer"
    if gate is None and deepcache is None:
        print(f"{name}: {si(base)} MACs per image (no gate)")
        return
    gated = count_macs(pipe.denoiser.config, height, width, steps, guidance, gate, deepcache=deepcache)["denoiser_macs"]
    what = [] if gate is None else [f"TGATE (gate step {gate.gate_step}, sp_interval {gate.sp_interval}, "
                                    f"fi_interval {gate.fi_interval}, warm-up {gate.warm_up})"]
    what += [] if deepcache is None else [f"DeepCache (interval {deepcache.interval}, branch {deepcache.branch})"]
    print(f"{' + '.join(what)}: {name} {si(gated)} MACs per image instead of {si(base)}, {1 - gated / base:.1%} fewer")


# ----------------------------------------------------------------------------- output files

class Output:
    """Where the images of one run go (output_files), checked when made; then each image saved as
    it comes, and with --out NAME.png and several images their grid at the end."""

    def __init__(self, out: str, n: int, overwrite: bool):
        self.folder, self.files, self.grid_file = output_files(out, n, overwrite)
        check_writable(self.folder)
        self.n, self.overwrite = n, overwrite
        self.number = None  # the next number to try in the folder, once the first image is there
        self.grid, self.grid_params = [], None

    def save(self, i: int, image, params: dict) -> None:
        """Image i, with `params` (format_parameters) in its PNG."""
        if self.files is None:
            if self.number is None:  # the first image: now the folder is needed
                self.folder.mkdir(parents=True, exist_ok=True)
                self.number = next_number(self.folder)
            path, self.number = save_numbered(self.folder, image, format_parameters(params), self.number)
        else:  # checked above; a file created since is still not replaced
            save_png(path := self.files[i], image, format_parameters(params), overwrite=self.overwrite)
        tqdm.write(f"saved {path}")  # above the progress bar, which is redrawn below it
        if self.grid_file is not None:
            self.grid.append(to_uint8(image))
            self.grid_params = self.grid_params or params  # the first image's, with the grid's own size

    def save_grid(self) -> None:
        if self.grid_file is None:
            return
        image = image_grid(self.grid)
        p = {**self.grid_params, "width": image.shape[1], "height": image.shape[0], "grid": self.n}
        save_png(self.grid_file, image, format_parameters(p), overwrite=self.overwrite)
        print(f"saved {self.grid_file} (all {self.n} images)")


def output_files(out: str, n: int, overwrite: bool = False) -> tuple[Path, list[Path] | None, Path | None]:
    """Where n images go: (folder, files, grid). A folder (a name ending in "/", an existing
    folder, or a name with no suffix) gets numbered files, picked as each is written (files None);
    a .png file gets the image, or with several images NAME-0.png, NAME-1.png, ... and the grid
    in NAME.png. Nothing is created here, but every named file that exists is an error unless
    `overwrite`: the run fails before generating instead of after."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return path, None, None
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: images are written as PNG; name a .png file, or a folder ending in /")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {str(path.parent)!r} does not exist")
    files, grid = ([path], None) if n == 1 else ([path.with_name(f"{path.stem}-{i}.png") for i in range(n)], path)
    for f in files + [grid] * (grid is not None):
        if f.is_dir():
            raise IsADirectoryError(f"--out {out}: {str(f)!r} is a folder")
        if f.exists() and not overwrite:
            raise FileExistsError(f"--out {out}: {str(f)!r} exists; pass --overwrite to replace it, or name another file")
    return path.parent, files, grid


def save_numbered(folder: Path, image, text: dict, first: int) -> tuple[Path, int]:
    """Save into `folder` as NNNNN.png, the first free number from `first` on: each number is
    claimed by creating its file exclusively, so two runs writing into one folder at the same
    time never write the same file. Returns the path and the next number to try."""
    n = first
    while True:  # ends: each failed try is a file that exists, and a folder holds finitely many
        path = folder / f"{n:05d}.png"
        try:
            save_png(path, image, text, overwrite=False)  # fails if the name is taken, even just now
            return path, n + 1
        except FileExistsError:
            n += 1
