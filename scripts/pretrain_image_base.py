#!/usr/bin/env python3
"""Builds and pretrains the embedded ``tiny-sd`` text-to-image base on CPU.

A deliberately tiny Stable Diffusion pipeline, made from configs (nothing is downloaded):

* ``AutoencoderKL``: block_out_channels (32, 64), one layer per block, 4 latent channels, no
  mid-block attention (fully convolutional, so it is trained on 16x16 crops); 32x32 images map to
  4x16x16 latents (``vae_scale_factor`` 2);
* ``CLIPTextModel``: hidden 64, 2 layers, 2 heads, 77 positions, with a ``CLIPTokenizer`` whose
  vocab.json / merges.txt are built here: the 512 byte-level symbols (so any text tokenizes, and new
  placeholder tokens can be added with ``tokenizer.add_tokens`` + ``resize_token_embeddings``), plus
  one whole-word token for every caption word and a few common prompt words;
* ``UNet2DConditionModel``: block_out_channels (32, 64), (DownBlock2D, CrossAttnDownBlock2D) /
  (CrossAttnUpBlock2D, CrossAttnUpBlock2D) and a cross-attention mid block: transformer blocks at
  8x8 and in the final 16x16 up block, cross_attention_dim 64 (the text hidden size), standard
  ``to_q/to_k/to_v/to_out.0`` attention projections;
* ``DDIMScheduler`` (trailing spacing, linear betas 1e-4..0.02, **v-prediction**) saved for sampling
  in ~20-25 steps; training uses a ``DDPMScheduler`` with the same betas and prediction type.

Training, all inside a wall-clock budget (``--minutes``, default 12, on ``--threads`` 1):
1. the autoencoder on pretraining images plus generic random textures (so it can reconstruct
   colours and patterns the base never draws, e.g. a style adapter's);
2. the UNet and the text encoder jointly (the text encoder starts from scratch and has to learn the
   words) on the cached latents of the captioned shapes (``scripts/make_image_data.py``), with
   caption augmentation (partial captions, 10% empty for classifier-free guidance) and an EMA.

The result is a normal ``StableDiffusionPipeline`` directory (``safety_checker=None``,
``requires_safety_checker=False``, ``feature_extractor=None``) in ``src/loraforge/bases/tiny-sd/``,
loadable offline with ``StableDiffusionPipeline.from_pretrained(dir)``, plus a ``TRAINING.md``.

    python scripts/pretrain_image_base.py                # ~12 minutes
    python scripts/pretrain_image_base.py --minutes 3 --out /tmp/tiny-sd   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_image_data as data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "loraforge" / "bases" / "tiny-sd"

MAX_LENGTH = 77
TEXT_HIDDEN = 64
NOISE_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    # v-prediction: with this (practically zero terminal SNR) schedule, epsilon-prediction gives the
    # high-noise steps -- where colour and layout are decided from the text alone -- almost no
    # training signal and makes the first sampling step blow up; v-prediction has neither problem.
    "prediction_type": "v_prediction",
}
SAMPLE_PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a white triangle on a black background",
    "a blue star on a yellow background",
]


# ----------------------------------------------------------------------------------------------
# tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to one printable unicode character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the lowest-ranked adjacent pair (what the tokenizer does)."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, _ = min(pairs)
        if rank == math.inf:
            break
        a, b = next((symbols[i], symbols[i + 1]) for r, i in pairs if r == rank)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and symbols[i] == a and symbols[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_tokenizer_files(words: list[str], out_dir: Path) -> None:
    """Writes a CLIP-style vocab.json + merges.txt in which every word in ``words`` is one token.

    Merges are added greedily, each appended after all earlier ones, until the word BPE-encodes
    to a single symbol; appending never changes how an already-complete word encodes.
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    for ch in byte_chars:
        vocab[ch + "</w>"] = len(vocab)
    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while True:
            symbols = _bpe(symbols, ranks)
            if len(symbols) == 1:
                break
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in vocab:
                vocab[pair[0] + pair[1]] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")


