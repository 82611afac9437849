"""A1111's prompt tags <lora:NAME> and <lora:NAME:MULTIPLIER> with --lora-dir, in `generate` and
`batch`: a tagged prompt makes exactly the image of the untagged prompt with --lora
DIR/NAME.safetensors:MULTIPLIER (which test_lora.py checks against diffusers), the PNG keeps the
tags in its prompt as A1111 writes it; the parsing follows A1111's modules/extra_networks.py
(regex <(\\w+):([^>]+)>, arguments split at ':', multiplier 1 by default) and its
extensions-builtin/Lora/networks.py (a name tagged twice is applied twice at its last multiplier);
bad tags are one line on stderr before the model loads. As in A1111, only prompts are read for
tags: in a negative prompt a tag is text."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from tiny_models import save_sd

from mini_tgate import cli as cli
from mini_tgate.cli import main, prompt_tags
from mini_tgate.cli.loras import untagged
from mini_tgate.formats.png import read_png_text

PROMPT = "a red circle on a blue background"
NAME = "my style.v2"  # A1111 names may hold spaces and dots
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def lora_dir(model, tmp_path_factory):
    """A random kohya-format LoRA (non-zero up weights) on the tiny UNet's attention and
    projection layers, named from diffusers' own module names."""
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    g, sd = torch.Generator().manual_seed(0), {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                t in name for t in ("attn1.to_q", "attn2.to_v", "attn1.to_out.0", "proj_in", "ff.net.2")):
            flat = "lora_unet_" + name.replace(".", "_")
            w = m.weight
            sd[f"{flat}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.3
            sd[f"{flat}.lora_up.weight"] = torch.randn(w.shape[0], 2, *(1,) * (w.ndim - 2), generator=g) * 0.3
            sd[f"{flat}.alpha"] = torch.tensor(2.0)
    assert sd
    folder = tmp_path_factory.mktemp("loras")
    save_file(sd, folder / f"{NAME}.safetensors")
    save_file({k: v * 0.5 if v.ndim else v for k, v in sd.items()}, folder / "other.safetensors")
    return folder


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def addnet_hash(stem):
    """A1111's short LoRA hash, computed here from its definition (modules/hashes.py,
    addnet_hash_safetensors): the SHA-256 of the file after its header, 12 hex digits."""
    data = Path(f"{stem}.safetensors").read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def generate(model, out, *args):
    rc = main(["generate", *args, "--model", str(model), "--steps", "3", "--seed", "5", "--no-tgate",
               "--out", str(out)])
    assert rc == 0
    return pixels(out)


# ----------------------------------------------------------------------------- parsing

def test_tags_parsed_as_a1111_does():
    assert prompt_tags(f"a <lora:{NAME}:0.5>, b <lora:other:-1>") == [(NAME, 0.5), ("other", -1.0)]
    assert prompt_tags("<lora:other>") == [("other", 1.0)]
    # A1111 lists a name once per tag, one object whose multiplier the last tag set: applied twice at 0.8
    assert prompt_tags("<lora:a:0.2> x <lora:b> <lora:a:0.8>") == [("a", 0.8), ("b", 1.0), ("a", 0.8)]
    # the tag goes, the text around it stays (A1111's re.sub(..., "", prompt))
    assert untagged(f"a cat, <lora:{NAME}:0.5>, blue") == "a cat, , blue"
    for plain in ["a < b", "i <3 cats", "<lora>", "<lora:", "< lora:x>", "a <b c:d>", "x <:y>"]:
        assert prompt_tags(plain) == [] and untagged(plain) == plain, plain


# ----------------------------------------------------------------------------- generate

def test_tag_makes_the_image_of_the_lora_option(model, lora_dir, tmp_path, capsys):
    tag, negative = f"<lora:{NAME}:0.7>", "blurry"
    got = generate(model, tmp_path / "tag.png", f"{PROMPT} {tag}", "--negative", negative, "--lora-dir", str(lora_dir))
    want = generate(model, tmp_path / "option.png", PROMPT, "--negative", negative,
                    "--lora", f"{lora_dir / NAME}.safetensors:0.7")
    plain = generate(model, tmp_path / "plain.png", PROMPT, "--negative", negative)
    assert np.array_equal(got, want)
    assert np.abs(got.astype(int) - plain).max() > 10  # the LoRA does change the image
    text = read_png_text(tmp_path / "tag.png")
    assert text["parameters"].split("\n")[:2] == [f"{PROMPT} {tag}", f"Negative prompt: {negative}"]
    params = json.loads(text["mini_tgate"])
    assert params["loras"] == [{"lora": f"{lora_dir / NAME}.safetensors", "scale": 0.7}]
    # A1111's "Lora hashes": the tag's NAME and the addnet hash, quoted as A1111 quotes the value
    assert f'RNG: CPU, Lora hashes: "{NAME}: {addnet_hash(lora_dir / NAME)}", ' in text["parameters"]
    assert params["lora_hashes"] == json.loads(read_png_text(tmp_path / "option.png")["mini_tgate"])["lora_hashes"]


def test_a_tag_in_a_negative_prompt_is_text(model, lora_dir, tmp_path):
    """A1111 reads extra-network tags from the prompts alone: in a negative prompt a tag merges
    nothing and reaches the text encoder as it is, with or without --lora-dir."""
    negative = f"<lora:{NAME}:0.7> blurry"
    got = generate(model, tmp_path / "tag.png", PROMPT, "--negative", negative, "--lora-dir", str(lora_dir))
    assert np.array_equal(got, generate(model, tmp_path / "plain.png", PROMPT, "--negative", negative))
    assert not np.array_equal(got, generate(model, tmp_path / "stripped.png", PROMPT, "--negative", " blurry"))
    assert "loras" not in json.loads(read_png_text(tmp_path / "tag.png")["mini_tgate"])


def test_same_name_twice_is_merged_twice_at_the_last_multiplier(model, lora_dir, tmp_path):
    got = generate(model, tmp_path / "tag.png", f"{PROMPT} <lora:other:0.1> <lora:other:0.4>",
                   "--lora-dir", str(lora_dir))
    path = lora_dir / "other.safetensors"
    want = generate(model, tmp_path / "option.png", PROMPT, "--lora", f"{path}:0.4", "--lora", f"{path}:0.4")
    assert np.array_equal(got, want)


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def refused(lora_dir, monkeypatch, capsys):
    """`generate ARGS` must end before loading, in one `error:` line: that line."""
    monkeypatch.setattr(cli.options, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))

    def run(*args, lora_dir_option=True):
        rc = main(["generate", *args, "--out", str(lora_dir.parent / "never.png")]
                  + ["--lora-dir", str(lora_dir)] * lora_dir_option)
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1, err
        return err
    return run


