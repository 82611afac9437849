"""T5EncoderModel against transformers' T5EncoderModel (T5 v1.1, gated-GELU)."""

import pytest
import torch
from conftest import realign
from safetensors.torch import load_file, save_file

from mini_tgate.core.config import ConfigError
from mini_tgate.core.weights import CheckpointError
from mini_tgate.pixart.config import T5Config
from mini_tgate.pixart.t5 import T5EncoderModel, preprocess_prompt

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=300, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8, relative_attention_max_distance=12, layer_norm_epsilon=1e-6)
CASES = {  # name: config changes
    "tiny": {},
    "wide_heads": dict(d_kv=16, num_layers=2),  # heads * d_kv = 64 != d_model
    "t5_buckets": dict(relative_attention_num_buckets=32, relative_attention_max_distance=128, num_layers=2),
}
L = 40  # longer than max_distance 12: the exact, log-spaced and last buckets are all used
# T5-v1.1-XXL's encoder, PixArt's text encoder (google/t5-v1_1-xxl, PixArt-alpha/*/text_encoder)
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
           feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128)


def reference(changes: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5EncoderModel(transformers.T5Config(**{**TINY, **changes})).eval()
    with torch.no_grad():  # every weight random, norms and the bias table included
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def inputs(vocab: int, lengths=(L, 17, 1)):
    """(N, L) ids and a padding mask: row i has lengths[i] tokens, then pad id 0."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (len(lengths), L), generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    """name -> (transformers model, its save_pretrained folder)."""
    out = {}
    for name, changes in CASES.items():
        folder = tmp_path_factory.mktemp(name)
        ref = reference(changes)
        ref.save_pretrained(folder)
        out[name] = ref, folder
    return out


def ref_output(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_transformers(saved, name):
    ref, folder = saved[name]
    ours = T5EncoderModel.from_pretrained(folder)
    ids, mask = inputs(ref.config.vocab_size)
    expected = ref_output(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
        unmasked = ours(ids[:1]).last_hidden_state
    assert got.shape == (3, L, ref.config.d_model)
    assert (got - expected).abs().max() <= 1e-5
    assert (unmasked - ref_output(ref, ids[:1], None)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_transformers(saved, tmp_path, dtype):
    """Both loaded in the same dtype from the same float32 file: in float16 transformers keeps
    `wo` in float32 (its residual stream becomes float32) and clamps; bfloat16 is plain."""
    _, folder = saved["tiny"]
    ref = realign(transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype).eval())  # wo: float32, mapped
    ours = T5EncoderModel.from_pretrained(folder, dtype=dtype)
    for name, p in ours.named_parameters():  # wo: float32 in float16 only, as transformers keeps it
        assert p.dtype == ref.get_parameter(name).dtype, name
    ids, mask = inputs(ref.config.vocab_size)
    expected = ref_output(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert got.dtype == expected.dtype == dtype
    # The same operations in the same order and dtypes: bit for bit (a fused GELU, which rounds
    # once instead of at every step, is 0.06 off at a scale of 1.7 in bfloat16).
    assert torch.equal(got, expected)


def test_float16_overflow_is_clamped_as_transformers(saved, tmp_path):
    """Embeddings near float16's limit and a large attention output: the first residual add
    overflows, transformers clamps it to the finite range (64504), and so must this model."""
    ref, folder = saved["tiny"]
    state = load_file(folder / "model.safetensors")
    state["shared.weight"] = state["shared.weight"].sign() * 65000
    state["encoder.block.0.layer.0.SelfAttention.o.weight"] *= 100
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ref = realign(transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval())
    ours = T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16)
    ids, mask = inputs(ref.config.vocab_size)
    expected = ref_output(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).last_hidden_state
    assert expected.isfinite().all() and torch.equal(got, expected)


@pytest.mark.parametrize("stored", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                    ("shared.weight", "encoder.embed_tokens.weight")])
def test_embedding_stored_either_way(saved, tmp_path, stored):
    ref, folder = saved["tiny"]
    state = load_file(folder / "model.safetensors")
    table = state.pop("shared.weight")
    state.pop("encoder.embed_tokens.weight", None)
    state.update({k: table.clone() for k in stored})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ours = T5EncoderModel.from_pretrained(tmp_path)
    ids, mask = inputs(ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids, attention_mask=mask).last_hidden_state - ref_output(ref, ids, mask)).abs().max() <= 1e-5


def test_missing_embedding_is_reported(saved, tmp_path):
    _, folder = saved["tiny"]
    state = load_file(folder / "model.safetensors")
    state.pop("shared.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing keys: shared.weight"):
        T5EncoderModel.from_pretrained(tmp_path)


def test_save_pretrained_loads_in_transformers(saved, tmp_path):
    ref, folder = saved["wide_heads"]
    T5EncoderModel.from_pretrained(folder).save_pretrained(tmp_path)
    again = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    ids, mask = inputs(ref.config.vocab_size)
    assert torch.equal(ref_output(again, ids, mask), ref_output(ref, ids, mask))


def test_xxl_config_has_transformers_keys_and_shapes():
    """PixArt's text encoder config: the same state dict, key for key and shape for shape."""
    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**XXL))
        ours = T5EncoderModel(T5Config.from_dict(XXL), ("shared.weight", "encoder.embed_tokens.weight"))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("changes, message", [
    (dict(feed_forward_proj="relu"), "feed_forward_proj='relu' is not supported"),
    (dict(model_type="umt5"), "model_type='umt5' is not supported"),
    (dict(num_layers=0), "num_layers=0: expected an integer from 1"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets=2"),
    (dict(relative_attention_max_distance=2), "relative_attention_max_distance=2 must exceed"),
    (dict(d_model="32"), "d_model='32': expected an integer"),
])
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        T5Config.from_dict({**TINY, **changes})


def test_preprocess_prompt_is_diffusers_without_caption_cleaning():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)
    for text in ["  A Cat ON a MAT\n", "ÉCOLE  Straße ", ""]:
        assert [preprocess_prompt(text)] == pipe._text_preprocessing(text, clean_caption=False)
