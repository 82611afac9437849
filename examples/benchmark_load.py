"""Benchmark: loading a real-size SD-1.5 (random weights, float16) from a diffusers folder and from
one LDM single file: load time and peak RSS increase against the weight bytes. Prints a table.

    python examples/benchmark_load.py [--cache DIR] [--root OTHER_CHECKOUT ...]

Each `--root` is a checkout of mini_tgate to import (default: this one), so that two versions
are measured side by side on the same files in one run. Each load runs in a fresh process
(median of 3). The time until every weight has been read once and the peak RSS increase are
measured with every weight touched, so that a memory-mapped file's lazily read pages count as
they will once generation runs. Needs the test extra (diffusers, transformers)
to build the checkpoint once (~2 GB each way; --cache keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LOAD = """
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
import mini_tgate
float(torch.randn(64, 64).sum())  # torch's one-time start-up costs are not loading
with torch.device("meta"):
    torch.nn.Embedding(2, 2)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
before, start = rss(), time.perf_counter()
pipe = mini_tgate.load_pipeline(sys.argv[2], dtype=torch.float16)
seconds = time.perf_counter() - start
# touch every weight (no copies made), so that memory maps count as they will once generation runs
total = sum(float(p.sum()) for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
resident = time.perf_counter() - start
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "resident": resident, "peak": peak - before, "module": mini_tgate.__file__}))
"""


def build(cache: Path) -> tuple[Path, Path]:
    """A random-weight SD-1.5 in float16: a diffusers folder and the LDM single file of it."""
    folder, single = cache / "sd15-fp16", cache / "sd15-fp16.safetensors"
    if (folder / "model_index.json").is_file() and single.is_file():
        return folder, single
    import warnings

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from test_single_file import ldm_state_dict
    from tiny_models import SD_SCHEDULER, tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "mini_tgate/presets/sd15.json").read_text()))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=te, tokenizer=tokenizer(),
                                       scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False).to(torch.float16)
        pipe.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in ldm_state_dict(pipe, "sd1").items()}, single)
    return folder, single


def measure(root: Path, source: Path) -> dict:
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", LOAD, str(root), str(source)], capture_output=True, text=True,
                             check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert Path(runs[0]["module"]).is_relative_to(root), runs[0]["module"]
    return {k: statistics.median(r[k] for r in runs) for k in ("seconds", "resident", "peak")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mini_tgate_benchmark_load")
    p.add_argument("--root", type=Path, action="append", help="a mini_tgate checkout to measure (repeatable)")
    args = p.parse_args()
    folder, single = build(args.cache)
    rows = []
    for name, source, files in (("diffusers folder", folder, list(folder.rglob("*.safetensors"))),
                                ("single file", single, [single])):
        weights = sum(f.stat().st_size for f in files)
        for root in args.root or [ROOT]:
            m = measure(root.resolve(), source)
            rows.append(f"| {name} | {root} | {weights / 2**30:.2f} GiB | {m['seconds']:.2f} s | {m['resident']:.2f} s | "
                        f"{m['peak'] / 2**30:.2f} GiB | {m['peak'] / weights:.2f}x |")
    print("| source | mini_tgate checkout | file bytes | load_pipeline | + every weight read once | "
          "peak RSS increase | / file bytes |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