def test_bad_tags_are_refused_before_loading(refused, lora_dir):
    assert "LoRA tags need --lora-dir" in refused(f"a <lora:{NAME}>", lora_dir_option=False)
    for name in ["../loras/other", "sub/../../x", str(lora_dir / "other"), "/etc/passwd"]:
        assert "a tag names a file in --lora-dir (no absolute path, no '..')" in refused(f"a <lora:{name}:0.5>")
    err = refused("a <lora:missing:0.5>")
    assert f"no file '{lora_dir / 'missing.safetensors'}'" in err and "other" not in err and NAME not in err
    for value in ["nan", "inf", "-inf"]:
        assert f"<lora:other:{value}>: the multiplier must be a finite number" in refused(f"a <lora:other:{value}>")
    assert "the multiplier 'x' is not a number" in refused("a <lora:other:x>")
    assert "separate text encoder and UNet multipliers" in refused("a <lora:other:0.5:1>")
    assert "<hypernet:...> extra networks are not supported" in refused("a <hypernet:agm:1.1>")
    assert "<embedding:...> extra networks are not supported" in refused("a <embedding:x>")
    assert "--lora-dir nowhere: no such folder" in refused("a", "--lora-dir", "nowhere", lora_dir_option=False)


def test_prompts_naming_other_loras_are_refused(refused):
    err = refused("a <lora:other:0.5>", "b <lora:other:0.6>")
    assert "prompt 2 names other LoRAs than prompt 1 (<lora:other:0.6>, not <lora:other:0.5>)" in err
    err = refused("a <lora:other>", "b <lora:other> <lora:other>")
    assert "prompt 2 names other LoRAs than prompt 1 (<lora:other:1> <lora:other:1>, not <lora:other:1>)" in err
    assert "prompt 2 names other LoRAs" in refused("a <lora:other>", "b")


