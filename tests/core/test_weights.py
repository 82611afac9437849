"""Checkpoint I/O: folders, hub cache (offline), variants, shards, strict loading, refusals."""

import hashlib
import json
import os
import shutil

import huggingface_hub
import pytest
import torch
from conftest import ROOT
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from safetensors.torch import load_file, save_file
from test_unet import make_reference

from mini_tgate.core.tokenizer import CLIPTokenizer
from mini_tgate.core.unet import UNet2DConditionModel
from mini_tgate.core.weights import (MAX_JSON_BYTES, CheckpointError, hub_patterns, resolve, snapshot_commit,
                                     weight_files)
from mini_tgate.formats.hub import model_hash

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


# ----------------------------------------------------------------------------- hub downloads

CLIP = ROOT / "mini_tgate" / "clip"

# A repo whose UNet has diffusers-style fp16 shards, whose text encoder has transformers-style
# ones, and whose VAE has no fp16 file at all.
VARIANT_REPO_FILES = """model_index.json scheduler/scheduler_config.json unet/config.json
unet/diffusion_pytorch_model.safetensors.index.json unet/diffusion_pytorch_model-00001-of-00002.safetensors
unet/diffusion_pytorch_model-00002-of-00002.safetensors unet/diffusion_pytorch_model.safetensors.index.fp16.json
unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors
text_encoder/config.json text_encoder/model.safetensors text_encoder/model-00001-of-00002.fp16.safetensors
text_encoder/model-00002-of-00002.fp16.safetensors text_encoder/model.safetensors.index.fp16.json
vae/config.json vae/diffusion_pytorch_model.safetensors tokenizer/vocab.json tokenizer/merges.txt""".split()


def test_hub_patterns_variant_shards_and_fallback():
    plain = set(filter_repo_objects(VARIANT_REPO_FILES, allow_patterns=hub_patterns(None)))
    assert not any("fp16" in f for f in plain)  # diffusers' fp16 shards end in -0000N-of-0000N too
    fp16_files = {"unet/diffusion_pytorch_model.safetensors.index.fp16.json",
                  "unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
                  "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
                  "text_encoder/model-00001-of-00002.fp16.safetensors", "text_encoder/model.safetensors.index.fp16.json"}
    # Without the file list (offline: the cache decides), only the variant's files.
    fp16 = set(filter_repo_objects(VARIANT_REPO_FILES, allow_patterns=hub_patterns("fp16")))
    assert fp16_files <= fp16 and "vae/diffusion_pytorch_model.safetensors" not in fp16
    # With it, the VAE (no fp16 file) gets its plain weights, the others only their fp16 ones.
    listed = set(filter_repo_objects(VARIANT_REPO_FILES, allow_patterns=hub_patterns("fp16", repo_files=VARIANT_REPO_FILES)))
    assert fp16_files | {"vae/diffusion_pytorch_model.safetensors"} <= listed
    assert not {"unet/diffusion_pytorch_model-00001-of-00002.safetensors", "text_encoder/model.safetensors"} & listed


class FakeHub:
    """snapshot_download and HfApi.list_repo_files as the hub answers them, recording the calls."""

    def __init__(self, monkeypatch, folder, files=None, error=None):
        self.calls, self.folder, self.error = [], folder, error
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda api, repo, revision=None: files)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def snapshot_download(self, repo, **kwargs):
        self.calls.append(kwargs)
        if self.error:
            raise self.error
        return str(self.folder)


def test_hub_download_fetches_the_variant_fallback(monkeypatch, tmp_path):
    hub = FakeHub(monkeypatch, tmp_path, files=VARIANT_REPO_FILES)
    assert resolve("org/sd", variant="fp16", revision="v1.0") == tmp_path
    (kwargs,) = hub.calls
    assert kwargs["revision"] == "v1.0" and not kwargs["local_files_only"]
    fetched = set(filter_repo_objects(VARIANT_REPO_FILES, allow_patterns=kwargs["allow_patterns"]))
    assert {"vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors"} <= fetched


