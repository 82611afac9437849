"""Bad input through the Python API: a CheckpointError (or ConfigError) naming the file for a
broken checkpoint, a ValueError naming the argument for an impossible request, and a pipeline
that still works afterwards."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT

from mini_tgate import CheckpointError, ConfigError, TGate, load_pipeline

DEFAULT = ROOT / "weights" / "tiny-random"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def ckpt(tmp_path):
    """A fresh copy of the embedded default checkpoint, to break."""
    return shutil.copytree(DEFAULT, tmp_path / "ckpt")


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pipeline(tmp_path / "nothing-here")
    with pytest.raises(CheckpointError, match="not a hub repo id"):
        load_pipeline("not/a/repo/id")


def test_hub_id_not_in_the_cache_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        load_pipeline("org/not-cached", cache_dir=tmp_path)


def test_unsupported_pipeline_class(ckpt):
    edit_json(ckpt / "model_index.json", _class_name="StableDiffusionInpaintPipeline")
    with pytest.raises(CheckpointError, match="StableDiffusionInpaintPipeline.*not supported"):
        load_pipeline(ckpt)


@pytest.mark.parametrize("remove, message", [
    ("model_index.json", "model_index.json: missing"),
    ("text_encoder", "text_encoder: missing component folder"),
    ("tokenizer", "tokenizer: missing tokenizer folder"),
    ("unet/config.json", "unet/config.json: missing"),
    ("scheduler/scheduler_config.json", "scheduler_config.json: missing"),
    ("vae/diffusion_pytorch_model.safetensors", "vae: no .safetensors weights found"),
])
def test_missing_parts(ckpt, remove, message):
    path = ckpt / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(CheckpointError, match=message):
        load_pipeline(ckpt)


def test_invalid_json(ckpt):
    (ckpt / "unet" / "config.json").write_text('{"sample_size": 16,')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_pipeline(ckpt)


@pytest.mark.parametrize("file, content", [
    ("model_index.json", []),
    ("model_index.json", "StableDiffusionPipeline"),
    ("unet/config.json", [1, 2]),
    ("vae/config.json", 3),
    ("scheduler/scheduler_config.json", []),
    ("scheduler/scheduler_config.json", "DDIMScheduler"),
    ("scheduler/scheduler_config.json", 1.5),
    ("tokenizer/tokenizer_config.json", ["model_max_length"]),
])
def test_valid_json_of_the_wrong_shape(ckpt, file, content):
    (ckpt / file).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=f"{ckpt / file}: must hold a JSON object"):
        load_pipeline(ckpt)


def test_deeply_nested_json(ckpt):
    (ckpt / "model_index.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(CheckpointError, match="model_index.json: JSON nested too deeply"):
        load_pipeline(ckpt)


@pytest.mark.parametrize("changes, message", [
    (dict(block_out_channels="32,64"), "unet config block_out_channels='32,64': expected a list"),
    (dict(layers_per_block="1"), "unet config layers_per_block='1': expected an integer"),
    (dict(norm_num_groups=0), "unet config norm_num_groups=0: expected an integer from 1"),
    (dict(attention_head_dim=0), "unet config attention_head_dim=0: expected an integer from 1"),
])
def test_bad_config_values(ckpt, changes, message):
    edit_json(ckpt / "unet" / "config.json", **changes)
    with pytest.raises(ConfigError, match=message) as e:
        load_pipeline(ckpt)
    assert str(ckpt / "unet" / "config.json") in str(e.value)


def test_integer_weights_name_the_file_and_key(ckpt):
    from safetensors.torch import load_file, save_file

    path = ckpt / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = sorted(state)[0]
    save_file({**state, key: state[key].long()}, path)
    with pytest.raises(CheckpointError, match=f"{path}: tensor {key} is int64"):
        load_pipeline(ckpt)


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_corrupt_safetensors(ckpt, damage):
    path = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage header": data[:8] + b"{nonsense" + data[17:],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file"):
        load_pipeline(ckpt)


def test_shape_mismatch_and_wrong_weights(ckpt):
    edit_json(ckpt / "unet" / "config.json", cross_attention_dim=48)  # what the text encoder does not give
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*attn2.to_k.weight: file \(32, 32\) vs model \(32, 48\)"):
        load_pipeline(ckpt)
    shutil.copy(ckpt / "vae" / "diffusion_pytorch_model.safetensors", ckpt / "unet")  # another model's weights
    with pytest.raises(CheckpointError, match="does not match UNet2DConditionModel: .* missing keys"):
        load_pipeline(ckpt)


def test_unsupported_architecture(ckpt):
    edit_json(ckpt / "unet" / "config.json", attention_type="gated")
    with pytest.raises(ConfigError, match="attention_type='gated' is not supported"):
        load_pipeline(ckpt)


class Payload:  # unpickling this creates a file: what a malicious checkpoint would do
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_only_checkpoint_is_refused_unread(ckpt, tmp_path):
    marker = tmp_path / "code-ran"
    (ckpt / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="only pickle-based weights .*diffusion_pytorch_model.bin"):
        load_pipeline(ckpt)
    assert not marker.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_bad_device_is_not_reported_as_a_bad_file():
    with pytest.raises(Exception) as e:
        load_pipeline(DEFAULT, device="cuda")
    assert not isinstance(e.value, CheckpointError)


# ----------------------------------------------------------------------------- the call

@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEFAULT)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(height=100), ValueError, "positive multiples of 8, got 100x128"),
    (dict(width=12), ValueError, "positive multiples of 8"),
    (dict(height=4, width=4), ValueError, "positive multiples of 8"),
    (dict(height=64.0), ValueError, "positive multiples of 8"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer >= 1, got 0"),
    (dict(num_inference_steps=2.5), ValueError, "num_inference_steps"),
    (dict(guidance_scale=float("nan")), ValueError, "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=float("inf")), ValueError, "guidance_scale must be a finite number, got inf"),
    (dict(guidance_scale="7.5"), ValueError, "guidance_scale"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError, "3 negative prompts for 2 prompts"),
    (dict(prompt=[]), ValueError, "prompt must be a string or a non-empty list"),
    (dict(prompt=None), ValueError, "prompt must be"),
    (dict(negative_prompt=3), ValueError, "negative_prompt must be"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, r"latents must have shape \(1, 4, 16, 16\)"),
    (dict(output_type="jpg"), ValueError, "output_type"),
    (dict(tgate=(10, 5, 1, 2)), TypeError, "tgate must be a mini_tgate.TGate"),
])
def test_bad_arguments(pipe, kwargs, error, message):
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        pipe(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gate_step=0), "gate_step must be an integer >= 1, got 0"),
    (dict(sp_interval=0), "sp_interval must be an integer >= 1"),
    (dict(fi_interval=-2), "fi_interval must be an integer >= 1"),
    (dict(warm_up=-1), "warm_up must be an integer >= 0, got -1"),
    (dict(gate_step=2.0), "gate_step must be an integer"),
])
def test_bad_gate_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TGate(**kwargs)


def test_the_pipeline_still_works_after_a_failed_call(pipe, monkeypatch):
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=4, latents=latents, tgate=TGate(2, 1, 1, 0))
    before = pipe("a cat", **kw).images
    with pytest.raises(ValueError):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], **kw)
    step, calls = type(pipe.scheduler).step, []

    def interrupted_step(*args, **kwargs):  # Ctrl-C after the gate has cached its outputs
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(type(pipe.scheduler), "step", interrupted_step)  # each call steps its own copy
    with pytest.raises(KeyboardInterrupt):
        pipe("a cat", **kw)
    monkeypatch.undo()
    assert all(m.cache is None for m in pipe.unet.attention_layers)
    assert np.array_equal(before, pipe("a cat", **kw).images)
