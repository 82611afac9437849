"""PixArtAlphaPipeline / PixArtSigmaPipeline against diffusers' pipelines and the tgate package's
PixArt loaders, on tiny random checkpoints built with diffusers and transformers and saved in the
real layout (spiece.model tokenizer, T5 encoder, PixArt transformer, VAE, DPM-Solver++)."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from mini_tgate import TGate, load_pipeline
from mini_tgate.pixart.pipeline import (ASPECT_RATIO_BINS, ASPECT_RATIO_BINS_2048, PixArtAlphaPipeline,
                                        PixArtSigmaPipeline, aspect_ratio_bin)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers reads spiece.model with it
from diffusers.image_processor import PixArtImageProcessor  # noqa: E402
from tgate import TgatePixArtAlphaLoader, TgatePixArtSigmaLoader  # noqa: E402
from tiny_models import perturb, vae  # noqa: E402

WORDS = "a cat dog on the mat red blue green photo of an astronaut riding horse city night rain sunset".split()
PROMPTS = ["A Red Cat on a mat", "  photo of an astronaut riding a horse at night  "]
TRANSFORMERS = {  # sample_size 128 turns Alpha's micro-conditions on, as in the real 1024 px model
    "alpha": dict(sample_size=128, num_attention_heads=2, attention_head_dim=12, num_layers=2, cross_attention_dim=24,
                  caption_channels=32),
    "sigma": dict(sample_size=32, num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16,
                  caption_channels=32, use_additional_conditions=False, interpolation_scale=0.5),
}
PIPELINES = {"alpha": (diffusers.PixArtAlphaPipeline, TgatePixArtAlphaLoader),
             "sigma": (diffusers.PixArtSigmaPipeline, TgatePixArtSigmaLoader)}


def t5_tokenizer(root):
    """A SentencePiece model trained here, laid out as PixArt ships it (spiece.model + configs)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(300)]
    (root / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = root / "spiece"
    folder.mkdir()
    (folder / "spiece.model").write_bytes((root / "sp.model").read_bytes())
    names = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
             "additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]}
    (folder / "special_tokens_map.json").write_text(json.dumps(names))
    (folder / "tokenizer_config.json").write_text(json.dumps({**names, "extra_ids": 100, "model_max_length": 512}))
    return transformers.T5Tokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, one_thread):
    """name -> (diffusers pipeline, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("pixart")
    tokenizer = t5_tokenizer(root)
    out = {}
    for i, (name, config) in enumerate(TRANSFORMERS.items()):
        torch.manual_seed(i)
        encoder = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16))
        transformer = perturb(diffusers.PixArtTransformer2DModel(**config), i)
        pipe = PIPELINES[name][0](tokenizer=tokenizer, text_encoder=perturb(encoder, i), vae=vae(i),
                                  transformer=transformer, scheduler=diffusers.DPMSolverMultistepScheduler())
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / name)
        out[name] = pipe, root / name
    return out


@pytest.fixture(scope="module")
def ours(checkpoints):
    return {name: load_pipeline(folder) for name, (_, folder) in checkpoints.items()}


def noise(batch, height, width, seed=0):
    return torch.randn(batch, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def reference(name, folder, tgate=None, **kw):
    """diffusers' image, or tgate's with a TGate, from a fresh pipeline: tgate's loader patches
    the attention modules' forward for good."""
    cls, loader = PIPELINES[name]
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if tgate is None:
        return pipe(**kw, output_type="np", clean_caption=False).images
    return loader(pipe).tgate(**kw, gate_step=tgate.gate_step, sp_interval=tgate.sp_interval,
                              fi_interval=tgate.fi_interval, warm_up=tgate.warm_up, output_type="np",
                              clean_caption=False).images


CASES = [  # name, size, binning, guidance, tgate
    ("alpha", (128, 128), False, 4.5, None),
    ("alpha", (96, 160), False, 4.5, TGate(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)),
    ("alpha", (128, 96), False, 3.0, TGate(gate_step=2, sp_interval=1, fi_interval=2, warm_up=0)),
    ("sigma", (160, 288), True, 4.5, None),  # binned to 192x336, then resized and centre-cropped back
    ("sigma", (256, 256), True, 4.5, TGate(gate_step=4, sp_interval=3, fi_interval=1, warm_up=2)),
    ("sigma", (128, 192), False, 2.0, TGate(gate_step=2, sp_interval=2, fi_interval=1, warm_up=1)),
]