def test_component_from_pretrained_fetches_only_its_folder(monkeypatch, tmp_path):
    shutil.copytree(CLIP, tmp_path / "tokenizer")
    hub = FakeHub(monkeypatch, tmp_path)
    CLIPTokenizer.from_pretrained("org/sd", subfolder="tokenizer")
    with pytest.raises(CheckpointError):  # no unet/ in this fake snapshot: the call is what is checked
        UNet2DConditionModel.from_pretrained("org/sd", subfolder="unet", revision="abc")
    for kwargs, folder in zip(hub.calls, ("tokenizer/", "unet/")):
        assert all(p.startswith(folder) or p == "model_index.json" for p in kwargs["allow_patterns"])
    assert hub.calls[1]["revision"] == "abc"


def test_network_failure_says_the_hub_could_not_be_reached(monkeypatch, tmp_path):
    import httpx2  # huggingface_hub's HTTP client

    try:  # what snapshot_download raises when the connection fails and the cache lacks the repo
        raise LocalEntryNotFoundError("cannot find the appropriate snapshot folder") from httpx2.ConnectError("down")
    except LocalEntryNotFoundError as e:
        error = e
    FakeHub(monkeypatch, tmp_path, error=error)
    with pytest.raises(CheckpointError, match="org/sd: the hub could not be reached") as e:
        resolve("org/sd")
    assert "downloading is off" not in str(e.value)
    FakeHub(monkeypatch, tmp_path, error=httpx2.ConnectTimeout("timed out"))
    with pytest.raises(CheckpointError, match="the hub could not be reached"):
        resolve("org/sd")


def test_mistyped_local_path_is_not_a_hub_error(monkeypatch, tmp_path):
    (tmp_path / "weights" / "tiny-shapes").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    FakeHub(monkeypatch, tmp_path, error=AssertionError("the hub must not be asked"))
    for path in ("weights/tiny-shapez", "./weights/tiny-shapez", "~/no-such-folder-here/x"):
        with pytest.raises(CheckpointError, match="no such folder"):
            resolve(path)


REV_A, REV_B = "a" * 40, "b" * 40


def test_revision_and_snapshot_commit(folder, tmp_path):
    repo = make_hub_cache(folder, tmp_path, rev=REV_A)
    repo_dir = tmp_path / "models--org--tiny-sd"
    shutil.copytree(folder, repo_dir / "snapshots" / REV_B)
    (repo_dir / "refs" / "v2").write_text(REV_B)  # a tag
    kw = dict(local_files_only=True, cache_dir=tmp_path)
    assert snapshot_commit(resolve(repo, **kw)) == REV_A  # refs/main
    assert snapshot_commit(resolve(repo, revision="v2", **kw)) == REV_B
    assert snapshot_commit(resolve(repo, revision=REV_A, **kw) / "unet") == REV_A  # a component folder too
    assert snapshot_commit(folder) is None
    unet = UNet2DConditionModel.from_pretrained(repo, subfolder="unet", revision="v2", **kw)
    assert same_weights(unet, UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))
    with pytest.raises(CheckpointError, match="not in the local hub cache"):
        resolve(repo, revision="v3", **kw)


def test_symlinked_hub_cache_with_shards_loads_and_hashes(tmp_path):
    """The hub cache's layout: snapshot files are symlinks to blobs/<sha256> (LFS files)."""
    make_reference("sd1").save_pretrained(tmp_path / "plain" / "unet", max_shard_size="200KB")
    repo_dir = tmp_path / "hub" / "models--org--sharded"
    snapshot = repo_dir / "snapshots" / REV_A
    (repo_dir / "blobs").mkdir(parents=True)
    (snapshot / "unet").mkdir(parents=True)
    digests = []
    for f in sorted((tmp_path / "plain" / "unet").iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo_dir / "blobs" / sha)
        os.symlink(f"../../../blobs/{sha}", snapshot / "unet" / f.name)
        if f.suffix == ".safetensors":
            digests.append(sha)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REV_A)
    assert len(digests) > 1
    unet = UNet2DConditionModel.from_pretrained("org/sharded", subfolder="unet", local_files_only=True,
                                                cache_dir=tmp_path / "hub")
    assert same_weights(unet, UNet2DConditionModel.from_pretrained(tmp_path / "plain", subfolder="unet"))
    # Sharded: the SHA-256 of the shards' digests, one per line, in file-name order.
    expected = hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()[:10]
    assert model_hash(snapshot) == model_hash(tmp_path / "plain") == expected


