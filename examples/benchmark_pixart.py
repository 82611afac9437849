"""Benchmark and full-size check of the PixArt pipeline: mini_tgate against diffusers'
PixArtAlphaPipeline (plain) and against the `tgate` package's TgatePixArtAlphaLoader (gated), on
PixArt-Alpha's real transformer (the preset config, 0.6 B parameters, random weights), the SD VAE
and a T5 of T5-v1.1-XXL's width with fewer layers (random weights), at 1024 px and 25 steps.
Prints the largest image difference per dtype and, on a GPU, the denoising times.

    python examples/benchmark_pixart.py --device cuda              # what docs/measurements.md's figures ran
    python examples/benchmark_pixart.py --small                    # a quick CPU run of the script

Needs the test extra (diffusers, transformers, tgate, sentencepiece: a T5 tokenizer is trained
on a few sentences, since no real one can be downloaded here). Times are the best of 3 after a
warm-up, output_type="latent" (text encoding and denoising, no VAE decode).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

import mini_tgate
from mini_tgate import TGate, load_pipeline

PRESET = Path(mini_tgate.__file__).parent / "presets" / "pixart-alpha.json"
PROMPT = "A small cactus with a happy face in the Sahara desert"


def t5_tokenizer(root: Path):
    import sentencepiece as spm
    import transformers

    words = "a small cactus with happy face in the sahara desert photo of an astronaut riding horse".split()
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=8)) for _ in range(300)))
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / "sp"), vocab_size=32,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    folder = root / "spiece"
    folder.mkdir()
    (folder / "spiece.model").write_bytes((root / "sp.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100, "model_max_length": 512}))
    return transformers.T5Tokenizer.from_pretrained(folder)


def build(folder: Path, device: str, small: bool) -> None:
    """Save a diffusers PixArtAlphaPipeline with random weights at the real transformer size."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    config = json.loads(PRESET.read_text())
    if small:
        config["num_layers"] = 1
    with torch.device(device):
        transformer = diffusers.PixArtTransformer2DModel.from_config(config)
        t5 = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=1 if small else 2, num_heads=64,
            feed_forward_proj="gated-gelu"))
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4,
                                      up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
        with torch.no_grad():  # every weight random (diffusers zero-initialises the modulation)
            for model in (transformer, vae):
                for p in model.parameters():
                    p.normal_(0, 0.02)
    pipe = diffusers.PixArtAlphaPipeline(tokenizer=t5_tokenizer(folder.parent), text_encoder=t5.eval(),
                                         vae=vae.eval(), transformer=transformer.eval(),
                                         scheduler=diffusers.DPMSolverMultistepScheduler())
    pipe.save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="1 transformer layer, 256 px, 3 steps: checks the script")
    ap.add_argument("--compile", action="store_true", help="also time mini_tgate after pipe.compile()")
    args = ap.parse_args()
    import diffusers
    from tgate import TgatePixArtAlphaLoader

    device, small = args.device, args.small
    steps, side = (3, 32) if small else (25, 128)
    gate = TGate(gate_step=2, sp_interval=1, warm_up=0) if small else TGate(15, 3, 1, 2)  # the authors' PixArt gate
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    common = dict(num_inference_steps=steps, height=side * 8, width=side * 8, use_resolution_binning=False)

    def reference(pipe, g, dtype, out="np"):
        kw = dict(prompt=PROMPT, **common, latents=latents.to(device, dtype), output_type=out, clean_caption=False)
        if g is None:
            return pipe(**kw).images
        return pipe.tgate(**kw, gate_step=g.gate_step, sp_interval=g.sp_interval, fi_interval=g.fi_interval,
                          warm_up=g.warm_up).images

    def ours(pipe, g, dtype, out="np"):
        return pipe(PROMPT, **common, latents=latents.to(device, dtype), tgate=g, output_type=out).images

    def best_of_3(fn):
        fn()
        times = []
        for _ in range(3):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pixart-alpha-random"
        build(folder, device, small)
        print(f"PixArt-Alpha transformer (preset config{', 1 layer' if small else ''}), random weights, "
              f"{side * 8} px, {steps} steps, TGATE {gate}, on {device}")
        for dtype in (torch.float32, torch.float16) if device != "cpu" else (torch.float32,):
            mine = load_pipeline(folder, device=device, dtype=dtype)
            plain = diffusers.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
            gated = TgatePixArtAlphaLoader(diffusers.PixArtAlphaPipeline.from_pretrained(folder, torch_dtype=dtype).to(device))
            for p in (plain, gated):
                p.set_progress_bar_config(disable=True)
            name = str(dtype).removeprefix("torch.")
            for g, ref in ((None, plain), (gate, gated)):
                diff = abs(reference(ref, g, dtype) - ours(mine, g, dtype)).max()
                print(f"{name} {'gated' if g else 'plain'}: max |mini_tgate - {'tgate' if g else 'diffusers'}| = {diff:.2e}")
            if dtype == torch.float32 and device != "cpu":
                continue
            rows = {"diffusers": best_of_3(lambda: reference(plain, None, dtype, "latent")),
                    "diffusers + tgate": best_of_3(lambda: reference(gated, gate, dtype, "latent")),
                    "mini_tgate": best_of_3(lambda: ours(mine, None, dtype, "latent")),
                    "mini_tgate + TGATE": best_of_3(lambda: ours(mine, gate, dtype, "latent"))}
            if args.compile:
                mine.compile()
                rows["mini_tgate compiled"] = best_of_3(lambda: ours(mine, None, dtype, "latent"))
                rows["mini_tgate compiled + TGATE"] = best_of_3(lambda: ours(mine, gate, dtype, "latent"))
            print(f"\n| run ({name}) | seconds | TGATE speed-up |\n|---|---|---|")
            for k, v in rows.items():
                base = rows.get(k.removesuffix(" + TGATE").removesuffix(" + tgate"))
                print(f"| {k} | {v:.3f} | {base / v:.2f}x |" if base is not v else f"| {k} | {v:.3f} | |")
    print("\nMAC-predicted TGATE speed-up at 1024 px, 25 steps, gate (15, 3, 1, 2): 107.031T / 73.971T = 1.45x")


if __name__ == "__main__":
    main()
