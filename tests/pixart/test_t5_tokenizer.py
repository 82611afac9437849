"""T5Tokenizer against transformers' T5Tokenizer, on a SentencePiece model trained here.

The model is trained offline with sentencepiece (nmt_nfkc normalisation, as T5's, so the
precompiled charsmap is exercised) with T5's special ids (pad 0, eos 1, unk 2, no bos), and
laid out as PixArt ships it: `spiece.model` + configs. transformers converts that folder (with
sentencepiece and protobuf) and saves the `tokenizer.json` form from it.
"""

import json
import random
import struct

import pytest
import torch

from mini_tgate.core.bounds import MAX_MODEL_MAX_LENGTH, MAX_T5_PROMPT_CHARS
from mini_tgate.core.weights import CheckpointError
from mini_tgate.pixart.tokenizer import T5Tokenizer, read_spiece_model

spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers needs it to read spiece.model
transformers = pytest.importorskip("transformers")

WORDS = ("a cat dog on the mat red blue green photo of an astronaut riding horse painting by van gogh city "
         "night rain café naïve résumé über straße 東京 夜 🐱 123 4567 hello world, sunset! mountain lake? "
         "(high quality) 8k ultra-detailed").split()
SYLLABLES = "ka ro mi ne ta su lo pe ri an on ex st ing tion er ed ly qu th sh ch ou ai".split()
PROMPTS = [
    "a cat", "A Cat ON a Mat", "", " ", "   leading and trailing   ", "multiple    spaces\tand\ttabs\nnewline",
    "café naïve résumé über straße", "Café NAÏVE", "e\u0301 composed vs é", "東京の夜 🐱 夜",
    "ＡＢＣ ｆｕｌｌ-width ① ﬁ ligature Ⅻ ½", "numbers 123 4567 3.14 1,000,000 8k",
    "punctuation!!! ??? (brackets) [x] {y} 'quotes' \"double\" -- ... ; :", "high-quality, ultra-detailed.",
    "<extra_id_5>", "a <extra_id_0> b <extra_id_99>c", "text</s>more <pad> <unk>", "<EXTRA_ID_5> <extra_id_100>",
    "unknown ЖЩЮ ᚠᛇᚻ glyphs", "zero\u200bwidth\u00a0nbsp", "control\x07char",
    "the " * 200,  # past every max_length below: truncated, </s> kept
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(spiece.model folder, tokenizer.json folder), both as transformers reads them."""
    root = tmp_path_factory.mktemp("t5tok")
    rng = random.Random(0)

    def word():
        return rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices(SYLLABLES, k=rng.randint(1, 4)))

    lines = [" ".join(word() for _ in range(rng.randint(3, 15))) for _ in range(600)]
    lines += ["ＡＢＣ ｆｕｌｌ width ① ﬁ ligature", "Ⅻ roman ½ fraction"]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=300,
                                   model_type="unigram", normalization_rule_name="nmt_nfkc", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=0.9995, minloglevel=2)
    spiece = root / "spiece"
    spiece.mkdir()
    (spiece / "spiece.model").write_bytes((root / "sp.model").read_bytes())
    extra = [f"<extra_id_{i}>" for i in range(100)]
    names = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>", "additional_special_tokens": extra}
    (spiece / "special_tokens_map.json").write_text(json.dumps(names))
    (spiece / "tokenizer_config.json").write_text(json.dumps(
        {**names, "extra_ids": 100, "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}))
    fast = root / "fast"
    transformers.T5Tokenizer.from_pretrained(spiece).save_pretrained(fast)
    assert not (fast / "spiece.model").exists() and (fast / "tokenizer.json").exists()
    return spiece, fast


@pytest.mark.parametrize("form", ["spiece", "tokenizer.json"])
@pytest.mark.parametrize("max_length", [1, 2, 8, 120])
def test_matches_transformers(folders, form, max_length):
    folder = folders[0] if form == "spiece" else folders[1]
    ref = transformers.T5Tokenizer.from_pretrained(folder)
    ours = T5Tokenizer.from_pretrained(folder, subfolder=None)
    expected = ref(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = ours(PROMPTS, max_length=max_length)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == expected["input_ids"].tolist()
    assert mask.tolist() == expected["attention_mask"].tolist()


def test_save_pretrained_reads_back_in_transformers(folders, tmp_path):
    T5Tokenizer.from_pretrained(folders[0], subfolder=None).save_pretrained(tmp_path)
    ref = transformers.T5Tokenizer.from_pretrained(folders[0])
    again = transformers.T5Tokenizer.from_pretrained(tmp_path)
    ours = T5Tokenizer.from_pretrained(tmp_path, subfolder=None)
    expected = ref(PROMPTS, padding="max_length", max_length=64, truncation=True)["input_ids"]
    assert again(PROMPTS, padding="max_length", max_length=64, truncation=True)["input_ids"] == expected
    assert ours(PROMPTS, max_length=64)[0].tolist() == expected
    assert ours.model_max_length == 512


def test_sentinels_and_untruncated_ids(folders):
    ref = transformers.T5Tokenizer.from_pretrained(folders[0])
    ours = T5Tokenizer.from_pretrained(folders[0], subfolder=None)
    for i in (0, 5, 99):  # <extra_id_0> is the last id: 300 pieces + 100 sentinels - 1
        assert ours.tokenizer.token_to_id(f"<extra_id_{i}>") == ref.convert_tokens_to_ids(f"<extra_id_{i}>") == 399 - i
    assert ours.encode(PROMPTS) == [ref(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert ours.tokenizer.get_vocab_size() == len(ref) == 400


def test_spiece_reader_matches_sentencepiece(folders):
    """The varint reader against the sentencepiece library's own parse of the same file."""
    path = folders[0] / "spiece.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    pieces, unk_id, charsmap = read_spiece_model(path)
    assert pieces == [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    assert unk_id == sp.unk_id() == 2
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    assert charsmap == proto.normalizer_spec.precompiled_charsmap and len(charsmap) > 1000


def test_dropped_text(folders):
    ours = T5Tokenizer.from_pretrained(folders[0], subfolder=None)
    ref = transformers.T5Tokenizer.from_pretrained(folders[0])
    prompt = "a cat on the mat riding horse"
    ids = ref(prompt, add_special_tokens=False)["input_ids"]
    assert ours.dropped_text([prompt, "a cat"], 4) == [ref.decode(ids[3:]), ""]


@pytest.mark.parametrize("call, error, message", [
    (lambda t: t(["a"], max_length=0), ValueError, "max_length must be an integer from 1 to"),
    (lambda t: t(["a"], max_length=MAX_MODEL_MAX_LENGTH + 1), ValueError, "max_length must be an integer"),
    (lambda t: t(["a"], max_length=True), ValueError, "max_length must be an integer"),
    (lambda t: t(["x" * (MAX_T5_PROMPT_CHARS + 1)]), ValueError, "characters; at most"),
    (lambda t: t([3]), TypeError, "a prompt must be a str"),
    (lambda t: t(["bad \udcff"]), ValueError, "not valid text"),
])
def test_bad_calls(folders, call, error, message):
    with pytest.raises(error, match=message):
        call(T5Tokenizer.from_pretrained(folders[0], subfolder=None))


def write_spiece(folder, data: bytes):
    folder.mkdir()
    (folder / "spiece.model").write_bytes(data)
    return folder


@pytest.mark.parametrize("data, message", [
    (b"\x0a\x07\x0a\x05<unk>\x12\x02\x18\x02", r"model_type 2 is not UNIGRAM"),  # a BPE model
    (b"\x0a\x07\x0a\x05<unk>\x12\x03\x98\x02\x01", "byte_fallback is not supported"),
    (b"\x0a\x07\x0a\x05<unk>\x12\x03\xc0\x02\x05", "unk id 5 is not one of its 1 pieces"),  # field 40
    (b"\x0a\x09\x0a\x05<unk>\x18\x06", "byte-fallback pieces"),  # type BYTE
    (b"\x0a\x7f\x0a\x05<unk>", "runs past the end"),
    (b"\x0a\x07\x0a\x05\xff\xfe\xfd\xfc\xfb", "not a SentencePiece Unigram model"),  # not UTF-8
    (b"\x0b", "wire type 3"),
    (b"\x0a" + b"\xff" * 11, "varint longer than 10 bytes"),
])
def test_broken_spiece_model(tmp_path, data, message):
    with pytest.raises(CheckpointError, match=message):
        T5Tokenizer.from_pretrained(write_spiece(tmp_path / "tok", data), subfolder=None)


def test_hand_written_spiece_model(tmp_path):
    """A three-piece model written field by field, unk_id given as field 40 (a 2-byte key)."""
    def piece(text, score):
        body = b"\x0a" + bytes([len(text.encode())]) + text.encode() + b"\x15" + struct.pack("<f", score)
        return b"\x0a" + bytes([len(body)]) + body
    data = piece("<pad>", 0) + piece("</s>", 0) + piece("<unk>", 0) + piece("▁", -1) + piece("▁a", -2) \
        + b"\x12\x03\xc0\x02\x02"
    tok = T5Tokenizer.from_pretrained(write_spiece(tmp_path / "tok", data), subfolder=None)
    ids, mask = tok(["a b a"], max_length=6)
    assert ids.tolist() == [[4, 3, 2, 4, 1, 0]] and mask.tolist() == [[1, 1, 1, 1, 1, 0]]


def test_missing_files(tmp_path):
    (tmp_path / "tok").mkdir()
    with pytest.raises(CheckpointError, match="neither tokenizer.json nor spiece.model"):
        T5Tokenizer.from_pretrained(tmp_path, subfolder="tok")
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(CheckpointError, match="not a Unigram tokenizer"):
        T5Tokenizer.from_pretrained(tmp_path, subfolder="tok")