def make_tokenizer(work_dir: Path):
    from transformers import CLIPTokenizer

    words = sorted(
        {w for combo in data.all_combinations() for cap in data.caption_variants(*combo) for w in cap.split()}
        | set(data.EXTRA_WORDS)
    )
    build_tokenizer_files(words, work_dir)
    tok = CLIPTokenizer(
        vocab=str(work_dir / "vocab.json"),
        merges=str(work_dir / "merges.txt"),
        model_max_length=MAX_LENGTH,
    )
    for w in words:  # every word must be a single whole-word token
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    return tok, words


# ----------------------------------------------------------------------------------------------
# models


def make_models(vocab_size: int, bos_id: int, eos_id: int, pad_id: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=data.RESOLUTION,
        mid_block_add_attention=False,
        force_upcast=False,
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    text_encoder = CLIPTextModel(text_config)
    unet = UNet2DConditionModel(
        sample_size=data.RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        # Transformer blocks at 8x8 (down, mid, up) and in the last, 16x16 up block -- right before
        # the output, so that attention-only LoRA adapters can repaint colours and texture (with
        # attention only at 8x8 a rank-8 style adapter reached ~25% of the example style; with
        # adapters able to act at 16x16 near the output ~85%).  The 16x16 down block has none: it
        # would cost another ~20% per step and adds little reach.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,  # diffusers' name for the number of heads here: head sizes 16 / 32
        norm_num_groups=16,
    )
    zero_init_residuals(vae)
    zero_init_residuals(unet)
    return vae, text_encoder, unet


def zero_init_residuals(model: torch.nn.Module) -> None:
    """Zero the last conv of every resnet block (and the output projection of every transformer).

    Each residual block then starts as its shortcut, so the freshly built network is shallow and
    learns its first, coarse mapping in far fewer steps (as in the original LDM / Fixup inits).
    """
    from diffusers.models.resnet import ResnetBlock2D

    for module in model.modules():
        if isinstance(module, ResnetBlock2D):
            torch.nn.init.zeros_(module.conv2.weight)
            torch.nn.init.zeros_(module.conv2.bias)
        if module.__class__.__name__ == "Transformer2DModel" and hasattr(module, "proj_out"):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# training phases


def time_lr(peak: float, frac: float, step: int, warmup: int = 20, floor: float = 0.05) -> float:
    """Linear warmup, then cosine decay to ``floor * peak`` over the fraction of the time budget used."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(max(frac, 0.0), 1.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_vae(vae, images: torch.Tensor, seconds: float, batch: int, lr: float, log, max_steps: int | None):
    vae.train()
    # Start with a nearly deterministic posterior (log-variance -8): with the default 0 the sampled
    # latents are swamped by unit noise and reconstruction learns far more slowly.
    with torch.no_grad():
        half = vae.quant_conv.bias.shape[0] // 2
        vae.quant_conv.bias[half:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    n, _, h, w = images.shape
    crop = 16
    start, step, hist = time.time(), 0, []
    while True:
        elapsed = time.time() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= seconds):
            break
        frac = step / max_steps if max_steps else elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = time_lr(lr, frac, step)
        idx = torch.randint(0, n, (batch,), generator=g)
        x = images[idx]
        # final quarter on full images, before that on random crops (the VAE is fully convolutional)
        if frac < 0.75:
            oy, ox = (int(v) for v in torch.randint(0, h - crop + 1, (2,), generator=g))
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        if torch.rand((), generator=g) < 0.5:
            x = x.flip(-1)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        hist.append(mse.item())
        step += 1
        if step % 100 == 0:
            log(f"  vae step {step:5d}  t={time.time() - start:6.1f}s  mse={np.mean(hist[-100:]):.5f}")
    vae.eval()
    return step, time.time() - start, float(np.mean(hist[-50:]))


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i : i + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_recon_mse(vae, images: torch.Tensor) -> float:
    rec = vae.decode(vae.encode(images).latent_dist.mean).sample
    return F.mse_loss(rec, images).item()


class Ema:
    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.n = 0

    @torch.no_grad()
    def update(self):
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self):
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @torch.no_grad()
    def swap(self):
        """Exchange the model's weights with the averaged ones (twice restores them)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


# ----------------------------------------------------------------------------------------------
# shape probe: does the base draw the shape its prompt names?

PROBE_SEEDS = range(4)


@torch.no_grad()
def shape_probe(pipe, grid_path: Path | None = None) -> tuple[float, float]:
    """Share of images recognised as the prompted shape (`loraforge.eval.style.recognised_shape`, the
    measure `eval-style` reports), for full captions ("a red circle on a blue background") and
    shape-only prompts ("a circle"); 4 seeds each."""
    from loraforge.eval.style import recognised_shape

    rows, scores = [], {"full": [], "shape": []}
    for kind, template in (("full", "a red {} on a blue background"), ("shape", "a {}")):
        for shape in data.SHAPES:
            images = pipe(
                [template.format(shape)] * len(PROBE_SEEDS),
                num_inference_steps=20,
                guidance_scale=5.0,
                height=data.RESOLUTION,
                width=data.RESOLUTION,
                generator=[torch.Generator().manual_seed(i) for i in PROBE_SEEDS],
            ).images
            scores[kind] += [recognised_shape(im) == shape for im in images]
            rows.append(np.concatenate([np.asarray(im) for im in images], 1))
    if grid_path is not None:
        from PIL import Image

        grid = Image.fromarray(np.concatenate(rows, 0))
        grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(grid_path)
    return float(np.mean(scores["full"])), float(np.mean(scores["shape"]))


def make_sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **NOISE_SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    )


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_diffusion(
    unet,
    text_encoder,
    latents_mean,
    latents_std,
    token_ids,
    variant_probs,
    scaling,
    seconds,
    batch,
    lr,
    log,
    max_steps,
    ema_decay,
    probe=None,
    probe_seconds=0.0,
):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**NOISE_SCHEDULE)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = Ema(params, ema_decay)
    g = torch.Generator().manual_seed(2)
    n = latents_mean.shape[0]
    probs = torch.tensor(variant_probs)
    start, step, hist = time.time(), 0, []
    last_probe = start
    while True:
        if probe is not None and probe_seconds and time.time() - last_probe >= probe_seconds:
            # watch the averaged weights draw the four shapes (the probe's time counts in the budget)
            ema.swap()
            unet.eval()
            text_encoder.eval()
            full, shape_only = probe(step)
            log(
                f'  probe at step {step}: shape right {full:.0%} (full captions), {shape_only:.0%} ("a <shape>")'
            )
            ema.swap()
            unet.train()
            text_encoder.train()
            last_probe = time.time()
        elapsed = time.time() - start
        if (max_steps is not None and step >= max_steps) or (max_steps is None and elapsed >= seconds):
            break
        frac = step / max_steps if max_steps else elapsed / seconds
        for group in opt.param_groups:
            group["lr"] = time_lr(lr, frac, step)
        idx = torch.randint(0, n, (batch,), generator=g)
        z = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=g)
        if torch.rand((), generator=g) < 0.5:
            z = z.flip(-1)  # every shape is left-right symmetric, so flips are free augmentation
        z = z * scaling
        variant = torch.multinomial(probs, batch, replacement=True, generator=g)
        ids = token_ids[idx, variant]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noisy = sched.add_noise(z, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, cond).sample
        target = sched.get_velocity(z, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        hist.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(
                f"  unet step {step:5d}  t={time.time() - start:6.1f}s  loss={np.mean(hist[-50:]):.4f}  lr={opt.param_groups[0]['lr']:.2e}"
            )
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()
    return step, time.time() - start, float(np.mean(hist[-50:]))


@torch.no_grad()
def eval_diffusion_loss(unet, text_encoder, latents_mean, token_ids, scaling, n=256) -> float:
    """Denoising loss of the final (EMA) weights on fixed noise / timesteps, full captions."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**NOISE_SCHEDULE)
    g = torch.Generator().manual_seed(3)
    idx = torch.arange(min(n, latents_mean.shape[0]))
    z = latents_mean[idx] * scaling
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (len(idx),), generator=g)
    cond = text_encoder(token_ids[idx, 0])[0]
    pred = unet(sched.add_noise(z, noise, t), t, cond).sample
    target = sched.get_velocity(z, noise, t) if sched.config.prediction_type == "v_prediction" else noise
    return F.mse_loss(pred, target).item()


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=12.0, help="total wall-clock budget")
    ap.add_argument(
        "--vae-minutes", type=float, default=3.5, help="part of the budget for the autoencoder (at most 40%%)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--images", type=int, default=3600, help="captioned pretraining images (generated in memory)"
    )
    ap.add_argument(
        "--textures", type=int, default=1200, help="extra random-texture images for the autoencoder"
    )
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--ema", type=float, default=0.99)
    ap.add_argument("--vae-steps", type=int, default=None, help="fixed step count instead of the time budget")
    ap.add_argument(
        "--unet-steps", type=int, default=None, help="fixed step count instead of the time budget"
    )
    ap.add_argument(
        "--probe-minutes",
        type=float,
        default=0.0,
        help="every this many minutes, log how often the EMA weights draw the prompted shape and save "
        "the samples to <out>.probe/step-N.png (0: only at the end)",
    )
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    budget = args.minutes * 60
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    from transformers import CLIPTokenizer

    # data -------------------------------------------------------------------------------------
    log(f"generating {args.images} captioned images + {args.textures} textures at {data.RESOLUTION}px")
    pairs = data.make_pretrain_set(args.images, seed=args.seed)
    shape_images = to_tensor([im for im, _ in pairs])
    texture_images = to_tensor(data.make_texture_set(args.textures, seed=args.seed + 1))

    tok_tmp = tempfile.TemporaryDirectory()
    tok_files = Path(tok_tmp.name)
    tokenizer, words = make_tokenizer(tok_files)
    tokenizer.save_pretrained(tok_files / "saved")
    tokenizer = CLIPTokenizer.from_pretrained(
        tok_files / "saved"
    )  # round-trip through files, as the pipeline will
    log(f"tokenizer: {len(tokenizer)} tokens, {len(words)} whole words")
    variants = [
        data.caption_variants(*attrs) + [""] for _, attrs in pairs
    ]  # full, fg+shape, shape+bg, shape, empty
    variant_probs = [0.6, 0.05, 0.05, 0.2, 0.1]
    flat = [c for v in variants for c in v]
    token_ids = tokenizer(
        flat, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    token_ids = token_ids.view(len(variants), len(variants[0]), MAX_LENGTH)

    vae, text_encoder, unet = make_models(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    counts = {"vae": n_params(vae), "text_encoder": n_params(text_encoder), "unet": n_params(unet)}
    log("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    # autoencoder --------------------------------------------------------------------------------
    setup_s = time.time() - t0
    vae_seconds = min(args.vae_minutes * 60, 0.4 * (budget - setup_s))
    log(f"training autoencoder for {vae_seconds:.0f}s")
    vae_images = torch.cat([shape_images, texture_images])
    vae_steps, vae_time, vae_mse = train_vae(
        vae, vae_images, vae_seconds, args.vae_batch, args.vae_lr, log, args.vae_steps
    )
    recon_shapes = vae_recon_mse(vae, shape_images[:256])
    recon_textures = vae_recon_mse(vae, texture_images[:256])
    style_imgs = to_tensor([data.render_style(s, random.Random(i)) for i, s in enumerate(data.SHAPES * 4)])
    recon_style = vae_recon_mse(vae, style_imgs)
    log(
        f"autoencoder: {vae_steps} steps in {vae_time:.0f}s, train mse {vae_mse:.5f}; recon mse shapes {recon_shapes:.5f}, "
        f"textures {recon_textures:.5f}, style-like {recon_style:.5f} (images in [-1, 1])"
    )
    for p in vae.parameters():
        p.requires_grad_(False)

    lat_mean, lat_std = encode_latents(vae, shape_images)
    scaling = float(1.0 / lat_mean.std())
    vae.register_to_config(scaling_factor=scaling)
    log(f"latents {tuple(lat_mean.shape[1:])}, scaling_factor {scaling:.4f}")

    # diffusion ----------------------------------------------------------------------------------
    reserve = 25.0  # saving + final evaluation
    unet_seconds = max(30.0, budget - (time.time() - t0) - reserve)
    log(f"training unet + text encoder for {unet_seconds:.0f}s")
    probe_dir = args.out.with_name(args.out.name + ".probe")

    def probe(step: int) -> tuple[float, float]:
        probe_dir.mkdir(parents=True, exist_ok=True)
        pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
        return shape_probe(pipe, probe_dir / f"step-{step}.png")

    unet_steps, unet_time, unet_loss = train_diffusion(
        unet,
        text_encoder,
        lat_mean,
        lat_std,
        token_ids,
        variant_probs,
        scaling,
        unet_seconds,
        args.batch,
        args.lr,
        log,
        args.unet_steps,
        args.ema,
        probe,
        args.probe_minutes * 60,
    )
    eval_loss = eval_diffusion_loss(unet, text_encoder, lat_mean, token_ids, scaling)
    log(
        f"unet: {unet_steps} steps in {unet_time:.0f}s, train loss (last 50) {unet_loss:.4f}, EMA eval loss {eval_loss:.4f}"
    )

    # save ---------------------------------------------------------------------------------------
    pipe = make_pipeline(vae, text_encoder, tokenizer, unet)
    probe_full, probe_shape = shape_probe(pipe, probe_dir / "final.png" if args.probe_minutes else None)
    log(
        f"shape probe (final weights, 4 seeds x 4 shapes, guidance 5): shape right {probe_full:.0%} with full "
        f'captions, {probe_shape:.0%} with "a <shape>"'
    )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the plain BPE files too, for tools that want them
        (out / "tokenizer" / name).write_bytes((tok_files / name).read_bytes())
    tok_tmp.cleanup()
    wall = time.time() - t0
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6

    cmd = "python " + " ".join(
        shlex.quote(a)
        for a in [os.path.relpath(sys.argv[0], REPO) if Path(sys.argv[0]).exists() else sys.argv[0]]
        + sys.argv[1:]
    )
    md = (
        f"""# tiny-sd: training record

Produced by `scripts/pretrain_image_base.py` (CPU, {args.threads} thread(s), torch {torch.__version__}).

    {cmd}

| | |
|---|---|
| wall time | {wall / 60:.1f} min ({wall:.0f} s) |
| resolution | {data.RESOLUTION}x{data.RESOLUTION} px, latents 4x{data.RESOLUTION // 2}x{data.RESOLUTION // 2} |
| data | {args.images} captioned shapes ({len(data.SHAPES)} shapes x {len(data.COLOURS)} colours x {len(data.COLOURS) - 1} backgrounds; {data.FREE_FRACTION:.0%} in random non-style colours captioned "a <shape>"), + {args.textures} random textures for the autoencoder; seed {args.seed} |
| parameters | UNet {counts["unet"]:,}; text encoder {counts["text_encoder"]:,}; VAE {counts["vae"]:,} |
| tokenizer | {len(tokenizer)} tokens, max length {MAX_LENGTH} |
| autoencoder | {vae_steps} steps, batch {args.vae_batch} (16x16 crops, then whole images), {vae_time:.0f} s; final train MSE {vae_mse:.5f}; reconstruction MSE (pixels in [-1, 1]): shapes {recon_shapes:.5f}, textures {recon_textures:.5f}, style-like {recon_style:.5f} |
| latent scaling_factor | {scaling:.4f} |
| UNet + text encoder | {unet_steps} steps, batch {args.batch}, peak lr {args.lr:g}, {unet_time:.0f} s; final train loss (mean of last 50 steps) {unet_loss:.4f}; EMA weights' eval loss {eval_loss:.4f} |
| noise schedule | DDPM linear betas 1e-4..0.02, 1000 steps, **v-prediction**; sampler DDIM (trailing) |
| size on disk | {size_mb:.1f} MB (fp32 safetensors) |

Captions look like "a red circle on a blue background"; training also used the partial forms
"a red circle", "a circle on a blue background", "a circle" (caption probabilities 0.6 / 0.05 /
0.05 / 0.2) and 10% empty captions (for classifier-free guidance).  A shape-only prompt such as
"a circle" draws the shape in some random colour, never in the example style's palette.  Sample with ~20-25 steps, guidance 3-7, height = width = {data.RESOLUTION}.

## Log

```
"""
        + "\n".join(lines)
        + "\n```\n"
    )
    (out / "TRAINING.md").write_text(md)
    print(f"saved pipeline to {out} ({size_mb:.1f} MB) in {wall:.0f}s")


if __name__ == "__main__":
    main()
