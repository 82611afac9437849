"""An adaptive gate step on the tiny shapes model: does choosing m per generation beat a fixed m?

    python examples/adaptive_gate.py --threads 2     # writes docs/adaptive_gate.png and docs/adaptive_gate.md

TGATE fixes the gate step m by hand. The adaptive rule simulated here measures during
the semantics-planning phase how much the cross-attention (CA) outputs changed since the previous
step and closes the gate when they have settled:

    change_i = mean over CA layers of ||A_i - A_{i-1}|| / ||A_i||   (per image, i >= 1)

where A_i is what TGATE would cache if step i were the gate: the mean of the two CFG halves of the
layer's output (the output itself without CFG). Once change_i < tolerance (and m >= min_gate_step),
step i+1 becomes the caching step, so m = i + 2; without that, m = max_gate_step. Why this
statistic: reusing the cache from step m-1 at later steps is exactly an error of this kind, the
tensors are computed anyway, and it costs a few elementwise passes over the CA outputs.

The simulation here is exact: before its decision an adaptive run is step for step the run of
TGate(gate_step=max_gate_step) with the same sp_interval and warm_up, and after it, the run of
TGate(gate_step=m) (a library version, since removed, was checked to give exactly these images). So one run per fixed m gives every image
the adaptive rule can produce; forward hooks on the CA modules of the m=15 run record change_i.
Every image is a generation of its own (one decision per image); MACs are the UNet's
(mini_tgate.count_macs) averaged over the images.

Seeds: the defaults (tolerance, min_gate_step, max_gate_step) were chosen on the tuning split (the
48 prompts of evaluate_tiny.py with its noise seeds 0 and 1); every figure reported is on the
held-out split (all 168 prompts, noise seeds 10-13), one adherence per seed, the spread being the
standard deviation over the four seeds.
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import shapes  # noqa: E402
from evaluate_tiny import eval_prompts, parser  # noqa: E402

import mini_tgate  # noqa: E402
from mini_tgate import TGate  # noqa: E402
from mini_tgate.core.attention import Attention  # noqa: E402

# The paper's two ways of gating (its notation: "m" alone gates cross-attention only; "m, k" also
# caches self-attention every k steps before the gate, after a warm-up of 2 steps).
VARIANTS = {"CA only": dict(sp_interval=1, fi_interval=1, warm_up=0),
            "k=5, warm-up 2 (paper)": dict(sp_interval=5, fi_interval=1, warm_up=2)}
FIXED_M = list(range(2, 16))
RECORD_M = FIXED_M[-1]  # the run whose CA changes are recorded: it gates last
TOLERANCES = [0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.045, 0.05, 0.06, 0.07]
SPLITS = {"tune": dict(prompts=eval_prompts(), seeds=[0, 1]),
          "test": dict(prompts=shapes.all_prompts(), seeds=[10, 11, 12, 13])}


def decide(changes, tolerance: float, min_gate_step: int, max_gate_step: int) -> int:
    """The adaptive rule on one image's recorded changes (changes[i] for step i >= 1)."""
    for i in range(1, max_gate_step - 1):
        if i + 2 >= min_gate_step and changes[i] < tolerance:
            return i + 2
    return max_gate_step


class ChangeRecorder:
    """Forward hooks on the CA modules: per step and image, the mean relative change of the mean
    of the CFG halves since the previous step. Only steps that run the doubled batch count."""

    def __init__(self, unet, batch: int, steps: int):
        self.modules = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross]
        self.changes = torch.full((steps, batch), float("nan"))  # (steps, images)
        self.calls = {id(m): 0 for m in self.modules}
        self.previous, self.elements = {}, 0
        self.handles = [m.register_forward_hook(self.hook) for m in self.modules]

    def hook(self, module, inputs, out):
        i = self.calls[id(module)]
        self.calls[id(module)] += 1
        if out.shape[0] != 2 * self.changes.shape[1]:  # after the gate: nothing to measure
            return
        uncond, cond = out.float().chunk(2)
        mean = (uncond + cond) / 2  # what TGATE would cache
        self.elements += mean.numel()
        if i > 0:
            change = (mean - self.previous[id(module)]).flatten(1).norm(dim=1) / mean.flatten(1).norm(dim=1)
            self.changes[i] = torch.nan_to_num(self.changes[i]) + change / len(self.modules)
        self.previous[id(module)] = mean

    def remove(self):
        for h in self.handles:
            h.remove()