@pytest.mark.parametrize("name,size,binning,guidance,tgate", CASES)
def test_matches_diffusers_and_tgate(checkpoints, ours, name, size, binning, guidance, tgate):
    h, w = size
    worked = aspect_ratio_bin(h, w, ASPECT_RATIO_BINS, 16) if binning else size
    kw = dict(prompt=PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=6, guidance_scale=guidance,
              height=h, width=w, num_images_per_prompt=2, use_resolution_binning=binning)
    latents = noise(4, *worked)
    expected = reference(name, checkpoints[name][1], tgate, **kw, latents=latents)
    out = ours[name](**kw, latents=latents, tgate=tgate)
    assert out.images.shape == (4, h, w, 3)
    np.testing.assert_allclose(out.images, expected, atol=1e-3, rtol=0)
    if tgate is not None:  # after the gate, the negative branch alone
        assert [s["batch"] for s in out.steps] == [8] * tgate.gate_step + [4] * (6 - tgate.gate_step)


def test_prompt_embeds_with_masks_and_a_plain_call_after_gated_ones(checkpoints, ours):
    """Embeddings encoded by diffusers, given with their masks, give diffusers' image; a plain call
    after gated calls equals a fresh pipeline's."""
    ref_pipe, folder = checkpoints["alpha"]
    with torch.no_grad():
        embeds, mask, neg, neg_mask = ref_pipe.encode_prompt(PROMPTS[0], clean_caption=False)
    kw = dict(num_inference_steps=4, height=128, width=128, use_resolution_binning=False, latents=noise(1, 128, 128),
              prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
              negative_prompt_attention_mask=neg_mask)
    expected = ref_pipe(**kw, negative_prompt=None, output_type="np").images
    pipe = ours["alpha"]
    pipe(PROMPTS, num_inference_steps=4, height=64, width=64, use_resolution_binning=False,
         tgate=TGate(gate_step=2, sp_interval=1, warm_up=0))
    np.testing.assert_allclose(pipe(**kw).images, expected, atol=1e-3, rtol=0)
    assert torch.equal(pipe(**kw, output_type="pt").images, load_pipeline(folder)(**kw, output_type="pt").images)


def test_without_guidance(checkpoints, ours):
    """guidance_scale 1: no CFG, nothing averaged (tgate's loader crashes here). A gate past the
    run equals diffusers' plain run; a real gate reuses cross-attention from its caching step."""
    ref_pipe, _ = checkpoints["sigma"]
    kw = dict(prompt=PROMPTS[0], num_inference_steps=5, guidance_scale=1.0, height=128, width=128,
              use_resolution_binning=False)
    expected = ref_pipe(**kw, latents=noise(1, 128, 128), output_type="np", clean_caption=False).images
    pipe = ours["sigma"]
    np.testing.assert_allclose(pipe(**kw, latents=noise(1, 128, 128), tgate=TGate(gate_step=5)).images, expected,
                               atol=1e-3, rtol=0)
    gated = pipe(**kw, latents=noise(1, 128, 128), tgate=TGate(gate_step=2, sp_interval=1, warm_up=0))
    assert [s["batch"] for s in gated.steps] == [1] * 5
    assert [s["cross_attn"] for s in gated.steps] == ["compute", "cache", "reuse", "reuse", "reuse"]
    plain = pipe(**kw, latents=noise(1, 128, 128))
    assert not np.array_equal(gated.images, plain.images)  # the reused cross-attention changed the image


@pytest.mark.parametrize("sample_size,bins", [(32, ASPECT_RATIO_BINS), (64, ASPECT_RATIO_BINS),
                                              (128, ASPECT_RATIO_BINS), (256, ASPECT_RATIO_BINS_2048)])
