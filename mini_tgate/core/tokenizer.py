"""CLIP's text tokenizer: byte-level byte-pair encoding (BPE), built on the `tokenizers` library.

Reimplements transformers' `CLIPTokenizer` (transformers/models/clip/tokenization_clip.py,
v5, which is what diffusers' pipelines load), itself a port of OpenAI's
`clip/simple_tokenizer.py`. A prompt becomes ids in five steps:

1. Added tokens: literal special tokens in the text (`<|startoftext|>`, `<|endoftext|>`, and
   the pad token, e.g. SDXL's `!`) are cut out first and map straight to their ids.
2. Normalizer: Unicode NFC, every run of whitespace becomes one space, lower case.
3. Pre-tokenizer: CLIP's regex splits the text into words (runs of letters, single digits,
   runs of punctuation, English contractions); each word's UTF-8 bytes are then spelled with
   GPT-2's 256 printable stand-in characters ("byte level"), so no text is ever unknown.
4. BPE: within each word, adjacent symbols are merged in the order of `merges.txt`; the last
   symbol of a word carries the `</w>` suffix ("a" alone is `a</w>` = 320).
5. Framing: BOS, the first 75 ids, EOS, then padding to 77 (`model_max_length`).

OpenAI's original also runs `ftfy.fix_text` and `html.unescape` on the prompt; transformers'
tokenizer (and so every diffusers pipeline) does not, and neither does this one.

A tokenizer folder holds `vocab.json` + `merges.txt` (+ `tokenizer_config.json`,
`special_tokens_map.json`) or one `tokenizer.json`; `mini_tgate/clip/` has CLIP's vocabulary (package data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from .bounds import MAX_MODEL_MAX_LENGTH, int_in, is_int
from .config import short
from .weights import CheckpointError, read_json, resolve, write_json

# OpenAI's word pattern: the two special tokens, contractions, runs of letters, one digit at a
# time, runs of anything else that is not a space.
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers writes int(1e30) (or int(1e20)) as model_max_length when a tokenizer has no limit;
# such a config is read as CLIP's 77, the context of every SD text encoder (the pipeline checks
# it against the text encoder's positions).
NO_LIMIT = int(1e20)
SPECIAL_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def check_model_max_length(length, low: int) -> int:
    """A tokenizer's model_max_length, checked: an integer from `low` (the tokens that frame a
    prompt: CLIP's BOS + EOS, T5's EOS) to MAX_MODEL_MAX_LENGTH; a ValueError otherwise."""
    if not int_in(length, low, MAX_MODEL_MAX_LENGTH):
        raise ValueError(f"tokenizer model_max_length must be an integer from {low} to {MAX_MODEL_MAX_LENGTH}, "
                         f"got {length!r}")
    return int(length)


def config_max_length(config: dict, default: int):
    """The model_max_length a tokenizer_config.json names (`default` when absent); transformers'
    "no limit" (NO_LIMIT or more) also reads as `default`. Not checked yet."""
    length = config.get("model_max_length", default)
    if (is_int(length) or isinstance(length, float)) and length >= NO_LIMIT:
        return default
    return length


class FolderOrTokenizer:
    """from_pretrained's default subfolder (transformers' reading): the folder itself when it holds
    the tokenizer's files, else its `tokenizer/` (a diffusers pipeline's). None: the folder itself."""

    def __repr__(self) -> str:
        return "<the folder itself if it holds the tokenizer files, else tokenizer/>"


FOLDER_OR_TOKENIZER = FolderOrTokenizer()


def tokenizer_folder(source, subfolder, local_files_only: bool, cache_dir, revision,
                     files: tuple[str, ...] = ("tokenizer.json", "vocab.json")) -> Path:
    """The local folder of the tokenizer in `subfolder` of a folder or hub repo (only its files are
    fetched). subfolder FOLDER_OR_TOKENIZER: the folder itself when it holds one of `files`, else
    its tokenizer/; None or "": the folder itself."""
    pick = subfolder is FOLDER_OR_TOKENIZER
    folders = ["", "tokenizer"] if pick else [subfolder or ""]
    folder = resolve(source, None, local_files_only, cache_dir, folders=folders, revision=revision)
    if pick:
        subfolder = None if any((folder / name).is_file() for name in files) else "tokenizer"
    folder = folder / subfolder if subfolder else folder
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing tokenizer folder")
    return folder


def read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from None
    return check_merges([line.split(" ") for line in lines if line and not line.startswith("#version")], path)


def check_merges(merges: list, path: Path) -> list[tuple[str, str]]:
    """BPE merges: pairs of symbols (a line "a b" of merges.txt, or tokenizer.json's "a b" or ["a", "b"])."""
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]
    bad = [m for m in merges if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m))]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} merges are not two symbols, e.g. {short(bad[0])}")
    return [tuple(m) for m in merges]