def run_split(pipe, split, steps, guidance, cache: Path | None = None):
    """For no gate and every variant and fixed m: per seed and prompt, whether the image is right
    (all three attributes); the CA changes of the m=15 runs, (seeds, prompts, steps); the elements
    the statistic reads per image. With `cache`, each configuration's result is a file there: a
    rerun, or a second process given the same folder, uses what is there; a configuration another
    process is computing is claimed by its .lock file and waited for (delete the folder to start
    afresh)."""
    prompts, seeds = SPLITS[split]["prompts"], SPLITS[split]["seeds"]
    noise = [torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds]
    jobs = [(None, None)] + [(v, m) for v in VARIANTS for m in FIXED_M]
    results, claimed_elsewhere = {}, []
    for v, m in jobs:
        name = f"{split}-baseline" if v is None else f"{split}-v{list(VARIANTS).index(v)}-m{m}"
        file = cache / f"{name}.npz" if cache else None
        if file is not None and file.exists():
            continue
        if file is not None:
            try:
                file.with_suffix(".lock").open("x").close()
            except FileExistsError:
                claimed_elsewhere.append(file)
                continue
        rows, changes, t0 = [], [], time.perf_counter()
        for z in noise:
            rec = ChangeRecorder(pipe.unet, len(prompts), steps) if m == RECORD_M else None
            images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, latents=z,
                          tgate=None if v is None else TGate(gate_step=m, **VARIANTS[v])).images
            if rec is not None:
                rec.remove()
                changes.append(rec.changes.T.numpy())  # (prompts, steps)
            rows.append([shapes.check(im, p)["all"] for im, p in zip(images, prompts)])
        result = {"ok": np.array(rows)}  # (seeds, prompts)
        if changes:
            result.update(changes=np.stack(changes), elements=rec.elements / len(prompts))
        ms = (time.perf_counter() - t0) / (len(prompts) * len(seeds)) * 1e3
        print(f"  {name}: {result['ok'].mean():.3f} ({ms:.1f} ms/image)", file=sys.stderr)
        if file is None:
            results[v, m] = result
        else:
            np.savez(file.with_suffix(".part.npz"), **result)
            file.with_suffix(".part.npz").rename(file)
    while any(not f.exists() for f in claimed_elsewhere):
        time.sleep(10)
    for v, m in jobs:
        if (v, m) not in results:
            name = f"{split}-baseline" if v is None else f"{split}-v{list(VARIANTS).index(v)}-m{m}"
            results[v, m] = dict(np.load(cache / f"{name}.npz"))
    ok = {v: {m: results[v, m]["ok"] for m in FIXED_M} for v in VARIANTS}
    changes = {v: results[v, RECORD_M]["changes"] for v in VARIANTS}
    return results[None, None]["ok"], ok, changes, float(results[list(VARIANTS)[0], RECORD_M]["elements"])


def adaptive(ok, changes, macs, tolerance, min_gate_step, max_gate_step):
    """Per seed: adherence and mean MACs of the adaptive rule; and the chosen m of every image."""
    chosen = np.array([[decide(c, tolerance, min_gate_step, max_gate_step) for c in seed] for seed in changes])
    right = np.take_along_axis(np.stack([ok[m] for m in FIXED_M]), (chosen - FIXED_M[0])[None], 0)[0]
    return right.mean(1), np.vectorize(macs.get)(chosen).mean(1), chosen


