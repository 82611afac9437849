"""LoRA: mini_tgate's load_lora_weights against diffusers' load_lora_weights + fuse_lora (PEFT backend)
on the tiny SD / SDXL checkpoints, with random LoRAs (non-zero up weights) in each format met in
the wild; unload against a fresh load of the same checkpoint, bit for bit; bad files against the
errors they must raise."""

import json
import os
import threading
import warnings

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tgate import TgateSDXLLoader
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate.core.weights import CheckpointError
from mini_tgate.loading import load_pipeline

pytest.importorskip("peft")  # diffusers' LoRA loading needs it (the test extra has it)

PROMPT = "a red circle on a blue background"
STEPS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    return {"sd": save_sd(tmp_path_factory.mktemp("sd")), "sdxl": save_sdxl(tmp_path_factory.mktemp("sdxl"))}


def reference(folder):
    """A fresh diffusers pipeline (fusing changes its weights: one per LoRA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def bases(folders):
    """diffusers pipelines never given a LoRA: layer names and shapes, and the images without a LoRA."""
    pipes = {name: reference(folder) for name, folder in folders.items()}
    return {name: (pipe, images(pipe, diffusers_pipe=True)) for name, pipe in pipes.items()}


@pytest.fixture(scope="module")
def ours(folders):
    return {name: load_pipeline(folder) for name, folder in folders.items()}


@pytest.fixture
def sd(ours):
    yield ours["sd"]
    ours["sd"].unload_lora_weights()


@pytest.fixture
def sdxl(ours):
    yield ours["sdxl"]
    ours["sdxl"].unload_lora_weights()


def noise(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def images(pipe, diffusers_pipe=False, **kw):
    kw = dict(num_inference_steps=STEPS, guidance_scale=7.5, latents=noise(), **kw)
    if diffusers_pipe:
        kw["output_type"] = "np"
    return pipe(PROMPT, **kw).images


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def layers(model, wanted):
    """(name, weight) of the reference model's Linear/Conv2d layers whose name contains one of `wanted`."""
    return [(n, m.weight) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(w in n for w in wanted)]


def pair(weight, rank, g, scale=0.3):
    """Random LoRA halves for a layer: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), both non-zero."""
    down = torch.randn(rank, *weight.shape[1:], generator=g) * scale
    up = torch.randn(weight.shape[0], rank, *(1,) * (weight.ndim - 2), generator=g) * scale
    return down, up


