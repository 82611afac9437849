"""PixArtTransformer2DModel against diffusers' on tiny random models saved in the real layout,
the real PixArt-Alpha / -Sigma configs on the meta device, and TGATE against the tgate package's
attention processor on the same model."""

import json
from pathlib import Path

import pytest
import torch
from conftest import realign
from diffusers import PixArtTransformer2DModel as RefTransformer
from tgate.tgate_utils import register_forward

from mini_tgate.core.attention import Attention
from mini_tgate.core.config import ConfigError
from mini_tgate.core.tgate import CACHE, CACHE_MEAN, COMPUTE, REUSE, StepPlan
from mini_tgate.core.weights import CheckpointError
from mini_tgate.pixart.config import PixArtTransformerConfig
from mini_tgate.pixart.transformer import PixArtTransformer2DModel

PRESETS = Path(__file__).resolve().parents[2] / "mini_tgate" / "presets"

TINY = {
    # As PixArt-Alpha's real config: use_additional_conditions and interpolation_scale left out, so
    # sample_size 128 turns the micro-conditions on and the interpolation scale to 2; saved under
    # the class name and extra keys Alpha checkpoints carry.
    "alpha": dict(num_attention_heads=2, attention_head_dim=12, num_layers=2, cross_attention_dim=24,
                  caption_channels=20, sample_size=128),
    # As Sigma (no micro-conditions), plus the branches real checkpoints do not take: a fractional
    # interpolation scale, affine norms, no q/k/v bias, no caption projection, out_channels None.
    "variant": dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=12,
                    caption_channels=None, sample_size=16, interpolation_scale=0.5, use_additional_conditions=False,
                    norm_elementwise_affine=True, attention_bias=False, out_channels=None),
}
ALPHA_EXTRA_KEYS = {"_class_name": "Transformer2DModel", "double_self_attention": False, "only_cross_attention": False,
                    "num_vector_embeds": None, "use_linear_projection": False}


def make_reference(name):
    torch.manual_seed(0)
    ref = RefTransformer(**TINY[name]).eval()
    with torch.no_grad():  # move every weight off its initial value (diffusers zero-inits some)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@pytest.fixture(scope="module", params=list(TINY))
def pair(request, tmp_path_factory, one_thread):
    name = request.param
    ref = make_reference(name)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder / "transformer")
    if name == "alpha":
        path = folder / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **ALPHA_EXTRA_KEYS}))
    return name, ref, PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer"), folder