def test_aspect_ratio_bins_equal_diffusers(sample_size, bins):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN,
                                                                        ASPECT_RATIO_1024_BIN)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    table = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN, 128: ASPECT_RATIO_1024_BIN,
             256: ASPECT_RATIO_2048_BIN}[sample_size]
    assert len(bins) == len(table)
    for h in range(8, 4097, 56):
        for w in range(8, 4097, 88):
            expected = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)
            assert aspect_ratio_bin(h, w, bins, sample_size // 2) == expected, (h, w)


def test_class_mapping_and_errors(checkpoints, ours):
    assert type(ours["alpha"]) is PixArtAlphaPipeline and type(ours["sigma"]) is PixArtSigmaPipeline
    assert PixArtSigmaPipeline.from_pretrained(checkpoints["sigma"][1]).transformer.config.num_layers == 2
    pipe = ours["alpha"]
    small = dict(num_inference_steps=1, height=64, width=64)
    odd = load_pipeline(checkpoints["sigma"][1])
    odd.transformer.config = dataclasses.replace(odd.transformer.config, sample_size=48)
    with pytest.raises(ValueError, match="no aspect-ratio bins for sample_size 48"):
        odd("a cat", **small)
    with pytest.raises(ValueError, match="clip_skip applies to CLIP"):
        pipe("a cat", clip_skip=1, **small)
    with pytest.raises(ValueError, match="max_sequence_length must be an integer from 1 to 1024"):
        pipe("a cat", max_sequence_length=5000, **small)
    with pytest.raises(ValueError, match="give prompt_attention_mask with prompt_embeds"):
        pipe(prompt_embeds=torch.zeros(1, 5, 32), **small)
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt_2'"):
        pipe("a cat", prompt_2="x", **small)


def test_save_pipeline_reads_back_in_diffusers(checkpoints, ours, tmp_path):
    """save_pipeline writes a PixArt folder that diffusers loads and that draws diffusers' image."""
    from mini_tgate import save_pipeline

    save_pipeline(ours["sigma"], tmp_path / "saved")
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, height=128, width=128, use_resolution_binning=False,
              latents=noise(1, 128, 128))
    ref = diffusers.PixArtSigmaPipeline.from_pretrained(tmp_path / "saved")
    ref.set_progress_bar_config(disable=True)
    expected = reference("sigma", checkpoints["sigma"][1], **kw)
    np.testing.assert_allclose(ref(**kw, output_type="np", clean_caption=False).images, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(load_pipeline(tmp_path / "saved")(**kw).images, expected, atol=1e-3, rtol=0)


def test_static_caches_match_tgate(checkpoints, ours):
    """The caches CUDA graphs need (compile(mode="reduce-overhead") sets `static_caches`): buffers
    written in place; tgate's image, and the usual caches' bit for bit, call after call."""
    name, size, _, guidance, tgate = CASES[4]
    kw = dict(prompt=PROMPTS, negative_prompt=["", "blurry"], num_inference_steps=6, guidance_scale=guidance,
              height=size[0], width=size[1], num_images_per_prompt=2, use_resolution_binning=False,
              latents=noise(4, *size))
    expected = reference(name, checkpoints[name][1], tgate, **kw)
    pipe = ours[name]
    usual = pipe(**kw, tgate=tgate).images
    pipe.static_caches = True
    try:
        static = [pipe(**kw, tgate=tgate).images for _ in range(2)]
        assert all(m.static for m in pipe.transformer.attention_layers)
    finally:
        pipe.static_caches = False
    np.testing.assert_allclose(static[0], expected, atol=1e-3, rtol=0)
    assert np.array_equal(static[0], usual) and np.array_equal(static[1], usual)


def test_regional_compile(checkpoints, ours, quick_inductor):
    """compile(regional=True) on PixArt: its transformer blocks compiled each on its own (inductor,
    as a user calls it); a gated run gives the eager image, and tgate's."""
    import copy
    tgate = TGate(gate_step=3, sp_interval=2, fi_interval=1, warm_up=1)
    kw = dict(prompt=PROMPTS[:1], num_inference_steps=5, guidance_scale=4.5, height=128, width=128,
              use_resolution_binning=False, latents=noise(1, 128, 128), tgate=tgate)
    pipe = copy.deepcopy(ours["alpha"]).compile(regional=True)
    assert all(m._compiled_call_impl is not None for m in pipe.transformer.transformer_blocks)
    assert pipe.transformer._compiled_call_impl is None
    got = pipe(**kw).images
    np.testing.assert_allclose(got, ours["alpha"](**kw).images, atol=1e-5, rtol=0)
    expected = reference("alpha", checkpoints["alpha"][1], tgate, **{k: v for k, v in kw.items() if k != "tgate"})
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)  # test_matches_diffusers_and_tgate's tolerance
