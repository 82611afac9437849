"""CLIPTextModel against transformers' CLIPTextModel / CLIPTextModelWithProjection."""

import pytest
import torch
from safetensors.torch import save_file

from mini_tgate.core.clip import CLIPTextModel
from mini_tgate.core.config import CLIPTextConfig
from mini_tgate.core.weights import CheckpointError

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=24, bos_token_id=996, eos_token_id=997)
# The EOS is 997 so that rows also hold higher ids (as added tokens do): the first-EOS rule and
# the highest-id rule then disagree. Pre-4.31 configs (eos_token_id=2) are fed 999 as their EOS.
CASES = {  # name: (config changes, with projection, EOS id in the rows, pad id)
    "quick_gelu": (dict(hidden_act="quick_gelu"), False, 997, 997),  # SD-1.x: pads with EOS
    "gelu_projection": (dict(hidden_act="gelu"), True, 997, 0),  # SDXL text_encoder_2: pads with "!" = 0
    "gelu_pad_eos": (dict(hidden_act="gelu", num_hidden_layers=2), False, 997, 997),
    "old_eos_2": (dict(hidden_act="quick_gelu", eos_token_id=2), False, 999, 999),
    "old_eos_2_projection": (dict(hidden_act="gelu", eos_token_id=2), True, 999, 0),
}


