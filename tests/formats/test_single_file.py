"""Single-file (LDM layout) checkpoints against diffusers' `from_single_file`.

The test files are written from tiny diffusers folders by `ldm_state_dict` below, a writer
built from the original LDM module layout (input/middle/output blocks, the LDM VAE's
down/up/mid naming, OpenCLIP's resblocks with fused in_proj). The writer is not trusted on its
own: diffusers' `from_single_file` must read each file back into the very model it came from,
and at real scale diffusers' own converters must turn the written key sets into exactly the
diffusers state dicts. Only then is mini_tgate's conversion compared with them.
"""

import json
import shutil

import diffusers
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from diffusers.loaders import single_file_utils as reference
from safetensors.torch import save_file

import mini_tgate
from mini_tgate.core.bounds import MAX_FILE_BYTES
from mini_tgate.core.weights import CheckpointError
from mini_tgate.formats import single_file

pytestmark = pytest.mark.usefixtures("one_thread")

# ----------------------------------------------------------------------------- diffusers -> LDM writer

RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet(state, layers_per_block, attention_levels):
    """UNet2DConditionModel -> openaimodel.UNetModel keys (`model.diffusion_model.` + ...)."""
    step = layers_per_block + 1
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if p[0] in ("conv_in", "conv_norm_out", "conv_out"):
            new = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}[p[0]] + "." + p[-1]
        elif p[0] in ("time_embedding", "add_embedding"):
            head = "time_embed" if p[0] == "time_embedding" else "label_emb.0"
            new = f"{head}.{0 if p[1] == 'linear_1' else 2}.{p[2]}"
        elif p[0] == "mid_block":
            index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
            rest = [RESNET_LDM.get(p[3], p[3])] + p[4:] if p[1] == "resnets" else p[3:]
            new = ".".join([f"middle_block.{index}"] + rest)  # one sequence: no sub-index
        elif p[0] == "down_blocks":
            level, first = int(p[1]), 1 + int(p[1]) * step
            if p[2] == "downsamplers":
                new = f"input_blocks.{first + layers_per_block}.0.op.{p[-1]}"
            elif p[2] == "resnets":
                new = ".".join([f"input_blocks.{first + int(p[3])}.0", RESNET_LDM.get(p[4], p[4])] + p[5:])
            else:
                new = ".".join([f"input_blocks.{first + int(p[3])}.1"] + p[4:])
        elif p[0] == "up_blocks":
            level, first = int(p[1]), int(p[1]) * step
            if p[2] == "upsamplers":  # after the attention when the level has one
                sub = 2 if attention_levels[level] else 1
                new = f"output_blocks.{first + layers_per_block}.{sub}.conv.{p[-1]}"
            elif p[2] == "resnets":
                new = ".".join([f"output_blocks.{first + int(p[3])}.0", RESNET_LDM.get(p[4], p[4])] + p[5:])
            else:
                new = ".".join([f"output_blocks.{first + int(p[3])}.1"] + p[4:])
        else:
            raise KeyError(k)
        out["model.diffusion_model." + new] = v
    return out


def ldm_vae(state, levels):
    """AutoencoderKL -> the LDM autoencoder (`first_stage_model.` + ...)."""
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    out = {}
    for k, v in state.items():
        p = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out").split(".")
        if p[1] in ("down_blocks", "up_blocks"):
            level = int(p[2]) if p[1] == "down_blocks" else levels - 1 - int(p[2])
            where = f"{p[0]}.{'down' if p[1] == 'down_blocks' else 'up'}.{level}"
            if p[3] == "resnets":
                p = [where, "block", *p[4:]]
            else:
                p = [where, "downsample" if p[3] == "downsamplers" else "upsample", *p[5:]]
        elif p[1] == "mid_block" and p[2] == "resnets":
            p = [p[0], "mid", f"block_{int(p[3]) + 1}", *p[4:]]
        elif p[1] == "mid_block":
            p = [p[0], "mid", "attn_1", attention[p[4]], p[-1]]
            if p[-1] == "weight" and v.ndim == 2:
                v = v[:, :, None, None]  # the LDM VAE's attention projections are 1x1 convolutions
        out["first_stage_model." + ".".join(p)] = v
    return out


