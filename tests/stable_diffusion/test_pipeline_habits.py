"""What a diffusers user expects of a pipeline (issue 11 D), each against diffusers (or the `tgate`
package for gated runs) on the same tiny checkpoints and initial latents: given embeddings,
clip_skip, SDXL's second prompts, step callbacks and interrupt, custom sigmas/timesteps,
progress-bar settings, pipe.to, from_pretrained, torch_dtype/revision, model_info, CPU offload."""

import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import realign
from tgate import TgateSDLoader, TgateSDXLLoader
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate import CheckpointError
from mini_tgate.loading import load_pipeline
from mini_tgate.stable_diffusion.pipeline import StableDiffusionPipeline, StableDiffusionXLPipeline

PROMPT = "a red circle on a blue background"
GATE = (3, 1, 1, 0)  # gate_step, sp_interval, fi_interval, warm_up


def noise(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def diffusers_pipeline(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipes(request, tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp(request.param)
    (save_sdxl if request.param == "sdxl" else save_sd)(folder)
    ref = diffusers_pipeline(folder)
    ours = load_pipeline(folder)
    ours.scheduler = mini_tgate.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    return request.param, ref, ours, folder


def both(ref, ours, gate=None, **kw):
    """The same call on diffusers (the tgate package when gated) and on mini_tgate: both images."""
    kw = {"num_inference_steps": 6, "latents": noise(), "guidance_scale": 7.5, **kw}
    if gate is None:
        expected = ref(output_type="np", **kw).images
    else:
        # the tgate package patches the pipeline it is given for good: a fresh one each time
        loader = TgateSDXLLoader if isinstance(ours, StableDiffusionXLPipeline) else TgateSDLoader
        expected = loader(diffusers_pipeline(ours.model_info["folder"])).tgate(output_type="np", **kw, **dict(zip(
            ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    got = ours(tgate=gate and mini_tgate.TGate(*gate), **kw).images
    return expected, got


@pytest.mark.parametrize("gate", [None, GATE])
def test_given_embeddings(pipes, gate):
    name, ref, ours, _ = pipes
    g = torch.Generator().manual_seed(3)
    width = 64 if name == "sdxl" else 32
    kw = dict(prompt_embeds=torch.randn(2, 77, width, generator=g),
              negative_prompt_embeds=torch.randn(2, 77, width, generator=g))
    if name == "sdxl":
        kw.update(pooled_prompt_embeds=torch.randn(2, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(2, 32, generator=g))
    expected, got = both(ref, ours, gate, latents=torch.cat([noise(0), noise(1)]), **kw)
    assert max_diff(expected, got) <= 1e-3


def diffusers_sd_clip_skip(ref, prompt, clip_skip):
    """diffusers' SD clip_skip, written out: its own code reaches for `text_encoder.text_model`,
    which transformers 5 no longer has. hidden_states[-(clip_skip + 1)], then the final norm."""
    ids = ref.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    states = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    return ref.text_encoder.final_layer_norm(states)


@pytest.mark.parametrize("gate", [None, GATE])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip(pipes, gate, clip_skip):
    name, ref, ours, _ = pipes
    if name == "sd":
        with torch.no_grad():
            given = dict(prompt_embeds=diffusers_sd_clip_skip(ref, PROMPT, clip_skip))
        expected, _ = both(ref, ours, gate, negative_prompt="blurry", **given)
        got = ours(PROMPT, negative_prompt="blurry", clip_skip=clip_skip, num_inference_steps=6, latents=noise(),
                   tgate=gate and mini_tgate.TGate(*gate)).images
    else:
        expected, got = both(ref, ours, gate, prompt=PROMPT, negative_prompt="blurry", clip_skip=clip_skip)
    assert max_diff(expected, got) <= 1e-3
    plain = ours(PROMPT, negative_prompt="blurry", num_inference_steps=6, latents=noise(),
                 tgate=gate and mini_tgate.TGate(*gate)).images
    assert max_diff(plain, got) > 1e-3  # clip_skip changed something


def test_sdxl_second_prompts(pipes):
    name, ref, ours, _ = pipes
    if name != "sdxl":
        pytest.skip("SDXL only")
    expected, got = both(ref, ours, prompt=["a cat", "a dog"], prompt_2=["an oil painting", "a sketch"],
                         negative_prompt="blurry", negative_prompt_2=["dark", "noisy"],
                         latents=torch.cat([noise(0), noise(1)]))
    assert max_diff(expected, got) <= 1e-3


def test_step_callback_sees_and_replaces_latents_and_interrupts(pipes):
    name, ref, ours, _ = pipes
    realign(ref.unet, ref.text_encoder, *([ref.text_encoder_2] if name == "sdxl" else []))  # fresh memory, as ours
    seen = {"ref": [], "ours": []}

    def callback(key):
        def on_step_end(pipe, i, t, tensors):
            seen[key].append(tensors["latents"].clone())
            if i == 1:
                return {"latents": tensors["latents"] * 0.9}
            if i == 3:
                pipe._interrupt = True  # diffusers' clean early stop
            return {}
        return on_step_end

    kw = dict(prompt=PROMPT, num_inference_steps=6, latents=noise(), guidance_scale=7.5)
    expected = ref(output_type="np", callback_on_step_end=callback("ref"), **kw).images
    out = ours(callback_on_step_end=callback("ours"), **kw)
    assert len(seen["ours"]) == len(seen["ref"]) == 4
    for a, b in zip(seen["ref"], seen["ours"]):
        assert torch.equal(a, b)  # float32 latents, bit for bit (see test_pipeline.py's latent test)
    assert max_diff(expected, out.images) <= 1e-3
    assert [s["step"] for s in out.steps] == [0, 1, 2, 3]
    assert max_diff(ours(**kw).images, out.images) > 1e-3  # the next call is not interrupted


def test_step_callback_embeddings(pipes):
    """A callback sees diffusers' [negative, prompt] batch, and what it returns is used from the
    next step on: here the prompts' half becomes the negative one."""
    name, ref, ours, _ = pipes
    seen = {}

    def look(where):
        def callback(pipe, i, t, tensors):
            seen.setdefault(where, tensors["prompt_embeds"].clone())
            negative = tensors["prompt_embeds"].chunk(2)[0]
            return {"prompt_embeds": torch.cat([negative, negative])}  # from now on, no text guidance
        return callback

    kw = dict(num_inference_steps=3, latents=noise(), guidance_scale=7.5)
    inputs = dict(callback_on_step_end_tensor_inputs=["prompt_embeds"])
    expected = ref(PROMPT, callback_on_step_end=look("ref"), output_type="np", **inputs, **kw).images
    out = ours(PROMPT, callback_on_step_end=look("ours"), **inputs, **kw)
    assert seen["ours"].shape == seen["ref"].shape == (2, 77, ref.unet.config.cross_attention_dim)
    assert max_diff(seen["ref"], seen["ours"]) <= 1e-5
    assert max_diff(expected, out.images) <= 1e-3
    assert max_diff(out.images, ours(PROMPT, **kw).images) > 1e-3


@pytest.mark.parametrize("custom", [dict(timesteps=[999, 700, 400, 100]), dict(sigmas=[14.0, 5.0, 2.0, 0.5, 0.0])])
def test_custom_timesteps_and_sigmas(pipes, custom):
    _, ref, ours, _ = pipes
    kw = dict(prompt=PROMPT, latents=noise(), guidance_scale=7.5, **custom)
    expected = ref(output_type="np", **kw).images
    out = ours(**kw)
    assert len(out.steps) == 4
    assert max_diff(expected, out.images) <= 1e-3


def test_progress_bar_config(pipes, capsys):
    _, _, ours, _ = pipes
    kw = dict(prompt=PROMPT, num_inference_steps=2, latents=noise(), output_type="latent")
    try:
        ours(**kw)
        assert "2/2" in capsys.readouterr().err  # shown by default, as diffusers shows it
        ours.set_progress_bar_config(desc="denoising")
        ours(**kw)
        assert "denoising" in capsys.readouterr().err
        ours(progress=False, **kw)
        assert "2/2" not in capsys.readouterr().err
        ours.set_progress_bar_config(disable=True)
        ours(**kw)
        assert "2/2" not in capsys.readouterr().err
        ours(progress=True, **kw)
        assert "2/2" in capsys.readouterr().err
    finally:
        ours.set_progress_bar_config(disable=True)


def test_to_from_pretrained_dtype_and_model_info(pipes, tmp_path):
    name, _, _, folder = pipes
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, torch_dtype=torch.float32)
    assert type(pipe) is cls
    assert pipe.model_info == {"name": folder.name, "folder": folder, "revision": None}
    assert pipe.to(torch.float16) is pipe
    assert pipe.unet.conv_in.weight.dtype == torch.float16 == pipe.text_encoder.text_model.final_layer_norm.weight.dtype
    assert pipe.vae.dtype == torch.float32  # force_upcast, as load_pipeline keeps it
    pipe.to("cpu", torch.bfloat16)
    assert pipe.dtype == pipe.vae.dtype == torch.bfloat16 and pipe.device.type == "cpu"
    with pytest.raises(ValueError, match="disagree"):
        load_pipeline(folder, dtype=torch.float32, torch_dtype=torch.float16)
    assert load_pipeline(folder, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    if name == "sd":
        with pytest.raises(CheckpointError, match="a StableDiffusionPipeline checkpoint.*not a StableDiffusionXL"):
            StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        with pytest.raises(CheckpointError, match="a StableDiffusionXLPipeline checkpoint.*not a StableDiffusionPipeline"):
            StableDiffusionPipeline.from_pretrained(folder)


def test_hub_model_info_and_revision(pipes, tmp_path, monkeypatch):
    name, _, _, folder = pipes
    if name == "sdxl":
        pytest.skip("one architecture is enough")
    rev_a, rev_b = "a" * 40, "b" * 40
    repo = tmp_path / "models--org--tiny"
    for rev in (rev_a, rev_b):
        shutil.copytree(folder, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev_a)
    (repo / "refs" / "v2").write_text(rev_b)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = dict(cache_dir=tmp_path, local_files_only=True)
    info = load_pipeline("org/tiny", **kw).model_info
    assert info == {"name": "org/tiny", "folder": repo / "snapshots" / rev_a, "revision": rev_a}
    assert load_pipeline("org/tiny", revision="v2", **kw).model_info["revision"] == rev_b


def test_model_cpu_offload_on_the_cpu(pipes):
    _, _, _, folder = pipes
    pipe = load_pipeline(folder)
    kw = dict(prompt=PROMPT, num_inference_steps=4, latents=noise())
    expected = pipe(**kw).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert np.array_equal(pipe(**kw).images, expected)
    assert all(p.device.type == "cpu" for m in pipe.models() for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_cpu_offload_on_the_gpu(pipes):
    _, _, _, folder = pipes
    kw = dict(prompt=PROMPT, num_inference_steps=4, latents=noise())
    expected = load_pipeline(folder, device="cuda")(**kw).images
    pipe = load_pipeline(folder)
    pipe.enable_model_cpu_offload(device="cuda")
    got = pipe(**kw).images
    assert all(p.device.type == "cpu" for m in pipe.models() for p in m.parameters())  # back after the call
    assert max_diff(got, expected) <= 1e-5


def test_sdxl_embeddings_need_their_pooled_embeddings(pipes):
    name, _, ours, _ = pipes
    if name != "sdxl":
        pytest.skip("SDXL only")
    with pytest.raises(ValueError, match="give pooled_prompt_embeds with prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=2)
    with pytest.raises(ValueError, match="give negative_pooled_prompt_embeds with negative_prompt_embeds"):
        ours(PROMPT, negative_prompt_embeds=torch.zeros(1, 77, 64), num_inference_steps=2)
    with pytest.raises(TypeError, match=r"StableDiffusionXLPipeline.__call__\(\) got an unexpected keyword argument 'x'"):
        ours(PROMPT, x=1)
