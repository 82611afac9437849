"""Text-to-image pipelines for SD 1.x/2.x (and LCM), SDXL and PixArt-Alpha/-Sigma, and image-to-video
for Stable Video Diffusion, with TGATE.

Reimplements diffusers' `StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
`PixArtAlphaPipeline`, `PixArtSigmaPipeline` and `StableVideoDiffusionPipeline` (and the `tgate`
package's gated versions of them). One call and one denoising loop (`DiffusionPipeline`) serve
all five; the subclasses differ only in the denoiser (UNet or transformer) and how a prompt (SVD:
an image, svd/pipeline.py) becomes its conditioning (`encode_prompt`):

    prompt ─ tokenizer(s) ─ text encoder(s) ─> conditioning ─┐
    noise (B, 4, H/8, W/8) ─> [ denoiser + guidance ─ scheduler step ] x steps ─> VAE decode ─> images

Classifier-free guidance (CFG) runs the denoiser on the doubled batch [unconditional, conditional]
and mixes: eps = eps_u + g * (eps_c - eps_u). With a `TGate`, tgate.plan() decides per step what
the attention layers do and whether the batch is doubled; after the gate step one branch runs
alone and its prediction is used as it is: the unconditional one for text to image, the
conditional one for SVD (`gated_branch`: each the reference's choice).

Read top to bottom: the pipeline and its call, then each step of the call (the initial latents,
the denoising loop, the decode). The arguments are checked in inputs.py; moving the models, the
call lock and compiling are runtime.py's.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bounds import is_number
from .inputs import Call, check_call, check_loading_args
from .runtime import RuntimeMixin, make_static_caches, on_device, progress_bar, timed
from .schedulers import DDIMScheduler, Scheduler, randn_tensor, scheduler_from_config
from .tgate import COMPUTE, DeepCache, TGate, plan
from .vae import AutoencoderKL
from .weights import CheckpointError, pick_dtype, read_json, read_model_index, resolve, snapshot_commit


@dataclass
class PipelineOutput:
    images: np.ndarray | torch.Tensor | list  # (N, H, W, 3) in [0, 1] for "np"; latents for "latent"
    steps: list[dict] = field(default_factory=list)  # the plan it ran: per step, what attention did
    timings: dict = field(default_factory=dict)      # seconds per phase

    @property
    def frames(self):
        """SVD's name for the output (diffusers' `.frames`): (N, F, H, W, 3) videos for "np"."""
        return self.images


class DiffusionPipeline(RuntimeMixin):
    """What every pipeline here shares: its parts, and the one call: check the inputs, encode the
    prompts, draw the noise, run the denoising loop under the TGATE plan, decode. Subclasses say
    which model denoises (`denoiser`) and how prompts become its conditioning (`encode_prompt`):
    StableDiffusionPipeline (UNet, CLIP text), its SDXL subclass (two text encoders, size ids), the
    PixArt pipelines (transformer, T5 text), StableVideoDiffusionPipeline (its own check, encode and
    decode: image to video). Moving the models, the call lock and compiling come from RuntimeMixin."""

    model_index_names: tuple[str, ...] = ()  # the model_index.json class names this class loads, and is picked for
    also_loads: tuple[str, ...] = ()  # other names it loads (the text-to-image and img2img pipelines: each other's)
    default_steps = 50  # diffusers' default num_inference_steps: 50 for SD and SDXL, 20 for PixArt
    default_guidance_scale = 7.5  # diffusers' defaults: 7.5 for SD, 5.0 for SDXL, 4.5 for PixArt
    default_strength = None  # img2img's (diffusers': 0.8 for SD, 0.3 for SDXL); None: no img2img (PixArt)
    extra_call_args = ()  # keyword arguments of __call__ that only the subclass reads (SDXL's, PixArt's)
    extra_callback_inputs = ()  # tensors a step callback may see besides CALLBACK_TENSOR_INPUTS (SDXL's)
    vae_class = AutoencoderKL  # SVD's: AutoencoderKLTemporalDecoder
    gated_branch = "uncond"  # the CFG branch that runs alone after the TGATE gate (tgate's SVD loader: "cond")

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, scheduler: Scheduler):
        super().__init__()  # RuntimeMixin's state: progress bar options, offload device, call lock
        self.vae, self.text_encoder, self.tokenizer, self.scheduler = vae, text_encoder, tokenizer, scheduler
        self.model_info: dict = {}  # set by load_pipeline: name, folder, revision of the checkpoint

    @classmethod
    def from_pretrained(cls, source, device="cpu", dtype: torch.dtype | None = None, variant: str | None = None,
                        local_files_only: bool = False, cache_dir=None, revision: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> "DiffusionPipeline":
        """The pipeline of a diffusers folder or hub repo whose model_index.json names this class
        or one it also loads (see load_folder; on DiffusionPipeline, the class the folder names).
        dtype (diffusers' name, torch_dtype, is an alias) defaults to float32. kwargs: diffusers'
        harmless loading arguments (inputs.HARMLESS_LOADING_ARGS), anything else a TypeError."""
        check_loading_args(f"{cls.__name__}.from_pretrained", kwargs)
        return load_folder(cls, source, device, pick_dtype(dtype, torch_dtype), variant, local_files_only, cache_dir,
                           revision)

    @classmethod
    def load_components(cls, folder: Path, index: dict, kw: dict) -> dict:
        """The models and tokenizers of a diffusers folder besides the VAE and the scheduler."""
        raise NotImplementedError

    @classmethod
    def from_pipe(cls, pipe: "DiffusionPipeline", **components) -> "DiffusionPipeline":
        """diffusers' from_pipe: this class on the same models (shared, not copied), any of them
        replaced by `components` (e.g. scheduler=...)."""
        new = cls(**{**init_arguments(pipe, cls), **components})
        new.model_info, new.progress_bar_config = dict(pipe.model_info), dict(pipe.progress_bar_config)
        return new

    @property
    def components(self) -> dict:
        """The parts (diffusers'): `type(pipe)(**pipe.components)` builds the same pipeline on them."""
        return {k: v for k, v in init_arguments(self, type(self)).items()
                if inspect.signature(type(self)).parameters[k].default is inspect.Parameter.empty}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_embeddings(self, n_prompts: int, prompt_embeds, negative_prompt_embeds, conditioning: dict):
        """The family's own checks of given embeddings (SDXL's pooled ones, PixArt's masks), after
        inputs.check_call has checked their shapes."""

    def working_size(self, height: int, width: int, conditioning: dict) -> tuple[int, int, tuple | None]:
        """The (height, width) the denoiser works at, and the size of the images returned (None:
        the same). SD and SDXL work at the size asked for; PixArt may bin it."""
        return height, width, None

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, generator=None,
                 latents: torch.Tensor | None = None, tgate: TGate | None = None, output_type: str = "np",
                 deepcache: DeepCache | None = None,
                 guidance_rescale: float = 0.0, eta: float = 0.0, progress: bool | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 clip_skip: int | None = None, timesteps: list | None = None, sigmas: list | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 image=None, strength: float | None = None, return_dict: bool = True,
                 **conditioning) -> PipelineOutput | tuple:
        """Text to images; with `image`, img2img (see image_latents). Thread-safe: concurrent calls
        on one pipeline run one at a time (see exclusive_call), each with its own copy of the scheduler.

        `callback_on_step_end(pipe, i, t, tensors) -> dict` runs after each step with the tensors
        named in `callback_on_step_end_tensor_inputs`; those it returns replace the loop's. Setting
        `pipe._interrupt = True` (diffusers' way) skips the remaining steps and decodes the
        current latents; the flag is reset when the next call starts. Setting `pipe._guidance_scale`
        there changes the guidance from the next step on (see denoise). return_dict=False: a tuple,
        as diffusers' (as_tuple)."""
        # 1. Check the arguments (all of them, by name) before anything is encoded or allocated: inputs.py.
        c = check_call(self, **{k: v for k, v in locals().items() if k not in ("self", "return_dict")})
        out = self.generate(c)
        return out if return_dict else self.as_tuple(out)

    def as_tuple(self, out: PipelineOutput) -> tuple:
        """return_dict=False's value, diffusers' for the family: (images,); SD's (images, None)."""
        return (out.images,)

    @torch.inference_mode()
    def generate(self, c: Call) -> PipelineOutput:
        """Steps 2 to 6 of a call whose arguments are checked (SVD's __call__ checks its own)."""
        timings = {}  # seconds per phase
        with self.exclusive_call():
            # 2. Encode the prompts (SVD: the image): the denoiser's conditioning, one row per image.
            with timed(timings, "text"):
                cond, uncond = self.encode(c)
            # 3. Initial latents (B, C, H/f, W/f): noise, or (img2img) the image's latents noised.
            latents = initial_latents(c)
            # 4. Plan: each step's attention behaviour, batch and (DeepCache) UNet part.
            cfg = uncond is not None  # encode decides: with CFG, it conditions on the negative prompts too
            steps = plan(c.tgate, len(c.scheduler.timesteps) - c.scheduler.begin_index, cfg, c.deepcache)
            self._guidance_scale, self._num_timesteps = c.guidance_scale, len(steps)  # diffusers' attributes
            # 5. Denoise.
            state = LoopState(latents, cond, uncond)
            with timed(timings, "denoise"), on_device([c.denoiser], c.offload):
                report = self.denoise(c, state, steps)
            # 6. Decode (no VAE for "latent").
            with timed(timings, "decode"), on_device([c.vae] if c.output_type != "latent" else [], c.offload):
                images = state.latents if c.output_type == "latent" else self.decode_latents(c, state.latents)
            return PipelineOutput(images, report, timings)

    def decode_latents(self, c: Call, latents: torch.Tensor):
        """The latents as images of c.output_type (SVD decodes videos)."""
        return decode(latents, c.output_type, c.vae, c.output_size)

    def encode(self, c: Call) -> tuple[dict, dict | None]:
        """The denoiser's conditioning of the prompts and, with CFG, of the negative prompts (else
        None), each repeated for its images (encode_text; SVD encodes its image)."""
        return encode_text(self, c)

    def denoise(self, c: Call, state: LoopState, steps: list) -> list[dict]:
        """The denoising loop with this call's progress bar and step callback; the latents end in
        `state`. Returns per step what attention did."""
        report, bar, checks = [], progress_bar(len(steps), c.bar_config), FiniteChecks(c, len(steps))
        try:
            for i, t, entry in denoising_loop(c, state, steps, checks, self.gated_branch):
                report.append(entry)
                if bar is not None:
                    bar.update()
                if c.callback is not None:  # diffusers' callback_on_step_end; what it returns replaces ours
                    guided = guidance_on(c.guidance_scale)
                    state.replace(c.callback(self, i, t, state.tensors(c.callback_inputs, guided)) or {}, guided)
                    c.guidance_scale = dynamic_guidance(self._guidance_scale, c.guidance_scale)
                if self._interrupt:  # diffusers' clean early stop: decode what there is
                    break
            checks.raise_first()  # the loop's one wait for the device
        finally:
            c.denoiser.clear_gate()  # no cache outlives the call
            if bar is not None:
                bar.close()
        return report


# ----------------------------------------------------------------------------- 1. loading

def load_folder(cls, source, device, dtype: torch.dtype, variant, local_files_only, cache_dir, revision):
    """DiffusionPipeline.from_pretrained's loading: the folder's (or repo's) model_index.json,
    the class (cls, which must load the name it gives: a text-to-image class loads an img2img
    folder and the other way round, as in diffusers; on DiffusionPipeline the class that declares
    the name), the VAE (float32 when its config says force_upcast), the scheduler and the
    family's components."""
    folder = resolve(source, variant, local_files_only, cache_dir, revision=revision)
    index = read_model_index(folder)
    cls = cls if cls.model_index_names else pipeline_class(index.get("_class_name"), folder / "model_index.json")
    if index.get("_class_name") not in cls.model_index_names + cls.also_loads:
        raise CheckpointError(f"{source}: a {index.get('_class_name')} checkpoint, not a {cls.__name__} one; "
                              "use load_pipeline")
    kw = dict(dtype=dtype, device=device, variant=variant)
    vae = cls.vae_class.from_pretrained(folder, subfolder="vae", **kw)
    vae = vae.float() if vae.needs_upcast else vae
    scheduler = scheduler_from_config(read_json(folder / "scheduler" / "scheduler_config.json"))
    pipe = cls(vae=vae, scheduler=scheduler, **cls.load_components(folder, index, kw))
    # where the weights came from (the CLI writes it into PNGs): never an absolute local path
    local = Path(source).expanduser().is_dir()
    pipe.model_info = {"name": folder.name if local else str(source), "folder": folder,
                       "revision": snapshot_commit(folder)}
    return pipe


def pipeline_class(name, where) -> type:
    """The pipeline class that declares `name` (model_index.json's `_class_name`) among its
    model_index_names, found among DiffusionPipeline's subclasses (core imports no family): the
    one lookup of load_pipeline and DiffusionPipeline.from_pretrained. `where` names the file."""
    classes, todo = {}, list(DiffusionPipeline.__subclasses__())
    while todo:
        cls = todo.pop(0)
        classes.update(dict.fromkeys(vars(cls).get("model_index_names", ()), cls))
        todo += cls.__subclasses__()
    if name not in classes:
        raise CheckpointError(f"{where}: pipeline class {name!r} is not supported (supported: {', '.join(classes)})")
    return classes[name]


def init_arguments(pipe, cls) -> dict:
    """What `cls`'s constructor takes that `pipe` has, by name: its parts (and options)."""
    names = [p.name for p in inspect.signature(cls).parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {name: getattr(pipe, name) for name in names if hasattr(pipe, name)}


# ----------------------------------------------------------------------------- 2. encode

def encode_text(pipe: DiffusionPipeline, c: Call) -> tuple[dict, dict | None]:
    """The conditioning of the prompts and, with CFG, of the negative prompts (else None), each
    repeated for its images. CFG doubles the batch, unless the UNet takes guidance as an
    embedding (LCM)."""
    lcm = getattr(c.denoiser.config, "time_cond_proj_dim", None) is not None  # PixArt has none
    cfg = c.guidance_scale > 1 and not lcm
    with on_device(pipe.text_encoders(), c.offload):
        cond, uncond = pipe.encode_prompt(c.prompts, c.negatives, cfg, c.height, c.width, c.device,
                                          c.prompt_embeds, c.negative_prompt_embeds, c.clip_skip, **c.conditioning)
    for what, x, given in (("prompt", cond, c.prompt_embeds), ("negative prompt", uncond, c.negative_prompt_embeds)):
        if x is not None and not torch.isfinite(x["encoder_hidden_states"]).all():
            raise FloatingPointError(f"the text embeddings of the {what} contain NaN or inf: " + (
                "the embeddings you passed" if given is not None
                else "the text encoder's weights produce them" + half_hint(c.dtype)))
    cond = repeat_images(cond, c.num_images_per_prompt)
    uncond = repeat_images(uncond, c.num_images_per_prompt) if cfg else None
    if lcm:
        w = torch.full((c.batch,), c.guidance_scale - 1.0)
        cond["timestep_cond"] = guidance_embedding(w, c.denoiser.config.time_cond_proj_dim,
                                                   torch.float32).to(c.device, c.dtype)
    return cond, uncond


# ----------------------------------------------------------------------------- 3. initial latents

def initial_latents(c: Call) -> torch.Tensor:
    """The starting latents (B, C, H/f, W/f): the noise given or drawn as diffusers draws it,
    scaled to the scheduler's first sigma; img2img noises the image's latents instead."""
    if c.pixels is not None:
        with on_device([c.vae], c.offload):
            return image_latents(c.pixels, c.vae, c.scheduler, c.batch, c.generator, c.device, c.dtype)
    latents = randn_tensor(c.shape, c.generator, c.device, c.dtype) if c.latents is None else c.latents
    return latents.to(c.device, c.dtype) * c.scheduler.init_noise_sigma


def image_latents(pixels, vae, scheduler, batch, generator, device, dtype):
    """img2img's starting point, as diffusers makes it: the image's latents (a sample of the VAE
    posterior, scaled) noised to the first step run, `scheduler.begin_index`. The generator
    draws the posterior sample first, then the noise: the order matters for equality. The
    denoising then runs the remaining steps; the TGATE plan is made over those alone, so its
    caching step m-1 always runs and a gate at or past their number gates nothing."""
    x = (2 * pixels - 1).to(device)  # the VAE takes [-1, 1]
    if isinstance(generator, (list, tuple)) and len(x) < batch:
        x = x.expand(batch, -1, -1, -1)  # one posterior sample per generator
    z = vae.scale_latents(vae.encode(x).sample(generator).float()).to(device, dtype)
    z = z.expand(batch, -1, -1, -1)  # one image for every output
    noise = randn_tensor(z.shape, generator, device, dtype)
    return scheduler.add_noise(z, noise, scheduler.timesteps[scheduler.begin_index:][:1].repeat(batch))


# ----------------------------------------------------------------------------- 5. the denoising loop

@dataclass
class LoopState:
    """What the denoising loop carries from step to step; a step callback may replace any of it."""
    latents: torch.Tensor  # (B, C, H/f, W/f); SVD's videos (B, F, C, H/f, W/f)
    cond: dict             # the denoiser's conditioning of the prompts: encoder_hidden_states (B, tokens, D), ...;
    #                        "concat": latents the loop stacks onto the denoiser's input channels (SVD's image's)
    uncond: dict | None    # of the negative prompts, with CFG

    def tensors(self, names: list[str], guided: bool) -> dict:
        """What a step callback sees: those of inputs.CALLBACK_TENSOR_INPUTS (and SDXL's) it names. With
        CFG on (guided), as in diffusers, the prompts' conditioning comes stacked after the negative
        prompts': [negative, prompt] along the batch."""
        both = guided and self.uncond is not None
        tensors = {"latents": self.latents,
                   "negative_prompt_embeds": None if self.uncond is None else self.uncond["encoder_hidden_states"]}
        for name, path in CONDITIONING.items():
            cond = conditioning(self.cond, path)
            tensors[name] = torch.cat([conditioning(self.uncond, path), cond]) if both and cond is not None else cond
        return {k: tensors[k] for k in names}

    def replace(self, out: dict, guided: bool) -> None:
        """What a step callback returned replaces what the loop carries: a [negative, prompt] batch
        (2B, with CFG on) both halves, a batch of B the prompts' alone."""
        self.latents = out.get("latents", self.latents)
        if "negative_prompt_embeds" in out and self.uncond is not None:
            self.uncond = {**self.uncond, "encoder_hidden_states": out["negative_prompt_embeds"]}
        batch, both = self.latents.shape[0], guided and self.uncond is not None
        for name, path in CONDITIONING.items():
            if name not in out or conditioning(self.cond, path) is None:
                continue
            x = out[name]
            if both and x.shape[0] == 2 * batch:
                uncond, x = x.chunk(2)
                self.uncond = with_conditioning(self.uncond, path, uncond)
            elif x.shape[0] != batch:
                raise ValueError(f"a step callback returned {name} of batch {x.shape[0]}: expected {batch} (the "
                                 f"prompts')" + (f" or {2 * batch} ([negative, prompt])" if both else ""))
            self.cond = with_conditioning(self.cond, path, x)


# the callback's names of the conditioning the loop carries, by their place in it (SDXL's added_cond_kwargs)
CONDITIONING = {"prompt_embeds": ("encoder_hidden_states",), "add_text_embeds": ("added_cond_kwargs", "text_embeds"),
                "add_time_ids": ("added_cond_kwargs", "time_ids")}


def conditioning(kw: dict, path: tuple):
    """kw[path[0]][path[1]]..., or None where it has none."""
    for key in path:
        kw = kw.get(key) if isinstance(kw, dict) else None
    return kw


def with_conditioning(kw: dict, path: tuple, x: torch.Tensor) -> dict:
    """A copy of kw with x at path (the dicts along it copied, the call's own left as they are)."""
    return {**kw, path[0]: x if len(path) == 1 else with_conditioning(kw[path[0]], path[1:], x)}


def denoising_loop(c: Call, state: LoopState, steps: list, checks: FiniteChecks, gated_branch: str = "uncond"):
    """The denoising loop, over the scheduler's timesteps from its begin_index: each step's
    attention behaviour, batch and (DeepCache) UNet part come from its plan; with CFG (state.uncond
    given) steps whose plan says so run the doubled batch, the others `gated_branch` alone.
    c.guidance_scale: a number, or a tensor that broadcasts over the latents (SVD's per frame).
    Yields after each step (i, t, what attention did); between steps the caller may replace what
    `state` holds. Nothing here waits for the device: the timesteps the scheduler and the report
    read are its Python numbers, and the NaN/inf checks are flags on the device (`checks`)."""
    denoiser, scheduler, begin = c.denoiser, c.scheduler, c.scheduler.begin_index
    extra = {"eta": c.eta} if isinstance(scheduler, DDIMScheduler) else {}
    caching = any((s.cross_attn, s.self_attn, s.deep) != (COMPUTE,) * 3 for s in steps)  # need the doubled batch
    for i, (t, t_host, step) in enumerate(zip(scheduler.timesteps[begin:], scheduler.schedule[begin:], steps)):
        latents, cond, uncond = state.latents, state.cond, state.uncond
        # a step callback may have turned guidance off (pipe._guidance_scale <= 1): diffusers then
        # runs the conditional branch alone; with a gate or DeepCache the batch stays doubled
        guided = guidance_on(c.guidance_scale)
        doubled = step.cfg and (guided or caching)
        if doubled:  # (2B, C, h, w): [unconditional, conditional]
            x, kw = torch.cat([latents, latents]), batch_cat(uncond, cond)
        elif step.cfg:  # guidance turned off before the gate: the conditional branch alone
            x, kw = latents, cond
        else:  # after the gate, CFG is dropped: one branch alone (the family's gated_branch)
            x, kw = latents, uncond if uncond is not None and gated_branch == "uncond" else cond
        x = scheduler.scale_model_input(x, t_host)
        if "concat" in kw:  # on the channel axis: (B, C, h, w) or videos (B, F, C, h, w)
            x, kw = torch.cat([x, kw["concat"]], dim=-3), {k: v for k, v in kw.items() if k != "concat"}
        if i == 0 and c.static_caches:  # CUDA graphs: caches in buffers made before any graph runs
            make_static_caches(denoiser, steps, x, t, kw)
        denoiser.set_gate(step)
        noise = denoiser(x, timestep=t, **kw)
        # PixArt predicts the variance too (learned sigma): the noise is the first half
        noise = checks.check(i, "noise", noise[:, :latents.shape[1]])
        if doubled and not guided:
            noise = noise.chunk(2)[1]  # the conditional prediction, as it is
        elif doubled:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + c.guidance_scale * (noise_text - noise_uncond)
            if c.guidance_rescale > 0:
                noise = rescale_noise_cfg(noise, noise_text, c.guidance_rescale)
            checks.check(i, "guidance", noise)
        state.latents = scheduler.step(noise, t_host, latents, generator=c.generator, **extra).prev_sample
        checks.check(i, "step", state.latents)
        yield i, t, {"step": i, "timestep": float(t_host), "cross_attn": step.cross_attn,
                     "self_attn": step.self_attn, "batch": x.shape[0], "deep": step.deep}


class FiniteChecks:
    """The loop's NaN/inf checks without a host synchronisation per step (one would stall the
    device's queue): each check sets a flag on the device, one per step and stage, read once after
    the loop; the error names the first step and stage that failed. On the CPU, where reading
    costs nothing, each check is read at once (`each_step`), so a bad run stops there."""

    STAGES = ("noise", "guidance", "step")

    def __init__(self, c: Call, num_steps: int):
        self.c, self.each_step = c, c.device.type == "cpu"
        self.flags = torch.zeros(num_steps, len(self.STAGES), dtype=torch.bool, device=c.device)

    def check(self, i: int, stage: str, x: torch.Tensor) -> torch.Tensor:
        self.flags[i, self.STAGES.index(stage)] = ~torch.isfinite(x).all()
        if self.each_step:
            self.raise_first()
        return x

    def raise_first(self) -> None:
        """A FloatingPointError naming the first failed check (reads the flags: a host sync)."""
        failed = self.flags.nonzero()
        if len(failed) == 0:
            return
        (i, stage), c = failed[0].tolist(), self.c
        denoiser, scheduler, hint = type(c.denoiser).__name__, type(c.scheduler).__name__, half_hint(c.dtype)
        raise FloatingPointError((
            f"the {denoiser}'s noise prediction at step {i} contains NaN or inf: its weights produce them{hint}",
            f"guidance_scale={c.guidance_scale} and guidance_rescale={c.guidance_rescale} produced NaN or inf "
            f"at step {i}",
            f"the {scheduler} step {i} produced NaN or inf" + (f" (eta={c.eta})" if scheduler == "DDIMScheduler"
                                                                else "") + hint,
        )[stage])


def guidance_on(scale) -> bool:
    """Whether guidance is on: a scale above 1, or a tensor (SVD's per frame). A step callback may
    set it to 1 or below (diffusers' dynamic CFG): the conditional branch then runs alone."""
    return not (is_number(scale) and scale <= 1)


def dynamic_guidance(set_scale, scale):
    """The guidance of the steps after a step callback: `pipe._guidance_scale` if the callback set
    it (diffusers' dynamic CFG), else the call's."""
    if set_scale is scale:
        return scale
    if not is_number(set_scale):
        raise ValueError(f"pipe._guidance_scale must be a finite number, got {set_scale!r}")
    return set_scale


def batch_cat(a: dict, b: dict) -> dict:
    """Two UNet conditionings (nested dicts of tensors) stacked along the batch: [a, b]."""
    return {k: batch_cat(a[k], b[k]) if isinstance(a[k], dict) else torch.cat([a[k], b[k]]) for k in a}


def rescale_noise_cfg(noise_cfg, noise_text, guidance_rescale):
    """Guidance rescale, Lin et al. 2023 (arXiv 2305.08891) Sec. 3.4: match the std of the text branch."""
    dims = list(range(1, noise_text.ndim))
    rescaled = noise_cfg * (noise_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


# ----------------------------------------------------------------------------- 6. decode

def decode(latents: torch.Tensor, output_type: str, vae: AutoencoderKL, size: tuple[int, int] | None = None):
    """Latents -> images in [0, 1]; the VAE runs in its own dtype (float32 when force_upcast).
    size: (height, width) to resize and centre-crop to, before the clamp (PixArt's binning)."""
    image = vae.decode(vae.unscale_latents(latents.to(vae.dtype)))
    if size is not None:
        image = resize_and_crop(image, *size)
    if not torch.isfinite(image).all():
        hint = ("; load the VAE in float32 (its force_upcast)" if vae.dtype == torch.float16
                else half_hint(vae.dtype))
        raise FloatingPointError("the decoded image contains NaN or inf: the VAE's weights produce them" + hint)
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (N, H, W, 3)
    if output_type == "pil":
        from PIL import Image  # optional: only for output_type="pil"
        return [Image.fromarray((im * 255).round().astype("uint8")) for im in image]
    return image


def resize_and_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images (N, C, h, w) scaled (bilinear) to cover height x width, then cropped to it, centred."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    ratio = max(height / h, width / w)
    image = torch.nn.functional.interpolate(image, size=(int(h * ratio), int(w * ratio)), mode="bilinear",
                                            align_corners=False)
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top:top + height, left:left + width]


# ----------------------------------------------------------------------------- helpers

def guidance_embedding(w: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    """LCM's guidance-scale embedding (diffusers' get_guidance_scale_embedding): sinusoids of 1000 w."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def repeat_images(x, n: int):
    """Each prompt's conditioning repeated for its n images: [p0, p0, p1, p1, ...]."""
    if isinstance(x, dict):
        return {k: repeat_images(v, n) for k, v in x.items()}
    return x.repeat_interleave(n, dim=0)


def half_hint(dtype: torch.dtype) -> str:
    """What to try when a run overflows: only half precision has a cheaper cure than new weights."""
    if dtype == torch.float16:
        return "; float16 overflows easily: try dtype=torch.bfloat16 or torch.float32"
    if dtype == torch.bfloat16:
        return "; try dtype=torch.float32"
    return ""
