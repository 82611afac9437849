"""Train a tiny latent text-to-image model on coloured shapes with mini_tgate's own modules, on a CPU.

    nice -n 10 python examples/train_tiny.py                 # ~50 min on 2 CPU cores, writes weights/tiny-shapes
    nice -n 10 python examples/train_tiny.py --resume        # continue an interrupted run from its checkpoints
    python examples/train_tiny.py --vae-steps 100 --unet-steps 200 --out /tmp/trial --export /tmp/trial/model

A Stable Diffusion 1.x in miniature, trained the way SD was, in two stages:

1. The VAE (mini_tgate.AutoencoderKL): 64x64 RGB <-> 8x8x4 latents (4 levels, factor 8),
   trained on reconstruction (L1 + L2) plus a very small KL term, then frozen. Its latents'
   standard deviation gives the `scaling_factor` that makes them roughly unit-variance (SD-1's
   0.18215 was found the same way), stored in the VAE's config.
2. The CLIP text encoder (mini_tgate.CLIPTextModel, the real 49408-token vocabulary, 32 wide,
   2 layers) and the UNet (mini_tgate.UNet2DConditionModel, SD-1's block types at 3 levels)
   trained jointly on DDPM's epsilon objective with SD-1.5's noise schedule (scaled_linear,
   0.00085-0.012, 1000 steps): pick t, noise the latents to x_t = sqrt(abar_t) x_0 +
   sqrt(1 - abar_t) eps, predict eps from (x_t, t, text). 10% of the captions are replaced by
   the empty prompt so that classifier-free guidance works. An exponential moving average (EMA)
   of the weights is what gets exported.

Data comes from examples/shapes.py, drawn afresh from a seed per step, so a resumed run sees
exactly the batches an uninterrupted one would. Checkpoints go to --out every --ckpt-every steps;
the result goes to --export as a diffusers folder (float16 weights, ~10 MB) that both
mini_tgate.load_pipeline and diffusers.StableDiffusionPipeline.from_pretrained read.
"""

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "examples"))

import shapes  # noqa: E402
from make_default import SCHEDULE, TEXT, export  # noqa: E402  (the text encoder and schedule of weights/tiny-random)

from mini_tgate import (AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler,  # noqa: E402
                        StableDiffusionPipeline, UNet2DConditionModel)
from mini_tgate.core.config import UNetConfig, VAEConfig  # noqa: E402
from mini_tgate.formats.png import image_grid, save_png  # noqa: E402

VAE = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64,
                latent_channels=4)
UNET = UNetConfig(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                  attention_head_dim=4, cross_attention_dim=TEXT.hidden_size,  # 4 heads (see config.py)
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
PREVIEW = [shapes.all_prompts()[i] for i in np.random.default_rng(0).permutation(168)[:24]]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (n, 64, 64, 3) -> the VAE's input (n, 3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def batch_of_images(seed: int, step: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """n fresh images (n, 3, 64, 64) in [-1, 1] and captions, fixed by (seed, step)."""
    images, captions = shapes.make_dataset(n, seed=[seed, step])
    return to_tensor(images), captions


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then a cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


class Progress:
    """Prints `stage step/total loss | it/s | ETA` every `every` steps."""

    def __init__(self, name: str, start: int, total: int, every: int):
        self.name, self.step0, self.total, self.every = name, start, total, every
        self.t0, self.losses = time.time(), []

    def update(self, step: int, loss: float, extra: str = ""):
        self.losses.append(loss)
        if (step + 1) % self.every and step + 1 != self.total:
            return
        rate = (step + 1 - self.step0) / (time.time() - self.t0)
        eta = (self.total - step - 1) / rate
        print(f"{self.name} {step + 1:5d}/{self.total} loss {np.mean(self.losses):.4f} | {rate:.2f} it/s | "
              f"ETA {eta / 60:4.1f} min {extra}", flush=True)
        self.losses = []


def save_ckpt(path: Path, **state):
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)  # never leave a half-written checkpoint


# ----------------------------------------------------------------------------- stage 1: the VAE


def train_vae(args) -> AutoencoderKL:
    ckpt = args.out / "vae.pt"
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"vae: resumed at step {start}")
    progress = Progress("vae ", start, args.vae_steps, args.log_every)
    vae.train()
    for step in range(start, args.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr)
        x, _ = batch_of_images(args.seed, step, args.vae_batch)
        posterior = vae.encode(x)
        x_rec = vae.decode(posterior.sample(torch.Generator().manual_seed(args.seed * 1_000_003 + step)))
        # L1 + L2: L2 alone blurs edges; L1 alone stalls here with the colours half learnt
        # (each RGB channel of the palette is high in half the colours: an L1 plateau)
        rec = (x_rec - x).abs().mean() + (x_rec - x).square().mean()
        # KL(posterior || N(0, 1)) per latent element; weighted so it only keeps the latents in check
        kl = 0.5 * (posterior.mean**2 + posterior.std**2 - 1 - posterior.logvar).mean()
        loss = rec + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress.update(step, rec.item(), f"(kl {kl.item():.1f})")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.vae_steps:
            save_ckpt(ckpt, vae=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, n: int, seed: int):
    """The frozen VAE's posterior (mean, std) for n dataset images, and their captions."""
    images, captions = shapes.make_dataset(n, seed=[seed, 10**9])
    x = to_tensor(images)
    means, stds = [], []
    for chunk in x.split(200):
        posterior = vae.encode(chunk)
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), captions