def test_model_hash_is_a1111s_short_sha256(folder, tmp_path):
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert model_hash(weights) == model_hash(folder) == sha[:10]
    # A hub blob's name is its content's SHA-256: it is taken as it is, the file is not read.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / ("c" * 64)).write_bytes(b"not read")
    os.symlink(tmp_path / "blobs" / ("c" * 64), tmp_path / "model.safetensors")
    assert model_hash(tmp_path / "model.safetensors") == "c" * 10
    with pytest.raises(CheckpointError, match="no such file or folder"):
        model_hash(tmp_path / "nope.safetensors")
    make_reference("sd1").save_pretrained(tmp_path / "fp16" / "unet", variant="fp16")
    fp16 = tmp_path / "fp16" / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert model_hash(tmp_path / "fp16", variant="fp16") == hashlib.sha256(fp16.read_bytes()).hexdigest()[:10]


def test_torch_dtype_is_an_alias_of_dtype(folder):
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float16)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    same = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float16, torch_dtype=torch.float16)
    assert same_weights(unet, same)
    with pytest.raises(ValueError, match="disagree"):
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.bfloat16, torch_dtype=torch.float16)


# ----------------------------------------------------------------------------- hostile files

def sharded_copy(tmp_path):
    make_reference("sd1").save_pretrained(tmp_path / "m" / "unet", max_shard_size="200KB")
    return tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors.index.json"


def test_variant_shards_load(folder, tmp_path):
    make_reference("sd1").save_pretrained(tmp_path / "unet", variant="fp16", max_shard_size="200KB")
    assert len(weight_files(tmp_path / "unet", "fp16")) > 1
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet", variant="fp16")
    assert same_weights(unet, UNet2DConditionModel.from_pretrained(folder, subfolder="unet"))


def test_shard_index_cannot_read_outside_the_folder(tmp_path):
    index = sharded_copy(tmp_path)
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"  # a perfectly good shard, but not in the model folder
    shutil.move(index.parent / first, outside)
    for name in ("../../outside.safetensors", str(outside)):
        index.write_text(json.dumps({"weight_map": {k: name if v == first else v for k, v in data["weight_map"].items()}}))
        with pytest.raises(CheckpointError, match="outside the model folder"):
            UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")


@pytest.mark.parametrize("content, message", [
    ([], "must hold a JSON object"),
    ({"weight_map": ["a.safetensors"]}, "weight_map must be a non-empty object"),
    ({"weight_map": {}}, "weight_map must be a non-empty object"),
    ({"weight_map": {"conv_in.weight": 3}}, "weight_map values must be file names, got 3"),
    ({"weight_map": {"conv_in.weight": ["a"]}}, "weight_map values must be file names"),
])
def test_shard_index_of_the_wrong_shape(tmp_path, content, message):
    index = sharded_copy(tmp_path)
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=message) as e:
        UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")
    assert str(index) in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    (" " * MAX_JSON_BYTES + "{}", "larger than 16 MiB"),
    ('"unet"', "must hold a JSON object"),
    ("3", "must hold a JSON object"),
], ids=["nested", "huge", "string", "number"])
def test_config_json_of_the_wrong_shape(folder, tmp_path, text, message):
    shutil.copytree(folder / "unet", tmp_path / "unet")
    (tmp_path / "unet" / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as e:
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    assert str(tmp_path / "unet" / "config.json") in str(e.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_integer_weights_are_refused(folder, tmp_path, dtype):
    path = broken_copy(folder, tmp_path, lambda s: s.update({"conv_in.bias": s["conv_in.bias"].to(dtype)}))
    with pytest.raises(CheckpointError, match=f"{path}: tensor conv_in.bias is {str(dtype)[6:]}; "
                                              "model weights must be floating point"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
