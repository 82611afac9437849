"""`batch`: a prompt file to a folder of PNGs and manifest.jsonl, on one process or under torchrun.

Its options are generate's (cli/options.py), with a prompt file for the prompts, --threads and
--compare-tgate. This file checks them and runs the job; cli/jobs.py tells how a job is cut into
batches, shared among processes, resumed after a crash and merged into the manifest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.bounds import CLI_MAX_THREADS, int_in
from ..core.schedulers import a1111_names
from ..core.tgate import TGate
from ..formats.hub import model_hash
from ..macs import count_macs
from . import jobs
from .errors import ERRORS, one_line
from .loras import lora_hashes, loras_from, tag_loras, untagged
from .options import (add_generate_options, call_options, check_options, check_text, check_writable, emphasis_name,
                      gate_from, image_option, load_from_options, note_literal_emphasis, pick_device, pick_dtype,
                      with_image)


# generate's options that do not decide an image's pixels (or are recorded another way), left out
# of the options a batch folder's records carry and a rerun must repeat
NOT_PIXELS = {"command", "run", "prompts", "out", "overwrite", "compare", "compare_tgate", "device", "no_tgate",
              "gate_step", "sp_interval", "fi_interval", "warm_up", "emphasis"}  # emphasis: recorded_options


def add_batch_options(p) -> None:
    p.add_argument("prompts", metavar="PROMPTS",
                   help="a text file, one prompt a line, or a .jsonl file of {\"prompt\", \"negative\", \"seed\", "
                        "\"id\", \"image\", \"strength\"}")
    add_generate_options(p, prompt_argument=False)
    p.add_argument("--threads", type=int,
                   help="CPU threads per process (default 1; the images depend on it, bit for bit: for more "
                        "cores, start more processes with torchrun)")
    p.add_argument("--compare-tgate", action="store_true",
                   help="the same images without and with the gate, into OUT/no-tgate and OUT/tgate")


# ----------------------------------------------------------------------------- the command

def batch_command(args) -> None:
    """`batch`: check every option and the prompt file, plan the job (rank 0), make this rank's
    share of the batches still to do, then merge the records and sum up (rank 0). Errors before
    the images are made are the same on every rank: rank 0 says them, the others exit quietly."""
    rank, world = jobs.distributed()
    with contextlib.ExitStack() as held:  # rank 0's locks of the job's folders (plan_job), until the end
        try:
            inputs = check_batch(args, world)
            if world > 1 and inputs.device.type == "cuda":
                torch.cuda.set_device(inputs.device)
            job, pending = plan_job(args, inputs, rank, world, held)
        except ERRORS:
            if rank != 0:
                sys.exit(1)
            raise
        already = len(job.images) - sum(len(job.batches[k]) for k in pending)
        stats = {"images": [0] * world, "busy": [0.0] * world, "wall": 0.0}
        if pending:  # else there is nothing to load the model for
            stats = make_images(args, inputs, job, pending, rank, world, already)
        if rank == 0:
            job.merge()
            print(jobs.summary(job, stats, already))
    if world > 1:
        jobs.dist.destroy_process_group()


# ----------------------------------------------------------------------------- the checks

@dataclass(frozen=True)
class Inputs:
    """What batch's options and prompt file come to, every one checked, before the model loads."""
    gate: TGate | None
    device: torch.device               # under torchrun with CUDA: the GPU of the process's LOCAL_RANK
    dtype: torch.dtype
    threads: int | None                # CPU threads per process; None on a GPU
    out: Path
    lines: list[jobs.Line]             # the prompt file's
    init_image: torch.Tensor | None    # --image's pixels
    negative: str | None               # --negative, for the lines without their own
    tagged: list[tuple[str, float]]    # the LoRA files the prompts' <lora:...> tags name, and their scales


