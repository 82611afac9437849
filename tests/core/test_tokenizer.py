"""CLIPTokenizer against transformers' CLIPTokenizer, on CLIP's real vocabulary (mini_tgate/clip/)."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from mini_tgate.core.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ROOT / "mini_tgate" / "clip"
BPE_GZ = Path("/work/shared/data/bpe_simple_vocab_16e6.txt.gz")


def added(content, normalized):
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


def write_folder(folder: Path, config: dict, special_tokens_map: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(VOCAB / "vocab.json", folder)
    shutil.copy(VOCAB / "merges.txt", folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders in the layouts real checkpoints ship."""
    root = tmp_path_factory.mktemp("tokenizers")
    # SD-1.x `tokenizer/` (saved by transformers 4.2x): special tokens in special_tokens_map.json.
    sd15 = write_folder(root / "sd15", {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "bos_token": {"__type": "AddedToken", **added("<|startoftext|>", True)},
        "eos_token": {"__type": "AddedToken", **added("<|endoftext|>", True)},
        "unk_token": {"__type": "AddedToken", **added("<|endoftext|>", True)},
        "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"},
        {"bos_token": added("<|startoftext|>", True), "eos_token": added("<|endoftext|>", True),
         "pad_token": "<|endoftext|>", "unk_token": added("<|endoftext|>", True)})
    # SDXL `tokenizer_2` (transformers >= 4.34): added_tokens_decoder, padding with "!" (id 0).
    sdxl2 = write_folder(root / "sdxl2", {
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
        "added_tokens_decoder": {"0": {**added("!", False), "special": True},
                                 "49406": {**added("<|startoftext|>", True), "special": True},
                                 "49407": {**added("<|endoftext|>", True), "special": True}},
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
        "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"})
    # The same two as transformers 5 saves them: tokenizer.json + tokenizer_config.json only.
    out = {"sd15": sd15, "sdxl2": sdxl2}
    for name in ("sd15", "sdxl2"):
        transformers.CLIPTokenizer.from_pretrained(out[name]).save_pretrained(root / f"{name}_json")
        assert sorted(p.name for p in (root / f"{name}_json").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        out[f"{name}_json"] = root / f"{name}_json"
    return out


def corpus() -> list[str]:
    hand = [
        "", " ", "a", "A", "a photo of an astronaut riding a horse on mars",
        "A PHOTO OF A CAT", "  leading and trailing spaces  ", "many     spaces   here",
        "tabs\tand\nnewlines\r\nand\u3000ideographic space\u00a0nbsp", "don't", "it's", "we're they've I'm you'll he'd",
        "DON'T IT'S", "rock'n'roll", "'quoted' \"double\" `back`", "a, b; c: d! e? f.", "...!!!???",
        "hello!!! world!", "x ! y", "!", "!!", "(masterpiece:1.2), [best quality], {detailed}",
        "4k 8K 1080p 3.14159 2024-01-01 #1 @user 100%", "1234567890", "１２３ full-width digits",
        "café naïve résumé Ångström crème brûlée", "cafe\u0301 (decomposed accent)", "Straße ǅ ﬁ ligature",
        "日本語のテキスト", "一只猫坐在垫子上", "한국어 문장", "Привет, мир! Кошка на крыше", "مرحبا بالعالم", "שלום עולם",
        "नमस्ते दुनिया", "ελληνικά γράμματα", "ไทย ภาษา", "emoji 😀👍🏽🏳️‍🌈👨‍👩‍👧 ❤️ ✨", "🐱🐶", "math ∑∫√∞≠ ≤ ≥ ±",
        "<|endoftext|>", "<|startoftext|>", "a <|endoftext|> b", "a<|endoftext|>b<|startoftext|>c",
        "<|ENDOFTEXT|> upper case special", "<|EndOfText|>", "< |endoftext| >", "<|endoftext", "|endoftext|>",
        "<|startoftext|><|endoftext|><|endoftext|>", "html &amp; entities &lt;b&gt;", "url https://example.com/a?b=c&d=e",
        "snake_case kebab-case CamelCase", "x" * 300, "word " * 100, "a, " * 60, "supercalifragilisticexpialidocious",
        "control\x00chars\x07here\x1b", "zero\u200bwidth\u200djoiner", "\ufeffbom", "ＡＢＣ full width", "Ⅻ roman ½ ¾ ²",
    ]
    pieces = ["cat", "Dog", "a", "the", "photo", "of", "HIGHLY", "detailed", "don't", "it's", "I'll", "we've",
              "4k", "8", "1.5", "2024", ",", ".", "!", "?", "...", "(", ")", "[", "]", ":1.3", "-", "/", "'", '"',
              "é", "naïve", "東京", "猫", "кот", "Москва", "قطة", "🙂", "🔥🔥", "<|endoftext|>", "<|startoftext|>",
              "<|ENDOFTEXT|>", "&", "#", "_", "@", "~", "\t", "\n", "  ", "ß", "Ω", "ｋａｔａ"]
    rng = random.Random(0)
    generated = []
    for _ in range(260):
        words = [rng.choice(pieces) for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 40, 90]))]
        generated.append("".join(w + rng.choice([" ", " ", " ", "", "  ", "\t", "\n"]) for w in words))
    return hand + generated


