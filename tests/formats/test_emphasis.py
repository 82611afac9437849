"""A1111 prompt emphasis: the parser against the examples A1111 publishes in parse_prompt_attention's
docstring (modules/prompt_parser.py), the chunks against chunks written out by hand, and the
embeddings against a reference computed with transformers' CLIPTextModel on the tiny SD and
SDXL checkpoints: per chunk of 75 tokens (BOS, tokens, EOS, padding), each token's state times
its weight, then z * (mean before / mean after), chunks side by side."""

import warnings

import pytest
import torch
import transformers
from tiny_models import save_sd, save_sdxl

from mini_tgate.formats.emphasis import has_emphasis, parse_prompt_attention, prompt_chunks
from mini_tgate.loading import load_pipeline

# A1111's published examples (the docstring of parse_prompt_attention), input -> output.
PUBLISHED = {
    "normal text": [["normal text", 1.0]],
    "an (important) word": [["an ", 1.0], ["important", 1.1], [" word", 1.0]],
    "(unbalanced": [["unbalanced", 1.1]],
    "\\(literal\\]": [["(literal]", 1.0]],
    "(unnecessary)(parens)": [["unnecessaryparens", 1.1]],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
}


@pytest.mark.parametrize("text", PUBLISHED)
def test_parser_gives_a1111s_published_results(text):
    assert parse_prompt_attention(text) == PUBLISHED[text]


