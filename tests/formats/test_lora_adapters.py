"""diffusers' adapter habits on merged LoRAs: set_adapters, get_active_adapters, delete_adapters,
fuse_lora / unfuse_lora (and fuse + unload keeping the LoRA) and cross_attention_kwargs={"scale": s},
each against diffusers + PEFT on the tiny SD checkpoint with UNet LoRAs; text-encoder LoRAs at
other weights against transformers' CLIPTextModel with the weights merged by hand from the
file's tensors; every re-merge exact (bit-equal to a fresh load at the same weights)."""

import pytest
import torch
import transformers
from test_lora import images, kohya_sd_lora, max_diff, peft_lora, reference, save
from tiny_models import save_sd

from mini_tgate.loading import load_pipeline

pytest.importorskip("peft")

TOLERANCE = 1e-3  # the images' largest difference to diffusers' (values in [0, 1])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_thread):
    return save_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def loras(folder, tmp_path_factory):
    """Two UNet-only LoRAs (diffusers/PEFT names and kohya names with alphas) and a whole one."""
    base, where = reference(folder), tmp_path_factory.mktemp("loras")
    unet_only = {k: v for k, v in kohya_sd_lora(base, seed=21).items() if k.startswith("lora_unet_")}
    return {"a": save(where, peft_lora(base, seed=20, text=False), "a.safetensors"),
            "b": save(where, unet_only, "b.safetensors"),
            "text": save(where, peft_lora(base, seed=22, unet=False), "text.safetensors")}


@pytest.fixture
def sd(folder):
    return load_pipeline(folder)


def both(folder, loras, sd):
    ref = reference(folder)
    for name in ("a", "b"):
        ref.load_lora_weights(str(loras[name]), adapter_name=name)
        sd.load_lora_weights(loras[name], adapter_name=name)
    return ref


def same_images(ref, sd, **kw):
    diff = max_diff(images(ref, diffusers_pipe=True, **kw), images(sd, **kw))
    assert diff <= TOLERANCE, diff
    return diff


