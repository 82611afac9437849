"""Derive CLIP's `vocab.json` and `merges.txt` from OpenAI's `bpe_simple_vocab_16e6.txt.gz`.

    python mini_tgate/clip/make_vocab.py path/to/bpe_simple_vocab_16e6.txt.gz [out_dir]

The result is the vocabulary every Stable Diffusion `tokenizer/` folder ships
(49,408 tokens, 48,894 merges). The derivation follows OpenAI's `clip/simple_tokenizer.py`:
merges are lines 2 .. 48,895 of the file; the vocab, in id order, is the 256 byte characters,
the same 256 with `</w>` appended, one token per merge (its halves joined), then
`<|startoftext|>` (49406) and `<|endoftext|>` (49407).
"""

import gzip
import json
import sys
from pathlib import Path


def byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in CLIP's vocabulary order.

    The 188 printable Latin-1 bytes stand for themselves and come first (so "!" is id 0);
    the other 68 (control characters, space, ...) follow as the code points 256, 257, ...
    given in byte order. The byte-level pre-tokenizer of `tokenizers` uses the same map.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(256 - len(keep))]


def make_vocab(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab(bpe_gz: Path, out_dir: Path) -> None:
    vocab, merges = make_vocab(bpe_gz)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_vocab(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