@pytest.mark.parametrize("text, expected", [
    ("((word))", [["word", 1.1 * 1.1]]),
    ("[word]", [["word", 1 / 1.1]]),
    ("(word:1.3)", [["word", 1.3]]),
    ("(word: 0.7 ) x", [["word", 0.7], [" x", 1.0]]),
    ("a \\(b\\) \\[c\\]", [["a (b) [c]", 1.0]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("ratio 1:2)", [["ratio 1:2)", 1.0]]),  # a colon or a bracket closing nothing is text
    ("", [["", 1.0]]),
])
def test_parser_rules(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_a_weight_that_is_no_number_is_one_line():
    with pytest.raises(ValueError, match="emphasis weight '1.2.3'"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, one_thread):
    return {"sd": save_sd(tmp_path_factory.mktemp("sd")), "sdxl": save_sdxl(tmp_path_factory.mktemp("sdxl"))}


def shift_final_norm(encoder):
    """A final layer norm with a bias, as CLIP's trained one has: the random tiny encoder's has none,
    which makes each token's state average 0 and the rescale's mean(z) / mean(z * w) about 0 / 0."""
    with torch.no_grad():
        getattr(encoder, "text_model", encoder).final_layer_norm.bias.copy_(torch.linspace(-0.2, 0.6, encoder.config.hidden_size))
    return encoder


@pytest.fixture(scope="module")
def pipes(folders):
    pipes = {name: load_pipeline(folder) for name, folder in folders.items()}
    shift_final_norm(pipes["sd"].text_encoder)
    return pipes


def hand_chunks(tok, runs):
    """Chunks built by hand from parsed runs with transformers' tokenizer: each run tokenized on
    its own, BREAK starting a new chunk (prompts here stay under 75 tokens a chunk)."""
    chunks, ids, weights = [], [], []
    for text, weight in runs + [["BREAK", -1]]:
        if text == "BREAK" and weight == -1:
            pad = 75 - len(ids)
            chunks.append(([tok.bos_token_id, *ids, tok.eos_token_id] + [tok.pad_token_id] * pad,
                           [1.0, *weights, 1.0] + [1.0] * pad))
            ids, weights = [], []
            continue
        tokens = tok(text, add_special_tokens=False).input_ids
        ids += tokens
        weights += [weight] * len(tokens)
    return chunks


def reference(encoder, tok, text, layer):
    """A1111's original emphasis on transformers' encoder: (1, 77 x chunks, D) and the first chunk's output."""
    states, first = [], None
    for ids, weights in hand_chunks(tok, parse_prompt_attention(text)):
        with torch.no_grad():
            out = encoder(torch.tensor([ids]), output_hidden_states=True)
        z = layer(out)
        w = torch.tensor(weights)[None, :, None]
        states.append(z * w * (z.mean() / (z * w).mean()))
        first = first or out
    return torch.cat(states, dim=1), first


PROMPTS = ["a (red:1.5) circle on a [blue] background",
           "((a red circle)) BREAK on a [[blue]] background, (sharp:0.8)"]


@pytest.mark.parametrize("text", PROMPTS)
def test_sd_embeddings_match_transformers_reference(folders, pipes, text):
    folder, pipe = folders["sd"], pipes["sd"]
    tok = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = shift_final_norm(transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval())
    assert [c[0] for c in prompt_chunks(pipe.tokenizer, text)] == [c[0] for c in hand_chunks(
        tok, parse_prompt_attention(text))]
    want, _ = reference(encoder, tok, text, lambda out: out.last_hidden_state)
    cond, _ = pipe.encode_prompt([text], None, False, 64, 64, "cpu", emphasis=True)
    got = cond["encoder_hidden_states"]
    assert got.shape == want.shape == (1, 77 * (1 + ("BREAK" in text)), 32)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("text", PROMPTS)
def test_sdxl_emphasis_on_both_encoders(folders, pipes, text):
    folder, pipe = folders["sdxl"], pipes["sdxl"]
    want, pooled = [], None
    for suffix, cls in (("", transformers.CLIPTextModel), ("_2", transformers.CLIPTextModelWithProjection)):
        tok = transformers.CLIPTokenizer.from_pretrained(folder / f"tokenizer{suffix}")
        encoder = cls.from_pretrained(folder / f"text_encoder{suffix}").eval()
        states, first = reference(encoder, tok, text, lambda out: out.hidden_states[-2])
        want.append(states)
        pooled = getattr(first, "text_embeds", None)
    want = torch.cat(want, dim=-1)
    cond, _ = pipe.encode_prompt([text], None, False, 64, 64, "cpu", emphasis=True)
    got = cond["encoder_hidden_states"]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    got_pooled = cond["added_cond_kwargs"]["text_embeds"]
    assert (got_pooled - pooled).abs().max() <= 1e-5 * pooled.abs().max()


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_without_syntax_emphasis_is_bit_identical(pipes, name):
    pipe = pipes[name]
    text = ["a red circle on a blue background, 4k: sharp", "x"]
    for negatives in (None, ["blurry", ""]):
        on = pipe.encode_prompt(text, negatives, True, 64, 64, "cpu", emphasis=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no syntax: no warning
            off = pipe.encode_prompt(text, negatives, True, 64, 64, "cpu")
        for a, b in zip(on, off):
            assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])


def test_emphasis_off_takes_syntax_literally_with_one_warning(pipes):
    pipe = pipes["sd"]
    with pytest.warns(UserWarning, match=r"A1111 emphasis syntax.*taken literally.*emphasis=True") as record:
        literal, _ = pipe.encode_prompt(["a (red) circle"], None, False, 64, 64, "cpu")
    assert len(record) == 1 and "\n" not in str(record[0].message)
    emphasized, _ = pipe.encode_prompt(["a (red) circle"], None, False, 64, 64, "cpu", emphasis=True)
    assert not torch.equal(literal["encoder_hidden_states"], emphasized["encoder_hidden_states"])
    assert has_emphasis("a \\(b") and has_emphasis("a BREAK b") and not has_emphasis("ratio 1:2")


def test_comma_backtrack_moves_the_text_after_the_last_comma(pipes):
    """A chunk about to overflow ends at its last comma when it is at most 20 tokens back (A1111)."""
    tok = pipes["sd"].tokenizer
    words = ["cat"] * 70 + [","] + ["dog"] * 10  # 81 tokens: the comma is the 71st
    chunks = prompt_chunks(tok, " ".join(words))
    cat, dog, comma = (tok.encode(w)[0][0] for w in ("cat", "dog", ","))
    assert len(chunks) == 2 and chunks[0][0][1:73] == [cat] * 70 + [comma, tok.eos_token_id]
    assert chunks[1][0][1:12] == [dog] * 10 + [tok.eos_token_id]
    far = prompt_chunks(tok, " ".join(["cat"] * 30 + [","] + ["dog"] * 50))  # the comma 44 tokens back: cut at 75
    assert far[0][0][1:77] == [cat] * 30 + [comma] + [dog] * 44 + [tok.eos_token_id]


def test_a_call_with_emphasis_and_a_longer_negative_prompt(pipes):
    """Prompt and negative prompt of different chunk counts are padded to the same (A1111 pads a
    batch with empty chunks); the call runs; emphasis must be a bool."""
    pipe = pipes["sd"]
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent", progress=False)
    out = pipe("a (red:1.3) circle", negative_prompt="blurry BREAK dark", emphasis=True, **kw)
    assert torch.isfinite(out.images).all()
    cond, uncond = pipe.encode_prompt(["a (red:1.3) circle"], ["blurry BREAK dark"], True, 64, 64, "cpu",
                                      emphasis=True)
    assert cond["encoder_hidden_states"].shape[1] == uncond["encoder_hidden_states"].shape[1] == 154
    with pytest.raises(TypeError, match="emphasis must be True or False"):
        pipe("x", emphasis="yes", **kw)
    with pytest.raises(ValueError, match="chunks of 75 tokens with emphasis, over the 16"):
        pipe(" BREAK ".join(["x"] * 20), emphasis=True, **kw)