def fixed_curve(ok, macs):
    return np.array([macs[m] for m in FIXED_M]), np.array([ok[m].mean(1) for m in FIXED_M])  # (m,), (m, seeds)


def margin(adh, mac, curve_macs, curve_adh):
    """Adherence above the fixed-m curve at the same MACs (linear between neighbouring m: what a
    random mix of the two fixed gates gives), per seed."""
    return adh - np.array([np.interp(x, curve_macs, curve_adh[:, s]) for s, x in enumerate(mac)])


def main():
    p = parser(__doc__)
    p.add_argument("--cache", type=Path, help="a folder for each configuration's results (resumable; shared by "
                   "several processes run at once)")
    p.add_argument("--fill-cache", action="store_true", help="with --cache: compute what is missing, then stop")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = mini_tgate.load_pipeline(args.model)
    pipe(["a red circle on a blue background"], num_inference_steps=2)  # warm-up
    macs = {v: {m: mini_tgate.count_macs(pipe.unet.config, 64, 64, args.steps, args.guidance,
                                         TGate(gate_step=m, **kw))["unet_macs"] for m in FIXED_M}
            for v, kw in VARIANTS.items()}
    base_macs = mini_tgate.count_macs(pipe.unet.config, 64, 64, args.steps, args.guidance)["unet_macs"]
    results = {}
    for split, s in SPLITS.items():
        print(f"{split}: {len(s['prompts'])} prompts x seeds {s['seeds']}", file=sys.stderr)
        results[split] = run_split(pipe, split, args.steps, args.guidance, args.cache)
    if args.fill_cache:
        return

    # 1. Defaults, chosen on the tuning split only: the rule with the largest mean margin over the
    # fixed curve (both variants), among rules that keep at least the adherence of fixed m=10.
    _, ok, changes, _ = results["tune"]
    best = None
    for lo in (3, 4, 5, 6):
        for hi in (8, 10, 12, 15):
            for tol in TOLERANCES:
                gains = []
                for v in VARIANTS:
                    adh, mac, _ = adaptive(ok[v], changes[v], macs[v], tol, lo, hi)
                    gains.append(margin(adh, mac, *fixed_curve(ok[v], macs[v])).mean())
                    gains[-1] -= 1.0 if adh.mean() < ok[v][10].mean() - 1e-9 else 0.0
                if best is None or np.mean(gains) > best[0] + 1e-9:
                    best = (float(np.mean(gains)), tol, lo, hi)
    _, tol0, lo, hi = best
    print(f"defaults from the tuning split: tolerance {tol0}, min_gate_step {lo}, max_gate_step {hi} "
          f"(mean margin {best[0]:+.4f})", file=sys.stderr)

    # 2. The held-out split.
    base, ok, changes, stat_elements = results["test"]
    n_seeds, n_prompts = base.shape
    lines = [f"Held-out: {n_prompts} prompts x {n_seeds} noise seeds ({SPLITS['test']['seeds']}), {args.steps} DDIM "
             f"steps, guidance {args.guidance}; adherence = all three attributes right, mean over seeds ± the "
             "standard deviation over seeds; margin = adherence minus the fixed-m curve's (same variant) at "
             "the same MACs, linear between neighbouring m, per seed, then mean ± std over seeds.",
             f"Adaptive rule: min_gate_step {lo}, max_gate_step {hi} (chosen on the tuning split: "
             f"{len(SPLITS['tune']['prompts'])} prompts x seeds {SPLITS['tune']['seeds']}; default tolerance "
             f"{tol0}).", "",
             f"Baseline (no gate): {base.mean(1).mean():.1%} ± {base.mean(1).std():.1%}, "
             f"{base_macs / 1e9:.3f} G MACs / image.", "",
             "| variant | gate | UNet MACs / image (G) | adherence | margin over fixed m | chosen m (min / median / max) |",
             "|---|---|---|---|---|---|"]
    curves, histograms = {}, {}
    for v in VARIANTS:
        cm, ca = fixed_curve(ok[v], macs[v])
        for m, x, a in zip(FIXED_M, cm, ca):
            lines.append(f"| {v} | fixed m={m} | {x / 1e9:.3f} | {a.mean():.1%} ± {a.std():.1%} | | |")
        points = []
        for tol in TOLERANCES:
            adh, mac, chosen = adaptive(ok[v], changes[v], macs[v], tol, lo, hi)
            gain = margin(adh, mac, cm, ca)
            points.append((mac.mean(), adh.mean(), adh.std(), gain.mean(), gain.std()))
            lines.append(f"| {v} | adaptive tol {tol}{' (default)' if tol == tol0 else ''} | {mac.mean() / 1e9:.3f} "
                         f"| {adh.mean():.1%} ± {adh.std():.1%} | {gain.mean():+.1%} ± {gain.std():.1%} "
                         f"| {chosen.min()} / {int(np.median(chosen))} / {chosen.max()} |")
            if tol == tol0:
                histograms[v] = np.bincount(chosen.ravel(), minlength=hi + 1)
        curves[v] = (cm, ca, np.array(points))
    lines.append("")
    for v, h in histograms.items():
        lines.append(f"Chosen gate steps at tolerance {tol0}, {v} ({h.sum()} images): "
                     + ", ".join(f"m={m}: {c}" for m, c in enumerate(h) if c))
    ca_macs = macs["CA only"][RECORD_M]
    # per element of the mean of the CFG halves: two means (4), a difference (1), two squared norms (4)
    lines.append(f"Cost of the statistic: about 9 elementwise operations per element of the CA outputs' CFG mean, "
                 f"{9 * stat_elements / 1e6:.2f} M per image over the whole planning phase of a 15-step gate, "
                 f"{9 * stat_elements / ca_macs:.3%} of that run's UNet MACs; memory: one more copy of the CA "
                 "outputs (the previous step's).")
    table = "\n".join(lines)
    print(table)
    args.docs.mkdir(exist_ok=True)
    (args.docs / "adaptive_gate.md").write_text(table + "\n")

    import matplotlib  # examples-only dependency: pip install matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for c, (v, (cm, ca, pts)) in enumerate(curves.items()):
        a.errorbar(cm / 1e9, ca.mean(1), yerr=ca.std(1), fmt="o-", color=f"C{c}", ms=4, capsize=2,
                   label=f"fixed m=2..15, {v}")
        for m, x, y in zip(FIXED_M, cm, ca.mean(1)):
            if m in (2, 3, 5, 10, 15):
                a.annotate(f"m={m}", (x / 1e9, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                           color=f"C{c}")
        a.errorbar(pts[:, 0] / 1e9, pts[:, 1], yerr=pts[:, 2], fmt="s--", color=f"C{c + 2}", ms=4, capsize=2,
                   label=f"adaptive, tol {TOLERANCES[0]}..{TOLERANCES[-1]}, {v}")
    a.axhline(base.mean(), color="gray", lw=0.8, ls=":", label=f"no gate ({base_macs / 1e9:.3f} G)")
    a.set(xlabel="UNet MACs per image (G)", ylabel="prompt adherence (all three right)",
          title=f"held-out: {n_prompts} prompts x {n_seeds} seeds (error bars: std over seeds)")
    a.legend(fontsize=7, loc="lower right")
    width = 0.4
    for c, (v, h) in enumerate(histograms.items()):
        ms = np.arange(len(h))
        b.bar(ms + (c - 0.5) * width, h / h.sum(), width, color=f"C{c + 2}", label=v)
    b.set(xlabel="chosen gate step m", ylabel="share of images", title=f"adaptive, tolerance {tol0}",
          xticks=range(lo, hi + 1), xlim=(lo - 0.7, hi + 0.7))
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.docs / "adaptive_gate.png", dpi=110)
    print(f"wrote {args.docs}/adaptive_gate.md and adaptive_gate.png")


if __name__ == "__main__":
    main()
