"""Checkpoint I/O: folders, hub cache (offline), variants, shards, strict loading, refusals."""

import json
import shutil

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file

from mini_tgate.checkpoint import CheckpointError, hub_patterns, resolve, weight_files
from mini_tgate.unet import UNet2DConditionModel
from test_unet import make_reference

# The files of a real SD-1.5 repo on the hub (runwayml/stable-diffusion-v1-5), abridged.
SD15_REPO_FILES = """model_index.json v1-5-pruned.ckpt v1-5-pruned-emaonly.safetensors
feature_extractor/preprocessor_config.json safety_checker/config.json safety_checker/model.safetensors
safety_checker/pytorch_model.bin scheduler/scheduler_config.json text_encoder/config.json
text_encoder/model.fp16.safetensors text_encoder/model.safetensors text_encoder/pytorch_model.bin
text_encoder/flax_model.msgpack tokenizer/merges.txt tokenizer/special_tokens_map.json
tokenizer/tokenizer_config.json tokenizer/vocab.json unet/config.json unet/diffusion_pytorch_model.bin
unet/diffusion_pytorch_model.fp16.safetensors unet/diffusion_pytorch_model.safetensors
unet/diffusion_flax_model.msgpack vae/config.json vae/diffusion_pytorch_model.safetensors
vae/diffusion_pytorch_model.fp16.safetensors text_encoder_2/model.safetensors.index.json
text_encoder_2/model-00001-of-00002.safetensors text_encoder_2/model-00002-of-00002.safetensors
text_encoder_2/model-00001-of-00002.fp16.safetensors text_encoder_2/model.safetensors.index.fp16.json
unet/model.onnx""".split()


def fetched(variant):
    return set(filter_repo_objects(SD15_REPO_FILES, allow_patterns=hub_patterns(variant)))


def test_hub_patterns_fetch_only_what_the_pipeline_needs():
    plain = fetched(None)
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json",
            "tokenizer/merges.txt", "scheduler/scheduler_config.json", "text_encoder/model.safetensors",
            "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json"} <= plain
    fp16 = fetched("fp16")
    assert {"unet/diffusion_pytorch_model.fp16.safetensors", "text_encoder_2/model.safetensors.index.fp16.json",
            "text_encoder_2/model-00001-of-00002.fp16.safetensors"} <= fp16
    for files, other in ((plain, ".fp16."), (fp16, "pytorch_model.safetensors")):
        assert not any(other in f for f in files)
    for f in plain | fp16:
        assert not f.endswith((".bin", ".ckpt", ".msgpack", ".onnx")), f
        assert f.split("/")[0] not in ("safety_checker", "feature_extractor"), f
        assert "/" in f or f == "model_index.json", f  # no single-file checkpoints at the top


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    make_reference("sd1").save_pretrained(path / "unet")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return path


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_hub_cache(folder, root, repo="org/tiny-sd", rev="0123456789abcdef0123456789abcdef01234567"):
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / rev)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    return repo


def test_repo_id_resolves_offline_from_the_hub_cache(folder, tmp_path, monkeypatch):
    repo = make_hub_cache(folder, tmp_path / "hub")
    from_folder = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    from_hub = UNet2DConditionModel.from_pretrained(repo, subfolder="unet", local_files_only=True,
                                                    cache_dir=tmp_path / "hub")
    assert same_weights(from_folder, from_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the environment variable alone also keeps it offline
    assert resolve(repo, cache_dir=tmp_path / "hub") == resolve(repo, local_files_only=True, cache_dir=tmp_path / "hub")
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        resolve("org/not-cached", cache_dir=tmp_path / "hub")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        resolve(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="missing component folder"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")


def test_variant_and_shards_load_the_same_weights(folder, tmp_path):
    ref = make_reference("sd1")
    ref.save_pretrained(tmp_path / "variant" / "unet", variant="fp16")
    ref.save_pretrained(tmp_path / "sharded" / "unet", max_shard_size="100KB")
    assert len(weight_files(tmp_path / "sharded" / "unet")) > 1
    base = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    assert same_weights(base, UNet2DConditionModel.from_pretrained(tmp_path / "variant", subfolder="unet",
                                                                   variant="fp16"))
    assert same_weights(base, UNet2DConditionModel.from_pretrained(tmp_path / "sharded", subfolder="unet"))


def test_dtype_and_device(folder):
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in unet.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in unet.parameters())


def broken_copy(folder, tmp_path, edit):
    shutil.copytree(folder / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("conv_in.weight"), "1 missing keys: conv_in.weight"),
    (lambda s: s.update(extra=torch.zeros(1)), "1 unexpected keys: extra"),
    (lambda s: s.update({"conv_in.bias": torch.zeros(5)}), r"conv_in.bias: file \(5,\) vs model \(32,\)"),
])
def test_strict_loading_names_file_and_keys(folder, tmp_path, edit, message):
    path = broken_copy(folder, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert str(path) in str(e.value)


def test_truncated_safetensors_is_refused(folder, tmp_path):
    shutil.copytree(folder / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")


def test_pickle_weights_are_refused(tmp_path):
    make_reference("sd1").save_pretrained(tmp_path / "unet", safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(CheckpointError, match="pickle.*execute arbitrary code"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