def inputs(name, batch, height, width, seed, text_len=7):
    """Latents, text, timesteps, kwargs; the text mask pads the last tokens of every prompt but the first."""
    g = torch.Generator().manual_seed(seed)
    cfg = TINY[name]
    x = torch.randn(batch, 4, height, width, generator=g)
    text = torch.randn(batch, text_len, cfg["caption_channels"] or cfg["cross_attention_dim"], generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    for i in range(1, batch):
        mask[i, text_len - 2 - i:] = 0
    if batch == 1:
        mask[0, -3:] = 0
    t = torch.tensor([999.0, 37.0, 500.0][:batch])
    cond = {"resolution": torch.tensor([[height * 8.0, width * 8.0]] * batch),
            "aspect_ratio": torch.tensor([[height / width]] * batch)}
    return x, text, t, {"added_cond_kwargs": cond, "encoder_attention_mask": mask}


def rel_err(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("batch,size", [(1, (8, 8)), (2, (6, 10)), (2, (16, 4))])
def test_matches_diffusers(pair, batch, size):
    name, ref, ours, _ = pair
    x, text, t, kw = inputs(name, batch, *size, seed=batch)
    with torch.no_grad():
        expected = ref(x, text, t, **kw).sample
        got = ours(x, text, t, **kw)
    assert got.shape == expected.shape == (batch, ref.out_channels, *size)
    assert rel_err(got, expected) <= 1e-4, (name, batch, size)


def test_the_text_mask_and_the_timestep_matter(pair):
    """So that the comparisons above could fail: dropping the mask, or changing the timestep or
    the micro-conditions, changes the output by far more than their tolerance."""
    name, ref, ours, _ = pair
    x, text, t, kw = inputs(name, 2, 6, 10, seed=5)
    with torch.no_grad():
        base = ours(x, text, t, **kw)
        assert rel_err(ours(x, text, t, added_cond_kwargs=kw["added_cond_kwargs"]), base) > 1e-2
        assert rel_err(ours(x, text, t + 1, **kw), base) > 1e-3
        if ours.config.additional_conditions:
            cond = {"resolution": kw["added_cond_kwargs"]["resolution"] * 2,
                    "aspect_ratio": kw["added_cond_kwargs"]["aspect_ratio"]}
            assert rel_err(ours(x, text, t, added_cond_kwargs=cond,
                                encoder_attention_mask=kw["encoder_attention_mask"]), base) > 1e-3


def test_scalar_timestep_and_derived_settings(pair):
    name, ref, ours, _ = pair
    assert ours.config.additional_conditions == ref.use_additional_conditions
    assert ours.pos_embed.interpolation_scale == ref.pos_embed.interpolation_scale
    x, text, _, kw = inputs(name, 2, 8, 8, seed=7)
    with torch.no_grad():
        assert rel_err(ours(x, text, 250, **kw), ref(x, text, torch.tensor([250, 250]), **kw).sample) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_diffusers(pair, dtype):
    """Loaded in half precision (as diffusers loads with torch_dtype: the position embedding stays
    float32 and is added in float32), both models run the same kernels on the same layouts, so the
    outputs are equal bit for bit. (A residual stream left in the patch embedding's transposed
    layout made Linear layers add their bias apart from the matmul: 0.5% off in bfloat16.)"""
    name, _, _, folder = pair
    ref = realign(RefTransformer.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).eval())
    ours = PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    x, text, t, kw = inputs(name, 2, 16, 16, seed=3)  # 16: the "variant" model's training size
    x, text = x.to(dtype), text.to(dtype)
    with torch.no_grad():
        expected = ref(x, text, t, **kw).sample
        got = ours(x, text, t, **kw)
    assert got.dtype == dtype
    assert torch.equal(got, expected), rel_err(got.float(), expected.float())


def test_save_pretrained_reads_back_in_diffusers(pair, tmp_path):
    name, ref, ours, _ = pair
    ours.save_pretrained(tmp_path)
    again = realign(RefTransformer.from_pretrained(tmp_path).eval())  # as `ref`: weights in fresh allocations
    x, text, t, kw = inputs(name, 1, 8, 6, seed=4)
    with torch.no_grad():
        assert rel_err(again(x, text, t, **kw).sample, ref(x, text, t, **kw).sample) == 0


# ----------------------------------------------------------------------------- real configs


@pytest.mark.parametrize("preset,params", [("pixart-alpha", 611_349_152), ("pixart-sigma", None)])
def test_real_configs_keys_shapes_and_size(preset, params):
    config = json.loads((PRESETS / f"{preset}.json").read_text())
    with torch.device("meta"):
        ref = RefTransformer.from_config(config)
        ours = PixArtTransformer2DModel(PixArtTransformerConfig.from_dict(config))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    if params is not None:
        assert count == params
    # the derived settings of the real configs: Alpha has micro-conditions, Sigma not; both scale 2
    assert ours.config.additional_conditions == ref.use_additional_conditions == (preset == "pixart-alpha")
    assert ours.pos_embed.interpolation_scale == ref.pos_embed.interpolation_scale == 2


def test_real_alpha_position_embedding_equals_diffusers():
    """At the real size (128 x 128 latents, 64 x 64 patches of 1152 channels) and at a
    non-square one: the stored buffer diffusers uses at the training size, and the one it
    computes at any other."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from mini_tgate.pixart.transformer import sincos_2d

    for h, w in ((64, 64), (48, 80)):
        expected = get_2d_sincos_pos_embed(1152, (h, w), base_size=64, interpolation_scale=2).float()
        assert torch.equal(sincos_2d(1152, h, w, 64, 2), expected)


# ----------------------------------------------------------------------------- TGATE


def tgate_register(model, cross: str, self_: str, cfg_mean: bool):
    """Point the tgate package's processor at every diffusers Attention: what our gate string
    means, in its cache/reuse flags (keep_shape=False caches the mean of the two CFG halves)."""
    register_forward(model, "Attention", keep_shape=not cfg_mean,
                     ca_kward={"cache": cross in (CACHE, CACHE_MEAN), "reuse": cross == REUSE},
                     sa_kward={"cache": self_ in (CACHE, CACHE_MEAN), "reuse": self_ == REUSE})


def test_tgate_gate_matches_the_tgate_package(pair):
    """A gated run as the pipeline makes it: CFG batch caching the mean at the gate, then the
    single (unconditional) batch reusing cross-attention while self-attention is cached and
    reused, against diffusers' model driven by tgate's processor with the same flags."""
    name, _, ours, folder = pair
    ref = RefTransformer.from_pretrained(folder, subfolder="transformer").eval()  # a copy the hooks may patch
    steps = [StepPlan(COMPUTE, CACHE, True), StepPlan(COMPUTE, REUSE, True), StepPlan(CACHE_MEAN, CACHE_MEAN, True),
             StepPlan(REUSE, REUSE, False), StepPlan(REUSE, CACHE, False), StepPlan(REUSE, REUSE, False)]
    try:
        for i, step in enumerate(steps):
            x, text, t, kw = inputs(name, 2 if step.cfg else 1, 6, 10, seed=10 + i)
            ours.set_gate(step)
            tgate_register(ref, step.cross_attn, step.self_attn, cfg_mean=CACHE_MEAN in (step.cross_attn, step.self_attn))
            with torch.no_grad():
                expected = ref(x, text, t, **kw).sample
                got = ours(x, text, t, **kw)
            assert rel_err(got, expected) <= 1e-4, (name, i, step)
            if step.cross_attn == REUSE:  # the reused output is what was cached, not a recomputation
                with torch.no_grad():
                    ours.set_gate(StepPlan(COMPUTE, COMPUTE, False))
                    assert rel_err(ours(x, text, t, **kw), got) > 1e-4
    finally:
        ours.clear_gate()
    attention = [m for m in ours.modules() if isinstance(m, Attention)]
    assert all(m.gate == COMPUTE and m.cache is None for m in attention)
    assert len(attention) == 2 * ours.config.num_layers


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("change,message", [
    ({"norm_type": "ada_norm_zero"}, "norm_type='ada_norm_zero' is not supported"),
    ({"activation_fn": "geglu"}, "activation_fn='geglu' is not supported"),
    ({"only_cross_attention": True}, "only_cross_attention=True is not supported"),
    ({"num_layers": 0}, "num_layers must be a positive integer"),
    ({"caption_channels": 20, "cross_attention_dim": 16}, "cross_attention_dim=16 must equal"),
    ({"num_attention_heads": 1, "attention_head_dim": 10, "cross_attention_dim": 10}, "must be a multiple of 4"),
    ({"attention_head_dim": 4, "cross_attention_dim": 8}, "must be a multiple of 3 with use_additional_conditions"),
    ({"cross_attention_dim": None}, "cross_attention_dim=None"),
])
def test_unsupported_configs_are_refused(change, message):
    config = {**TINY["alpha"], **change}
    with pytest.raises(ConfigError, match=message):
        PixArtTransformerConfig.from_dict(config)


def test_bad_inputs_are_clear_errors(pair):
    name, _, ours, _ = pair
    x, text, t, kw = inputs(name, 2, 6, 10, seed=1)
    with pytest.raises(ValueError, match="multiples of patch_size=2, got 6x9"):
        ours(x[..., :9], text, t, **kw)
    with pytest.raises(ValueError, match=r"encoder_attention_mask must have shape \(batch, text length\)"):
        ours(x, text, t, kw["added_cond_kwargs"], kw["encoder_attention_mask"][:, :3])
    if ours.config.additional_conditions:
        with pytest.raises(ValueError, match=r"added_cond_kwargs must hold 'resolution' \(2, 2\)"):
            ours(x, text, t, encoder_attention_mask=kw["encoder_attention_mask"])
        one = {k: v[:1] for k, v in kw["added_cond_kwargs"].items()}  # a batch of 1's conditions for 2
        with pytest.raises(ValueError, match="for a batch of 2"):
            ours(x, text, t, one, kw["encoder_attention_mask"])


def test_checkpoint_of_another_shape_is_refused(tmp_path):
    make_reference("variant").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(CheckpointError, match="missing keys: .*to_q.bias"):
        PixArtTransformer2DModel.from_pretrained(tmp_path)