def check_vocab(vocab, path: Path) -> dict[str, int]:
    """A BPE vocabulary: an object of token -> id."""
    if not (isinstance(vocab, dict) and all(int_in(i, 0, 2**31 - 1) for i in vocab.values())):
        raise CheckpointError(f"{path}: the vocabulary must be an object of token -> id (a non-negative integer)")
    return vocab


def added_token(t: str | dict) -> AddedToken:
    """A special-token entry of a config file: a plain string, or a dict with its matching flags."""
    if isinstance(t, str):
        return AddedToken(t, special=True, normalized=False)
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    if not (isinstance(t, dict) and isinstance(t.get("content"), str)
            and all(isinstance(t.get(k, False), bool) for k in keys[1:])):
        raise ValueError(f"special token {short(t)}: expected a string or an object with a string 'content'")
    return AddedToken(**{"special": True, **{k: t[k] for k in keys if k in t}})


class Encoding(dict):
    """transformers' BatchEncoding as scripts read it: encoding["input_ids"] or encoding.input_ids."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *,
                 bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                 unk_token="<|endoftext|>", added_tokens: list[AddedToken] | None = None,
                 model_max_length: int = 77):
        tok = Tokenizer(BPE(vocab, merges, unk_token=unk_token, end_of_word_suffix="</w>"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # Split keeps the regex matches and drops the spaces between them. ByteLevel then maps
        # bytes to characters; it also re-splits each word with GPT-2's regex, which changes
        # nothing for CLIP's words except a literal "<|endoftext|>" that reached this point
        # (e.g. written in upper case), which is cut into "<|", "endoftext", "|>".
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        if added_tokens is None:
            added_tokens = [added_token(t) for t in (bos_token, eos_token, unk_token, pad_token)]
        # Of several entries with the same text, the last one's flags win.
        tok.add_tokens(added_tokens)
        self.tokenizer = tok
        self.model_max_length = check_model_max_length(model_max_length, 2)  # BOS + EOS at least
        self.bos_token_id, self.eos_token_id, self.pad_token_id = (
            self.token_id(t) for t in (bos_token, eos_token, pad_token))

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer: special token {token!r} is not in the vocabulary")
        return i

    @classmethod
    def from_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, **kwargs) -> CLIPTokenizer:
        """From a `vocab.json` and a `merges.txt`, e.g. `mini_tgate/clip/`; kwargs as `__init__`."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        return cls(vocab, read_merges(Path(merges_txt)), **kwargs)

    @classmethod
    def from_pretrained(cls, source, subfolder: str | None = FOLDER_OR_TOKENIZER, local_files_only: bool = False,
                        cache_dir=None, revision: str | None = None) -> CLIPTokenizer:
        """The tokenizer of a folder or hub repo (only `subfolder`'s files are fetched). As in
        transformers, a folder that itself holds the files (tokenizer.json, or vocab.json +
        merges.txt) is read as it is; without `subfolder`, a pipeline's folder is read at its
        tokenizer/ (subfolder="tokenizer_2" for SDXL's second)."""
        folder = tokenizer_folder(source, subfolder, local_files_only, cache_dir, revision)
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        listed = []  # added tokens with their ids and flags
        files = [folder / "tokenizer.json"]  # where the vocabulary and the special tokens come from
        if files[0].is_file():
            data = read_json(files[0])
            model = data.get("model", {})
            if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
                raise CheckpointError(f"{files[0]}: not a BPE tokenizer")
            vocab, merges = check_vocab(model.get("vocab"), files[0]), check_merges(model["merges"], files[0])
            listed = data.get("added_tokens", [])
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            files = [folder / "vocab.json", folder / "merges.txt"]
            vocab, merges = check_vocab(read_json(files[0]), files[0]), read_merges(files[1])
        else:
            raise CheckpointError(f"{folder}: neither tokenizer.json nor vocab.json + merges.txt")

        # Which texts are special and how each is matched follows transformers' loading: since
        # 4.34 tokenizer_config.json lists them under `added_tokens_decoder`; older folders
        # name them in special_tokens_map.json (over tokenizer_config.json) and tokenizer.json.
        # `normalized: true` matches a token after lower-casing, so "<|ENDOFTEXT|>" counts too.
        names, where = config, folder / "tokenizer_config.json"
        try:
            if "added_tokens_decoder" in config:
                listed = [dict(t, id=int(i)) for i, t in config["added_tokens_decoder"].items()]
            elif (folder / "special_tokens_map.json").is_file():
                names = {**config, **read_json(folder / "special_tokens_map.json")}
                where = f"{where} / special_tokens_map.json"
            added = [added_token(t) for t in sorted(listed, key=lambda t: t["id"])]
            specials = {k: added_token(names.get(k) or v) for k, v in SPECIAL_DEFAULTS.items()}
            added += [t for t in specials.values() if t.content not in {a.content for a in added}]
            length = check_model_max_length(config_max_length(config, 77), 2)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{where}: {e}") from None
        try:
            return cls(vocab, merges, added_tokens=added, model_max_length=length,
                       **{k: t.content for k, t in specials.items()})
        except CheckpointError as e:  # a special token not in the vocabulary
            raise CheckpointError(f"{where}: {e}") from None
        except Exception as e:  # the tokenizers library's: merges of symbols not in the vocabulary, ...
            raise CheckpointError(f"{' / '.join(map(str, files))}: {str(e).splitlines()[0][:200]}") from None

    def save_pretrained(self, folder) -> None:
        """Write `vocab.json`, `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json`,
        the files SD checkpoints ship and transformers' CLIPTokenizer reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.model.save(str(folder))  # vocab.json and merges.txt
        names = {"bos_token": self.tokenizer.id_to_token(self.bos_token_id),
                 "eos_token": self.tokenizer.id_to_token(self.eos_token_id),
                 "pad_token": self.tokenizer.id_to_token(self.pad_token_id),
                 "unk_token": self.tokenizer.model.unk_token}
        added = {str(i): {"content": t.content, "single_word": t.single_word, "lstrip": t.lstrip,
                          "rstrip": t.rstrip, "normalized": t.normalized, "special": t.special}
                 for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())}
        write_json(folder / "special_tokens_map.json", names)
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": self.model_max_length,
            "added_tokens_decoder": added, **names})

    def encode(self, prompts: str | list[str]) -> list[list[int]]:
        """The ids of each prompt's text, without BOS/EOS and not truncated."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"a prompt must be a str, got {type(p).__name__}")
            try:
                p.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: what Python makes of non-UTF-8 argv bytes
                raise ValueError(f"prompt is not valid text: {p[e.start:e.end]!r} at character {e.start} is not a "
                                 "Unicode character (was it given in an encoding other than UTF-8?)") from None
        return [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str], padding="max_length", max_length: int | None = None,
                 truncation: bool = True, return_tensors: str | None = None):
        """(N, model_max_length) LongTensor: BOS, each prompt's ids cut to fit, EOS, padding.
        Called as scripts call transformers' tokenizer for a text encoder (padding="max_length",
        max_length=model_max_length, truncation=True, return_tensors="pt"), it returns what
        transformers does: an `Encoding` with input_ids and attention_mask (1 up to EOS)."""
        n = self.model_max_length
        if (padding, max_length or n, truncation, return_tensors) not in (("max_length", n, True, None),
                                                                          ("max_length", n, True, "pt")):
            raise ValueError(f"CLIPTokenizer pads and cuts every prompt to model_max_length={n} "
                             "(padding='max_length', truncation=True) and returns torch tensors (return_tensors='pt')")
        rows, mask = [], []
        for ids in self.encode(prompts):
            ids = [self.bos_token_id, *ids[:n - 2], self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (n - len(ids)))
            mask.append([1] * len(ids) + [0] * (n - len(ids)))
        input_ids = torch.tensor(rows, dtype=torch.long).view(len(rows), n)
        if return_tensors is None:
            return input_ids
        return Encoding(input_ids=input_ids, attention_mask=torch.tensor(mask, dtype=torch.long).view(len(rows), n))

    def dropped_text(self, prompts: str | list[str]) -> list[str]:
        """For each prompt, the text cut off by truncation ("" when it fits), for a warning."""
        return [self.decode(ids[self.model_max_length - 2:]) for ids in self.encode(prompts)]
