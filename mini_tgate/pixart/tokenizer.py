"""T5's tokenizer: a SentencePiece Unigram model, built on the `tokenizers` library.

Reimplements transformers' `T5Tokenizer` (transformers/models/t5/tokenization_t5.py, v5), which
PixArt's pipelines load. A prompt becomes ids in four steps:

1. Added tokens: `</s>`, `<pad>`, `<unk>` and the 100 sentinels `<extra_id_0>` ... `<extra_id_99>`
   written literally in the text are cut out first and map straight to their ids.
2. Normalizer: SentencePiece's "precompiled charsmap", a compiled table of the normalisation rule
   the model was trained with (T5: nmt_nfkc, i.e. Unicode NFKC plus a few fixes: full-width
   "ＡＢＣ" becomes "ABC", "ﬁ" becomes "fi", control characters are dropped).
3. Pre-tokenizer: split on whitespace (runs of spaces count once), and mark each word's start
   with "▁" (U+2581), SentencePiece's visible space: "a cat" -> "▁a", "▁cat".
4. Unigram: each word is cut into the vocabulary's pieces whose summed log-probabilities
   (the scores) are highest (Viterbi); a character no piece covers becomes `<unk>`.
Then `</s>` is appended and the row padded with `<pad>` (id 0) to max_length.

Real PixArt folders hold only `spiece.model`: a serialized SentencePiece `ModelProto`
(sentencepiece_model.proto). The few fields read here, with their field numbers:
  ModelProto      1: pieces (repeated SentencePiece), 2: trainer_spec, 3: normalizer_spec
  SentencePiece   1: piece (string), 2: score (float), 3: type (enum; 6 = BYTE)
  TrainerSpec     3: model_type (enum; 1 = UNIGRAM, the default), 35: byte_fallback (bool),
                  40: unk_id (int32, default 0)
  NormalizerSpec  2: precompiled_charsmap (bytes)
Protobuf's wire format is (key, value) pairs, key = field number << 3 | wire type, wire type
0 a varint, 1 eight bytes, 2 a varint length then that many bytes (strings, sub-messages),
5 four bytes (a little-endian float). The sentinels come after the pieces, last one first:
with T5's 32,000 pieces, `<extra_id_99>` is 32000 and `<extra_id_0>` 32099.
Newer saves also hold a `tokenizer.json` (the Unigram vocabulary with the sentinels, and the
charsmap in base64); it is read instead when present.
"""

from __future__ import annotations

import base64
import re
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram

from ..core.bounds import MAX_EXTRA_IDS, MAX_MODEL_MAX_LENGTH, MAX_SPIECE_BYTES, MAX_T5_PROMPT_CHARS, int_in
from ..core.tokenizer import (FOLDER_OR_TOKENIZER, CLIPTokenizer, check_model_max_length, config_max_length,
                              tokenizer_folder)
from ..core.weights import CheckpointError, read_json, write_json


