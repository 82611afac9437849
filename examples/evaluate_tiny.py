"""Prompt adherence of the tiny shapes model, without and with TGATE at several gate steps, and DeepCache.

    python examples/evaluate_tiny.py                       # weights/tiny-shapes, 48 prompts x 2 seeds, 25 steps
    python examples/evaluate_tiny.py --model /tmp/trial/model --seeds 1

A thin layer over `python -m mini_tgate batch --compare-tgate`: one run per configuration, each
making the same images (the same 48 prompts, image i seeded with i) without and with its gate,
grading both with the checker of examples/shapes.py (shape colour, background colour, shape, all
three right) and counting the UNet's MACs as the paper does (mini_tgate.count_macs). This script
reads their manifests into one table, adding each configuration's mean absolute difference to
the baseline's image of the same prompt and seed (per pixel and channel, in 0-255 levels, from
the PNGs). ms / image is the generation time per image (text, denoising, decoding) in batches of
--batch-size on this machine's CPU: a rough figure. The images stay in --out (a rerun reuses
them); the table goes to stdout and docs/tiny_eval.md, sample grids to docs/.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image  # Pillow: matplotlib, the examples' extra, depends on it

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import shapes  # noqa: E402

from mini_tgate.cli import main as mini_tgate_cli  # noqa: E402
from mini_tgate.formats.png import image_grid, save_png  # noqa: E402

# name -> (batch options, folder: "tgate" for the gated images, "no-tgate" for those without).
# "m" alone gates cross-attention only (the paper's notation); the paper's SD default also caches
# self-attention every 5 steps before the gate. DeepCache runs with tgate's DeepCache defaults for
# the gate (sp_interval 1, warm-up 0); one --compare-tgate run gives both DeepCache rows.
GATE = ["--sp-interval", "1", "--fi-interval", "1", "--warm-up", "0"]
CONFIGS = {
    "baseline": (["--gate-step", "3", *GATE], "no-tgate"),  # the first run's images without the gate
    "TGATE m=3": (["--gate-step", "3", *GATE], "tgate"),
    "TGATE m=5": (["--gate-step", "5", *GATE], "tgate"),
    "TGATE m=10": (["--gate-step", "10", *GATE], "tgate"),
    "TGATE m=10, k=5 (paper default)": (["--gate-step", "10", "--sp-interval", "5", "--fi-interval", "1",
                                         "--warm-up", "2"], "tgate"),
    "DeepCache, interval 3": (["--deepcache-interval", "3", "--gate-step", "10", *GATE], "no-tgate"),
    "DeepCache + TGATE m=10": (["--deepcache-interval", "3", "--gate-step", "10", *GATE], "tgate"),
}
GRID_ROWS = list(CONFIGS)[:5]  # docs/tiny_tgate_rows.png: baseline and the four gates


def eval_prompts() -> list[str]:
    """48 prompts: every shape colour with every shape, each on two backgrounds (never its own colour)."""
    names, out = shapes.NAMES, []
    for c, color in enumerate(names):
        for s, shape in enumerate(shapes.SHAPES):
            for k in range(2):
                background = names[(c + 1 + 2 * s + k) % len(names)]  # offsets 1..6 from the shape's colour
                out.append(shapes.caption(color, shape, background))
    return out


def parser(doc: str) -> argparse.ArgumentParser:
    """The options this script and analyse_tiny.py share."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "tiny-shapes"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    return p


def read_rows(folder: Path) -> tuple[list[dict], np.ndarray]:
    """A batch folder's manifest records, in the job's order, and its images (N, 64, 64, 3) uint8."""
    records = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return records, np.stack([np.asarray(Image.open(folder / r["file"]).convert("RGB")) for r in records])


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (seeds 0, 1, ... in turn)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "evaluate_tiny", help="where the images go")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    prompts = eval_prompts()
    prompt_file = args.out / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    common = [str(prompt_file), "--compare-tgate", "--model", args.model, "--steps", str(args.steps),
              "--guidance-scale", str(args.guidance), "--seed", "0", "--num-images", str(args.seeds),
              "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    runs = {}  # batch options -> its folder
    for options, _ in CONFIGS.values():
        key = tuple(options)
        if key not in runs:
            runs[key] = args.out / f"run{len(runs)}"
            print(f"batch {' '.join(options)} --out {runs[key]}", file=sys.stderr)
            if mini_tgate_cli(["batch", *common, *options, "--out", str(runs[key])]) != 0:
                sys.exit(1)

    rows, images = [], {}
    for name, (options, half) in CONFIGS.items():
        records, images[name] = read_rows(runs[tuple(options)] / half)
        score = {k: float(np.mean([r["adherence"][k] for r in records])) for k in ("color", "background", "shape", "all")}
        diff = float(np.abs(images[name].astype(np.int16) - images["baseline"]).mean())
        seconds = float(np.mean([sum(r["seconds"].values()) for r in records]))
        rows.append((name, score, diff, seconds, records[0]["denoiser_macs"]))
        print(f"{name}: {score} diff {diff:.2f} {seconds * 1e3:.1f} ms/image", file=sys.stderr)

    base_macs = rows[0][4]
    lines = [f"{len(prompts)} prompts x {args.seeds} seeds, {args.steps} DDIM steps, guidance {args.guidance}, "
             f"batches of {args.batch_size}",
             "", "| configuration | shape colour | background | shape | all three | mean abs diff to baseline "
             "(0-255) | ms / image | UNet MACs / image |", "|---|---|---|---|---|---|---|---|"]
    for name, s, diff, seconds, macs in rows:
        lines.append(f"| {name} | {s['color']:.1%} | {s['background']:.1%} | {s['shape']:.1%} | **{s['all']:.1%}** "
                     f"| {diff:.2f} | {seconds * 1e3:.1f} | {macs / 1e9:.3f} G ({macs / base_macs:.0%}) |")
    table = "\n".join(lines)
    print(table)

    args.docs.mkdir(exist_ok=True)
    (args.docs / "tiny_eval.md").write_text(table + "\n")
    first_seed = slice(0, len(prompts) * args.seeds, args.seeds)  # image k * seeds + j is prompt k, seed j
    save_png(args.docs / "tiny_samples.png", image_grid(images["baseline"][first_seed], cols=12))
    # one row per configuration, the same 12 prompts and seed: where the gate changes the picture
    pick = slice(0, len(prompts) * args.seeds, 4 * args.seeds)
    save_png(args.docs / "tiny_tgate_rows.png", image_grid(np.concatenate([images[n][pick] for n in GRID_ROWS]), cols=12))
    print(f"\nwrote {args.docs}/tiny_eval.md, tiny_samples.png (baseline, seed 0, 48 prompts) and "
          f"tiny_tgate_rows.png (rows: {', '.join(GRID_ROWS)})")


if __name__ == "__main__":
    main()
