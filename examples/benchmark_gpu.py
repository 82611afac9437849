"""The GPU table: SD-1.5 at 512 px and SDXL at 1024 px, 25 steps, batch 1, real-size models with
random weights built here; diffusers eager (+ tgate, + DeepCache), mini_tgate eager, compiled, and
compiled with CUDA graphs (the whole UNet, or its repeated blocks: regional); plain, TGATE (the
paper's gates), DeepCache, TGATE + DeepCache.

    python examples/benchmark_gpu.py --out table.md   # one GPU, about 8 minutes (--budget)
    python examples/benchmark_gpu.py --small --device cpu --budget 60   # checks the script

Rows run in order of importance (`order()`: diffusers, diffusers + tgate and mini_tgate eager for
both models, then CUDA graphs of the repeated blocks, then the rest) until --budget seconds have
passed; the rest are listed as skipped. Each row is printed (and written to --out) as soon as it
is measured, so a run stopped early keeps what it measured. Each time is the median of --repeats
calls after one warm-up (which compiles; its seconds are printed too), output_type "latent":
prompt encoding and denoising, no VAE decode. The table gives with each: the speed-up over the
same engine's plain run, the MAC prediction of that speed-up, the fraction of the GPU's float16
matmul rate (measured in the same run) the denoiser reaches; then the issue's targets as
measured. The loop's host time per step around a no-op denoiser is printed once per model.
Needs the test extra (diffusers, tgate, DeepCache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
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


def load(folder: Path, model: str, dtype, engine: str, variant: str, device: str):
    """One row's pipeline: diffusers (with tgate's loader, or DeepCache's helper, for the run) or
    mini_tgate, eager or compiled."""
    import diffusers
    import tgate

    if engine.startswith("diffusers"):
        xl = model == "sdxl"
        pipe = (diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline).from_pretrained(
            folder, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        if variant == "TGATE":
            return (tgate.TgateSDXLLoader if xl else tgate.TgateSDLoader)(pipe)
        if variant == "TGATE + DeepCache":
            loader = tgate.TgateSDXLDeepCacheLoader if xl else tgate.TgateSDDeepCacheLoader
            return loader(pipe, cache_interval=DEEPCACHE.interval, cache_branch_id=DEEPCACHE.branch)
        if variant == "DeepCache":  # the DeepCache package's own helper
            from DeepCache import DeepCacheSDHelper
            helper = DeepCacheSDHelper(pipe=pipe)
            helper.set_params(cache_interval=DEEPCACHE.interval, cache_branch_id=DEEPCACHE.branch)
            helper.enable()
        return pipe
    pipe = mini_tgate.load_pipeline(folder, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    mode = {"mini_tgate eager": False, "mini_tgate compiled": None}.get(engine, "reduce-overhead")
    return pipe if mode is False else pipe.compile(mode=mode, regional=engine.endswith("regional"))


def measure(pipe, model: str, dtype, engine: str, variant: str, size: int, steps: int, device: str,
            repeats: int) -> dict:
    """One row: seconds per image of `pipe` for the run `variant`, with its MACs and the plain run's."""
    gate, dc = VARIANTS[variant]
    gate, dc = GATES[model] if gate else None, DEEPCACHE if dc else None
    latents = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=steps, height=size, width=size, latents=latents.to(device, dtype),
              output_type="latent")
    if engine.startswith("diffusers"):
        tg = {} if gate is None else dict(gate_step=gate.gate_step, sp_interval=gate.sp_interval,
                                           fi_interval=gate.fi_interval, warm_up=gate.warm_up)
        run = (lambda: pipe.tgate(PROMPT, **kw, **tg)) if gate else (lambda: pipe(PROMPT, **kw))
    else:
        run = lambda: pipe(PROMPT, tgate=gate, deepcache=dc, **kw)  # noqa: E731
    return dict(model=model, dtype=dtype, engine=engine, variant=variant, seconds=seconds(run, repeats, device),
                macs=count_macs(model, size, size, steps, 7.5, gate, deepcache=dc)["unet_macs"],
                plain_macs=count_macs(model, size, size, steps, 7.5, None)["unet_macs"])


def order(models: list[str], device: str) -> list[tuple]:
    """(model, dtype, engine, variant) in order of importance, rows of one pipeline together: first
    what the targets need (the speed-ups of every run, eager, and diffusers + tgate against the
    fastest engine: CUDA graphs of the repeated blocks, quickest to compile), then the rest."""
    fp16, bf16, rows = torch.float16, torch.bfloat16, []
    graphs = ("TGATE + DeepCache", "TGATE", "plain") if device.startswith("cuda") else ()
    for model in models:
        rows += [(model, fp16, "diffusers", "plain"), (model, fp16, "diffusers + tgate", "TGATE")]
        rows += [(model, fp16, "mini_tgate eager", v) for v in VARIANTS]
    rows += [(model, fp16, "mini_tgate CUDA graphs, regional", v) for model in models for v in graphs]
    for model in models:
        rows += [(model, fp16, "diffusers + tgate", "TGATE + DeepCache"), (model, fp16, "diffusers + DeepCache", "DeepCache")]
        if graphs:
            rows += [(model, fp16, "mini_tgate CUDA graphs", v) for v in (*graphs, "DeepCache")]
        rows += [(model, fp16, "mini_tgate compiled", v) for v in ("TGATE + DeepCache", "TGATE", "plain", "DeepCache")]
        rows += [(model, bf16, "mini_tgate eager", v) for v in VARIANTS]
    return rows