UNET_TARGETS = ["attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2", "resnets.0.conv1", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv"]
TEXT_TARGETS = ["q_proj", "out_proj", "fc1"]


def peft_lora(ref, seed, text_model_prefix=True, unet=True, text=True):
    """diffusers' current format (PEFT names). transformers 5 names CLIP's layers without
    `text_model.`; files written before it have the prefix: both are met."""
    g, sd = torch.Generator().manual_seed(seed), {}
    if unet:
        for name, w in layers(ref.unet, UNET_TARGETS):
            sd[f"unet.{name}.lora_A.weight"], sd[f"unet.{name}.lora_B.weight"] = pair(w, 2, g)
    if text:
        prefix = "text_model." if text_model_prefix else ""
        for name, w in layers(ref.text_encoder, TEXT_TARGETS):
            name = prefix + name.removeprefix("text_model.")
            sd[f"text_encoder.{name}.lora_A.weight"], sd[f"text_encoder.{name}.lora_B.weight"] = pair(w, 3, g)
    return sd


def old_diffusers_lora(ref, seed):
    """diffusers before PEFT: attention processors' to_q_lora/to_out_lora, `.lora.down` for other
    UNet layers, `lora_linear_layer` and old attention names in the text encoder."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, w in layers(ref.unet, UNET_TARGETS):
        down, up = pair(w, 2, g)
        if name.split(".")[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0"):
            stem = name.rsplit(".", 2 if name.endswith("to_out.0") else 1)[0]
            which = "to_out" if name.endswith("to_out.0") else name.split(".")[-1]
            key = f"unet.{stem}.processor.{which}_lora"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
        else:
            sd[f"unet.{name}.lora.down.weight"], sd[f"unet.{name}.lora.up.weight"] = down, up
    # the old text-encoder processors adapted all four attention projections (to_q_lora ... to_out_lora)
    for name, w in layers(ref.text_encoder, ["self_attn.", "fc1"]):
        down, up = pair(w, 2, g)
        name = "text_model." + name.removeprefix("text_model.")
        stem, _, proj = name.rpartition(".")
        if proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            which = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[proj]
            key = f"text_encoder.{stem}.{which}_lora"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
        else:
            sd[f"text_encoder.{name}.lora_linear_layer.down.weight"] = down
            sd[f"text_encoder.{name}.lora_linear_layer.up.weight"] = up
    return sd


def kohya(sd, flat, weight, rank, alpha, g):
    sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = pair(weight, rank, g)
    sd[f"{flat}.alpha"] = torch.tensor(float(alpha))


def kohya_alpha(name, i):
    """alpha != rank, and not the same everywhere. diffusers 0.42 drops the per-layer alphas of
    attention projections (its alpha_pattern names them `...attn1.processor.to_q_lora.down.weight`,
    which match no layer, so they get the most common alpha): those all share the most common
    value here, as in kohya's own files, where one network_alpha is the rule."""
    return 8 if "attn" in name or i % 3 else 2


def kohya_sd_lora(ref, seed):
    """kohya/A1111 on SD 1.x: diffusers' module paths with `_`, conv LoRAs (3x3 and 1x1), alpha != rank."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for i, (name, w) in enumerate(layers(ref.unet, UNET_TARGETS)):
        kohya(sd, "lora_unet_" + name.replace(".", "_"), w, 4, kohya_alpha(name, i), g)
    for name, w in layers(ref.text_encoder, TEXT_TARGETS):
        kohya(sd, "lora_te_text_model_" + name.removeprefix("text_model.").replace(".", "_"), w, 2, 3, g)
    return sd


# kohya trains SDXL on the original LDM UNet: its names, written out by hand for the tiny SDXL UNet
# (layers_per_block 1; two resolutions, both with attention; transformer layers [1, 2]).
SDXL_KOHYA_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "time_embed_2": "time_embedding.linear_2",
    "label_emb_0_0": "add_embedding.linear_1",
    "label_emb_0_2": "add_embedding.linear_2",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks_1_0_out_layers_3": "down_blocks.0.resnets.0.conv2",
    "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks_1_1_transformer_blocks_0_attn1_to_out_0":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "input_blocks_1_1_transformer_blocks_0_attn2_to_k": "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "input_blocks_1_1_transformer_blocks_0_ff_net_0_proj":
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "input_blocks_1_1_transformer_blocks_0_ff_net_2": "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "input_blocks_2_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_3_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_v": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
    "middle_block_0_in_layers_2": "mid_block.resnets.0.conv1",
    "middle_block_1_transformer_blocks_1_attn1_to_k": "mid_block.attentions.0.transformer_blocks.1.attn1.to_k",
    "middle_block_1_proj_out": "mid_block.attentions.0.proj_out",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_1_1_transformer_blocks_0_attn2_to_q": "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q",
    "output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks_3_0_in_layers_2": "up_blocks.1.resnets.1.conv1",
    "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
    "out_2": "conv_out",
}


def kohya_sdxl_lora(ref, seed):
    g, sd = torch.Generator().manual_seed(seed), {}
    modules = dict(ref.unet.named_modules())
    for i, (flat, path) in enumerate(SDXL_KOHYA_NAMES.items()):
        kohya(sd, "lora_unet_" + flat, modules[path].weight, 2, kohya_alpha(path, i), g)
    for prefix, encoder in (("lora_te1_", ref.text_encoder), ("lora_te2_", ref.text_encoder_2)):
        for name, w in layers(encoder, TEXT_TARGETS):
            kohya(sd, prefix + "text_model_" + name.removeprefix("text_model.").replace(".", "_"), w, 2, 1, g)
    return sd


def save(tmp_path, sd, name="lora.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=metadata)
    return path


def fused_reference(folder, path, scale=1.0):
    ref = reference(folder)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    return ref


FORMATS = {"peft": peft_lora, "peft-no-text-model": lambda ref, seed: peft_lora(ref, seed, text_model_prefix=False),
           "old-diffusers": old_diffusers_lora, "kohya": kohya_sd_lora}


@pytest.mark.parametrize("fmt", FORMATS)
def test_sd_formats_match_diffusers(folders, bases, sd, tmp_path, fmt):
    base, base_images = bases["sd"]
    path = save(tmp_path, FORMATS[fmt](base, seed=1))
    expected = images(fused_reference(folders["sd"], path, scale=0.8), diffusers_pipe=True)
    sd.load_lora_weights(path, scale=0.8)
    got = images(sd)
    assert max_diff(expected, got) <= 1e-3
    assert max_diff(base_images, got) > 0.05  # the LoRA changed the images


@pytest.mark.parametrize("part", ["unet", "text"])
def test_each_part_alone_matches_diffusers(folders, bases, sd, tmp_path, part):
    """A text-encoder-only LoRA (diffusers loads it through transformers' PEFT integration) and a
    UNet-only one: each changes the images and is applied as diffusers applies it."""
    base, base_images = bases["sd"]
    path = save(tmp_path, peft_lora(base, seed=2, unet=part == "unet", text=part == "text"))
    expected = images(fused_reference(folders["sd"], path), diffusers_pipe=True)
    sd.load_lora_weights(path)
    got = images(sd)
    assert max_diff(expected, got) <= 1e-3
    assert max_diff(base_images, got) > 0.05


def test_diffusers_saved_lora_with_alpha_metadata(folders, sd, tmp_path):
    """A file written by diffusers' save_lora_weights from a PEFT adapter: alpha (and a per-layer
    alpha_pattern) live in the file's lora_adapter_metadata, not in its tensors."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    trainer = reference(folders["sd"])
    config = LoraConfig(r=2, lora_alpha=6, alpha_pattern={"proj_in": 3}, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "proj_in", "conv1", "ff.net.2"])
    trainer.unet.add_adapter(config)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trainer.unet), unet_lora_adapter_metadata=config.to_dict())
    saved = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(saved, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_alpha"] == 6 and metadata["unet.alpha_pattern"] == {"proj_in": 3}
    expected = images(fused_reference(folders["sd"], saved), diffusers_pipe=True)
    sd.load_lora_weights(tmp_path)  # the folder: its pytorch_lora_weights.safetensors
    assert max_diff(expected, images(sd)) <= 1e-3


def test_sdxl_kohya_ldm_names_and_both_text_encoders(folders, bases, sdxl, tmp_path):
    base, base_images = bases["sdxl"]
    path = save(tmp_path, kohya_sdxl_lora(base, seed=4))
    expected = images(fused_reference(folders["sdxl"], path), diffusers_pipe=True)
    sdxl.load_lora_weights(path)
    got = images(sdxl)
    assert max_diff(expected, got) <= 1e-3
    assert max_diff(base_images, got) > 0.05


def test_sdxl_peft_with_second_text_encoder(folders, bases, sdxl, tmp_path):
    base, _ = bases["sdxl"]
    sd_ = peft_lora(base, seed=5)
    g = torch.Generator().manual_seed(6)
    for name, w in layers(base.text_encoder_2, TEXT_TARGETS):
        sd_[f"text_encoder_2.{name}.lora_A.weight"], sd_[f"text_encoder_2.{name}.lora_B.weight"] = pair(w, 2, g)
    path = save(tmp_path, sd_)
    expected = images(fused_reference(folders["sdxl"], path), diffusers_pipe=True)
    sdxl.load_lora_weights(path)
    assert max_diff(expected, images(sdxl)) <= 1e-3


def test_two_loras_with_their_own_scales(folders, bases, sd, tmp_path):
    base, _ = bases["sd"]
    a = save(tmp_path, peft_lora(base, seed=7), "a.safetensors")
    b = save(tmp_path, kohya_sd_lora(base, seed=8), "b.safetensors")
    ref = reference(folders["sd"])
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    ref.fuse_lora(adapter_names=["a", "b"])
    sd.load_lora_weights(a, scale=0.7, adapter_name="a")
    sd.load_lora_weights(tmp_path, weight_name="b.safetensors", scale=-0.4)
    assert list(sd.lora_adapters) == ["a", "default_1"] and sd.get_active_adapters() == ["default_1"]  # as diffusers
    sd.set_adapters(["a", "default_1"], [0.7, -0.4])
    assert max_diff(images(ref, diffusers_pipe=True), images(sd)) <= 1e-3
    with pytest.raises(ValueError, match="adapter_name 'a' is already loaded"):
        sd.load_lora_weights(a, adapter_name="a")


def test_unload_restores_every_weight_bit_for_bit(folders, bases, ours, tmp_path):
    fresh = {name: load_pipeline(folder) for name, folder in folders.items()}
    for name, lora in (("sd", kohya_sd_lora), ("sdxl", kohya_sdxl_lora)):
        pipe, base = ours[name], bases[name][0]
        pipe.load_lora_weights(save(tmp_path, lora(base, seed=9), f"{name}.safetensors"))
        pipe.load_lora_weights(save(tmp_path, peft_lora(base, seed=10), f"{name}2.safetensors"), scale=2.5)
        changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, fresh[name].unet.state_dict()[k])]
        assert len(changed) > 20
        pipe.unload_lora_weights()
        for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
            if hasattr(pipe, part):
                want = getattr(fresh[name], part).state_dict()
                got = getattr(pipe, part).state_dict()
                assert all(torch.equal(got[k], want[k]) for k in want), part
        assert pipe.lora_adapters == {}