def check_batch(args, world: int) -> Inputs:
    """Every option, the prompt file and the folder, checked before anything loads; the same on
    every rank."""
    gate = gate_from(args)
    if args.compare:
        raise ValueError("--compare is generate's: batch takes --compare-tgate (two folders, and their difference)")
    if args.compare_tgate and gate is None:
        raise ValueError("--compare-tgate runs without and with the gate: drop --no-tgate")
    if args.overwrite:
        raise ValueError("batch never replaces an image: a rerun skips those made already; to start afresh, "
                         "choose another --out")
    check_options(args)
    check_text(args.negative or [], "negative prompt")
    if args.negative and len(args.negative) > 1:
        raise ValueError("batch takes one --negative, for every prompt without its own (a .jsonl prompt file "
                         "gives each line its own \"negative\")")
    if args.threads is not None and not int_in(args.threads, 1, CLI_MAX_THREADS):
        raise ValueError(f"--threads {args.threads}: must be from 1 to {CLI_MAX_THREADS}")
    device = pick_device(args.device)
    if world > 1 and device.type == "cuda":  # one GPU a process, by its rank on this machine
        if device.index is not None:
            raise ValueError(f"--device {args.device}: under torchrun each process takes the GPU of its "
                             "LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    out = Path(args.out)
    if out.suffix.lower() == ".png" or out.is_file():
        raise ValueError(f"--out {args.out}: batch writes into a folder (PNGs named by id, and manifest.jsonl); name one")
    check_writable(out)
    lines = jobs.read_prompts(args.prompts)
    init_image = image_option(args, per_line=any(line.image is not None for line in lines))
    tagged = tag_loras([line.prompt for line in lines], args.lora_dir,
                       lambda k: f"{Path(args.prompts).name} line {lines[k].number}")
    if world > len(lines):
        raise ValueError(f"{world} processes for {len(lines)} prompt(s): start at most {len(lines)}")
    return Inputs(gate, device, pick_dtype(args.dtype, device), (args.threads or 1) if device.type == "cpu" else None,
                  out, lines, init_image, args.negative[0] if args.negative else None, tagged)


# ----------------------------------------------------------------------------- the job

def plan_job(args, inputs: Inputs, rank: int, world: int, held: contextlib.ExitStack) -> tuple[jobs.Job, list[int]]:
    """The job and the batches still to do: rank 0 locks the job's folders into `held` (one job a
    folder; the other ranks are part of this one), plans (the seed, the img2img checks of the
    lines, what the folders hold already) and tells the others; an error is sent to every rank,
    as its message."""
    out, gate = inputs.out, inputs.gate
    folders = ({"": (out, gate)} if not args.compare_tgate
               else {"no-tgate": (out / "no-tgate", None), "tgate": (out / "tgate", gate)})
    options = recorded_options(args, inputs)

    def job(seed):
        return jobs.Job(jobs.job_images(inputs.lines, args.num_images, seed, inputs.negative, args.strength), folders,
                        {**options, "seed": seed}, args.batch_size)

    def plan():  # rank 0
        try:
            for folder, _ in folders.values():
                held.enter_context(jobs.folder_lock(folder))
            seed = jobs.resolve_seed([folder for folder, _ in folders.values()], args.seed)
            planned = job(seed)
            size = None if inputs.init_image is None else (inputs.init_image.shape[3], inputs.init_image.shape[2])
            jobs.check_img2img(planned, args.steps, size, args.height, args.width)
            return seed, planned.plan()
        except ERRORS as e:
            return one_line(e), None

    seed, pending = jobs.broadcast(plan() if rank == 0 else None, world)
    if pending is None:
        raise ValueError(seed)
    return job(seed), pending


def recorded_options(args, inputs: Inputs) -> dict:
    """The options that decide the pixels, as every record of the job carries them (the gate
    aside: each folder has its own)."""
    model = Path(args.model).resolve() if Path(args.model).exists() else args.model  # a local folder, wherever called from
    # options added since batch was written are left out when unset, so older jobs keep their options
    options = {k: v for k, v in vars(args).items()
               if k not in NOT_PIXELS and not (k in ("image", "strength", "lora_dir") and v is None)}
    if args.image:  # the file, wherever called from, and its bytes: a file changed under a finished job is refused
        options.update(image=str(Path(args.image).resolve()), image_sha256=jobs.file_sha256(args.image))
    if args.lora_dir:  # the tags are in the prompts, which each record holds; the folder they name, wherever called from
        options.update(lora_dir=str(Path(args.lora_dir).resolve()))
    options.update(model=str(model), device=inputs.device.type, threads=inputs.threads)
    texts = [text for line in inputs.lines for text in (line.prompt, line.negative or "")] + [inputs.negative or ""]
    if any(ch in text for text in texts for ch in "(["):  # emphasis changes only the pixels of such prompts
        options["emphasis"] = args.emphasis is not False  # the default is on
    return options


# ----------------------------------------------------------------------------- the images

def make_images(args, inputs: Inputs, job: jobs.Job, pending: list[int], rank: int, world: int, already: int) -> dict:
    """Load the model and make this rank's share of the pending batches (jobs.run_batches)."""
    start = time.perf_counter()
    if inputs.threads is not None:
        torch.set_num_threads(inputs.threads)
    pipe = load_from_options(args, inputs.device, inputs.dtype, inputs.tagged)
    call = with_image(call_options(args, pipe), inputs.init_image)  # lines with their own image replace it
    png_params = png_parameters(args, pipe, call, inputs, rank, world)
    if rank == 0:
        note_literal_emphasis(pipe, call, [text for line in inputs.lines for text in (line.prompt, line.negative)]
                              + [inputs.negative])

    @functools.cache
    def macs(gate, height, width, steps):
        return count_macs(pipe.denoiser.config, height, width, steps, call["guidance_scale"], gate,
                          **({"deepcache": call["deepcache"]} if "deepcache" in call else {}))["denoiser_macs"]
    if rank == 0:
        print(f"loaded {args.model} ({type(pipe).__name__}) on {inputs.device} in "
              f"{str(inputs.dtype).removeprefix('torch.')}: {time.perf_counter() - start:.1f} s; {len(job.images)} "
              f"images, {already} there already, {len(pending)} batches of up to {job.batch_size} to make on "
              f"{world} process(es)", file=sys.stderr)
    checker = jobs.shapes_checker([untagged(image.prompt) for image in job.images]) if args.compare_tgate else None
    return jobs.run_batches(job, pipe, pending, call, png_params, rank, world, checker, macs,
                            jobs.Progress(len(job.images), already) if rank == 0 else None)


def png_parameters(args, pipe, call: dict, inputs: Inputs, rank: int, world: int) -> dict:
    """What every PNG of the job records (each adds its own prompt, seed, gate, ...). The model
    hash is rank 0's, sent to the others."""
    info = pipe.model_info
    hash_ = jobs.broadcast(model_hash(info["folder"], args.variant) if rank == 0 else None, world)
    sampler, schedule_type = a1111_names(pipe.scheduler)
    deepcache = {"deepcache": call["deepcache"]} if "deepcache" in call else {}  # both folders run it
    loras = [{"lora": path, "scale": scale} for path, scale in loras_from(args) + inputs.tagged]
    hashes = jobs.broadcast(lora_hashes(args, inputs.tagged) if rank == 0 and loras else None, world)
    return dict(steps=args.steps, guidance_scale=call["guidance_scale"], sampler=sampler,
                scheduler=type(pipe.scheduler).__name__, schedule_type=schedule_type, model=info["name"],
                model_hash=hash_, model_revision=info.get("revision"), dtype=inputs.dtype, **deepcache,
                rng="CPU", emphasis=emphasis_name(call),  # each image's noise: its own CPU generator
                **({"loras": loras, "lora_hashes": hashes} if loras else {}),
                **({"image": Path(args.image).name} if args.image else {}))  # the name, never a path
