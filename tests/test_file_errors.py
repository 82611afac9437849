"""Broken checkpoint files are refused in one line that names the file (issue 24, items 7 and 9):
model_index.json, tokenizer files, and JSON holding integers Python will not parse."""

import json
import shutil
import struct

import pytest
from conftest import ROOT

from mini_tgate import CheckpointError, load_pipeline
from mini_tgate.core.weights import read_header

TINY = ROOT / "weights" / "tiny-random"


@pytest.fixture
def ckpt(tmp_path):
    return shutil.copytree(TINY, tmp_path / "ckpt")


def refused(folder, path, message):
    with pytest.raises(CheckpointError) as e:
        load_pipeline(folder)
    text = str(e.value)
    assert text.startswith(str(path)) and "\n" not in text and len(text) < 300 + len(str(path))
    assert message in text, text


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(_class_name={"a": 1}), "_class_name must be the pipeline's class name"),
    (dict(_class_name=["StableDiffusionPipeline"]), "_class_name must be the pipeline's class name"),
    (dict(unet="x"), "unet must be a [library, class] pair"),
    (dict(vae=["diffusers"]), "vae must be a [library, class] pair"),
])
def test_model_index_of_the_wrong_shape(ckpt, changes, message):
    edit_json(ckpt / "model_index.json", **changes)
    refused(ckpt, ckpt / "model_index.json", message)


@pytest.mark.parametrize("token", [5, ["<|startoftext|>"], {"text": "<|startoftext|>"}])
def test_special_token_of_the_wrong_type(ckpt, token):
    path = ckpt / "tokenizer" / "tokenizer_config.json"
    edit_json(path, bos_token=token)
    refused(ckpt, path, "special token")


@pytest.mark.parametrize("name, text, message", [
    ("vocab.json", '{"a": "b"}', "the vocabulary must be an object of token -> id"),
    ("vocab.json", '{"a": -1}', "the vocabulary must be an object of token -> id"),
    ("merges.txt", "#version: 0.2\na b c\n", "merges are not two symbols"),
    ("merges.txt", "#version: 0.2\nqqqq zzzz\n", "out of vocabulary"),
])
def test_malformed_vocabulary_or_merges(ckpt, name, text, message):
    (ckpt / "tokenizer" / name).write_text(text)
    refused(ckpt, ckpt / "tokenizer" / ("vocab.json" if "vocabulary" in message else name), message)


def test_an_integer_of_5001_digits_in_a_config(ckpt):
    path = ckpt / "unet" / "config.json"
    path.write_text(path.read_text().replace('"sample_size": 16', '"sample_size": 1' + "0" * 5000))
    refused(ckpt, path, "not valid JSON")


def test_an_integer_of_5001_digits_in_a_safetensors_header(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b'], "data_offsets": [0, 4]}}'
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(CheckpointError, match=f"{path}: not a readable safetensors file \\(its header is not JSON"):
        read_header(path)