def reference_ids(ref, prompts):
    """What diffusers' pipelines compute (`_encode_prompt`)."""
    return ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@pytest.mark.parametrize("layout", ["sd15", "sdxl2", "sd15_json", "sdxl2_json"])
def test_matches_transformers(folders, layout):
    ref = transformers.CLIPTokenizer.from_pretrained(folders[layout])
    tok = CLIPTokenizer.from_pretrained(folders[layout], subfolder=None)
    prompts = corpus()
    assert len(prompts) >= 200
    ids, expected = tok(prompts), reference_ids(ref, prompts)
    assert ids.dtype == torch.long and ids.shape == (len(prompts), 77)
    for p, a, b in zip(prompts, ids.tolist(), expected.tolist()):
        assert a == b, f"{p!r}"
    assert tok.pad_token_id == ref.pad_token_id == (0 if layout.startswith("sdxl2") else 49407)
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49406, 49407, 77)


def test_known_ids_and_padding(folders):
    tok = CLIPTokenizer.from_pretrained(folders["sd15"], subfolder=None)
    tok2 = CLIPTokenizer.from_pretrained(folders["sdxl2"], subfolder=None)
    assert tok("a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 49407]
    assert tok2("a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 0]
    assert tok2("a cat").tolist() == tok2(["a cat"]).tolist()
    long = tok("word " * 100)
    assert long.shape == (1, 77) and long[0, -1] == 49407 and (long[0, 1:-1] != 49407).all()


def test_subfolder(folders, tmp_path):
    shutil.copytree(folders["sdxl2"], tmp_path / "tokenizer_2")
    assert CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer_2").pad_token_id == 0


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_from_files(pad_token):
    """Straight from mini_tgate/clip/, as transformers' CLIPTokenizer(vocab, merges, pad_token=...)."""
    tok = CLIPTokenizer.from_files(VOCAB / "vocab.json", VOCAB / "merges.txt", pad_token=pad_token)
    ref = transformers.CLIPTokenizer(vocab=str(VOCAB / "vocab.json"), merges=str(VOCAB / "merges.txt"),
                                     pad_token=pad_token, model_max_length=77)
    prompts = corpus()
    assert tok(prompts).tolist() == reference_ids(ref, prompts).tolist()


def test_dropped_text(folders):
    """The words a pipeline warns about, as diffusers finds them from the untruncated ids."""
    ref = transformers.CLIPTokenizer.from_pretrained(folders["sd15"])
    tok = CLIPTokenizer.from_pretrained(folders["sd15"], subfolder=None)
    words = " ".join(f"word{i}" for i in range(60)) + ", and a Café at the end"
    untruncated = ref(words, padding="longest", return_tensors="pt").input_ids
    assert tok.dropped_text([words, "short"]) == [ref.batch_decode(untruncated[:, 76:-1])[0], ""]
    assert tok.dropped_text(words)[0].endswith("and a café at the end")


def test_missing_files(tmp_path):
    from mini_tgate.core.weights import CheckpointError

    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(CheckpointError, match="vocab.json"):
        CLIPTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="missing"):
        CLIPTokenizer.from_pretrained(tmp_path, subfolder="tokenizer_2")


@pytest.mark.skipif(not BPE_GZ.is_file(), reason="needs the shared copy of bpe_simple_vocab_16e6.txt.gz")
def test_weights_clip_is_derived_from_openai_bpe(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vocab", VOCAB / "make_vocab.py")
    make_vocab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_vocab)
    make_vocab.write_vocab(BPE_GZ, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (VOCAB / name).read_bytes()
    vocab = json.loads((VOCAB / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["!"] == 0 and vocab["a</w>"] == 320
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


@pytest.mark.parametrize("length, expected", [
    (int(1e30), 77), (int(1e20), 77),  # transformers' "no limit": read as CLIP's 77 positions
    (100000, "an integer from 2 to 16384, got 100000"),
    (1, "got 1"), (-77, "got -77"), ("77", "got '77'"), (77.5, "got 77.5"), (True, "got True"),
])
def test_model_max_length_is_bounded(tmp_path, length, expected):
    folder = write_folder(tmp_path / "tok", {"model_max_length": length})
    if isinstance(expected, int):
        tok = CLIPTokenizer.from_pretrained(folder, subfolder=None)
        assert tok.model_max_length == expected and tok("a cat").shape == (1, expected)
        return
    from mini_tgate.core.weights import CheckpointError

    with pytest.raises(CheckpointError, match=f"{folder / 'tokenizer_config.json'}: tokenizer model_max_length .*{expected}"):
        CLIPTokenizer.from_pretrained(folder, subfolder=None)
    with pytest.raises(ValueError, match=expected):
        CLIPTokenizer.from_files(VOCAB / "vocab.json", VOCAB / "merges.txt", model_max_length=length)


def test_prompt_that_is_not_valid_text():
    """A non-UTF-8 command-line argument reaches Python as lone surrogates ("\udcff")."""
    tok = CLIPTokenizer.from_files(VOCAB / "vocab.json", VOCAB / "merges.txt")
    bad = b"a caf\xe9".decode("utf-8", "surrogateescape")
    for prompts in (bad, ["a cat", bad]):
        with pytest.raises(ValueError, match=r"prompt is not valid text: '\\udce9' at character 5"):
            tok(prompts)
    with pytest.raises(TypeError, match="a prompt must be a str, got int"):
        tok(["a cat", 3])


@pytest.mark.parametrize("layout", ["sd15", "sdxl2_json"])
def test_a_folder_holding_the_files_is_read_itself(folders, tmp_path, layout):
    """transformers' `from_pretrained(folder)`: the folder itself when it holds the tokenizer files;
    a pipeline's folder (no files of its own) is read at its tokenizer/, as before."""
    ref = transformers.CLIPTokenizer.from_pretrained(folders[layout])
    tok = CLIPTokenizer.from_pretrained(folders[layout])
    prompts = corpus()[:50]
    assert tok(prompts).tolist() == reference_ids(ref, prompts).tolist()
    shutil.copytree(folders[layout], tmp_path / "pipe" / "tokenizer")
    assert CLIPTokenizer.from_pretrained(tmp_path / "pipe")(prompts).tolist() == tok(prompts).tolist()
    assert CLIPTokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer", subfolder=None).pad_token_id == tok.pad_token_id


def test_t5_folder_holding_the_files_is_read_itself(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from mini_tgate.pixart.tokenizer import T5Tokenizer

    rng = random.Random(0)
    words = "a cat dog on the mat red blue photo of an astronaut riding horse city night rain".split()
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    for folder in (tmp_path / "t5", tmp_path / "pipe" / "tokenizer"):
        folder.mkdir(parents=True)
        (folder / "spiece.model").write_bytes((tmp_path / "sp.model").read_bytes())
    ref = transformers.T5Tokenizer.from_pretrained(tmp_path / "t5")
    prompts = ["a cat on the mat", "a red horse at night", "astronaut"]
    expected = ref(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    for source in (tmp_path / "t5", tmp_path / "pipe"):  # the folder itself; a pipeline's tokenizer/
        ids, mask = T5Tokenizer.from_pretrained(source)(prompts, max_length=16)
        assert ids.tolist() == expected.input_ids.tolist() and mask.tolist() == expected.attention_mask.tolist()


@pytest.mark.parametrize("name", ["sd15", "sdxl2"])
def test_called_as_scripts_call_transformers(folders, name):
    """`tokenizer(prompt, padding="max_length", max_length=..., truncation=True, return_tensors="pt")`
    gives transformers' input_ids and attention_mask; other paddings are refused."""
    ours, ref = CLIPTokenizer.from_pretrained(folders[name]), transformers.CLIPTokenizer.from_pretrained(folders[name])
    prompts = ["a photo of a cat", "a " * 100 + "dog", ""]
    kw = dict(padding="max_length", max_length=ref.model_max_length, truncation=True, return_tensors="pt")
    got, expected = ours(prompts, **kw), ref(prompts, **kw)
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got["attention_mask"], expected.attention_mask)
    assert torch.equal(ours(prompts), expected.input_ids)  # the plain call: the ids alone
    with pytest.raises(ValueError, match="pads and cuts every prompt to model_max_length"):
        ours(prompts, padding="longest", return_tensors="pt")