def report(done: list[dict], rate: float) -> str:
    """The table, then the issue's three targets as measured."""
    lines = ["| model | dtype | engine | run | s / image | speed-up | MAC-predicted | achieved / predicted | "
             "denoiser's share of the matmul rate |", "|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        base = next((b for b in done if (b["model"], b["dtype"], b["variant"]) == (r["model"], r["dtype"], "plain")
                     and b["engine"].split(" +")[0] == r["engine"].split(" +")[0]), None)
        speed = f"{base['seconds'] / r['seconds']:.2f}x" if base else "-"
        predicted = base["macs"] / r["macs"] if base else r["plain_macs"] / r["macs"]
        ratio = f"{base['seconds'] / r['seconds'] / predicted:.0%}" if base else "-"
        lines.append(f"| {r['model']} | {str(r['dtype'])[6:]} | {r['engine']} | {r['variant']} | {r['seconds']:.3f} | "
                     f"{speed} | {predicted:.2f}x | {ratio} | {r['macs'] / r['seconds'] / rate:.0%} |")
    sdxl = {(r["engine"], r["variant"]): r["seconds"] for r in done if r["model"] == "sdxl" and r["dtype"] == torch.float16}
    ref = sdxl.get(("diffusers + tgate", "TGATE"))
    fast = [s for (e, v), s in sdxl.items() if v == "TGATE" and e.startswith("mini_tgate")]
    if ref and fast:
        lines.append(f"\ntarget: SDXL + TGATE, fastest mini_tgate against diffusers + tgate eager: "
                     f"{ref / min(fast):.2f}x (>= 1.3x)")
    both = [s for (e, v), s in sdxl.items() if v == "TGATE + DeepCache" and e.startswith("mini_tgate")]
    if both:
        lines.append(f"target: SDXL 1024 px TGATE + DeepCache, fastest mini_tgate: {min(both):.3f} s / image (< 0.5)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default="sdxl,sd15")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=420, help="seconds; the rows left are listed as skipped")
    p.add_argument("--out", type=Path, help="also write each row here as it is measured (a new file), then the table")
    p.add_argument("--small", action="store_true", help="narrow models, 64 px, 4 steps: checks the script")
    args = p.parse_args()
    out = open(args.out, "x") if args.out else None  # never overwrites a file

    def say(line: str) -> None:
        print(line, flush=True)
        if out:
            print(line, file=out, flush=True)

    start, device, steps = time.perf_counter(), args.device, (4 if args.small else args.steps)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rate = matmul_rate(device, torch.float16)
    say(f"{torch.cuda.get_device_name() if device.startswith('cuda') else device}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; float16 matmul: {2 * rate / 1e12:.0f} TFLOP/s measured")
    tmp = Path(tempfile.mkdtemp())
    models = args.models.split(",")
    folders = {m: build(tmp / m, m, args.small, device) for m in models}
    size = {"sd15": 512, "sdxl": 1024} if not args.small else {"sd15": 64, "sdxl": 64}
    done, skipped, held = [], [], {}  # held: the one pipeline kept, by (model, dtype, engine, and for diffusers the run)

    def pipeline(model, dtype, engine, variant):
        key = (model, dtype, engine, variant if engine.startswith("diffusers") else None)
        if key not in held:
            held.clear()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            held[key] = load(folders[model], model, dtype, engine, variant, device)
            if engine == "mini_tgate eager":
                kw = dict(num_inference_steps=steps, height=size[model], width=size[model])
                say(f"{model} {str(dtype)[6:]}: the loop's host work per step, no-op denoiser: "
                    f"{loop_overhead(held[key], kw, device, steps) * 1e3:.2f} ms")
        return held[key]


    broken = set()  # (model, dtype, engine) whose pipeline failed: its other rows are not tried
    for model, dtype, engine, variant in order(models, device):
        name = f"{model} {str(dtype)[6:]} {engine} {variant}"
        if time.perf_counter() - start > args.budget or (model, dtype, engine) in broken:
            skipped.append(name + (" (its engine failed)" if (model, dtype, engine) in broken else " (budget)"))
            continue
        began = time.perf_counter()
        try:
            r = measure(pipeline(model, dtype, engine, variant), model, dtype, engine, variant, size[model], steps,
                        device, args.repeats)
        except Exception as e:  # one engine failing (a compile, a CUDA graph) must not cost the other rows
            traceback.print_exc()
            say(f"row failed: {name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
            broken.add((model, dtype, engine))
            held.clear()
            continue
        done.append(r)
        say(f"row: {name}: {r['seconds']:.3f} s / image ({time.perf_counter() - began:.0f} s with warm-up and "
            f"compiling; {time.perf_counter() - start:.0f} s so far)")
    held.clear()
    say("\n" + report(done, rate))
    for s in skipped:
        say(f"skipped: {s}")
    say(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