def reference(changes: dict, projection: bool):
    config = transformers.CLIPTextConfig(**{**TINY, **changes})
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(config).eval()
    with torch.no_grad():  # every weight random, layer norms and biases included
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def save_reference(model, folder, layout: str):
    """"transformers": as transformers 5 saves it (CLIPTextModel's keys lose their `text_model.`
    prefix); "checkpoint": as real checkpoints hold it (transformers 4.x), every key under
    `text_model.` or `text_projection.`; "legacy": that plus the position_ids buffer (< 4.31)."""
    model.save_pretrained(folder)
    if layout != "transformers":
        state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v.contiguous()
                 for k, v in model.state_dict().items()}
        if layout == "legacy":
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def input_ids(eos: int, pad: int, T: int = 77):
    """Rows of random ids (any but the EOS) with the EOS at various positions, padding after it."""
    ends = [1, T // 3, T // 2, T - 1]
    ids = torch.randint(0, 999, (len(ends), T))
    ids[ids >= eos] += 1
    ids[:, 0] = 996  # BOS
    for row, e in enumerate(ends):
        ids[row, e] = eos
        ids[row, e + 1:] = pad
    return ids


def max_errors(ours, ref_model, ids) -> dict[str, float]:
    with torch.no_grad():
        theirs = ref_model(ids, output_hidden_states=True)
        text_model = getattr(ref_model, "text_model", ref_model)
        pooled = text_model(ids).pooler_output
    errors = {"last_hidden_state": (ours.last_hidden_state - theirs.last_hidden_state).abs().max().item(),
              "pooler_output": (ours.pooler_output - pooled).abs().max().item()}
    assert len(ours.hidden_states) == len(theirs.hidden_states) == ref_model.config.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        errors[f"hidden_states[{i}]"] = (a - b).abs().max().item()
    if hasattr(theirs, "text_embeds"):
        errors["text_embeds"] = (ours.text_embeds - theirs.text_embeds).abs().max().item()
    else:
        assert ours.text_embeds is None
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(tmp_path, case):
    changes, projection, eos, pad = CASES[case]
    ref = reference(changes, projection)
    save_reference(ref, tmp_path / "text_encoder", "checkpoint")
    te = CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder")
    assert te.config.with_projection == projection
    for ids in (input_ids(eos, pad), input_ids(eos, pad, T=12)):
        out = te(ids, output_hidden_states=True)
        errors = max_errors(out, ref, ids)
        assert max(errors.values()) <= 1e-5, errors
        assert te(ids).hidden_states is None
        assert torch.equal(te(ids).last_hidden_state, out.last_hidden_state)


def test_loads_transformers_with_projection_save(tmp_path):
    ref = reference(dict(hidden_act="gelu"), True)
    save_reference(ref, tmp_path, "transformers")  # keys already under text_model.
    ids = input_ids(997, 0)
    errors = max_errors(CLIPTextModel.from_pretrained(tmp_path)(ids, output_hidden_states=True), ref, ids)
    assert max(errors.values()) <= 1e-5, errors


def test_loads_transformers_5_save_without_prefix(tmp_path):
    ref = reference(dict(hidden_act="quick_gelu"), False)
    save_reference(ref, tmp_path, "transformers")
    ids = input_ids(997, 997)
    errors = max_errors(CLIPTextModel.from_pretrained(tmp_path)(ids, output_hidden_states=True), ref, ids)
    assert max(errors.values()) <= 1e-5, errors


def test_legacy_position_ids_are_dropped(tmp_path):
    ref = reference(dict(hidden_act="quick_gelu", eos_token_id=2), False)
    save_reference(ref, tmp_path, "legacy")
    te = CLIPTextModel.from_pretrained(tmp_path)
    assert not list(te.buffers())
    # transformers reads the same file to the same model
    again = transformers.CLIPTextModel.from_pretrained(tmp_path).eval()
    ids = input_ids(999, 999)
    errors = max_errors(te(ids, output_hidden_states=True), again, ids)
    assert max(errors.values()) <= 1e-5, errors


def test_wrong_shape_is_an_error(tmp_path):
    save_reference(reference({}, False), tmp_path, "checkpoint")
    (tmp_path / "config.json").write_text((tmp_path / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64'))
    with pytest.raises(CheckpointError, match="shape"):
        CLIPTextModel.from_pretrained(tmp_path)


# text_encoder/config.json of the real checkpoints (the fields that shape the model).
REAL = {
    # SD-1.5 (and SDXL's first encoder): OpenAI CLIP ViT-L/14
    "sd15": dict(architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SD-2.1: OpenCLIP ViT-H/14 text tower (its last layer dropped: 23 of 24)
    "sd21": dict(architectures=["CLIPTextModel"], vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77, projection_dim=512,
                 hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # SDXL text_encoder_2: OpenCLIP ViT-bigG/14 with its projection
    "sdxl_2": dict(architectures=["CLIPTextModelWithProjection"], vocab_size=49408, hidden_size=1280,
                   intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                   projection_dim=1280, hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                   pad_token_id=1),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_configs_have_transformers_keys(name):
    d = REAL[name]
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig.from_dict(d))
        cls = getattr(transformers, d["architectures"][0])
        theirs = cls(transformers.CLIPTextConfig(**{k: v for k, v in d.items() if k != "architectures"}))
    # transformers >= 5 names CLIPTextModel's keys without the `text_model.` of real checkpoints
    expected = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: tuple(v.shape)
                for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in expected
    assert ("text_projection.weight" in expected) == (name == "sdxl_2")
    assert not list(ours.buffers())


def test_more_tokens_than_positions_is_a_clear_error():
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig.from_dict(TINY))
    with pytest.raises(ValueError, match="input_ids hold 78 tokens; this text encoder has 77 positions"):
        te(torch.zeros(1, 78, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("projection", [False, True])
def test_indexed_as_transformers_outputs(tmp_path, projection):
    """`text_encoder(ids)[0]`, as scripts write it: the same tensor as transformers' [0] (the
    last hidden state; text_embeds for CLIPTextModelWithProjection), and [1]."""
    ref = reference({}, projection)
    save_reference(ref, tmp_path, "checkpoint")
    ids = input_ids(ref.config.eos_token_id, ref.config.pad_token_id)
    ours = CLIPTextModel.from_pretrained(tmp_path)(ids)
    with torch.no_grad():
        theirs = ref(ids)
    for i in (0, 1):
        assert (ours[i] - theirs[i]).abs().max() <= 1e-5
