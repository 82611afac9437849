"""LoRA misuse: files whose dtypes, values or scales the merge cannot take. Each is refused with
one line naming the file and the layer, and a refused LoRA leaves every parameter of the
pipeline bit-equal to before, also when it fails after some of its layers merged."""

import copy
import gc
import weakref

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import save_sd

from mini_tgate.core.weights import CheckpointError
from mini_tgate.loading import load_pipeline

# five Linear layers of the tiny SD UNet, (out, in) = (32, 32); kohya names them with `_` for `.`
LAYERS = [f"down_blocks.0.attentions.0.transformer_blocks.0.{name}"
          for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q")]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    return load_pipeline(save_sd(tmp_path_factory.mktemp("sd")))


@pytest.fixture
def sd(pipe):
    yield pipe
    pipe.unload_lora_weights()


def params(pipe):
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, name).state_dict().items()}


def assert_unchanged(pipe, before):
    after = params(pipe)
    assert after.keys() == before.keys()
    assert [k for k in after if not torch.equal(after[k], before[k])] == []


def kohya(alphas, rank=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    out = {}
    for path, alpha in zip(LAYERS, alphas):
        flat = "lora_unet_" + path.replace(".", "_")
        out[f"{flat}.lora_down.weight"] = torch.randn(rank, 32, generator=g).to(dtype)
        out[f"{flat}.lora_up.weight"] = torch.randn(32, rank, generator=g).to(dtype)
        out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def one_line_error(excinfo, *parts):
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message


def test_fifth_layer_overflowing_undoes_the_four_merged_before_it(sd, tmp_path):
    """alpha 3e38 (a finite float32) makes the 5th layer's merged weight inf; the four layers
    merged before it go back, bit for bit, and nothing is recorded as loaded."""
    path = tmp_path / "lora.safetensors"
    save_file(kohya([1, 1, 1, 1, 3e38]), path)
    before = params(sd)
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(path)
    one_line_error(e, str(path), f"unet.{LAYERS[4]}", "no longer finite")
    assert_unchanged(sd, before)
    assert sd.lora_adapters == {} and sd.lora_originals == {}


def test_failed_second_lora_keeps_the_first_and_unload_still_restores(sd):
    base = params(sd)
    sd.load_lora_weights(kohya([1] * 5), adapter_name="first")
    with_first = params(sd)
    with pytest.raises(CheckpointError, match="no longer finite"):
        sd.load_lora_weights(kohya([2, 2, 2, 2, 3e38]))
    assert_unchanged(sd, with_first)
    assert list(sd.lora_adapters) == ["first"]
    sd.unload_lora_weights()
    assert_unchanged(sd, base)


@pytest.mark.parametrize("scale", [1e30, -1e30, 1e300, 101])
def test_a_scale_beyond_the_bound_is_refused_naming_the_lora(sd, tmp_path, scale):
    """1e30 keeps the merged float32 weights finite, and the UNet's activations overflow: the
    generation would fail later, naming no LoRA."""
    before = params(sd)
    path = tmp_path / "big.safetensors"
    save_file(kohya([1] * 5), path)
    with pytest.raises(ValueError) as e:
        sd.load_lora_weights(path, scale=scale)
    one_line_error(e, str(path), "scale must be a finite number from -100 to 100", repr(scale))
    assert_unchanged(sd, before)
    assert getattr(sd, "lora_adapters", {}) == {}


def test_float8_lora_merges_as_its_exact_float32_values(sd):
    """Every float8 value is exactly a float32 one: the merge equals that of the upcast LoRA."""
    lora8 = kohya([1] * 5, dtype=torch.float8_e4m3fn)
    sd.load_lora_weights(lora8)
    merged8 = params(sd)
    sd.unload_lora_weights()
    sd.load_lora_weights({k: v.float() for k, v in lora8.items()})
    assert_unchanged(sd, merged8)


def test_float64_beyond_float32_is_refused_by_name(sd):
    lora = kohya([1] * 5, dtype=torch.float64)
    key = "lora_unet_" + LAYERS[2].replace(".", "_") + ".lora_up.weight"
    lora[key] = lora[key] * 1e300  # finite in float64, inf in float32
    before = params(sd)
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(lora)
    one_line_error(e, f"unet.{LAYERS[2]}", "up weight contains NaN or inf")
    assert_unchanged(sd, before)


def test_alpha_of_many_values_is_one_line(sd):
    lora = kohya([1] * 5)
    lora["lora_unet_" + LAYERS[0].replace(".", "_") + ".alpha"] = torch.ones(40, 40)
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(lora)
    one_line_error(e, f"unet.{LAYERS[0]}", "alpha must be one finite number", "(40, 40)")


@pytest.mark.parametrize("tensor", [torch.zeros(2, 32, device="meta"), torch.zeros(2, 32).to_sparse()])
def test_tensors_without_dense_data_are_refused(sd, tensor):
    lora = kohya([1] * 5)
    lora["lora_unet_" + LAYERS[0].replace(".", "_") + ".lora_down.weight"] = tensor
    with pytest.raises(TypeError, match="dense tensors holding data"):
        sd.load_lora_weights(lora)


@pytest.mark.parametrize("down, up", [((0, 32), (32, 0)), ((2, 32, 3, 3), (32, 2, 1, 1)), ((2, 32), (32, 2, 3, 3))])
def test_zero_rank_and_conv_shapes_on_a_linear_layer(sd, down, up):
    flat = "lora_unet_" + LAYERS[0].replace(".", "_")
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights({f"{flat}.lora_down.weight": torch.zeros(down), f"{flat}.lora_up.weight": torch.zeros(up)})
    one_line_error(e, f"unet.{LAYERS[0]}")


def test_tensor_count_is_bounded_before_reading(sd, tmp_path):
    """Bounded by the largest LoRAs in use (SDXL, every layer, kohya: ~3,000 tensors)."""
    from mini_tgate.formats import lora
    path = tmp_path / "many.safetensors"
    save_file({f"t{i}": torch.zeros(0) for i in range(lora.MAX_LORA_TENSORS + 1)}, path)
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(path)
    one_line_error(e, str(path), f"{lora.MAX_LORA_TENSORS + 1} tensors")


def test_metadata_size_is_bounded_before_parsing(sd, tmp_path):
    """diffusers' lora_adapter_metadata is a LoraConfig per model (kilobytes); a JSON list of
    megabytes would become gigabytes of Python objects."""
    from mini_tgate.formats import lora
    path = tmp_path / "meta.safetensors"
    save_file(kohya([1] * 5), path, metadata={"lora_adapter_metadata": "[" + "[]," * (lora.MAX_LORA_METADATA_BYTES // 3) + "[]]"})
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(path)
    one_line_error(e, str(path), "lora_adapter_metadata")


def test_numbers_too_large_for_a_float_are_refused(sd, tmp_path):
    """Python ints have no bound; float() of 10**400 overflows."""
    with pytest.raises(ValueError, match="scale must be a finite number"):
        sd.load_lora_weights(kohya([1] * 5), scale=10**400)
    path = tmp_path / "lora.safetensors"
    peft = {f"unet.{LAYERS[0]}.lora_A.weight": torch.ones(2, 32), f"unet.{LAYERS[0]}.lora_B.weight": torch.ones(32, 2)}
    save_file(peft, path, metadata={"lora_adapter_metadata": '{"unet.lora_alpha": 1' + "0" * 400 + "}"})
    with pytest.raises(CheckpointError) as e:
        sd.load_lora_weights(path)
    one_line_error(e, str(path), "alpha must be a finite number")


def test_a_numpy_scale_is_the_same_number(sd):
    import numpy as np
    sd.load_lora_weights(kohya([1] * 5), scale=np.float32(0.5))
    with_numpy = params(sd)
    sd.unload_lora_weights()
    sd.load_lora_weights(kohya([1] * 5), scale=0.5)
    assert_unchanged(sd, with_numpy)


def test_loading_from_a_step_callback_is_refused_and_changes_nothing(sd):
    """The callback runs under the call lock: merging there would change weights mid-generation."""
    before, errors = params(sd), []

    def callback(pipe, i, t, tensors):
        try:
            pipe.load_lora_weights(kohya([1] * 5))
        except RuntimeError as e:
            errors.append(str(e))
        return {}

    sd("a red circle", num_inference_steps=1, height=64, width=64, callback_on_step_end=callback)
    assert len(errors) == 1 and "called from inside one of its own calls" in errors[0]
    assert_unchanged(sd, before)
    assert getattr(sd, "lora_adapters", {}) == {}


LAYER_TE = "text_model.encoder.layers.0.self_attn.q_proj.weight"


def with_text_encoder(pipe):
    """kohya([1] * 5) and one layer of the text encoder (PEFT names: `text_encoder.` + its path)."""
    width = pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    layer = "text_encoder." + LAYER_TE.removesuffix(".weight")
    return {**kohya([1] * 5), f"{layer}.lora_A.weight": torch.randn(2, width, generator=g),
            f"{layer}.lora_B.weight": torch.randn(width, 2, generator=g)}


def another_unet(unet, lacks_the_layer):
    """Another fine-tune of the same UNet, or one without the first layer the LoRA touches."""
    new = copy.deepcopy(unet)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1)
    if lacks_the_layer:
        del new.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    return new


@pytest.mark.parametrize("lacks_the_layer", [False, True])
def test_unload_after_the_unet_was_replaced(sd, monkeypatch, lacks_the_layer):
    """The weights go back into the models they were taken from: the text encoder and the
    replaced UNet (the caller still holds it); the new UNet never had the LoRA and stays as given."""
    base = params(sd)
    sd.load_lora_weights(with_text_encoder(sd))
    assert not torch.equal(sd.text_encoder.state_dict()[LAYER_TE], base[f"text_encoder.{LAYER_TE}"])
    new = another_unet(sd.unet, lacks_the_layer)
    new_before = {k: v.clone() for k, v in new.state_dict().items()}
    monkeypatch.setattr(sd, "unet", new)
    sd.unload_lora_weights()
    assert sd.lora_adapters == {} and sd.lora_originals == {}
    after = new.state_dict()
    assert [k for k in new_before if not torch.equal(after[k], new_before[k])] == []
    monkeypatch.undo()
    assert_unchanged(sd, base)


def test_unload_after_the_replaced_unet_was_freed(sd, monkeypatch):
    base = params(sd)
    monkeypatch.setattr(sd, "unet", another_unet(sd.unet, False))
    sd.load_lora_weights(with_text_encoder(sd))
    new = another_unet(sd.unet, True)
    new_before = {k: v.clone() for k, v in new.state_dict().items()}
    merged_into = weakref.ref(sd.unet)
    sd.unet = new
    gc.collect()
    assert merged_into() is None  # the UNet the LoRA was merged into is freed
    sd.unload_lora_weights()
    assert sd.lora_adapters == {} and sd.lora_originals == {}
    after = new.state_dict()
    assert [k for k in new_before if not torch.equal(after[k], new_before[k])] == []
    assert torch.equal(sd.text_encoder.state_dict()[LAYER_TE], base[f"text_encoder.{LAYER_TE}"])


def test_loading_after_a_model_was_replaced_asks_to_unload_first(sd, monkeypatch):
    """The first LoRA's saved weights belong to the replaced UNet: the new one's would never be
    saved, and a LoRA merged into it could not be taken out. Refused before anything changes."""
    sd.load_lora_weights(kohya([1] * 5), adapter_name="first")
    monkeypatch.setattr(sd, "unet", another_unet(sd.unet, False))
    before = params(sd)
    with pytest.raises(ValueError) as e:
        sd.load_lora_weights(with_text_encoder(sd))
    one_line_error(e, "pipe.unet was replaced after a LoRA was loaded (first)", "unload_lora_weights()")
    assert_unchanged(sd, before)
    assert list(sd.lora_adapters) == ["first"]
