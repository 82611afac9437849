"""Benchmark: mini_tgate vs diffusers, diffusers + the `tgate` package, + the `DeepCache` package's
helper and + tgate's DeepCache loader, on the same random-weight model, device, steps and initial
noise; each mini_tgate row beside the reference row it reproduces. Prints a markdown table.

    python examples/benchmark.py                          # SD-1.5 topology, narrow, 256 px, CPU
    python examples/benchmark.py --model sd15 --size 256  # the full SD-1.5 architecture
    python examples/benchmark.py --device cuda --dtype float16 --model sd15 --size 512 --compile

Needs the test extra (diffusers, transformers, tgate). Latency is the median of `--repeats`
runs, the libraries alternating run by run so that machine noise hits all alike. Load time
and the peak memory while loading are measured in a fresh process per library.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mini_tgate  # noqa: E402
from mini_tgate.core.tgate import DeepCache  # noqa: E402
from mini_tgate.macs import count_macs  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


def build_checkpoint(folder: Path, model: str) -> Path:
    """A random-weight SD-1.5-topology checkpoint in diffusers layout: the real UNet config
    ("sd15") or the same topology with 1/5 of the channels ("small")."""
    import warnings

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_models import SD_SCHEDULER, perturb, text_encoder, tokenizer

    if (folder / "model_index.json").exists():
        return folder
    config = json.loads((ROOT / "mini_tgate" / "presets" / "sd15.json").read_text())
    if model == "small":
        config.update(block_out_channels=[64, 128, 256, 256], attention_head_dim=8, cross_attention_dim=256)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    vae = AutoencoderKL(block_out_channels=(64, 128, 256, 256) if model == "small" else (128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32)
    te = text_encoder(config["cross_attention_dim"], "quick_gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        StableDiffusionPipeline(unet=unet, vae=perturb(vae, 0), text_encoder=te, tokenizer=tokenizer(),
                                scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


LOAD_SNIPPET = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
lib, folder, device, dtype = sys.argv[1], sys.argv[2], sys.argv[3], getattr(torch, sys.argv[4])
if lib == "mini_tgate":
    import mini_tgate
    load = lambda: mini_tgate.load_pipeline(folder, device=device, dtype=dtype)
else:
    import diffusers
    load = lambda: diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
# torch's one-time start-up costs (first kernel, the meta-device machinery: ~70 MiB) are not loading
float(torch.randn(64, 64).sum())
with torch.device("meta"):
    torch.nn.Embedding(2, 2)
before = rss()
t = time.perf_counter()
pipe = load()
seconds = time.perf_counter() - t
# touch every weight, so that lazily mapped files count as they will once generation runs
modules = [getattr(pipe, n) for n in ("unet", "vae", "text_encoder")]
total = sum(float(p.sum()) for m in modules for p in m.parameters())
# VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over from fork + exec)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({{"seconds": seconds, "peak_rss_increase": peak - before}}))
"""


