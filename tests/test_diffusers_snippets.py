"""Fifteen everyday diffusers snippets, run as written with diffusers and with mini_tgate after
changing only their import lines (`from diffusers` -> `from mini_tgate`), plus
`output_type="pil"` where the snippet takes a PIL image, on tiny local models: the same image.

Adapted to this machine and its tiny checkpoints: no GPU (no `.to("cuda")`, CPU generators),
local folders instead of hub ids, 64 px. Everything else is the snippets' own text: the model
card's quickstart (SD-1.5 with its own PNDM scheduler), AutoPipeline with an fp16 variant, SDXL,
img2img, SDXL img2img, DPM++ 2M Karras, UniPC, several generators and a grid, the docs' dynamic
CFG callback, interrupt, prompt_embeds, a LoRA with a scale, two LoRAs with set_adapters,
from_single_file, DiffusionPipeline.from_pretrained picking SDXL."""

import shutil
import textwrap
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_models import save_sd, save_sdxl

SNIPPETS = {
    "quickstart": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15, torch_dtype=torch.float32)
        prompt = "a photo of an astronaut riding a horse on mars"
        image = pipe(prompt, generator=torch.manual_seed(0)).images[0]
    """,
    "autopipeline fp16": """
        import torch
        from diffusers import AutoPipelineForText2Image

        pipe = AutoPipelineForText2Image.from_pretrained(SD15, torch_dtype=torch.float16, variant="fp16")
        image = pipe("a cat wearing a hat", num_inference_steps=25, generator=torch.manual_seed(1)).images[0]
    """,
    "sdxl": """
        import torch
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(SDXL, use_safetensors=True)
        image = pipe(prompt="an astronaut in a jungle, cold color palette", generator=torch.manual_seed(2)).images[0]
    """,
    "img2img": """
        import torch
        from diffusers import StableDiffusionImg2ImgPipeline
        from diffusers.utils import load_image

        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(SD15, safety_checker=None)
        init_image = load_image(PHOTO).resize((64, 64))
        prompt = "A fantasy landscape, trending on artstation"
        image = pipe(prompt=prompt, image=init_image, strength=0.75, guidance_scale=7.5,
                     generator=torch.manual_seed(3)).images[0]
    """,
    "sdxl img2img": """
        import torch
        from diffusers import AutoPipelineForImage2Image
        from diffusers.utils import load_image

        pipe = AutoPipelineForImage2Image.from_pretrained(SDXL, use_safetensors=True)
        init_image = load_image(PHOTO).convert("RGB")
        image = pipe("a photo of a dog", image=init_image, strength=0.5, generator=torch.manual_seed(4)).images[0]
    """,
    "dpm++ 2m karras": """
        import torch
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        pipe = DiffusionPipeline.from_pretrained(SD15)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
        image = pipe("a castle at dawn", num_inference_steps=20, generator=torch.manual_seed(5)).images[0]
    """,
    "unipc": """
        import torch
        from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        image = pipe("a red fox in the snow", num_inference_steps=15, generator=torch.manual_seed(6)).images[0]
    """,
    "generators and a grid": """
        import torch
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import make_image_grid

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        generator = [torch.Generator("cpu").manual_seed(i) for i in range(4)]
        images = pipe(prompt=["a portrait of an old warrior chief"] * 4, generator=generator,
                      num_inference_steps=20).images
        image = make_image_grid(images, rows=2, cols=2)
    """,
    "dynamic cfg": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15)

        def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
            # adjust the batch_size of prompt_embeds according to guidance_scale
            if step_index == int(pipe.num_timesteps * 0.4):
                prompt_embeds = callback_kwargs["prompt_embeds"]
                prompt_embeds = prompt_embeds.chunk(2)[-1]
                # update guidance_scale and prompt_embeds
                pipe._guidance_scale = 0.0
                callback_kwargs["prompt_embeds"] = prompt_embeds
            return callback_kwargs

        image = pipe("a photo of an astronaut riding a horse on mars", generator=torch.manual_seed(7),
                     callback_on_step_end=callback_dynamic_cfg,
                     callback_on_step_end_tensor_inputs=["prompt_embeds"]).images[0]
    """,
    "interrupt": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        pipe.set_progress_bar_config(disable=True)

        def interrupt_callback(pipe, i, t, callback_kwargs):
            stop_idx = 10
            if i == stop_idx:
                pipe._interrupt = True
            return callback_kwargs

        image = pipe("A photo of a cat", num_inference_steps=50, callback_on_step_end=interrupt_callback,
                     generator=torch.manual_seed(8)).images[0]
    """,
    "prompt_embeds": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        prompt = "a photo of a cat"
        text_inputs = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
        prompt_embeds = pipe.text_encoder(text_inputs.input_ids)[0]
        image = pipe(prompt_embeds=prompt_embeds, num_inference_steps=20, generator=torch.manual_seed(9)).images[0]
    """,
    "lora with a scale": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        pipe.load_lora_weights(LORAS, weight_name="pixel.safetensors", adapter_name="pixel")
        image = pipe("a pixel-art cat", num_inference_steps=20, cross_attention_kwargs={"scale": 0.5},
                     generator=torch.manual_seed(10)).images[0]
    """,
    "two loras": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(SD15)
        pipe.load_lora_weights(LORAS, weight_name="pixel.safetensors", adapter_name="pixel")
        pipe.load_lora_weights(LORAS, weight_name="toy.safetensors", adapter_name="toy")
        pipe.set_adapters(["pixel", "toy"], adapter_weights=[0.5, 1.0])
        image = pipe("a toy face, pixel art", num_inference_steps=20, generator=torch.manual_seed(11)).images[0]
    """,
    "from_single_file": """
        import torch
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(CHECKPOINT, config=SD15)
        image = pipe("a watercolor lighthouse", num_inference_steps=20, generator=torch.manual_seed(12)).images[0]
    """,
    "DiffusionPipeline picks SDXL": """
        import torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(SDXL, torch_dtype=torch.float32, use_safetensors=True)
        image = pipe("a bowl of ramen, studio light", num_inference_steps=20, generator=torch.manual_seed(13)).images[0]
    """,
}
# float16 on the CPU: the UNet and text encoder as diffusers run them; the VAE decodes in float32
# here (its force_upcast) and in float16 there (docs/not-supported.md), a few 1e-3 in the pixels
TOL = {"autopipeline fp16": 2e-2}


