"""The paper's analysis (TGATE, arXiv 2404.02747, Fig. 2 and 3) on the tiny shapes model.

    python examples/analyse_tiny.py                    # weights/tiny-shapes; writes docs/tiny_analysis.{csv,png}

1. Fig. 2: does cross-attention converge? Forward hooks record the output of every attention
   module at every one of 25 steps (the conditional half of the CFG batch); per step i we plot
   the L2 distance between consecutive outputs, ||A_i - A_{i-1}||, averaged over layers and
   prompts, relative to ||A_i||, for cross-attention (which TGATE caches) and for
   self-attention (which it keeps computing).
2. Fig. 3: when does the text matter? Two ways of withholding the prompt:
   S_F(m): the prompt for the first m steps, the null text ("") afterwards;
   S_L(m): the null text for the first m steps, the prompt afterwards.
   With the null text in both CFG branches guidance does nothing, so a null-text step is an
   unconditional step. We grade each with the checker: if the first steps decide the picture,
   S_F keeps its adherence from small m on while S_L loses it.
"""

import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import shapes  # noqa: E402
from evaluate_tiny import eval_prompts, parser  # noqa: E402

import mini_tgate  # noqa: E402
from mini_tgate.core.attention import Attention  # noqa: E402


@torch.inference_mode()
def generate(pipe, prompts, noise, steps, guidance, use_text, hook=None):
    """The SD sampling loop written out, with the prompt used only at steps where use_text(i).
    hook(i) is called before step i's UNet call."""
    text = pipe.text_encoder(pipe.tokenizer(prompts)).last_hidden_state      # (B, 77, D)
    null = pipe.text_encoder(pipe.tokenizer([""] * len(prompts))).last_hidden_state
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        if hook:
            hook(i)
        if use_text(i):  # classifier-free guidance on the doubled batch [null, text]
            eps_u, eps_c = pipe.unet(sched.scale_model_input(torch.cat([x, x]), t), t,
                                     torch.cat([null, text])).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:            # null text in both branches: the guidance term vanishes
            eps = pipe.unet(sched.scale_model_input(x, t), t, null)
        x = sched.step(eps, t, x).prev_sample
    return pipe.decode(x)  # (B, 64, 64, 3) in [0, 1]


def attention_convergence(pipe, prompts, noise, steps, guidance):
    """Per step: relative L2 change of cross- and self-attention outputs since the previous step."""
    outputs = {}  # (step, module index) -> output of the conditional half
    step = [0]
    modules = [m for m in pipe.unet.modules() if isinstance(m, Attention)]

    def record(k):
        def hook(module, inputs, out):
            outputs[step[0], k] = out.chunk(2)[1].float().clone()
        return hook

    handles = [m.register_forward_hook(record(k)) for k, m in enumerate(modules)]
    generate(pipe, prompts, noise, steps, guidance, use_text=lambda i: True,
             hook=lambda i: step.__setitem__(0, i))
    for h in handles:
        h.remove()
    rows = []
    for i in range(1, steps):
        row = {"step": i}
        for kind, cross in (("cross", True), ("self", False)):
            ks = [k for k, m in enumerate(modules) if m.is_cross == cross]
            d = [(outputs[i, k] - outputs[i - 1, k]).flatten(1).norm(dim=1) for k in ks]  # per image
            n = [outputs[i, k].flatten(1).norm(dim=1) for k in ks]
            row[f"{kind}_l2"] = float(torch.stack(d).mean())
            row[f"{kind}_rel"] = float((torch.stack(d) / torch.stack(n)).mean())
        rows.append(row)
    return rows


def main():
    args = parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    pipe = mini_tgate.load_pipeline(args.model)
    prompts = eval_prompts()
    noise = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))

    conv = attention_convergence(pipe, prompts, noise, args.steps, args.guidance)
    print("step  cross-attn change  self-attn change (relative L2 to the previous step)")
    for r in conv:
        print(f"{r['step']:4d}  {r['cross_rel']:17.4f}  {r['self_rel']:16.4f}")

    ms = [m for m in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25) if m <= args.steps]
    paths = []
    for m in ms:
        sf = shapes.adherence(generate(pipe, prompts, noise, args.steps, args.guidance, lambda i: i < m), prompts)
        sl = shapes.adherence(generate(pipe, prompts, noise, args.steps, args.guidance, lambda i: i >= m), prompts)
        paths.append({"m": m, **{f"SF_{k}": v for k, v in sf.items()}, **{f"SL_{k}": v for k, v in sl.items()}})
        print(f"m={m:2d}  S_F (text first m steps): all {sf['all']:.2f} | S_L (text after step m): all {sl['all']:.2f}")

    args.docs.mkdir(exist_ok=True)
    for name, rows in (("tiny_attention_convergence.csv", conv), ("tiny_sf_sl.csv", paths)):
        with open(args.docs / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    import matplotlib  # examples-only dependency: pip install matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in conv], [r["cross_rel"] for r in conv], "o-", label="cross-attention")
    a.plot([r["step"] for r in conv], [r["self_rel"] for r in conv], "s-", label="self-attention")
    a.set(xlabel="denoising step i", ylabel="||A_i - A_{i-1}|| / ||A_i||", yscale="log",
          title="attention output change per step (Fig. 2)")
    a.legend()
    for key, style in (("all", "-"), ("color", ":"), ("background", "--")):
        b.plot(ms, [r[f"SF_{key}"] for r in paths], "o" + style, color="C0", label=f"S_F {key}")
        b.plot(ms, [r[f"SL_{key}"] for r in paths], "s" + style, color="C3", label=f"S_L {key}")
    b.set(xlabel="m", ylabel="prompt adherence", ylim=(0, 1.02),
          title="S_F: text first m steps; S_L: text after m (Fig. 3)")
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.docs / "tiny_analysis.png", dpi=110)
    print(f"wrote {args.docs}/tiny_attention_convergence.csv, tiny_sf_sl.csv, tiny_analysis.png")


if __name__ == "__main__":
    main()
