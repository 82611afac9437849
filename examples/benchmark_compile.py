"""How long torch.compile takes over a TGATE run: the real UNet (its preset config, random weights,
float32) compiled whole or regionally (pipe.compile(regional=True)), the seconds of the first call
of each distinct step plan of TGate(10, 5, 1, 2) at 25 steps with CFG, in the order a run meets
them. Tracing and code generation do not depend on the image size, so the latents are small.

    python examples/benchmark_compile.py --model sd15 --backend inductor [--regional]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mini_tgate.core.config import UNetConfig  # noqa: E402
from mini_tgate.core.tgate import TGate, plan  # noqa: E402
from mini_tgate.core.unet import UNet2DConditionModel  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--backend", default="inductor", help="inductor (what pipe.compile uses), aot_eager or eager")
    p.add_argument("--regional", action="store_true", help="each transformer block and resnet on its own")
    p.add_argument("--latent", type=int, default=16, help="latent side (the image's / 8)")
    args = p.parse_args()
    config = json.loads((ROOT / "mini_tgate" / "presets" / f"{args.model}.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(config)).eval().to(memory_format=torch.channels_last)
    torch._dynamo.config.recompile_limit = 64
    parts = [m for m in unet.modules() if isinstance(m, unet.repeated_blocks)] if args.regional else [unet]
    for part in parts:  # as pipe.compile does
        part.compile(fullgraph=True, dynamic=False, backend=args.backend)
    x, context = torch.randn(2, 4, args.latent, args.latent), torch.randn(2, 77, config["cross_attention_dim"])
    added = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)} if args.model == "sdxl" else None
    print(f"{args.model}, {args.backend}, {'regional' if args.regional else 'whole UNet'}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    seen, total = set(), 0.0
    with torch.inference_mode():
        for step in plan(TGate(10, 5, 1, 2), 25, cfg=True):
            if step in seen:
                continue
            seen.add(step)
            unet.set_gate(step)
            b = 2 if step.cfg else 1
            start = time.perf_counter()
            unet(x[:b], torch.tensor(500.0), context[:b],
                 added_cond_kwargs=None if added is None else {k: v[:b] for k, v in added.items()})
            total += time.perf_counter() - start
            print(f"  cross {step.cross_attn}, self {step.self_attn}, CFG {step.cfg}: "
                  f"{time.perf_counter() - start:.1f} s")
    print(f"total {total:.0f} s, {counters['stats']['unique_graphs']} graphs")


if __name__ == "__main__":
    main()
