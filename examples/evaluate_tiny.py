"""Prompt adherence of the tiny shapes model, without and with TGATE at several gate steps.

    python examples/evaluate_tiny.py                       # weights/tiny-shapes, 48 prompts x 2 seeds, 25 steps
    python examples/evaluate_tiny.py --model /tmp/trial/model --seeds 1

Every configuration draws the same images: the same prompts and the same initial noise. Each
image is graded by the checker of examples/shapes.py (shape colour, background colour, shape,
all three right), and compared with the baseline's image of the same prompt and noise (mean
absolute difference per pixel and channel, in 0-255 levels). MACs are the UNet's over one
25-step generation, counted as the paper counts them (mini_tgate.count_macs). Latency is the
wall time per image when the 48 prompts run as one batch (denoising and decoding), on this
machine's CPU: a rough figure. Writes a markdown table to stdout and docs/tiny_eval.md, and
sample grids to docs/.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import shapes  # noqa: E402
import mini_tgate  # noqa: E402
from mini_tgate import TGate  # noqa: E402
from mini_tgate.png import image_grid, save_png  # noqa: E402

# name -> gate. "m" alone gates cross-attention only (the paper's notation); the paper's SD
# default also caches self-attention every 5 steps before the gate.
CONFIGS = {
    "baseline": None,
    "TGATE m=3": TGate(gate_step=3, sp_interval=1, fi_interval=1, warm_up=0),
    "TGATE m=5": TGate(gate_step=5, sp_interval=1, fi_interval=1, warm_up=0),
    "TGATE m=10": TGate(gate_step=10, sp_interval=1, fi_interval=1, warm_up=0),
    "TGATE m=10, k=5 (paper default)": TGate(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2),
}


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


def main():
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, default=2, help="initial noises per prompt")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipe = mini_tgate.load_pipeline(args.model)
    prompts = eval_prompts()
    noise = {seed: torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
             for seed in range(args.seeds)}
    pipe(prompts[:2], num_inference_steps=2)  # warm-up: first calls are slower

    rows, images = [], {}
    for name, gate in CONFIGS.items():
        t0, ims = time.perf_counter(), []
        for seed in range(args.seeds):
            ims.append(pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                            latents=noise[seed], tgate=gate).images)
        seconds = (time.perf_counter() - t0) / (len(prompts) * args.seeds)
        images[name] = ims = np.concatenate(ims)  # (seeds * 48, 64, 64, 3), seed-major
        score = shapes.adherence(ims, prompts * args.seeds)
        diff = float(np.abs(ims - images["baseline"]).mean() * 255)
        macs = mini_tgate.count_macs(pipe.unet.config, 64, 64, args.steps, args.guidance, gate)["unet_macs"]
        rows.append((name, score, diff, seconds, macs))
        print(f"{name}: {score} diff {diff:.2f} {seconds * 1e3:.1f} ms/image", file=sys.stderr)

    base_macs = rows[0][4]
    lines = [f"{len(prompts)} prompts x {args.seeds} seeds, {args.steps} DDIM steps, guidance {args.guidance}",
             "", "| configuration | shape colour | background | shape | all three | mean abs diff to baseline "
             "(0-255) | ms / image | UNet MACs / image |", "|---|---|---|---|---|---|---|---|"]
    for name, s, diff, seconds, macs in rows:
        lines.append(f"| {name} | {s['color']:.1%} | {s['background']:.1%} | {s['shape']:.1%} | **{s['all']:.1%}** "
                     f"| {diff:.2f} | {seconds * 1e3:.1f} | {macs / 1e9:.3f} G ({macs / base_macs:.0%}) |")
    table = "\n".join(lines)
    print(table)

    args.docs.mkdir(exist_ok=True)
    (args.docs / "tiny_eval.md").write_text(table + "\n")
    save_png(args.docs / "tiny_samples.png", image_grid(images["baseline"][:len(prompts)], cols=12))
    # one row per configuration, the same 12 prompts and noise: where the gate changes the picture
    pick = slice(0, len(prompts), 4)
    save_png(args.docs / "tiny_tgate_rows.png", image_grid(np.concatenate([im[pick] for im in images.values()]), cols=12))
    print(f"\nwrote {args.docs}/tiny_eval.md, tiny_samples.png (baseline, seed 0, 48 prompts) and "
          f"tiny_tgate_rows.png (rows: {', '.join(CONFIGS)})")


if __name__ == "__main__":
    main()
