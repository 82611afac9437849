"""The GPU table: SD-1.5 at 512 px and SDXL at 1024 px, 25 steps, batch 1, real-size models with
random weights built here; diffusers eager, diffusers + tgate, mini_tgate eager, compiled, and
compiled with CUDA graphs; plain, TGATE (the paper's gates), DeepCache, TGATE + DeepCache.

    python examples/benchmark_gpu.py                  # one GPU, about 8 minutes (--budget)
    python examples/benchmark_gpu.py --small --device cpu --budget 60   # checks the script

Rows run in order of importance (SDXL float16 first, then SD-1.5, then the compiled-only
variants, then bfloat16) until --budget seconds have passed; the rest are listed as skipped.
Each time is the median of --repeats calls after one warm-up (which compiles), output_type
"latent" (prompt encoding and denoising; the VAE decode is timed once per model). Printed with
each: the speed-up over the same engine's plain run, the MAC prediction of that speed-up, the
fraction of the GPU's float16 matmul rate (measured in the same run) the denoiser reaches, and
the host time per step of the loop around a no-op denoiser. Needs the test extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import mini_tgate  # noqa: E402
from mini_tgate import DeepCache, TGate  # noqa: E402
from mini_tgate.macs import count_macs  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
GATES = {"sd15": TGate(10, 5, 1, 2), "sdxl": TGate(10, 5, 1, 2)}  # the paper's, at 25 steps
DEEPCACHE = DeepCache(3, 0)  # tgate's DeepCache loaders'
VARIANTS = {"plain": (None, None), "TGATE": (True, None), "DeepCache": (None, True), "TGATE + DeepCache": (True, True)}


def build(folder: Path, model: str, small: bool, device: str) -> Path:
    """A diffusers checkpoint of the real UNet (its preset config) and VAE, random weights, float16;
    text encoders of the real width with 2 layers (their time is in every row alike)."""
    import diffusers
    from tiny_models import perturb, text_encoder, tokenizer

    config = json.loads((ROOT / "mini_tgate" / "presets" / f"{model}.json").read_text())
    if small:  # the same topology, narrow
        config.update(block_out_channels=[32, 64, 64, 64][:len(config["block_out_channels"])], norm_num_groups=8,
                      attention_head_dim=4, cross_attention_dim=32 * (2 if model == "sdxl" else 1))
        if model == "sdxl":
            config.update(projection_class_embeddings_input_dim=32 + 6 * config["addition_time_embed_dim"])
    torch.manual_seed(0)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = perturb(diffusers.UNet2DConditionModel.from_config(config), 0).half()
        width = (8, 8, 8, 8) if small else (128, 256, 512, 512)
        vae = perturb(diffusers.AutoencoderKL(block_out_channels=width, layers_per_block=2,
                                              norm_num_groups=8 if small else 32, force_upcast=model == "sdxl",
                                              down_block_types=("DownEncoderBlock2D",) * 4,
                                              up_block_types=("UpDecoderBlock2D",) * 4), 0).half()
        scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                     steps_offset=1)
        if model == "sd15":
            te = text_encoder(config["cross_attention_dim"], "quick_gelu").half()
            pipe = diffusers.StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer(),
                                                     scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                     requires_safety_checker=False)
        else:
            d = config["cross_attention_dim"]
            te1 = text_encoder(d * 3 // 8 if not small else d // 2, "quick_gelu").half()
            te2 = text_encoder(d * 5 // 8 if not small else d // 2, "gelu", projection=1280 if not small else 32,
                               seed=1).half()
            pipe = diffusers.StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2,
                                                       tokenizer=tokenizer(), tokenizer_2=tokenizer("!"),
                                                       scheduler=scheduler)
    pipe.save_pretrained(folder)
    return folder


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(run, repeats: int, device: str) -> float:
    run()  # warm-up: compiles, records the CUDA graphs
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(device: str, dtype) -> float:
    """Multiply-adds per second of a large square matmul on this device."""
    n = 8192 if device.startswith("cuda") else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return n**3 / seconds(lambda: a @ b, 10, device)


def loop_overhead(pipe, kw: dict, device: str, steps: int) -> float:
    """Seconds per step of a call whose denoiser does nothing (one tiny kernel): the loop's own host
    work, what a fast denoiser must hide (it does, when no step waits for the device)."""
    unet = pipe.unet
    unet.forward = lambda sample, **_: sample[:, :4] * 0
    try:
        return seconds(lambda: pipe(PROMPT, output_type="latent", **kw), 3, device) / steps
    finally:
        del unet.forward


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="sdxl,sd15")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=420, help="seconds; the rows left are listed as skipped")
    p.add_argument("--small", action="store_true", help="narrow models, 64 px, 4 steps: checks the script")
    args = p.parse_args()
    import diffusers
    from tgate import TgateSDDeepCacheLoader, TgateSDLoader, TgateSDXLDeepCacheLoader, TgateSDXLLoader

    start, device, steps = time.perf_counter(), args.device, (4 if args.small else args.steps)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rate = matmul_rate(device, torch.float16)
    print(f"{torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}; float16 matmul: {2 * rate / 1e12:.0f} TFLOP/s measured\n")
    tmp = Path(tempfile.mkdtemp())
    models = args.models.split(",")
    folders = {m: build(tmp / m, m, args.small, device) for m in models}
    size = {"sd15": 512, "sdxl": 1024} if not args.small else {"sd15": 64, "sdxl": 64}
    done, skipped = [], []

    def ours(model, dtype, mode):
        pipe = mini_tgate.load_pipeline(folders[model], device=device, dtype=dtype)
        return pipe if mode == "eager" else pipe.compile(mode={"compiled": None, "CUDA graphs": "reduce-overhead"}[mode])

    def theirs(model, dtype, gated):
        cls = diffusers.StableDiffusionXLPipeline if model == "sdxl" else diffusers.StableDiffusionPipeline
        pipe = cls.from_pretrained(folders[model], torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if gated == "TGATE":
            return (TgateSDXLLoader if model == "sdxl" else TgateSDLoader)(pipe)
        if gated == "TGATE + DeepCache":
            loader = TgateSDXLDeepCacheLoader if model == "sdxl" else TgateSDDeepCacheLoader
            return loader(pipe, cache_interval=DEEPCACHE.interval, cache_branch_id=DEEPCACHE.branch)
        return pipe

    def row(model, dtype, engine, variant, pipe):
        if time.perf_counter() - start > args.budget:
            skipped.append((model, dtype, engine, variant))
            return
        gate, dc = VARIANTS[variant]
        gate, dc = GATES[model] if gate else None, DEEPCACHE if dc else None
        latents = torch.randn(1, 4, size[model] // 8, size[model] // 8, generator=torch.Generator().manual_seed(0))
        kw = dict(num_inference_steps=steps, height=size[model], width=size[model],
                  latents=latents.to(device, dtype), output_type="latent")
        if engine.startswith("diffusers"):
            tg = {} if gate is None else dict(gate_step=gate.gate_step, sp_interval=gate.sp_interval,
                                               fi_interval=gate.fi_interval, warm_up=gate.warm_up)
            run = (lambda: pipe.tgate(PROMPT, **kw, **tg)) if gate else (lambda: pipe(PROMPT, **kw))
        else:
            run = lambda: pipe(PROMPT, tgate=gate, deepcache=dc, **kw)  # noqa: E731
        macs = count_macs(model, size[model], size[model], steps, 7.5, gate, deepcache=dc)["unet_macs"]
        done.append(dict(model=model, dtype=dtype, engine=engine, variant=variant, seconds=seconds(run, args.repeats, device),
                         macs=macs))

    for model in models:  # float16: diffusers, then mini_tgate eager and with CUDA graphs (the targets)
        dtype = torch.float16
        for variant in ("plain", "TGATE", "TGATE + DeepCache"):
            if time.perf_counter() - start <= args.budget:
                row(model, dtype, "diffusers" + ("" if variant == "plain" else " + tgate"), variant,
                    theirs(model, dtype, variant))
        for engine in ("eager", "CUDA graphs") if device.startswith("cuda") else ("eager",):
            pipe = ours(model, dtype, engine)
            for variant in VARIANTS:
                row(model, dtype, f"mini_tgate {engine}", variant, pipe)
            if engine == "eager":
                overhead = loop_overhead(pipe, dict(num_inference_steps=steps, height=size[model],
                                                    width=size[model]), device, steps)
                print(f"{model}: the loop's host work per step, no-op denoiser: {overhead * 1e3:.2f} ms")
            del pipe
    for model in models:  # compiled without CUDA graphs, then bfloat16 eager
        pipe = ours(model, torch.float16, "compiled") if time.perf_counter() - start <= args.budget else None
        for variant in VARIANTS:
            row(model, torch.float16, "mini_tgate compiled", variant, pipe)
        pipe = ours(model, torch.bfloat16, "eager")
        for variant in VARIANTS:
            row(model, torch.bfloat16, "mini_tgate eager", variant, pipe)

    print("| model | dtype | engine | run | s / image | speed-up | MAC-predicted | achieved / predicted | "
          "denoiser's share of the matmul rate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in done:
        base = next(b for b in done if (b["model"], b["dtype"], b["variant"]) == (r["model"], r["dtype"], "plain")
                    and b["engine"].split(" +")[0] == r["engine"].split(" +")[0])
        speedup, predicted = base["seconds"] / r["seconds"], base["macs"] / r["macs"]
        share = r["macs"] / r["seconds"] / rate
        print(f"| {r['model']} | {str(r['dtype'])[6:]} | {r['engine']} | {r['variant']} | {r['seconds']:.3f} | "
              f"{speedup:.2f}x | {predicted:.2f}x | {speedup / predicted:.0%} | {share:.0%} |")
    for s in skipped:
        print(f"skipped (budget): {s[0]} {str(s[1])[6:]} {s[2]} {s[3]}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