def protobuf_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The unsigned varint at buf[pos:] (7 bits a byte, least significant first) and the
    position after it."""
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise ValueError("varint longer than 10 bytes")


def protobuf_fields(buf: bytes):
    """Yield (field number, wire type, value) for each field of a serialized message: value is
    an int for a varint, bytes for the other wire types."""
    pos = 0
    while pos < len(buf):
        key, pos = protobuf_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = protobuf_varint(buf, pos)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, pos = protobuf_varint(buf, pos)
            else:
                size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
            if pos > len(buf):
                raise ValueError(f"field {field} runs past the end")
        else:
            raise ValueError(f"field {field} has wire type {wire}, not one SentencePiece uses")
        yield field, wire, value


def int32(varint: int) -> int:
    """A varint read as protobuf's int32 (negative numbers are 10-byte two's complement)."""
    return varint - 2**64 if varint >= 2**63 else varint


def read_spiece_model(path: Path) -> tuple[list[tuple[str, float]], int, bytes]:
    """(pieces with their scores, unk id, precompiled charsmap) of a SentencePiece Unigram model."""
    if path.stat().st_size > MAX_SPIECE_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes; a SentencePiece model is at most "
                              f"{MAX_SPIECE_BYTES} here")
    pieces, unk_id, charsmap = [], 0, b""
    try:
        for field, wire, value in protobuf_fields(path.read_bytes()):
            if field == 1 and wire == 2:  # one SentencePiece
                piece, score, kind = None, 0.0, 1
                for f, w, v in protobuf_fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif f == 3 and w == 0:
                        kind = v
                if piece is None:
                    raise ValueError(f"piece {len(pieces)} has no text")
                if kind == 6:
                    raise ValueError("byte-fallback pieces (<0x00>...) are not supported")
                pieces.append((piece, score))
            elif field == 2 and wire == 2:  # TrainerSpec
                for f, w, v in protobuf_fields(value):
                    if f == 3 and w == 0 and v != 1:
                        raise ValueError(f"model_type {v} is not UNIGRAM (1)")
                    if f == 35 and w == 0 and v:
                        raise ValueError("byte_fallback is not supported")
                    if f == 40 and w == 0:
                        unk_id = int32(v)
            elif field == 3 and wire == 2:  # NormalizerSpec
                for f, w, v in protobuf_fields(value):
                    if f == 2 and w == 2:
                        charsmap = v
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a SentencePiece Unigram model ({e})") from None
    if not 0 <= unk_id < len(pieces):
        raise CheckpointError(f"{path}: unk id {unk_id} is not one of its {len(pieces)} pieces")
    return pieces, unk_id, charsmap


def read_t5_tokenizer_json(path: Path) -> tuple[list[tuple[str, float]], int, bytes]:
    """(vocabulary with scores, unk id, precompiled charsmap) of a Unigram `tokenizer.json`."""
    data = read_json(path)
    model = data.get("model") or {}
    vocab, unk_id = model.get("vocab"), model.get("unk_id")
    if model.get("type") != "Unigram" or not isinstance(vocab, list) or not vocab:
        raise CheckpointError(f"{path}: not a Unigram tokenizer")
    if not all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], (int, float))
               for v in vocab):
        raise CheckpointError(f"{path}: the Unigram vocabulary must be [piece, score] pairs")
    if not int_in(unk_id, 0, len(vocab) - 1):
        raise CheckpointError(f"{path}: unk_id {unk_id!r} is not one of its {len(vocab)} pieces")
    normalizer = data.get("normalizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = next((s.get("precompiled_charsmap") for s in steps if s.get("type") == "Precompiled"), None)
    try:
        charsmap = base64.b64decode(charsmap, validate=True) if charsmap else b""
    except (ValueError, TypeError):
        raise CheckpointError(f"{path}: precompiled_charsmap is not base64") from None
    return [(p, float(s)) for p, s in vocab], unk_id, charsmap


def token_text(t, default: str) -> str:
    """A special-token entry of a config file: a string, or a dict with its "content"."""
    t = t.get("content") if isinstance(t, dict) else t
    return t if isinstance(t, str) and t else default


class T5Tokenizer:
    def __init__(self, vocab: list[tuple[str, float]], unk_id: int, precompiled_charsmap: bytes = b"", *,
                 eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_tokens: list[str] = (),
                 model_max_length: int = 512):
        """vocab: every piece with its score, the sentinels included (see `from_pretrained`)."""
        tok = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=False))
        if precompiled_charsmap:
            tok.normalizer = normalizers.Precompiled(precompiled_charsmap)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
        # Matched in the raw text, before normalisation, each keeping its id in the vocabulary.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in (pad_token, eos_token, unk_token, *extra_tokens)])
        self.tokenizer = tok
        self.model_max_length = check_model_max_length(model_max_length, 1)  # EOS at least
        self.special_tokens = dict(eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)
        self.extra_tokens = list(extra_tokens)
        self.eos_token_id, self.pad_token_id = (self.token_id(t) for t in (eos_token, pad_token))

    token_id = CLIPTokenizer.token_id  # the same lookup, with the same error

    @classmethod
    def from_pretrained(cls, source, subfolder: str | None = FOLDER_OR_TOKENIZER, local_files_only: bool = False,
                        cache_dir=None, revision: str | None = None) -> T5Tokenizer:
        """The tokenizer of a folder or hub repo: `tokenizer.json`, or else `spiece.model`, with
        `tokenizer_config.json` / `special_tokens_map.json` naming the special tokens. As in
        transformers, a folder that itself holds them is read as it is; without `subfolder`, a
        pipeline's folder is read at its tokenizer/."""
        folder = tokenizer_folder(source, subfolder, local_files_only, cache_dir, revision,
                                  ("tokenizer.json", "spiece.model"))
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second wins, as in transformers
            if (folder / name).is_file():
                config.update(read_json(folder / name))
        extra_ids = config.get("extra_ids", 100)
        if not int_in(extra_ids, 0, MAX_EXTRA_IDS):
            raise CheckpointError(f"{folder}: extra_ids must be an integer from 0 to {MAX_EXTRA_IDS}, got {extra_ids!r}")
        if (folder / "tokenizer.json").is_file():
            vocab, unk_id, charsmap = read_t5_tokenizer_json(folder / "tokenizer.json")  # sentinels included
        elif (folder / "spiece.model").is_file():
            vocab, unk_id, charsmap = read_spiece_model(folder / "spiece.model")
            vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
        else:
            raise CheckpointError(f"{folder}: neither tokenizer.json nor spiece.model")
        listed = config.get("additional_special_tokens")
        extra = [token_text(t, "") for t in listed] if isinstance(listed, list) else []
        extra = [t for t in extra if t] or [f"<extra_id_{i}>" for i in range(extra_ids)]
        length = config_max_length(config, 512)  # "no limit": T5 was trained on 512 tokens
        try:
            return cls(vocab, unk_id, charsmap, eos_token=token_text(config.get("eos_token"), "</s>"),
                       pad_token=token_text(config.get("pad_token"), "<pad>"),
                       unk_token=token_text(config.get("unk_token"), "<unk>"), extra_tokens=extra,
                       model_max_length=length)
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from None

    def save_pretrained(self, folder) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json`, the files transformers' T5Tokenizer
        saves and reads (it takes the vocabulary and the charsmap from tokenizer.json)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        extra_ids = sum(bool(re.fullmatch(r"<extra_id_\d+>", t)) for t in self.extra_tokens)
        write_json(folder / "tokenizer_config.json", {
            **self.special_tokens, "additional_special_tokens": self.extra_tokens, "extra_ids": extra_ids,
            "model_max_length": self.model_max_length, "tokenizer_class": "T5Tokenizer"})

    def encode(self, prompts: str | list[str]) -> list[list[int]]:
        """The ids of each prompt's text, without `</s>` and not truncated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if isinstance(p, str) and len(p) > MAX_T5_PROMPT_CHARS:
                raise ValueError(f"prompt has {len(p)} characters; at most {MAX_T5_PROMPT_CHARS} are allowed")
        return CLIPTokenizer.encode(self, prompts)  # the same type and text checks

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), two (N, max_length) LongTensors: each prompt's ids cut to max_length - 1,
        then `</s>`, then `<pad>` (0); the mask is 1 on the tokens and `</s>`, 0 on the padding.
        max_length defaults to model_max_length (PixArt passes 120 for Alpha, 300 for Sigma)."""
        n = self.model_max_length if max_length is None else max_length
        if not int_in(n, 1, MAX_MODEL_MAX_LENGTH):
            raise ValueError(f"max_length must be an integer from 1 to {MAX_MODEL_MAX_LENGTH}, got {n!r}")
        ids, mask = [], []
        for row in self.encode(prompts):
            row = [*row[:n - 1], self.eos_token_id]
            ids.append(row + [self.pad_token_id] * (n - len(row)))
            mask.append([1] * len(row) + [0] * (n - len(row)))
        return (torch.tensor(ids, dtype=torch.long).view(len(ids), n),
                torch.tensor(mask, dtype=torch.long).view(len(mask), n))

    def dropped_text(self, prompts: str | list[str], max_length: int) -> list[str]:
        """For each prompt, the text cut off by truncation to max_length ("" when it fits)."""
        return [self.decode(ids[max_length - 1:]) for ids in self.encode(prompts)]
