"""What TGATE's attention caches hold at SVD-XT size, one row per query (as before) vs one row for
a one-token cross-attention (core/attention.py now).

    python examples/svd_cache_memory.py [--frames 25 --height 576 --width 1024]

SVD-XT's UNet (mini_tgate/presets/svd-xt.json) is built on the meta device and run once, in float16
with CFG (batch 2), under the gate step's plan (every attention, self and cross, caches the mean of
the two CFG halves: what it keeps for the steps after the gate). Nothing is allocated: each
module's cache shape is read off, and its "before" size is that shape with one row per query.
"""

from __future__ import annotations

import argparse
import sys
import json
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from mini_tgate.core.attention import Attention
from mini_tgate.core.tgate import CACHE_MEAN, StepPlan
from mini_tgate.svd.config import UNetSpatioTemporalConfig
from mini_tgate.svd.unet import UNetSpatioTemporalConditionModel

PRESET = Path(__file__).resolve().parents[1] / "mini_tgate" / "presets" / "svd-xt.json"


def cache_sizes(frames: int = 25, height: int = 576, width: int = 1024, dtype=torch.float16) -> list[dict]:
    """One dict per gated attention module: name, kind, cache shape now, bytes before and now."""
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel(UNetSpatioTemporalConfig.from_dict(json.loads(PRESET.read_text())))
    unet = unet.to(dtype)
    queries = {}  # module -> the number of queries (rows) its forward saw
    hooks = [m.register_forward_pre_hook(lambda m, args: queries.__setitem__(m, args[0].shape[1]))
             for m in unet.attention_layers]
    unet.set_gate(StepPlan(CACHE_MEAN, CACHE_MEAN, True))
    with torch.device("meta"), torch.no_grad():
        sample = torch.empty(2, frames, 8, height // 8, width // 8, dtype=dtype)
        unet(sample, 1.0, torch.empty(2, 1, 1024, dtype=dtype), torch.empty(2, 3, dtype=dtype))
    for h in hooks:
        h.remove()
    rows = []
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            shape, size = tuple(m.cache.shape), m.cache.element_size()
            before = shape[0] * queries[m] * shape[2] * size
            rows.append(dict(name=name, cross=m.is_cross, temporal="temporal" in name, shape=shape,
                             before=before, now=m.cache.numel() * size))
    unet.clear_gate()
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=25)
    p.add_argument("--height", type=int, default=576)
    p.add_argument("--width", type=int, default=1024)
    a = p.parse_args()
    rows = cache_sizes(a.frames, a.height, a.width)
    print(f"SVD-XT, {a.frames} frames, {a.height}x{a.width}, CFG, float16: {len(rows)} gated attention modules")
    print("| attention | modules | before | now |")
    print("|---|---|---|---|")
    for cross in (False, True):
        for temporal in (False, True):
            part = [r for r in rows if r["cross"] == cross and r["temporal"] == temporal]
            kind = f"{'temporal' if temporal else 'spatial'} {'cross' if cross else 'self'}"
            print(f"| {kind} | {len(part)} | {sum(r['before'] for r in part) / 2**30:.3f} GiB | "
                  f"{sum(r['now'] for r in part) / 2**20:.3f} MiB |")
    before, now = sum(r["before"] for r in rows), sum(r["now"] for r in rows)
    print(f"| all | {len(rows)} | {before / 2**30:.3f} GiB ({before:,} bytes) | "
          f"{now / 2**30:.3f} GiB ({now:,} bytes) |")


if __name__ == "__main__":
    main()
