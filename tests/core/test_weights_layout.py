"""The same weights give the same bits from any file (issue 21).

CPU kernels take different paths on differently aligned data, so a weight that sits at its
file offset (a memory map) computes differently from the same weight read from a file whose
layout differs. Every loaded tensor must be a fresh allocation of its own, whatever the file."""

import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT
from safetensors.torch import save_file

import mini_tgate
from mini_tgate.core.unet import UNet2DConditionModel
from mini_tgate.core.weights import read_header

SOURCE = ROOT / "weights" / "tiny-shapes"  # trained weights: a gated image depends on every bit
ALIGNMENT = torch.empty(1).data_ptr() % 64  # 0: torch aligns every CPU allocation to 64 bytes


def offsets(path):
    """name -> offset of the tensor's first byte in the file, modulo 64."""
    header = read_header(path)
    return {k: (header.data_start + begin) % 64 for k, (_, _, begin, _) in header.tensors.items()}


def shifted_copy(path, out, pad):
    """The same tensors written with `pad` more bytes of metadata: every data offset moves."""
    header = read_header(path)
    tensors, _ = mini_tgate.core.weights.read_file(path, 2**40, 10**6, "file")
    save_file(tensors, out, metadata={"format": "pt", "pad": "x" * pad, **header.metadata})


def assert_fresh(model, name):
    """Every parameter and buffer owns its storage from byte 0, aligned as a fresh allocation."""
    for k, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.data_ptr() % 64 == ALIGNMENT and t.storage_offset() == 0, f"{name}.{k}"
        assert t.untyped_storage().nbytes() == t.nbytes, f"{name}.{k} is a view of a larger storage"


@pytest.fixture(scope="module")
def float32_folder(tmp_path_factory):
    """tiny-shapes (float16 files) saved in float32: loaded in float32, nothing needs a cast."""
    folder = tmp_path_factory.mktemp("float32") / "tiny-shapes"
    mini_tgate.save_pipeline(mini_tgate.load_pipeline(SOURCE), folder)
    return folder


@pytest.fixture(scope="module")
def three_files(float32_folder, tmp_path_factory, one_thread):
    """The same float32 weights from three files: tiny-shapes' float16 files (cast), the float32
    folder and a copy of it whose every weights file has another layout."""
    copy = tmp_path_factory.mktemp("shifted") / "tiny-shapes"
    shutil.copytree(float32_folder, copy)
    for path in copy.rglob("*.safetensors"):
        shifted_copy(float32_folder / path.relative_to(copy), path, pad=20)
    for path in copy.rglob("*.safetensors"):  # the layouts differ: some tensor moved off its alignment
        before, after = offsets(float32_folder / path.relative_to(copy)), offsets(path)
        assert before.keys() == after.keys() and any(before[k] != after[k] for k in before), path
    return [mini_tgate.load_pipeline(f) for f in (SOURCE, float32_folder, copy)]


@pytest.mark.parametrize("gate", [None, mini_tgate.TGate(3, 2, 1, 1)], ids=["plain", "gated"])
def test_same_images_from_any_file(three_files, gate):
    first, *others = three_files
    kw = dict(num_inference_steps=6, guidance_scale=5.0, tgate=gate, progress=False)
    x = first("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    for other in others:
        for name in ("unet", "vae", "text_encoder"):
            sa, sb = getattr(first, name).state_dict(), getattr(other, name).state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
        y = other("a red circle", generator=torch.Generator().manual_seed(0), **kw).images
        assert np.array_equal(x, y), float(np.abs(x - y).max())


def test_loaded_weights_are_fresh_allocations(three_files):
    for pipe in three_files[1:]:  # float32 files read in float32: no cast copies them
        for name in ("unet", "vae", "text_encoder"):
            assert_fresh(getattr(pipe, name), name)
    # float16 files read in float16: no cast copies them either
    assert_fresh(UNet2DConditionModel.from_pretrained(SOURCE, subfolder="unet", dtype=torch.float16), "unet")


def test_a_file_rewritten_after_loading_changes_nothing(float32_folder, tmp_path):
    shutil.copytree(float32_folder / "unet", tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    path = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    start = read_header(path).data_start
    with open(path, "r+b") as f:  # in place: same inode, same size, every weight byte now 0xFF (NaN)
        f.seek(start)
        f.write(b"\xff" * (path.stat().st_size - start))
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