def ldm_clip(state, prefix):
    """transformers' CLIPTextModel keys as they are (transformers 5 drops `text_model.`)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def ldm_openclip(state, prefix, sd2=False, seed=0):
    """CLIPTextModel(WithProjection) -> OpenCLIP's text tower. `sd2`: add what SD-2's files
    carry and its conditioning (the penultimate layer) never reaches: a last block and the
    tower's (width, width) text_projection."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    width = state["embeddings.token_embedding.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    g = torch.Generator().manual_seed(seed)
    if sd2:  # the last block: a copy of the one before with other weights
        for k in [k for k in state if k.startswith(f"encoder.layers.{layers - 1}.")]:
            v = state[k]
            state[k.replace(f"layers.{layers - 1}.", f"layers.{layers}.")] = v + (torch.randn(v.shape, generator=g) * 0.05).to(v.device)
        layers += 1
        state["text_projection.weight"] = torch.randn(width, width, generator=g).to(v.device)
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"], prefix + "ln_final.bias": state["final_layer_norm.bias"],
           prefix + "logit_scale": torch.ones((), device=state["final_layer_norm.bias"].device)}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for what in ("weight", "bias"):
            out[theirs + f"attn.in_proj_{what}"] = torch.cat([state[ours + f"self_attn.{p}_proj.{what}"] for p in "qkv"])
            for a, b in names.items():
                out[theirs + f"{b}.{what}"] = state[ours + f"{a}.{what}"]
    return out


DDPM = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "posterior_mean_coef1"]