def ported(source: str) -> str:
    """The snippet for mini_tgate: its import lines changed, and PIL images asked for where it
    takes one (`.images[0]` or a grid of `.images`): mini_tgate returns numpy unless told."""
    lines = []
    for line in textwrap.dedent(source).splitlines():
        if line.startswith("from diffusers"):
            line = line.replace("from diffusers", "from mini_tgate", 1)
        lines.append(line)
    code = "\n".join(lines)
    return code.replace(").images", ', output_type="pil").images').replace(",, output_type", ", output_type")


def changed_lines(a: str, b: str) -> int:
    return sum(x != y for x, y in zip(a.splitlines(), b.splitlines()))


@pytest.fixture(scope="module")
def places(tmp_path_factory, one_thread):
    """The local stand-ins for the hub: folders, an fp16 variant, a photo, LoRA files, a single file."""
    from formats.test_single_file import ldm_state_dict
    from test_lora import peft_lora

    root = tmp_path_factory.mktemp("snippets")
    sd15, sdxl = save_sd(root / "sd15"), save_sdxl(root / "sdxl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(sd15)
        # SD-1.5 ships PNDM (PLMS): the model card's quickstart runs it
        diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                skip_prk_steps=True, steps_offset=1).save_pretrained(sd15 / "scheduler")
        ref.save_pretrained(sd15, variant="fp16")  # the weights again as *.fp16.safetensors (float32 values)
    photo = root / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(photo)
    loras = root / "loras"
    loras.mkdir()
    for seed, name in ((1, "pixel"), (2, "toy")):
        save_file({k: v.contiguous() for k, v in peft_lora(ref, seed, text=False).items()}, loras / f"{name}.safetensors")
    checkpoint = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(ref, "sd1").items()}, checkpoint)
    return dict(SD15=str(sd15), SDXL=str(sdxl), PHOTO=str(photo), LORAS=str(loras), CHECKPOINT=str(checkpoint))


def run(code: str, places: dict):
    scope = dict(places)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "<snippet>", "exec"), scope)
    return np.asarray(scope["image"], dtype=np.float32) / 255


@pytest.mark.parametrize("name", list(SNIPPETS))
def test_snippet_runs_with_its_import_changed(places, name):
    source = textwrap.dedent(SNIPPETS[name])
    mine = ported(source)
    expected, got = run(source, places), run(mine, places)
    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    # the image counted in 8-bit steps, as the snippets save it: at most one step apart
    assert diff <= TOL.get(name, 1 / 255 + 1e-6), (name, diff)
    changed = changed_lines(source, mine)
    assert changed <= source.count("from diffusers") + source.count(".images")
    print(f"| {name} | {changed} | {diff:.1e} |")  # the closing note's table (pytest -s)
