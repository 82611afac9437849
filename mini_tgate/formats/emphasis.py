"""A1111 prompt emphasis: `(word)`, `[word]`, `(word:1.3)`, escapes and `BREAK`, as AUTOMATIC1111's
stable-diffusion-webui reads a prompt (modules/prompt_parser.py, modules/sd_hijack_clip.py).

Parsing (`parse_prompt_attention`): the prompt becomes runs of text, each with a weight.
`(text)` multiplies its weight by 1.1, `[text]` divides it by 1.1, `(text:w)` multiplies it by w;
brackets nest (`((text))` is 1.21); a bracket left open is closed at the end of the prompt, and a
closing one that closes nothing is text. `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters.
`BREAK` (the word, capitals) outside brackets ends the current chunk; inside brackets A1111 reads it as
text, and so does this. Runs of equal weight are joined.

Chunks (`prompt_chunks`): each run is tokenized on its own; the tokens fill chunks of 75
(model_max_length - 2), each written BOS, tokens, EOS, padding, with the run's weight per token
(1.0 for BOS, EOS and padding). A token that would overflow a chunk which holds a comma among its
last A1111_COMMA_BACKTRACK tokens moves the text after that comma to the next chunk (A1111's
"comma padding backtrack", default 20). Prompts of a batch get empty chunks up to the longest.

Embedding (`emphasize`, A1111's "Original" emphasis): the text encoder encodes each chunk on its
own; each token's state is multiplied by its weight, then the chunk's states are scaled so that
their mean is the mean before: z * (mean(z) / mean(z * w)). The chunks' states are concatenated
along the tokens (a prompt of 2 chunks conditions on 154 tokens). SDXL's pooled text is the first
chunk's. A1111 takes that mean over all the prompts it encodes together; here over each prompt's
chunk, so an image does not depend on the other prompts of its batch (the same for one prompt, or
for a batch of copies of it). A chunk whose weights are all 1.0 is left exactly as encoded.
"""

from __future__ import annotations

import re
import warnings

import torch

from ..core.bounds import A1111_COMMA_BACKTRACK, MAX_PROMPT_CHUNKS

ROUND, SQUARE = 1.1, 1 / 1.1  # (text), [text]
# One piece of a prompt: an escape (a backslash, with the character it makes literal), an opening
# bracket, a weight closing a round bracket, a closing bracket, plain text, or a lone colon.
PIECE = re.compile(r"\\[()\[\]\\]?|[(\[]|:\s*([+-]?[.\d]+)\s*\)|[)\]]|[^\\()\[\]:]+|:")
BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
SYNTAX = "(word), ((word)), [word], (word:1.3), \\( and BREAK"


def parse_prompt_attention(text: str) -> list[list]:
    """[[text, weight], ...] as A1111's function of this name returns it; a BREAK is ["BREAK", -1]."""
    runs: list[list] = []
    open_round: list[int] = []   # where each open bracket's runs start
    open_square: list[int] = []

    def scale(start: int, factor: float):
        for run in runs[start:]:
            run[1] *= factor

    for m in PIECE.finditer(text):
        piece, number = m.group(0), m.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif number is not None and open_round:
            try:
                factor = float(number)
            except ValueError:
                raise ValueError(f"prompt emphasis weight {number!r} (in {piece!r}) is not a number") from None
            scale(open_round.pop(), factor)
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(BREAK.split(piece)):
                if i:
                    runs.append(["BREAK", -1])
                runs.append([part, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    joined: list[list] = []
    for run in runs or [["", 1.0]]:
        if joined and joined[-1][1] == run[1]:
            joined[-1][0] += run[0]
        else:
            joined.append(run)
    return joined


def has_emphasis(text: str) -> bool:
    """Whether A1111 would read `text` otherwise than literally."""
    return parse_prompt_attention(text) != [[text, 1.0]]


def warn_literal(texts) -> None:
    """One line when emphasis is off and a prompt holds its syntax."""
    found = next((t for t in texts if t and has_emphasis(t)), None)
    if found is not None:
        warnings.warn(f"prompt {found[:60]!r}{'...' if len(found) > 60 else ''} holds A1111 emphasis syntax "
                      f"({SYNTAX}), taken literally as diffusers does; pass emphasis=True to apply it", stacklevel=5)


def prompt_chunks(tokenizer, text: str) -> list[tuple[list[int], list[float]]]:
    """A1111's chunks of one prompt: (ids, weights), each model_max_length long."""
    size = tokenizer.model_max_length - 2
    comma = tokenizer.tokenizer.token_to_id(",</w>")
    runs = parse_prompt_attention(text)
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close():
        nonlocal ids, weights, last_comma
        pad = size - len(ids)
        chunks.append(([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
                       [1.0, *weights, 1.0] + [1.0] * pad))
        ids, weights, last_comma = [], [], -1

    for tokens, (run, weight) in zip(tokenizer.encode([run for run, _ in runs]), runs):
        if run == "BREAK" and weight == -1:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= A1111_COMMA_BACKTRACK:
                moved = ids[last_comma + 1:], weights[last_comma + 1:]
                ids, weights = ids[:last_comma + 1], weights[:last_comma + 1]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == size:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def chunk_count(tokenizers, texts) -> int:
    """The chunks the longest of these prompts makes (with any of these tokenizers), checked."""
    count = 1
    for tokenizer in tokenizers:
        for text in texts:
            n = len(prompt_chunks(tokenizer, text))
            if n > MAX_PROMPT_CHUNKS:
                raise ValueError(f"prompt {text[:40]!r}... makes {n} chunks of {tokenizer.model_max_length - 2} "
                                 f"tokens with emphasis, over the {MAX_PROMPT_CHUNKS} a prompt may have")
            count = max(count, n)
    return count


def weighted_tokens(tokenizer, texts: list[str], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, count, model_max_length) ids and float32 weights of the prompts' chunks, each prompt
    padded with empty chunks (BOS, EOS, padding; weights 1.0) to `count`, as A1111 pads a batch."""
    empty = prompt_chunks(tokenizer, "")[0]
    rows = []
    for text in texts:
        chunks = prompt_chunks(tokenizer, text)
        rows.append(chunks + [empty] * (count - len(chunks)))
    ids = torch.tensor([[c[0] for c in row] for row in rows], dtype=torch.long)
    weights = torch.tensor([[c[1] for c in row] for row in rows], dtype=torch.float32)
    return ids, weights


def emphasize(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's original emphasis of one chunk: (B, T, D) states times their tokens' (B, T)
    weights, each row rescaled to its mean before (computed in float32); rows whose weights are
    all 1.0 are returned untouched."""
    weighted = (weights != 1.0).any(dim=1)
    if not weighted.any():
        return states
    z = states.float()
    w = weights.to(z.device)[..., None]
    before = z.mean(dim=(1, 2), keepdim=True)
    scaled = z * w
    scaled = scaled * (before / scaled.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted.to(z.device)[:, None, None], scaled, z).to(states.dtype)