def measure_load(lib: str, folder: Path, device: str, dtype: str) -> dict:
    """Load time and peak RSS increase while loading, in a fresh process (median of 3)."""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET.format(root=str(ROOT)), lib, str(folder), device,
                              dtype], capture_output=True, text=True, check=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def time_decode(vae, device: str) -> list[float]:
    """Wrap `vae.decode` so that each call's seconds are recorded: the latency minus the decode is
    the denoising loop (plus milliseconds of text encoding), the part the MACs of TGATE apply to."""
    decode, seconds = vae.decode, []

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        out = decode(*args, **kwargs)
        sync(device)
        seconds.append(time.perf_counter() - start)
        return out

    vae.decode = timed
    return seconds


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or on CPU the increase of the process RSS,
    sampled every ms, over its value at the start, after malloc_trim has handed the memory freed
    by earlier runs back to the system (else a later run would reuse it and read low)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def rss(self) -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return self
        if platform.system() == "Linux":
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self.rss()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.bytes = self.peak - self.base


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["small", "sd15"], default="small")
    p.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--gate", default="10,5,1,2", help="gate_step,sp_interval,fi_interval,warm_up")
    p.add_argument("--deepcache", default="3,0", help="interval,branch (default: tgate's DeepCache loaders')")
    p.add_argument("--compile", action="store_true", help="also time mini_tgate with pipe.compile()")
    p.add_argument("--cache", default=None, help="folder to keep the generated checkpoint in")
    args = p.parse_args()

    import diffusers
    from DeepCache import DeepCacheSDHelper
    from tgate import TgateSDDeepCacheLoader, TgateSDLoader

    folder = Path(args.cache or tempfile.mkdtemp()) / f"bench-{args.model}"
    build_checkpoint(folder, args.model)
    dtype = getattr(torch, args.dtype)
    gate = mini_tgate.TGate(*map(int, args.gate.split(",")))
    gate_kw = dict(gate_step=gate.gate_step, sp_interval=gate.sp_interval, fi_interval=gate.fi_interval,
                   warm_up=gate.warm_up)
    dc = DeepCache(*map(int, args.deepcache.split(",")))

    def reference(loader=None, **loader_kw):  # a diffusers pipeline of its own: the loaders patch it in place
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe if loader is None else loader(pipe, **loader_kw)

    ours = mini_tgate.load_pipeline(folder, device=args.device, dtype=dtype)
    ref, ref_tgate = reference(), reference(TgateSDLoader)
    ref_dc = reference()
    helper = DeepCacheSDHelper(pipe=ref_dc)
    helper.set_params(cache_interval=dc.interval, cache_branch_id=dc.branch)
    helper.enable()
    ref_dc_tgate = reference(TgateSDDeepCacheLoader, cache_interval=dc.interval, cache_branch_id=dc.branch)

    def tgate_call(pipe):
        """tgate keeps every attention's cache on the module after a call. With its DeepCache
        loader a later call then reuses the previous image's self-attention in the deep part on
        full steps whose caching step was shallow (the second image of the same input differs
        from the first by ~1e-2) and skips that work. Clearing the caches first times what the
        first call, the one whose image is compared, computes."""
        for m in pipe.unet.modules():
            if hasattr(m, "cache"):
                m.cache = None
        return pipe.tgate
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size,
              latents=latents.to(args.device, dtype))

    # name: (pipeline, run, (TGate, DeepCache) it counts MACs with, the row it is compared with, its baseline)
    rows = {
        "diffusers": (ref, lambda: ref(PROMPT, output_type="np", **kw).images, (None, None), None, None),
        "diffusers + tgate": (ref_tgate, lambda: tgate_call(ref_tgate)(PROMPT, output_type="np", **kw, **gate_kw).images,
                              (gate, None), None, "diffusers"),
        "diffusers + DeepCache": (ref_dc, lambda: ref_dc(PROMPT, output_type="np", **kw).images, (None, dc), None,
                                  "diffusers"),
        "diffusers + tgate + DeepCache": (ref_dc_tgate, lambda: tgate_call(ref_dc_tgate)(
            PROMPT, output_type="np", **kw, **gate_kw).images, (gate, dc), None, "diffusers"),
    }
    pipelines = [("mini_tgate", ours)]
    if args.compile:
        compiled = mini_tgate.load_pipeline(folder, device=args.device, dtype=dtype)
        compiled.compile()
        pipelines.append(("mini_tgate compiled", compiled))
    for name, pipe in pipelines:
        for suffix, tgate, deepcache, ref_name in (("", None, None, "diffusers"),
                                                   (" + TGATE", gate, None, "diffusers + tgate"),
                                                   (" + DeepCache", None, dc, "diffusers + DeepCache"),
                                                   (" + TGATE + DeepCache", gate, dc, "diffusers + tgate + DeepCache")):
            run = lambda pipe=pipe, tgate=tgate, deepcache=deepcache: pipe(PROMPT, tgate=tgate, deepcache=deepcache,
                                                                           **kw).images
            rows[name + suffix] = (pipe, run, (tgate, deepcache), ref_name, name if suffix else None)
    decodes = {id(pipe): time_decode(pipe.vae, args.device) for pipe, *_ in rows.values()}
    for pipe in {id(pipe): pipe for pipe, *_ in rows.values()}.values():
        # page in lazily mapped weights now, so that the peak memory of a run is its activations
        for model in (pipe.unet, pipe.vae, pipe.text_encoder):
            sum(float(p.sum()) for p in model.parameters())

    times = {name: [] for name in rows}
    denoise = {name: [] for name in rows}  # latency minus the VAE decode
    memory, images = {}, {}
    for name, (_, run, *_) in rows.items():  # warm-up (and compilation), memory, and the outputs to compare
        with PeakMemory(args.device) as m:
            images[name] = run()
        memory[name] = m.bytes
    for _ in range(args.repeats):
        for name, (pipe, run, *_) in rows.items():
            decoded = decodes[id(pipe)]
            sync(args.device)
            t = time.perf_counter()
            run()
            sync(args.device)
            times[name].append(time.perf_counter() - t)
            denoise[name].append(times[name][-1] - decoded[-1])
    median = {name: statistics.median(ts) for name, ts in times.items()}
    median_denoise = {name: statistics.median(ts) for name, ts in denoise.items()}

    unet_config = ours.unet.config
    macs = {gd: count_macs(unet_config, args.size, args.size, args.steps, 7.5, gd[0], deepcache=gd[1])["unet_macs"]
            for gd in {row[2] for row in rows.values()}}
    loads = {"mini_tgate": measure_load("mini_tgate", folder, args.device, args.dtype),
             "diffusers": measure_load("diffusers", folder, args.device, args.dtype)}
    wb = weight_bytes(folder)

    cpu = platform.processor() or platform.machine()
    print(f"\n{args.model} ({sum(p.numel() for p in ours.unet.parameters()) / 1e6:.0f}M-parameter UNet), "
          f"{args.size}x{args.size}, {args.steps} steps, CFG 7.5, {args.device} {args.dtype}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu}), {time.strftime('%Y-%m-%d')}; "
          f"TGATE {gate_kw}; DeepCache interval {dc.interval}, branch {dc.branch}; median of {args.repeats}\n")
    print("| run | latency / image | vs its reference | denoising | speed-up: whole / denoising | "
          "MAC-predicted | peak memory | max diff vs its reference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, _, gd, ref_name, base) in rows.items():
        speedup = (f"{median[base] / median[name]:.2f}x / {median_denoise[base] / median_denoise[name]:.2f}x"
                   if base else "")
        predicted = f"{macs[(None, None)] / macs[gd]:.2f}x" if base else ""
        vs = f"{median[name] / median[ref_name]:.2f}x" if ref_name else ""
        diff = f"{abs(images[name] - images[ref_name]).max():.1e}" if ref_name else ""
        print(f"| {name} | {median[name]:.3f} s | {vs} | {median_denoise[name]:.3f} s | {speedup} | {predicted} | "
              f"{memory[name] / 2**20:.0f} MiB | {diff} |")
    print(f"\nLoading ({wb / 2**20:.0f} MiB of safetensors, fresh process, median of 3):\n")
    print("| library | load time | peak RSS increase | / weight bytes |")
    print("|---|---|---|---|")
    for name, r in loads.items():
        print(f"| {name} | {r['seconds']:.2f} s | {r['peak_rss_increase'] / 2**20:.0f} MiB | "
              f"{r['peak_rss_increase'] / wb:.2f}x |")


if __name__ == "__main__":
    main()