# ----------------------------------------------------------------------------- batch

def test_batch_tags_match_the_lora_option_and_reruns_check_them(model, lora_dir, tmp_path, capsys):
    tag = f"<lora:{NAME}:0.7>"
    (tmp_path / "tagged.txt").write_text(f"{PROMPT} {tag}\na yellow square on a green background {tag}\n")
    (tmp_path / "plain.txt").write_text(f"{PROMPT}\na yellow square on a green background\n")
    options = ["--model", str(model), "--steps", "3", "--seed", "5", "--batch-size", "2"]
    assert main(["batch", str(tmp_path / "tagged.txt"), "--out", str(tmp_path / "tagged"), "--lora-dir", str(lora_dir),
                 *options]) == 0
    assert main(["batch", str(tmp_path / "plain.txt"), "--out", str(tmp_path / "option"),
                 "--lora", f"{lora_dir / NAME}.safetensors:0.7", *options]) == 0
    for name in ("00000.png", "00001.png"):
        assert np.array_equal(pixels(tmp_path / "tagged" / name), pixels(tmp_path / "option" / name))
    assert read_png_text(tmp_path / "tagged" / "00000.png")["parameters"].startswith(f"{PROMPT} {tag}\n")
    records = [json.loads(line) for line in (tmp_path / "tagged" / "manifest.jsonl").read_text().splitlines()]
    assert records[1]["prompt"] == f"a yellow square on a green background {tag}"
    assert records[1]["parameters"]["loras"] == [{"lora": f"{lora_dir / NAME}.safetensors", "scale": 0.7}]
    assert records[1]["parameters"]["lora_hashes"] == {NAME: addnet_hash(lora_dir / NAME)}
    capsys.readouterr()
    # a rerun with the LoRAs from another folder is refused, naming it
    other = tmp_path / "other-loras"
    other.mkdir()
    (other / f"{NAME}.safetensors").write_bytes((lora_dir / "other.safetensors").read_bytes())
    assert main(["batch", str(tmp_path / "tagged.txt"), "--out", str(tmp_path / "tagged"), "--lora-dir", str(other),
                 *options]) == 1
    assert f"other options: --lora-dir '{lora_dir}' (now '{other}')" in capsys.readouterr().err


def test_batch_lines_naming_other_loras_are_refused(lora_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.options, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a <lora:other>"}\n\n{"prompt": "b <lora:other> <lora:other:2>", "negative": "<lora:x>"}\n')
    assert main(["batch", str(path), "--out", str(tmp_path / "o"), "--lora-dir", str(lora_dir)]) == 1
    err = capsys.readouterr().err
    assert "error: p.jsonl line 3 names other LoRAs than p.jsonl line 1 (<lora:other:2> <lora:other:2>, " \
           "not <lora:other:1>)" in err
    path = tmp_path / "p.txt"
    path.write_text("a <lora:other>\nb <hypernet:x>\n")
    assert main(["batch", str(path), "--out", str(tmp_path / "o"), "--lora-dir", str(lora_dir)]) == 1
    assert "<hypernet:...> extra networks are not supported" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