def ldm_state_dict(pipe, kind):
    """The whole LDM-layout state dict of a diffusers pipeline, with the extras real files carry
    (the DDPM buffers, an EMA copy's bookkeeping, position_ids)."""
    unet = pipe.unet
    attention_levels = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    out = ldm_unet(unet.state_dict(), unet.config.layers_per_block, attention_levels)
    out.update(ldm_vae(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    if kind == "sd1":
        out.update(ldm_clip(pipe.text_encoder.state_dict(), "cond_stage_model.transformer."))
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    elif kind == "sd2":
        out.update(ldm_openclip(pipe.text_encoder.state_dict(), "cond_stage_model.model.", sd2=True))
    else:
        out.update(ldm_clip(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        out.update(ldm_openclip(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    device = next(iter(out.values())).device
    out.update({name: torch.linspace(0.1, 0.9, 1000, device=device) for name in DDPM})
    if kind == "sdxl":
        out["denoiser.sigmas"] = torch.linspace(0.03, 14.6, 1000, device=device)  # sgm's schedule buffer
    out.update({"model_ema.decay": torch.tensor(0.9999, device=device),
                "model_ema.num_updates": torch.tensor(1000, dtype=torch.int32, device=device)})
    return out


# ----------------------------------------------------------------------------- tiny end to end

def save_sd2(folder):
    """SD-2 in miniature: linear projections, gelu OpenCLIP-style text encoder, v-prediction."""
    tiny_models.save_sd(folder, prediction_type="v_prediction")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    return folder


def save_sdxl(folder):
    """SDXL in miniature with text encoders of different widths (16 and 48, as CLIP-L's 768 and
    bigG's 1280 differ): diffusers' from_single_file tells the two apart by width."""
    pipe = diffusers.StableDiffusionXLPipeline(
        unet=tiny_models.sdxl_unet(), vae=tiny_models.vae(), text_encoder=tiny_models.text_encoder(16, "quick_gelu"),
        text_encoder_2=tiny_models.text_encoder(48, "gelu", projection=32, seed=1), tokenizer=tiny_models.tokenizer(),
        tokenizer_2=tiny_models.tokenizer("!"), scheduler=diffusers.DDIMScheduler(**tiny_models.SD_SCHEDULER))
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny(request, tmp_path_factory):
    """(kind, diffusers folder, LDM file written from it)."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    folder = root / "diffusers"
    {"sd1": tiny_models.save_sd, "sd2": save_sd2, "sdxl": save_sdxl}[kind](folder)
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder)
    path = root / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(pipe, kind).items()}, path)
    return kind, folder, path


def images(pipe, kind, **kw):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return pipe("a red circle", negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0,
                latents=latents, output_type="np", **kw).images


def test_same_images_as_diffusers_from_single_file_and_the_folder(tiny, tmp_path):
    kind, folder, path = tiny
    cls = diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline
    ref_folder = cls.from_pretrained(folder)
    ref_single = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    # the writer is right: diffusers reads the LDM file back into exactly the folder's weights
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else []):
        a, b = getattr(ref_folder, name).state_dict(), getattr(ref_single, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # configs only: the tokenizers come from the project's CLIP vocabulary (mini_tgate/clip)
    configs = tmp_path / "configs"
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("tokenizer*", "*.safetensors"))
    ours = mini_tgate.load_single_file(path, config=configs)
    assert ours.scheduler.config["prediction_type"] == ("v_prediction" if kind == "sd2" else "epsilon")
    a, b, c = images(ours, kind), images(ref_single, kind), images(ref_folder, kind)
    assert a.shape == b.shape == (1, 64, 64, 3)
    assert np.abs(a - b).max() < 1e-3
    assert np.abs(a - c).max() < 1e-3
    assert np.abs(a - images(ours, kind, tgate=mini_tgate.TGate(2, 1, 1, 0))).max() > 1e-4  # the gate acts


# ----------------------------------------------------------------------------- real scale, meta device

def meta_diffusers_parts(kind):
    """diffusers / transformers models of the real SD-1.5, SD-2.1 or SDXL configs, on meta."""
    preset, scaling, encoders, _, _ = single_file.KINDS[kind]
    unet_config = json.loads((single_file.PRESETS / f"{preset}.json").read_text())
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        texts = []
        for encoder in encoders:
            cfg = {k: v for k, v in encoder.items() if k != "architectures"}
            model = transformers.CLIPTextModelWithProjection if "architectures" in encoder else transformers.CLIPTextModel
            texts.append(model(transformers.CLIPTextConfig(**cfg)))
    return unet, vae, texts


class MetaPipe:
    def __init__(self, unet, vae, texts):
        self.unet, self.vae, self.text_encoder = unet, vae, texts[0]
        self.text_encoder_2 = texts[1] if len(texts) > 1 else None


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_real_scale_key_sets_convert_to_the_diffusers_state_dicts(kind):
    unet, vae, texts = meta_diffusers_parts(kind)
    ldm = ldm_state_dict(MetaPipe(unet, vae, texts), kind)
    # the real files' sizes: SD-2's OpenCLIP tower has 24 blocks, SDXL's bigG 32, SD-1's CLIP 12 layers
    if kind != "sd1":
        prefix = "cond_stage_model.model." if kind == "sd2" else "conditioner.embedders.1.model."
        blocks = {k.split(".")[-3] for k in ldm if k.startswith(prefix + "transformer.resblocks.") and k.endswith("ln_1.weight")}
        assert len(blocks) == (24 if kind == "sd2" else 32)
    assert ldm["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 4, 3, 3)

    # 1. diffusers' own converters read these key sets into exactly its models' state dicts
    assert shapes(reference.convert_ldm_unet_checkpoint(ldm, unet.config)) == shapes(unet.state_dict())
    assert shapes(reference.convert_ldm_vae_checkpoint(ldm, vae.config)) == shapes(vae.state_dict())
    if kind == "sd1":
        text = reference.convert_ldm_clip_checkpoint(ldm)
        text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
        assert shapes(text) == shapes(texts[0].state_dict())
    else:
        prefix = "cond_stage_model.model." if kind == "sd2" else "conditioner.embedders.1.model."
        text = reference.convert_open_clip_checkpoint(texts[-1], ldm, prefix=prefix)
        if not hasattr(texts[-1], "text_model"):
            text = {k.removeprefix("text_model."): v for k, v in text.items()}
        assert shapes(text) == shapes(texts[-1].state_dict())

    # 2. mini_tgate's table gives its own models (built from the same presets) exactly
    found, parts = single_file.convert(ldm)
    assert found == kind
    configs = single_file.preset_configs(kind, single_file.KINDS[kind][4])
    with torch.device("meta"):
        ours = {"unet": mini_tgate.UNet2DConditionModel(mini_tgate.UNet2DConditionModel.config_class.from_dict(configs["unet"])),
                "vae": mini_tgate.AutoencoderKL(mini_tgate.AutoencoderKL.config_class.from_dict(configs["vae"]))}
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs:
                ours[name] = mini_tgate.CLIPTextModel(mini_tgate.CLIPTextModel.config_class.from_dict(configs[name]))
    assert parts.keys() == ours.keys()
    for name, model in ours.items():
        assert shapes(parts[name]) == shapes(model.state_dict()), name
    if kind == "sd2":  # what is left out of SD-2's text tower is exactly what diffusers leaves out
        generic = single_file.ignored_keys(ldm, "sd1")
        assert single_file.ignored_keys(ldm, "sd2") - generic == set(reference.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    # and the names are diffusers' (the text encoders' with transformers' text_model. level)
    assert shapes(parts["unet"]) == shapes(unet.state_dict())
    assert shapes(parts["vae"]) == shapes(vae.state_dict())


def test_preset_schedulers_are_sds_noise_schedule():
    """The presets' schedule is the one diffusers' from_single_file assumes for these files."""
    for kind, (_, _, _, scheduler, prediction) in single_file.KINDS.items():
        for k in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset", "timestep_spacing"):
            assert scheduler[k] == reference.SCHEDULER_DEFAULT_CONFIG[k], (kind, k)
        config = single_file.preset_configs(kind, prediction)
        sample = config["unet"]["sample_size"] * 8
        assert sample == reference.DIFFUSERS_TO_LDM_DEFAULT_IMAGE_SIZE_MAP[{"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}[kind]]
        assert config["vae"]["sample_size"] == sample
    assert single_file.preset_configs("sd2", "epsilon")["unet"]["sample_size"] * 8 == 512


# ----------------------------------------------------------------------------- errors

def test_presets_refuse_a_file_of_other_sizes(tiny):
    """Without config=, the presets are the real models': a tiny file does not fit them."""
    kind, folder, path = tiny
    with pytest.raises(CheckpointError, match="its UNet has 1 layers per block, the unet config 2 .the (sd1|sd2|sdxl) preset"):
        mini_tgate.load_single_file(path)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_a_config_that_does_not_fit_names_the_part_and_keys(tiny, tmp_path):
    kind, folder, path = tiny
    shutil.copytree(folder, tmp_path / "config")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (tmp_path / "config" / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 24}))
    with pytest.raises(CheckpointError, match=r"its unet does not fit the unet config \(\d+ problems: .*model\.diffusion_model\."
                                              r"\S+\.attn2\.to_k\.weight \(\S+\.attn2\.to_k\.weight\): file \(\d+, \d+\) vs model"):
        mini_tgate.load_single_file(path, config=tmp_path / "config")


def test_file_size_bound(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="larger than any Stable Diffusion checkpoint"):
        mini_tgate.load_single_file(path)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_unknown_keys_are_named(tiny, tmp_path):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    state["model.diffusion_model.some_new_module.weight"] = torch.zeros(2)
    state["first_stage_model.encoder.mystery.bias"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match=r"2 keys .* match no part.*some_new_module.*|2 keys .* match no part.*mystery"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_inpainting_models_are_refused(tiny, tmp_path):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    conv_in = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    bad = tmp_path / "inpainting.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match="its UNet takes 9 input channels .an inpainting"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_missing_tensor_is_named(tiny, tmp_path):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    del state["first_stage_model.decoder.conv_out.bias"]
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match="vae does not fit.*missing decoder.conv_out.bias"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_files_are_refused(tmp_path, suffix):
    path = tmp_path / ("model" + suffix)
    path.write_bytes(b"\x80\x04anything")
    with pytest.raises(CheckpointError, match="pickle.*convert it to .safetensors"):
        mini_tgate.load_single_file(path)


@pytest.mark.parametrize("head", [b"", b"\x01\x00", (2**40).to_bytes(8, "little"), (17 * 2**20).to_bytes(8, "little"),
                                  (100).to_bytes(8, "little") + b"{}"])
def test_not_a_safetensors_file(tmp_path, head):
    path = tmp_path / "model.safetensors"
    path.write_bytes(head)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        mini_tgate.load_single_file(path)


def test_offsets_outside_the_file(tmp_path):
    header = json.dumps({"model.diffusion_model.out.2.bias": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="truncated"):
        mini_tgate.load_single_file(path)


def test_not_a_stable_diffusion_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint in the LDM layout"):
        mini_tgate.load_single_file(path)
    parts = {"model.diffusion_model.out.2.bias": torch.zeros(4), "first_stage_model.quant_conv.bias": torch.zeros(8)}
    save_file({**parts, "conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="an SDXL refiner checkpoint"):
        mini_tgate.load_single_file(path)
    save_file({**parts, "cond_stage_model.mystery.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="without a known text encoder"):
        mini_tgate.load_single_file(path)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_bad_prediction_type(tiny):
    kind, folder, path = tiny
    with pytest.raises(ValueError, match="prediction_type='v'"):
        mini_tgate.load_single_file(path, config=folder, prediction_type="v")


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_prediction_type_argument_wins(tiny):
    kind, folder, path = tiny
    pipe = mini_tgate.load_single_file(path, config=folder, prediction_type="v_prediction")
    assert pipe.scheduler.config["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------- load_pipeline and the CLI

@pytest.fixture
def presets_of(monkeypatch):
    """Make the presets those of a tiny folder (the real ones need real-size files)."""
    def use(folder):
        monkeypatch.setattr(single_file, "preset_configs", lambda kind, prediction: single_file.folder_configs(folder, kind))
    return use


def test_load_pipeline_takes_a_single_file(tiny, presets_of):
    """load_pipeline(file): the folder's weights exactly (float16 here), the right class."""
    kind, folder, path = tiny
    presets_of(folder)
    ours = mini_tgate.load_pipeline(str(path), dtype=torch.float16)
    ref = mini_tgate.load_pipeline(folder, dtype=torch.float16)
    assert type(ours) is type(ref) and ours.model_info["name"] == "model.safetensors"
    for name in ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else []):
        a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
    other = mini_tgate.StableDiffusionPipeline if kind == "sdxl" else mini_tgate.StableDiffusionXLPipeline
    with pytest.raises(CheckpointError, match=f"a {type(ref).__name__} checkpoint .{kind}., not a {other.__name__} one"):
        other.from_pretrained(path)


def test_load_pipeline_single_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing.safetensors: no such file"):
        mini_tgate.load_pipeline(tmp_path / "missing.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle-based checkpoints are refused"):
        mini_tgate.load_pipeline(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="prediction_type is for single-file checkpoints"):
        mini_tgate.load_pipeline(tiny_models.save_sd(tmp_path / "folder"), prediction_type="epsilon")


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_variant_is_refused_for_a_single_file(tiny):
    kind, folder, path = tiny
    with pytest.raises(ValueError, match="variant and revision are for diffusers folders"):
        mini_tgate.load_pipeline(path, variant="fp16")


@pytest.mark.parametrize("tiny", ["sd2"], indirect=True)  # one kind is enough for the command line
def test_cli_generates_from_a_single_file(tiny, presets_of, tmp_path, capsys):
    import hashlib

    from mini_tgate.cli import main
    from mini_tgate.formats.png import read_png_text

    kind, folder, path = tiny
    presets_of(folder)
    rc = main(["generate", "a cat", "--model", str(path), "--steps", "2", "--height", "64", "--width", "64",
               "--prediction-type", "v_prediction", "--out", str(tmp_path / "cat.png"), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    text = read_png_text(tmp_path / "cat.png")["parameters"]
    assert "Model: model, " in text or "Model: model.safetensors" in text, text
    assert f"Model hash: {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}" in text  # A1111's: the file's SHA-256
    rc = main(["generate", "a cat", "--model", str(folder), "--prediction-type", "epsilon", "--out", str(tmp_path / "b.png")])
    out, err = capsys.readouterr()
    assert rc == 1 and err.startswith("error: ") and len(err.splitlines()) == 1 and "single-file" in err


# ----------------------------------------------------------------------------- misuse: headers against the spec

def write_raw(path, header_text: str, data: bytes):
    header = header_text.encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


A, B = "model.diffusion_model.out.2.bias", "first_stage_model.quant_conv.bias"
SPEC_BREAKING = {  # name -> (header, data bytes, what the error must say)
    "dtype size disagrees": (json.dumps({A: entry("F16", [4], 0, 16)}), 16, f"bad header entry for '{A}'"),
    "overlapping": (json.dumps({A: entry("F32", [4], 0, 16), B: entry("F32", [4], 0, 16)}), 16, "overlaps another"),
    "gap": (json.dumps({A: entry("F32", [2], 8, 16)}), 16, f"'{A}' at bytes 8-16 leaves a gap from 0"),
    "bytes left over": (json.dumps({A: entry("F32", [2], 0, 8)}), 16, "bytes left over"),
    "truncated": (json.dumps({A: entry("F32", [4], 0, 16)}), 8, "truncated"),
    "unknown dtype": (json.dumps({A: entry("X9", [2], 0, 8)}), 8, f"bad header entry for '{A}'"),
    "shape overflowing": (json.dumps({A: entry("F32", [2**62, 2**62], 0, 8)}), 8, f"bad header entry for '{A}'"),
    "duplicate key": (f'{{"{A}": {json.dumps(entry("F32", [2], 0, 8))}, "{A}": {json.dumps(entry("F32", [2], 8, 16))}}}',
                      16, f"names '{A}' twice"),
}


@pytest.mark.parametrize("case", SPEC_BREAKING)
def test_headers_the_safetensors_library_refuses_are_refused_by_name(tmp_path, case):
    """Each header breaks the format's spec: the safetensors library itself refuses it. Ours
    refuses it from the header alone, in one line naming the file (and the tensor)."""
    from safetensors import safe_open
    header, size, message = SPEC_BREAKING[case]
    path = write_raw(tmp_path / "model.safetensors", header, bytes(size))
    with pytest.raises(Exception, match="Error while deserializing header"):
        with safe_open(path, framework="pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as e:
        mini_tgate.load_single_file(path)
    assert str(path) in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def rewrite_header(path, out, change):
    """A copy of a safetensors file whose header `change` edits (the data bytes as they were)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    return write_raw(out, json.dumps(header), raw[8 + n:])


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_a_real_file_whose_header_lies_about_a_dtype(tiny, tmp_path):
    """F32 bytes declared F16: safetensors would raise its own error while reading; ours names the tensor first."""
    kind, folder, path = tiny
    key = "first_stage_model.decoder.conv_out.weight"
    bad = rewrite_header(path, tmp_path / "bad.safetensors", lambda h: h[key].update(dtype="F16"))
    with pytest.raises(CheckpointError, match=f"bad.safetensors: not a readable safetensors file .bad header entry for '{key}'"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("tiny", ["sd2"], indirect=True)
@pytest.mark.parametrize("suffix, shape, message", [("weight", lambda w: (2, w), r"shape \(2, 32\) is not a fused q/k/v"),
                                                    ("bias", lambda w: (), r"shape \(\) is not a fused q/k/v"),
                                                    ("weight", lambda w: (3 * w + 3, w),
                                                     r"resblocks\.0\.attn\.in_proj_weight \(text_model\.encoder\.layers"
                                                     r"\.0\.self_attn\.\w_proj\.weight\): file \(33, 32\) vs model \(32, 32\)")])
def test_sd2_in_proj_of_the_wrong_shape_is_named_before_reading(tiny, tmp_path, suffix, shape, message):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    key = f"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_{suffix}"
    state[key] = torch.zeros(shape(state[key].shape[-1]))
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match=message) as e:
        mini_tgate.load_single_file(bad, config=folder)
    assert "bad.safetensors" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("tiny", ["sd2"], indirect=True)
def test_sd2_resblock_key_without_a_number_is_named(tiny, tmp_path):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    state["cond_stage_model.model.transformer.resblocks.x.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match="bad.safetensors: 1 keys of the sd2 checkpoint match no part.*resblocks.x.weight"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_conv_in_of_the_wrong_rank_is_named(tiny, tmp_path):
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match=r"bad.safetensors: its unet does not fit.*problems: "
                                              r"model\.diffusion_model\.input_blocks\.0\.0\.weight \(conv_in\.weight\): file \(4,\)"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_unsupported_model_types_name_the_file_and_their_keys(tmp_path, model):
    """SD3 and Flux files, by the keys diffusers recognises them by (CHECKPOINT_KEY_NAMES)."""
    marker = reference.CHECKPOINT_KEY_NAMES[model][1]
    assert marker.startswith("model.diffusion_model.")
    extra = {"sd3": {"first_stage_model.decoder.conv_in.bias": torch.zeros(2),
                     "text_encoders.clip_l.transformer.text_model.final_layer_norm.bias": torch.zeros(2)},
             "flux": {"vae.decoder.conv_in.bias": torch.zeros(2)}}[model]
    path = tmp_path / "model.safetensors"
    save_file({marker: torch.zeros(2), **extra}, path)
    with pytest.raises(CheckpointError) as e:
        mini_tgate.load_single_file(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message
    assert (marker if model == "flux" else "text_encoders.clip_l.") in message


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
def test_two_keys_for_one_weight_are_refused(tiny, tmp_path):
    """Old files name CLIP's tensors without `text_model.`; a file with both spellings is ambiguous."""
    kind, folder, path = tiny
    from safetensors.torch import load_file
    state = load_file(path)
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    state[key.replace("text_model.", "")] = state[key] + 1
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    with pytest.raises(CheckpointError, match="bad.safetensors: .*final_layer_norm.weight and .*final_layer_norm.weight "
                                              "are both the text_encoder's text_model.final_layer_norm.weight"):
        mini_tgate.load_single_file(bad, config=folder)


@pytest.mark.parametrize("tiny", ["sd1"], indirect=True)
@pytest.mark.parametrize("dtype, name", [(torch.int32, "I32"), (torch.bool, "BOOL")])
def test_a_weight_that_is_not_floating_point_is_refused_before_reading(tiny, tmp_path, monkeypatch, dtype, name):
    """From the header's dtype, naming the file's key, before a tensor is read. The integer
    tensors real SD-1 files carry (CLIP's position_ids, int64; model_ema.num_updates, int32:
    both in this file, which the tests above load) stay ignored: only the weight is named."""
    import safetensors
    from safetensors.torch import load_file
    kind, folder, path = tiny
    state = load_file(path)
    assert state["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert state["model_ema.num_updates"].dtype == torch.int32
    key = "first_stage_model.decoder.conv_out.weight"
    state[key] = state[key].to(dtype)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    with pytest.raises(CheckpointError) as e:
        mini_tgate.load_single_file(bad, config=folder)
    assert str(e.value) == f"{bad}: tensor {key} is {name}; model weights must be floating point"


@pytest.mark.parametrize("tiny", ["sd2"], indirect=True)  # SD-2: q, k and v are cut from one fused tensor
def test_loaded_weights_are_fresh_allocations(tiny):
    """Read in the file's dtype, no weight is a view of the file or of another tensor (issue 21)."""
    from test_weights_layout import assert_fresh

    kind, folder, path = tiny
    pipe = mini_tgate.load_single_file(path, config=folder)
    for name in ("unet", "vae", "text_encoder"):
        assert_fresh(getattr(pipe, name), name)