def test_half_precision_merges_in_float32_and_restores(folders, bases, tmp_path):
    pipe = load_pipeline(folders["sd"], dtype=torch.bfloat16)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora = peft_lora(bases["sd"][0], seed=11, text=False)
    pipe.load_lora_weights(lora)  # a dict in memory, as diffusers accepts
    name = "down_blocks.0.attentions.0.proj_in"
    w = original[f"{name}.weight"].float()
    up, down = lora[f"unet.{name}.lora_B.weight"], lora[f"unet.{name}.lora_A.weight"]
    want = (w + (up.flatten(1) @ down.flatten(1)).view(w.shape)).to(torch.bfloat16)
    assert torch.equal(pipe.unet.state_dict()[f"{name}.weight"], want)
    pipe.unload_lora_weights()
    assert all(torch.equal(v, original[k]) for k, v in pipe.unet.state_dict().items())
    # merged in float32, then moved to bfloat16, then unloaded: the originals as bfloat16 loads them
    moved = load_pipeline(folders["sd"])
    moved.load_lora_weights(lora)
    moved.to(torch.bfloat16)
    moved.unload_lora_weights()
    assert all(torch.equal(v, original[k]) for k, v in moved.unet.state_dict().items())


# ----------------------------------------------------------------------------- LCM-LoRA