@torch.no_grad()
def vae_report(vae: AutoencoderKL, seed: int):
    """Reconstruction error and the checker's verdict on reconstructed images (the ceiling for stage 2)."""
    images, captions = shapes.make_dataset(256, seed=[seed, 10**9 + 1])
    x = to_tensor(images)
    rec = vae(x).clamp(-1, 1)
    out = ((rec + 1) / 2).permute(0, 2, 3, 1).numpy()
    score = shapes.adherence(out, captions)
    print(f"vae: L1 on held-out images {(rec - x).abs().mean():.4f}; checker on reconstructions: {score}")
    return np.concatenate([images[:8] / 255.0, out[:8]])


# ----------------------------------------------------------------------------- stage 2: text encoder + UNet


def make_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SCHEDULE))


def preview(pipe: StableDiffusionPipeline, path: Path) -> dict:
    """24 fixed prompts, 20 DDIM steps, guidance 7.5: a grid PNG and the checker's scores."""
    images = pipe(PREVIEW, num_inference_steps=20, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(0)).images
    save_png(path, image_grid(images, cols=8))
    return shapes.adherence(images, PREVIEW)


def train_unet(args, vae: AutoencoderKL, tokenizer: CLIPTokenizer):
    pool_path, ckpt = args.out / "latents.pt", args.out / "unet.pt"
    if pool_path.exists():
        pool = torch.load(pool_path)
    else:
        t0 = time.time()
        mean, std, captions = encode_pool(vae, args.pool, args.seed)
        scale = 1 / torch.cat([mean + std * torch.randn_like(std)]).std().item()  # unit-variance latents
        pool = dict(mean=mean, std=std, ids=tokenizer(captions), scaling_factor=scale)
        torch.save(pool, pool_path)
        print(f"encoded {args.pool} images in {time.time() - t0:.0f} s; scaling_factor = {scale:.4f}")
    vae.config.scaling_factor = pool["scaling_factor"]

    torch.manual_seed(args.seed + 1)
    text_encoder, unet = CLIPTextModel(TEXT), UNet2DConditionModel(UNET)
    ema_text_encoder, ema_unet = copy.deepcopy(text_encoder).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = [*text_encoder.parameters(), *unet.parameters()]
    ema_params = [*ema_text_encoder.parameters(), *ema_unet.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    start = 0
    if args.resume and ckpt.exists():
        state = torch.load(ckpt)
        for name, model in (("text_encoder", text_encoder), ("unet", unet), ("ema_text_encoder", ema_text_encoder),
                            ("ema_unet", ema_unet)):
            model.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"unet: resumed at step {start}")

    # DDPM's forward process with SD-1.5's betas: abar_t = prod_{s<=t} (1 - beta_s)
    betas = torch.linspace(SCHEDULE["beta_start"] ** 0.5, SCHEDULE["beta_end"] ** 0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, dim=0)
    empty = tokenizer([""])[0]  # the unconditional prompt for classifier-free guidance
    n_pool = len(pool["ids"])
    progress = Progress("unet", start, args.unet_steps, args.log_every)
    for step in range(start, args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(n_pool, (args.batch,), generator=g)
        z = pool["mean"][idx] + pool["std"][idx] * torch.randn(pool["std"][idx].shape, generator=g)
        x0 = z * pool["scaling_factor"]  # (B, 4, 8, 8)
        ids = pool["ids"][idx].clone()
        ids[torch.rand(args.batch, generator=g) < args.uncond] = empty  # CFG dropout
        t = torch.randint(1000, (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, text_encoder(ids).last_hidden_state)
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # a short memory while the weights move fast
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)

        extra = ""
        if (step + 1) % args.eval_every == 0 or step + 1 == args.unet_steps:
            score = preview(make_pipeline(ema_unet, vae, ema_text_encoder, tokenizer),
                            args.out / f"preview_{step + 1:05d}.png")
            extra = "| preview adherence " + " ".join(f"{k} {v:.2f}" for k, v in score.items())
        progress.update(step, loss.item(), extra)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.unet_steps:
            save_ckpt(ckpt, text_encoder=text_encoder.state_dict(), unet=unet.state_dict(),
                      ema_text_encoder=ema_text_encoder.state_dict(), ema_unet=ema_unet.state_dict(),
                      opt=opt.state_dict(), step=step + 1)
    return ema_text_encoder.eval(), ema_unet.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/tiny_train"), help="checkpoints and previews")
    p.add_argument("--export", type=Path, default=ROOT / "weights" / "tiny-shapes", help="the diffusers folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads; 1 on a shared machine (threads waiting on a busy core stall)")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-5)
    p.add_argument("--pool", type=int, default=20000, help="images encoded once for stage 2")
    p.add_argument("--unet-steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--uncond", type=float, default=0.1, help="share of empty captions (CFG dropout)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--ckpt-every", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tokenizer = CLIPTokenizer.from_files(ROOT / "mini_tgate/clip/vocab.json", ROOT / "mini_tgate/clip/merges.txt")
    final_vae = args.out / "vae_final.pt"
    if args.resume and final_vae.exists():
        vae = AutoencoderKL(VAE)
        vae.load_state_dict(torch.load(final_vae))
        vae.eval().requires_grad_(False)
        print("vae: done in an earlier run")
    else:
        vae = train_vae(args)
        torch.save(vae.state_dict(), final_vae)
        save_png(args.out / "vae_reconstructions.png", image_grid(vae_report(vae, args.seed), cols=8))
        print(f"vae: {(time.time() - t0) / 60:.1f} min")

    text_encoder, unet = train_unet(args, vae, tokenizer)
    pipe = make_pipeline(unet, vae, text_encoder, tokenizer)
    size = export(pipe, args.export)
    print(f"exported {args.export} ({size:.1f} MB); total {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