def unet_weights(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_set_adapters_and_get_active_adapters(folder, loras, sd):
    ref = both(folder, loras, sd)
    # as diffusers: the LoRA loaded last is the active one until set_adapters names several
    assert sd.get_active_adapters() == ref.get_active_adapters() == ["b"]
    same_images(ref, sd)
    for names, weights in ((["a", "b"], [0.7, -0.4]), ("b", 0.5), (["b", "a"], None), (["a"], [{"unet": 0.3}])):
        ref.set_adapters(names, adapter_weights=weights)
        sd.set_adapters(names, adapter_weights=weights)
        assert sd.get_active_adapters() == ref.get_active_adapters()
        same_images(ref, sd)
    assert sd.get_list_adapters() == ref.get_list_adapters() == {"unet": ["a", "b"]}


def test_delete_adapters(folder, loras, sd):
    fresh = unet_weights(load_pipeline(folder))
    ref = both(folder, loras, sd)
    ref.set_adapters(["a", "b"], [0.7, -0.4])
    sd.set_adapters(["a", "b"], [0.7, -0.4])
    ref.delete_adapters("a")
    sd.delete_adapters("a")
    assert sd.get_active_adapters() == ref.get_active_adapters() == ["b"]
    same_images(ref, sd)
    sd.delete_adapters(["b"])
    assert sd.lora_adapters == {} and sd.lora_originals == {}
    assert all(torch.equal(v, fresh[k]) for k, v in unet_weights(sd).items())


def test_fuse_unfuse_and_fuse_then_unload(folder, loras, sd):
    ref = both(folder, loras, sd)
    ref.set_adapters(["a", "b"], [0.7, -0.4])
    sd.set_adapters(["a", "b"], [0.7, -0.4])
    unfused = images(sd)
    ref.fuse_lora(lora_scale=0.5)
    sd.fuse_lora(lora_scale=0.5)
    same_images(ref, sd)
    ref.unfuse_lora()
    sd.unfuse_lora()
    same_images(ref, sd)  # unfused, at 0.35 and -0.2: diffusers keeps lora_scale in the weights
    assert sd.lora_adapters == {"a": (str(loras["a"]), 0.35), "b": (str(loras["b"]), -0.2)}
    ref.set_adapters(["a", "b"], [0.7, -0.4])
    sd.set_adapters(["a", "b"], [0.7, -0.4])
    assert max_diff(unfused, images(sd)) == 0  # exact: merged again from the originals
    ref.fuse_lora(lora_scale=0.5, adapter_names=["a"])
    sd.fuse_lora(lora_scale=0.5, adapter_names=["a"])
    same_images(ref, sd)  # a fused at 0.35; b, unfused, skipped where a is fused (PEFT)
    ref.unload_lora_weights()
    sd.unload_lora_weights()  # diffusers keeps what was fused
    assert sd.lora_adapters == {} and sd.get_active_adapters() == []
    same_images(ref, sd)


def test_cross_attention_kwargs_scale(folder, loras, sd):
    ref = both(folder, loras, sd)
    ref.set_adapters(["a", "b"], [0.7, -0.4])
    sd.set_adapters(["a", "b"], [0.7, -0.4])
    at_one = images(sd)
    same_images(ref, sd, cross_attention_kwargs={"scale": 0.5})
    assert max_diff(at_one, images(sd)) == 0  # the next call, without it, at scale 1 again, exactly
    ref.fuse_lora(adapter_names=["a"])
    sd.fuse_lora(adapter_names=["a"])
    same_images(ref, sd, cross_attention_kwargs={"scale": 0.0})  # a fused ignores the scale: b off


def text_states(sd, scale=None):
    """The prompt's states as a call encodes them (the call's LoRA scale merged first)."""
    kw = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    cond, _ = sd.encode_prompt(["a red circle"], None, False, 64, 64, "cpu", **kw)
    return cond["encoder_hidden_states"]


def test_text_encoder_lora_weights_against_a_hand_merge(folder, loras, sd):
    """W = W0 + weight x scale x alpha / rank x up @ down on transformers' CLIPTextModel, from the
    file's tensors (alpha = rank: no metadata), against ours after set_adapters and with a call scale."""
    from safetensors.torch import load_file

    tensors = load_file(loras["text"])
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tok(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def hand_merged(factor):
        encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
        modules = dict(encoder.named_modules())
        with torch.no_grad():
            for key, down in tensors.items():
                if key.endswith(".lora_A.weight"):
                    path = key.removeprefix("text_encoder.").removesuffix(".lora_A.weight")
                    path = path if path in modules else path.removeprefix("text_model.")
                    up = tensors[key.replace("lora_A", "lora_B")]
                    modules[path].weight += factor * (up @ down)  # alpha / rank = 1
            return encoder(ids).last_hidden_state

    sd.load_lora_weights(loras["text"], adapter_name="t")
    for factor, call in ((1.0, None), (0.6, None), (0.6, 0.5)):
        if factor != 1.0:
            sd.set_adapters("t", factor)
        want = hand_merged(factor * (call or 1.0))
        got = text_states(sd, call)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_remerging_is_exact_and_never_drifts(folder, loras, sd):
    fresh = load_pipeline(folder)
    fresh.load_lora_weights(loras["a"], scale=0.7, adapter_name="a")
    want = unet_weights(fresh)
    sd.load_lora_weights(loras["a"], adapter_name="a")
    sd.load_lora_weights(loras["b"], adapter_name="b")
    for _ in range(3):
        sd.set_adapters(["a", "b"], [0.3, 2.0])
        sd.set_adapters("a", 0.7)
    assert all(torch.equal(v, want[k]) for k, v in unet_weights(sd).items())


def test_misuse_is_one_line_and_changes_nothing(loras, sd):
    sd.load_lora_weights(loras["a"], adapter_name="a")
    before = unet_weights(sd)
    for call, error, message in (
            (lambda: sd.set_adapters(["x"]), ValueError, r"adapter_names: 'x' not loaded \(loaded: a\)"),
            (lambda: sd.set_adapters(["a"], [1.0, 2.0]), ValueError, "2 adapter_weights for 1 adapters"),
            (lambda: sd.set_adapters("a", {"unet": {"down": 1.0}}), ValueError, "per-block weights"),
            (lambda: sd.set_adapters("a", {"text_encoder": 1.0}), ValueError, "'text_encoder' is not a part it adapts"),
            (lambda: sd.set_adapters("a", float("nan")), ValueError, "weight must be a finite number"),
            (lambda: sd.delete_adapters("b"), ValueError, "'b' not loaded"),
            (lambda: sd.fuse_lora(components=["vae"]), ValueError, "'vae' is not a part of this pipeline"),
            (lambda: sd.fuse_lora(lora_scale=1e9), ValueError, "lora_scale must be a finite number"),
            (lambda: sd("x", cross_attention_kwargs={"scale": 0.5, "foo": 1}), ValueError, "only 'scale'"),
            (lambda: sd("x", cross_attention_kwargs={"scale": "big"}), ValueError, r"\['scale'\] must be a finite")):
        with pytest.raises(error, match=message) as e:
            call()
        assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in unet_weights(sd).items())
    assert sd.get_active_adapters() == ["a"]
    with pytest.warns(UserWarning, match="already fused"):
        sd.fuse_lora()
        sd.fuse_lora()