def lcm_lora(ref, seed):
    """A random stand-in for latent-consistency/lcm-lora-*: kohya names over the whole UNet."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for name, w in layers(ref.unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net",
                                     "conv1", "conv2", "time_emb_proj"]):
        kohya(sd, "lora_unet_" + name.replace(".", "_"), w, 4, 4, g)
    return sd


def lcm_reference(folder, path):
    ref = fused_reference(folder, path)
    ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
    return ref


@pytest.mark.parametrize("gate", [None, (1, 1, 1, 0), (2, 1, 1, 0)])
def test_lcm_lora_sd_four_steps(folders, bases, sd, tmp_path, gate):
    """SD + LCM-LoRA, 4 steps, guidance 1 (no CFG), with and without TGATE. tgate's SD loader
    cannot run without CFG (it splits a batch that was never doubled), so the gated reference
    is diffusers' pipeline with tgate's own attention processor registered before each step, as
    tgate's SDXL loader does for LCM (keep_shape: nothing averaged)."""
    from tgate.tgate_utils import register_forward, tgate_scheduler

    path = save(tmp_path, lcm_lora(bases["sd"][0], seed=12))
    ref = lcm_reference(folders["sd"], path)

    def gate_at(i):  # what tgate's loaders do before step i
        if gate is not None and i < STEPS:
            ca, sa, _ = tgate_scheduler(cur_step=i, **dict(zip(["gate_step", "sp_interval", "fi_interval",
                                                               "warm_up"], gate)))
            register_forward(ref.unet, "Attention", ca_kward=ca, sa_kward=sa, keep_shape=True)
        return {}

    gate_at(0)
    kw = dict(num_inference_steps=STEPS, guidance_scale=1.0, latents=noise())
    expected = ref(PROMPT, output_type="np", generator=torch.Generator().manual_seed(1), **kw,
                   callback_on_step_end=lambda pipe, i, t, tensors: gate_at(i + 1)).images
    sd.load_lora_weights(path)
    scheduler = sd.scheduler
    sd.scheduler = mini_tgate.LCMScheduler.from_config(scheduler.config)
    try:  # LCM re-noises with the generator
        out = sd(PROMPT, generator=torch.Generator().manual_seed(1), tgate=gate and mini_tgate.TGate(*gate), **kw)
    finally:
        sd.scheduler = scheduler
    assert max_diff(expected, out.images) <= 1e-3
    assert {s["batch"] for s in out.steps} == {1}  # guidance 1: no CFG
    if gate:
        assert [s["cross_attn"] for s in out.steps][gate[0]:] == ["reuse"] * (STEPS - gate[0])


@pytest.fixture(scope="module")
def lcm_sdxl(folders, bases, tmp_path_factory):
    """An LCM-LoRA file for the tiny SDXL and diffusers' pipeline with it fused (one for all gates)."""
    path = save(tmp_path_factory.mktemp("lcm-lora"), lcm_lora(bases["sdxl"][0], seed=13))
    return path, lcm_reference(folders["sdxl"], path)


@pytest.mark.parametrize("gate", [None, (1, 1, 1, 0), (2, 1, 1, 0)])
def test_lcm_lora_sdxl_with_and_without_tgate(lcm_sdxl, sdxl, gate):
    """The authors' LCM setting (gate 1 or 2, no self-attention reuse) against the tgate package."""
    path, ref = lcm_sdxl
    kw = dict(num_inference_steps=4, guidance_scale=1.0, latents=noise())
    g = [torch.Generator().manual_seed(1) for _ in range(2)]
    if gate is None:
        expected = ref(PROMPT, output_type="np", generator=g[0], **kw).images
    else:
        expected = TgateSDXLLoader(ref).tgate(PROMPT, output_type="np", lcm=True, generator=g[0], **kw, **dict(zip(
            ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    sdxl.load_lora_weights(path)
    scheduler = sdxl.scheduler
    sdxl.scheduler = mini_tgate.LCMScheduler.from_config(scheduler.config)
    try:
        out = sdxl(PROMPT, tgate=gate and mini_tgate.TGate(*gate), generator=g[1], **kw)
    finally:
        sdxl.scheduler = scheduler
    assert max_diff(expected, out.images) <= 1e-3
    if gate:
        assert [s["cross_attn"] for s in out.steps][gate[0]:] == ["reuse"] * (4 - gate[0])


# ----------------------------------------------------------------------------- errors

def lora_for(pipe, path="down_blocks.0.attentions.0.proj_in", rank=2):
    w = dict(pipe.unet.named_modules())[path].weight
    down, up = pair(w, rank, torch.Generator().manual_seed(0))
    return {f"unet.{path}.lora_A.weight": down, f"unet.{path}.lora_B.weight": up}


def bad(sd_pipe, kind):
    good = lora_for(sd_pipe)
    if kind == "unknown layer":
        return {**good, "unet.down_blocks.7.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
                "unet.down_blocks.7.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2)}
    if kind == "unknown kohya layer":
        return {**good, "lora_unet_down_blocks_0_no_such_layer.lora_down.weight": torch.zeros(2, 32)}
    if kind == "unknown prefix":
        return {**good, "vae.decoder.conv_in.lora_A.weight": torch.zeros(2, 4)}
    if kind == "not lora":
        return {**good, "unet.down_blocks.0.attentions.0.proj_in.weight": torch.zeros(32, 32, 1, 1)}
    if kind == "no up":
        return {k: v for k, v in good.items() if "lora_B" not in k}
    if kind == "rank over the layer's size":
        return lora_for(sd_pipe, "down_blocks.0.resnets.0.time_emb_proj", rank=40)  # Linear(128, 32)
    if kind == "shape":
        return {k: v[:, :5] if "lora_A" in k else v for k, v in good.items()}
    if kind == "nan":
        return {k: v.clone().fill_(float("nan")) if "lora_B" in k else v for k, v in good.items()}
    if kind == "integer":
        return {k: v.long() if "lora_B" in k else v for k, v in good.items()}
    if kind == "alpha":
        return {**good, "unet.down_blocks.0.attentions.0.proj_in.alpha": torch.tensor([1.0, 2.0])}
    if kind == "twice":
        return {**good, "unet.down_blocks.0.attentions.0.proj_in.lora.down.weight": good[next(iter(good))]}
    if kind == "other pipeline":
        return {**good, "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 32)}
    raise AssertionError(kind)


BAD = {"unknown layer": "2 keys match no layer.*down_blocks.7.attentions.0.proj_in.lora_A.weight",
       "unknown kohya layer": "lora_unet_down_blocks_0_no_such_layer.lora_down.weight",
       "unknown prefix": "vae.decoder.conv_in.lora_A.weight",
       "not lora": r"match no layer.*proj_in\.weight",
       "no up": "has no LoRA up",
       "rank over the layer's size": "rank 40 must be between 1 and the layer's smaller dimension 32",
       "shape": r"do not fit the layer's weight \(32, 32, 1, 1\)",
       "nan": "contains NaN or inf",
       "integer": "not floating point",
       "alpha": "alpha must be one finite number",
       "twice": "down weight twice",
       "other pipeline": "text_encoder_2, which this pipeline does not have"}


@pytest.mark.parametrize("kind", BAD)
def test_bad_loras_are_refused_and_change_nothing(sd, kind):
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    with pytest.raises(CheckpointError, match=BAD[kind]):
        sd.load_lora_weights(bad(sd, kind))
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    assert getattr(sd, "lora_adapters", {}) == {}


def test_bad_sources_and_scales(sd, tmp_path):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        sd.load_lora_weights(lora_for(sd), scale=float("inf"))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        sd.load_lora_weights(lora_for(sd), scale=True)
    torch.save(lora_for(sd), tmp_path / "lora.bin")
    with pytest.raises(CheckpointError, match="pickle-based LoRA files are refused"):
        sd.load_lora_weights(tmp_path / "lora.bin")
    with pytest.raises(CheckpointError, match="no such LoRA file or folder"):
        sd.load_lora_weights(tmp_path / "missing.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        sd.load_lora_weights(tmp_path / "broken.safetensors")
    save(tmp_path, lora_for(sd), "a.safetensors")
    with pytest.raises(CheckpointError, match="2 .safetensors files"):
        sd.load_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="weight_name must be a file name inside"):
        sd.load_lora_weights(tmp_path, weight_name="../a.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")  # never opened: reading it would hang
    with pytest.raises(CheckpointError, match="fifo.safetensors: not a file"):
        sd.load_lora_weights(tmp_path, weight_name="fifo.safetensors")
    with pytest.raises(TypeError, match="must map names"):
        sd.load_lora_weights({"unet.conv_in.lora_A.weight": [[0.0]]})
    for metadata, message in (({"unet.alpha_pattern": {"proj_.*": 2}}, "regular expressions are not supported"),
                              ({"unet.use_dora": True}, "DoRA LoRAs"),
                              ({"unet.lora_alpha": "8"}, "alpha must be a finite number")):
        save(tmp_path, lora_for(sd), "m.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})
        with pytest.raises(CheckpointError, match=message):
            sd.load_lora_weights(tmp_path, weight_name="m.safetensors")
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        sd.load_lora_weights("no-such-org/no-such-lora", weight_name="x.safetensors", local_files_only=True)


def test_hub_repo_id_from_the_local_cache(sd, tmp_path):
    """A repo id resolves through huggingface_hub's cache (built here with its own layout)."""
    commit = "0" * 40
    snapshot = tmp_path / "models--someone--tiny-lora" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save(snapshot, lora_for(sd), "pytorch_lora_weights.safetensors")
    (tmp_path / "models--someone--tiny-lora" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-lora" / "refs" / "main").write_text(commit)
    before = sd.unet.down_blocks[0].attentions[0].proj_in.weight.clone()
    sd.load_lora_weights("someone/tiny-lora", cache_dir=tmp_path, local_files_only=True)
    assert not torch.equal(before, sd.unet.down_blocks[0].attentions[0].proj_in.weight)


def test_loading_waits_for_a_running_call(sd, tmp_path):
    """load and unload hold the call lock: a generation never sees half-merged weights."""
    started, release = threading.Event(), threading.Event()

    def callback(pipe, i, t, tensors):
        started.set()
        release.wait(10)
        return {}

    runner = threading.Thread(target=lambda: sd(PROMPT, num_inference_steps=2, latents=noise(),
                                                callback_on_step_end=callback))
    runner.start()
    started.wait(10)
    loader = threading.Thread(target=sd.load_lora_weights, args=(lora_for(sd),))
    loader.start()
    loader.join(0.5)
    assert loader.is_alive()  # blocked by the running call
    release.set()
    runner.join(10)
    loader.join(10)
    assert list(sd.lora_adapters) == ["default_0"]


# ----------------------------------------------------------------------------- command line

def test_cli_lora_with_scale_matches_diffusers(folders, bases, tmp_path, capsys):
    from PIL import Image

    from mini_tgate.cli import main

    a = save(tmp_path, peft_lora(bases["sd"][0], seed=14), "a.safetensors")
    b = save(tmp_path, kohya_sd_lora(bases["sd"][0], seed=15), "b.safetensors")
    ref = reference(folders["sd"])
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5])
    ref.fuse_lora(adapter_names=["a", "b"])
    want = ref(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    rc = main(["generate", PROMPT, "--model", str(folders["sd"]), "--steps", "3", "--seed", "5", "--no-tgate",
               "--lora", str(a), "--lora", f"{b}:0.5", "--out", str(tmp_path / "x.png")])
    assert rc == 0, capsys.readouterr().err
    got = np.asarray(Image.open(tmp_path / "x.png").convert("RGB")).astype(int)
    assert np.abs(got - (want * 255).round()).max() <= 1
    params = json.loads(Image.open(tmp_path / "x.png").info["mini_tgate"])
    assert params["loras"] == [{"lora": str(a), "scale": 1.0}, {"lora": str(b), "scale": 0.5}]


@pytest.mark.parametrize("value, message", [("lora.safetensors:inf", "the scale must be a finite number"),
                                            ("missing.safetensors:0.5", "--lora missing.safetensors: no such file")])
def test_cli_bad_lora_is_one_line_before_loading(folders, tmp_path, monkeypatch, capsys, value, message):
    from mini_tgate import cli as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli.options, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["generate", PROMPT, "--model", str(folders["sd"]), "--lora", value]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_sdxl_kohya_names_at_real_scale_as_diffusers_reads_them():
    """Every Linear/Conv2d of the real SDXL UNet (meta device): its kohya (LDM) name, as
    ldm_unet_name writes it, is read back to that same layer by diffusers' own kohya converter and
    by ours."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    from mini_tgate.formats.lora import LayerIndex, ldm_unet_name
    from mini_tgate.macs import PRESETS

    config = json.loads((PRESETS / "sdxl.json").read_text())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(config)
    index = LayerIndex("unet", unet)
    up_with_attention = {b for b, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")}
    assert len(index.layers) == 794
    for path in index.layers:
        flat = "lora_unet_" + ldm_unet_name(path, 2, up_with_attention).replace(".", "_")
        assert index.find([flat.removeprefix("lora_unet_")], kohya=True) == path
        halves = {f"{flat}.lora_down.weight": torch.zeros(1), f"{flat}.lora_up.weight": torch.zeros(1)}
        converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(halves, unet.config))
        peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        assert {k.rsplit(".lora_", 1)[0] for k in peft} == {path}, flat


def test_pixart_transformer_lora_as_peft_merges_it(tmp_path, one_thread):
    """PixArt pipelines take `transformer.` LoRAs. diffusers has no LoRA loader for PixArt: the
    reference is PEFT itself, injected into diffusers' transformer, loaded and merged."""
    from types import SimpleNamespace

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from test_pixart import inputs, make_reference

    from mini_tgate.formats import lora
    from mini_tgate.pixart.transformer import PixArtTransformer2DModel

    ref = make_reference("alpha")
    ref.save_pretrained(tmp_path / "transformer")
    ours = PixArtTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    g, weights = torch.Generator().manual_seed(16), {}
    for name, w in layers(ref, ["attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "proj_out",
                                "caption_projection.linear_1", "adaln_single.linear", "pos_embed.proj"]):
        weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"] = pair(w, 2, g, scale=0.2)
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in weights})
    x, text, t, kw = inputs("alpha", 2, 8, 8, seed=0)
    with torch.no_grad():
        before = ref(x, text, t, **kw).sample
        ref = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=5, target_modules=targets), ref)
        set_peft_model_state_dict(ref, weights)
        for module in ref.modules():
            if isinstance(module, LoraLayer):
                module.merge()
        expected = ref(x, text, t, **kw).sample
    path = save(tmp_path, {"transformer." + k: v for k, v in weights.items()},
                metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 5})})
    pipe = SimpleNamespace(transformer=ours)
    lora.fuse(pipe, lora.read_lora(path))
    with torch.no_grad():
        got = ours(x, text, t, **kw)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - before).abs().max() > 0.01 * before.abs().max()
