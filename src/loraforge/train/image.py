"""`loraforge train-image`: teach a Stable Diffusion pipeline a style or subject with LoRA.

    loraforge train-image                                  # embedded tiny-sd + the example style set
    loraforge train-image --base path/or/hub-id --data photos.zip --max-steps 1500 --resolution 512
    loraforge train-image --config examples/train_image.yaml --train-text-encoder --out runs/mine

From Python: ``train_image(ImageTrainConfig(data="photos", max_steps=500, lora=LoraConfig(r=16)))``
returns a `TrainResult`.

What it trains (on the shared loop of `loraforge.train.loop`, so checkpoints, resume, metrics, NaN
handling and seeds behave as in `loraforge train`):

* LoRA on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` by default;
  any names or a regex, convolutions included, via ``lora.target_modules``), optionally on the text
  encoder(s) too (``train_text_encoder``);
* pivotal tuning: new placeholder tokens (``<s1><s2>`` by default) are added to the tokenizer(s) and
  their embedding vectors train with the LoRA. The vectors are a separate parameter spliced into the
  embedding lookup, so no other row of the embedding matrix can change (it gets no gradient and
  is not in the optimizer);
* the noise-prediction loss of the pipeline's scheduler (epsilon or v-prediction), with optional
  min-SNR weighting (``snr_gamma``) and noise offset. VAE latents are computed once (for both flips
  when flipping) unless random cropping forces a fresh encode each step; with a frozen text
  encoder and no tokens to learn, prompt embeddings are cached too.

Output (``output_dir/adapter``): ``pytorch_lora_weights.safetensors`` (diffusers' format; or
``lora.safetensors`` in kohya's with ``format: kohya``), ``learned_embeds.safetensors``,
``adapter_info.json`` and ``validation.png`` (the validation prompts rendered with the adapter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.config import LoraConfig
from loraforge.data.images import (
    ImageRecord,
    PromptBuilder,
    bucket_batches,
    make_buckets,
    nearest_bucket,
    resize_and_crop,
    scan_images,
)
from loraforge.errors import UserError
from loraforge.train.config import (
    TrainConfig,
    add_config_arguments,
    bad_value,
    config_from_args,
    resolve_config,
)
from loraforge.train.loop import TrainResult
from loraforge.train.task import Task, enable_activation_checkpointing

EXAMPLE_DATA = Path(__file__).resolve().parent.parent / "examples" / "style"
DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The embedded tiny-sd's default adds the transformer blocks' other projections and the ResNet
# convolutions: its 1M-parameter UNet draws textures in those convolutions, and LoRA on attention
# alone cannot make it paint a repeating pattern such as the example style's stripes. Every other
# pipeline defaults to the attention projections.
TINY_SD_UNET_TARGETS = DEFAULT_UNET_TARGETS + [
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
]


# The default extra caption templates: several phrasings of "in the style of", so that the style
# follows the tokens rather than one sentence (the idea of cloneofsimo's style templates; these are
# our own). `loraforge eval-style` also measures phrasings that are not among them.
STYLE_TEMPLATES = [
    "{caption} in the style of {tokens}",
    "a painting of {caption}, {tokens} style",
    "{tokens} style, {caption}",
    "a drawing of {caption} in {tokens} style",
    "{caption}, art in the style of {tokens}",
    "{tokens} {caption}",
]


def default_unet_targets(base: str) -> list[str]:
    from loraforge.bases import EMBEDDED_BASES

    tiny = EMBEDDED_BASES["tiny-sd"][1]
    if base == "tiny-sd" or Path(base).resolve() == tiny.resolve():
        return list(TINY_SD_UNET_TARGETS)
    return list(DEFAULT_UNET_TARGETS)


@dataclass
class ImageTrainConfig(TrainConfig):
    """`loraforge train-image`: LoRA (plus learned tokens) on a Stable Diffusion pipeline."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = TrainConfig.RESUME_FREE + (
        "validation_prompts",
        "validation_steps",
        "validation_guidance",
        "validation_seed",
    )

    output_dir: str = "runs/image"
    """Directory for the run: the final adapter (`adapter/`), checkpoints, metrics, samples, loss curve."""

    eval_every: int = 0
    """Compute the eval loss every N steps (and always at the end): the noise-prediction error on up to
    8 training images at fixed timesteps and noise, comparable across steps. 0: only at the end."""

    base: str = "tiny-sd"
    """Pipeline to adapt: an embedded base name, a local diffusers directory or a hub id (SD 1.x/2.x, SDXL)."""

    data: str | None = None
    """Training images: a folder (nested folders too) or a .zip of .jpg/.png/.webp files, with optional
    same-name .txt captions or a metadata.jsonl. Empty: the packaged example style set."""

    resolution: int = 0
    """Training size in pixels (the short side of square buckets). 0: the pipeline's native size."""

    buckets: bool = True
    """Group images into aspect-ratio buckets of about resolution^2 pixels instead of cropping all to a square."""

    crop: Literal["center", "random"] = "center"
    """How an image is cut to its bucket after scaling. "random" re-crops every step (no latent cache)."""

    flip: bool = False
    """Also train on mirror images (random horizontal flips). Off for styles with a handedness."""

    min_image_size: int = 0
    """Images whose short side is smaller are skipped (and reported). 0: half the resolution."""

    placeholder_tokens: list[str] = field(default_factory=lambda: ["<s1>", "<s2>"])
    """New tokens added to the tokenizer(s) and learned (pivotal tuning). Empty: no new tokens."""

    train_tokens: bool = True
    """Learn the placeholder tokens' embedding vectors along with the LoRA."""

    token_init: str = ""
    """Start the new tokens from this word's embedding. Empty: random, scaled like the existing embeddings."""

    token_learning_rate: float = 0.0
    """Learning rate of the token vectors. 0: learning_rate."""

    caption_template: str = "{caption}, in the style of {tokens}"
    """Training prompt for a captioned image ({caption}, {tokens} = the placeholder tokens joined); also
    the form of the validation prompts made from captions."""

    caption_templates: list[str] = field(
        default_factory=lambda: list(STYLE_TEMPLATES), metadata={"repeat": True}
    )
    """More training prompts for captioned images: at every step each image draws one of caption_template
    and these (seeded), so the learned tokens carry the style in other phrasings than one (on the
    command line: repeat the flag, each giving one template). Empty ([] in a config file):
    caption_template only."""

    instance_prompt: str = "a picture in the style of {tokens}"
    """Training prompt for an image without a caption."""

    prior_images: int = 0
    """Prior preservation: render this many images with the base pipeline from the data's captions
    without the tokens (seeds 0, 1, ...; caption after caption) before training and train on them too,
    with those bare captions, so that prompts without the tokens keep the base's pictures. 0: off."""

    train_text_encoder: bool = False
    """Also put LoRA on the text encoder(s)."""

    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    """Text-encoder modules that get LoRA when train_text_encoder is on."""

    text_encoder_learning_rate: float = 0.0
    """Learning rate of the text-encoder LoRA. 0: learning_rate."""

    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """What the UNet predicts. auto: what the pipeline's scheduler says."""

    snr_gamma: float = 0.0
    """Min-SNR loss weighting gamma (Hang et al. 2023; 5 is usual). 0: plain mean squared error."""

    noise_offset: float = 0.0
    """Add this much per-channel constant noise (helps very dark or bright images). 0: off."""

    cache_latents: bool = True
    """Encode every image with the VAE once, before training (not possible with crop: random)."""

    validation_prompts: list[str] = field(default_factory=list)
    """Prompts rendered to samples/step-N.png every sample_every steps and at the end. Empty: up to 4
    prompts made from the data's captions."""

    validation_steps: int = 20
    """Denoising steps of the validation images."""

    validation_guidance: float = 5.0
    """Classifier-free guidance scale of the validation images."""

    validation_seed: int = 0
    """Seed of the validation images (the same every time, so grids are comparable)."""

    format: Literal["diffusers", "kohya"] = "diffusers"
    """File format of the adapter: diffusers (pytorch_lora_weights.safetensors) or kohya (lora.safetensors)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Dtype of the frozen base weights. auto: float32 on CPU, the mixed-precision dtype on GPU."""

    learning_rate: float = 2e-3
    """Peak learning rate of AdamW (reached after the warmup). Lower (1e-4 to 5e-4) for full-size pipelines."""

    batch_size: int = 4
    """Images per micro-batch on each process."""

    max_steps: int = 4500
    """Number of optimizer steps. 0: run for `epochs` passes over the data instead."""

    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(r=8, lora_alpha=8.0),
        metadata={
            "docs": {
                "target_modules": "UNet modules that get LoRA: names or suffixes (convolutions too, e.g. "
                'conv1, conv2), a regular expression, or "all-linear". Empty: the attention projections '
                "to_q, to_k, to_v, to_out.0 (for the embedded tiny-sd also proj_in, proj_out, ff.net.0.proj, "
                "ff.net.2, conv1, conv2). The text encoders' LoRA (train_text_encoder) has the same "
                "settings on text_encoder_target_modules."
            }
        },
    )

    save_every: int = 100
    """Write a resumable checkpoint every N steps (and at the end). 0: only at the end."""

    threads: int = 0
    """CPU threads for PyTorch on each process. 0: PyTorch's default, but 1 for a tiny pipeline on CPU
    (its kernels are too small to split; spare threads only spin)."""

    def validate(self) -> None:
        super().validate()
        if self.resolution < 0:
            bad_value("resolution", self.resolution, "must be >= 0")
        if self.min_image_size < 0:
            bad_value("min_image_size", self.min_image_size, "must be >= 0")
        if self.prior_images < 0:
            bad_value("prior_images", self.prior_images, "must be >= 0")
        for name in ("snr_gamma", "noise_offset", "token_learning_rate", "text_encoder_learning_rate"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                bad_value(name, getattr(self, name), "must be a number >= 0")
        if self.validation_steps <= 0:
            bad_value("validation_steps", self.validation_steps, "must be > 0")
        if len(set(self.placeholder_tokens)) != len(self.placeholder_tokens):
            bad_value("placeholder_tokens", self.placeholder_tokens, "tokens must differ")
        for token in self.placeholder_tokens:
            if not token or any(c.isspace() for c in token):
                bad_value("placeholder_tokens", token, "each token must be non-empty and without spaces")
        for template in [self.caption_template, *self.caption_templates]:
            PromptBuilder(self.placeholder_tokens, template, self.instance_prompt)  # checks templates
        if not self.base:
            bad_value("base", self.base, "must not be empty")
        # What Stable Diffusion's LoRA files cannot hold.
        if self.lora.bias != "none":
            bad_value("lora.bias", self.lora.bias, "image adapter files hold no biases; use none")
        if self.lora.modules_to_save:
            bad_value("lora.modules_to_save", self.lora.modules_to_save, "image adapter files hold LoRA only")
        if self.lora.init_lora_weights == "pissa":
            bad_value(
                "lora.init_lora_weights",
                "pissa",
                "PiSSA changes the base weights, which image files cannot hold",
            )


# -- the modules that train ----------------------------------------------------------------------------


class PlaceholderEmbedding(nn.Module):
    """A token embedding whose rows for ids >= `first_id` come from the trainable `new_rows`.

    The original embedding stays frozen and out of the optimizer, so only the new tokens' vectors can
    change; `bake()` writes them into the original matrix."""

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.new_rows = nn.Parameter(init.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # for code that reads `get_input_embeddings().weight`
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        offset = (ids - self.first_id).clamp(0, self.new_rows.shape[0] - 1)
        rows = self.new_rows.to(out.dtype)[offset]
        return torch.where((ids >= self.first_id).unsqueeze(-1), rows, out)

    @torch.no_grad()
    def bake(self) -> None:
        n = self.new_rows.shape[0]
        self.base.weight[self.first_id : self.first_id + n] = self.new_rows.to(self.base.weight.dtype)


class DiffusionLoraModule(nn.Module):
    """Everything with trainable weights (UNet, text encoders), as one module for the shared loop."""

    def __init__(self, unet, text_encoders: list[nn.Module], sdxl: bool):
        super().__init__()
        self.unet = unet
        self.text_encoders = nn.ModuleList(text_encoders)
        self.sdxl = sdxl

    def encode(self, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            return self.text_encoders[0](ids[0])[0], None
        hidden, pooled = [], None
        for encoder, tokens in zip(self.text_encoders, ids):
            out = encoder(tokens, output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def forward(self, noisy, timesteps, ids=None, hidden=None, pooled=None, time_ids=None):
        if hidden is None:
            hidden, pooled = self.encode(ids)
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
        return self.unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


# -- the task ------------------------------------------------------------------------------------------


@dataclass
class _Samples:
    prompts: list[str] = field(default_factory=list)
    buckets: list[tuple[int, int]] = field(default_factory=list)  # (w, h)
    original: list[tuple[int, int]] = field(default_factory=list)  # (h, w) before resizing (SDXL)
    crops: list[tuple[int, int]] = field(default_factory=list)  # (top, left) of the centre/fixed crop
    pixels: list[torch.Tensor] = field(
        default_factory=list
    )  # uint8 (3, H, W): cropped, or covering (random crop)
    latent_mean: list[torch.Tensor] = field(default_factory=list)  # (variants, C, h, w)
    latent_std: list[torch.Tensor] = field(default_factory=list)
    variants: list[list[str]] = field(default_factory=list)  # each image's training prompts; [0] = prompts
    ids: list[list[list[torch.Tensor]]] = field(default_factory=list)  # [image][variant][encoder], (L,)


class ImageTask(Task):
    """The shared loop's task for Stable Diffusion LoRA (see `loraforge.train.task`).

    Without `records`, the constructor reads and checks the config's data (before any model loads)."""

    throughput_unit = "img"  # the loop's throughput counts images here, not tokens
    eval_loss_label = "eval loss (on up to 8 training images, fixed noise)"  # loss.png's legend

    def __init__(self, config: ImageTrainConfig, records: list[ImageRecord] | None = None, report=None):
        if records is None:
            records, report = load_data(config)
        self.config = config
        self.records = records
        self.report = report
        self.model: nn.Module | None = None
        self.last_grid: Path | None = None
        self.log = print

    # -- build ---------------------------------------------------------------------------------------

    def build(self, accelerator=None) -> None:
        from diffusers import DDPMScheduler

        from loraforge.model import LoraModel
        from loraforge.runtime import load_pipeline, native_size, size_step, text_models

        c = self.config
        if self.report is not None:
            lines = self.report.summary().splitlines()
            more = [f"  ... and {len(lines) - 21} more"] if len(lines) > 21 else []
            self.log("\n".join(lines[:21] + more))
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        dtype = self._weights_dtype()
        self.pipe = pipe = load_pipeline(c.base, device="cpu", dtype=dtype, threads=c.threads)
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self.step = size_step(pipe)
        self.resolution = c.resolution or min(native_size(pipe))
        if self.resolution % self.step:
            raise UserError(
                f"resolution {self.resolution} must be a multiple of {self.step} for this pipeline"
            )
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = (
            self.noise_scheduler.config.prediction_type if c.prediction_type == "auto" else c.prediction_type
        )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(
                f"prediction type {self.prediction_type!r} is not supported (epsilon or v_prediction)"
            )
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.vae = pipe.vae.requires_grad_(False).eval()
        self.prior = self._render_prior() if c.prior_images else []
        self.unet_dtype = pipe.unet.dtype  # diffusers' `.dtype` walks every module: read it once

        # UNet LoRA.
        targets = c.lora.target_modules or default_unet_targets(c.base)
        self.unet_targets = targets
        self.unet_lora = LoraModel(pipe.unet, dataclasses.replace(c.lora, target_modules=targets))
        # Text encoders: optional LoRA, then the placeholder tokens (after LoRA, which freezes everything).
        self.text = text_models(pipe)
        encoders = []
        self.te_loras = {}
        for component, _, encoder in self.text:
            encoder.requires_grad_(False)
            if c.train_text_encoder:
                te_config = dataclasses.replace(c.lora, target_modules=list(c.text_encoder_target_modules))
                self.te_loras[component] = LoraModel(encoder, te_config)
                encoders.append(self.te_loras[component])
            else:
                encoders.append(encoder)
        self.tokens = list(c.placeholder_tokens)
        self.placeholders: dict[str, PlaceholderEmbedding] = {}
        if self.tokens:
            self._add_placeholder_tokens()
        self.builder = prompt_builder(c)
        self.builders = prompt_builders(c)
        self.container = DiffusionLoraModule(self.unet_lora, encoders, self.sdxl).to(self.device)
        self.model = self.container  # the loop swaps in its prepared (DDP / autocast) wrapper
        self.vae.to(self.device)

        # Data: sizes, prompts, latents (and prompt embeddings when nothing in the text path trains).
        self.cached = c.cache_latents and c.crop != "random"
        if c.cache_latents and not self.cached:
            self.log(
                "note: crop: random re-crops every step, so latents are not cached (the VAE runs every step)"
            )
        self._prepare_samples()
        self.text_cache = None
        if not c.train_text_encoder and not (self.tokens and c.train_tokens):
            self._cache_text()
        trainable, total = self._count_parameters()
        self.log(
            f"{type(pipe).__name__}: {len(self.samples.prompts)} images at {self.resolution}px, LoRA on {', '.join(targets)} "
            f"({len(set(self.samples.buckets))} bucket(s)), trainable parameters {trainable:,d} of {total:,d}, "
            f"prediction {self.prediction_type}, latents {'cached' if self.cached else 'encoded every step'}"
        )

    def _render_prior(self) -> list[tuple[object, str]]:
        """(image, prompt) pairs of prior preservation, rendered by the bare base (before any LoRA)."""
        from loraforge.runtime import GenerationSettings, render

        c = self.config
        captions = []
        for record in self.records:
            caption = record.caption or "a picture"
            if caption not in captions:
                captions.append(caption)
        pairs = []
        for k in range(c.prior_images):
            caption = captions[k % len(captions)]
            settings = GenerationSettings(
                prompt=caption,
                seed=k // len(captions),
                steps=c.validation_steps,
                guidance=c.validation_guidance,
                width=self.resolution,
                height=self.resolution,
            )
            pairs.append((render(self.pipe, settings, 1)[0], caption))
        self.log(f"prior preservation: rendered {len(pairs)} base image(s) of {len(captions)} caption(s)")
        return pairs

    def _weights_dtype(self) -> torch.dtype:
        c = self.config
        if c.dtype != "auto":
            return getattr(torch, c.dtype)
        if torch.cuda.is_available() and c.mixed_precision in ("fp16", "bf16"):
            return torch.float16 if c.mixed_precision == "fp16" else torch.bfloat16
        return torch.float32

    def _add_placeholder_tokens(self) -> None:
        c = self.config
        extended = set()  # tokenizers shared by two encoders get the tokens once
        for component, tokenizer, encoder in self.text:
            if id(tokenizer) not in extended:
                clash = [t for t in self.tokens if t in tokenizer.get_vocab()]
                if clash:
                    raise UserError(
                        f"placeholder token {clash[0]!r} is already a token of this tokenizer; pick another"
                    )
                tokenizer.add_tokens(self.tokens)
                extended.add(id(tokenizer))
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            first = ids[0]
            if ids != list(range(first, first + len(self.tokens))) or first + len(self.tokens) != len(
                tokenizer
            ):
                raise UserError(
                    f"the tokenizer gave the new tokens ids {ids}; expected the last consecutive ids"
                )
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            base = encoder.get_input_embeddings()
            weight = base.weight.detach()
            if c.token_init:
                init_ids = tokenizer(c.token_init, add_special_tokens=False).input_ids
                if not init_ids:
                    raise UserError(f"token_init {c.token_init!r} tokenizes to nothing")
                init = weight[init_ids].float().mean(0, keepdim=True).repeat(len(self.tokens), 1)
            else:
                std = weight[:first].float().std()
                init = torch.randn(len(self.tokens), weight.shape[1]) * std
            with torch.no_grad():
                base.weight[first:] = init.to(base.weight.dtype)
            wrapper = PlaceholderEmbedding(base, first, init)
            wrapper.new_rows.requires_grad_(c.train_tokens)
            encoder.set_input_embeddings(wrapper)
            self.placeholders[component] = wrapper

    def _count_parameters(self) -> tuple[int, int]:
        params = list({id(p): p for p in self.container.parameters()}.values())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def _prepare_samples(self) -> None:
        c = self.config
        buckets = (
            make_buckets(self.resolution, self.step) if c.buckets else [(self.resolution, self.resolution)]
        )
        s = self.samples = _Samples()
        items = [(record.load, record.caption, None) for record in self.records]
        items += [((lambda im=image: im), None, prompt) for image, prompt in self.prior]
        for load, caption, prior_prompt in items:
            image = load()
            bucket = nearest_bucket(image.size, buckets) if c.buckets else buckets[0]
            variants = [prior_prompt] if prior_prompt is not None else []
            for builder in self.builders if prior_prompt is None else []:
                prompt = builder(caption)
                if prompt not in variants:
                    variants.append(prompt)
            s.prompts.append(variants[0])
            s.variants.append(variants)
            s.buckets.append(bucket)
            s.original.append((image.size[1], image.size[0]))
            if c.crop == "random":
                # Keep the scaled (covering) image; each step cuts its own window.
                scale = max(bucket[0] / image.size[0], bucket[1] / image.size[1])
                size = (
                    max(bucket[0], round(image.size[0] * scale)),
                    max(bucket[1], round(image.size[1] * scale)),
                )
                cover, _ = resize_and_crop(image, size, "center")
                s.pixels.append(_uint8(cover))
                s.crops.append((0, 0))
            else:
                cropped, top_left = resize_and_crop(image, bucket, "center")
                s.pixels.append(_uint8(cropped))
                s.crops.append(top_left)
        flat = [prompt for variants in s.variants for prompt in variants]
        per_encoder = [
            tokenizer(
                flat,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for _, tokenizer, _ in self.text
        ]
        k = 0
        for variants in s.variants:
            s.ids.append([])
            for _ in variants:
                s.ids[-1].append([ids[k] for ids in per_encoder])
                k += 1
        if self.cached:
            variants = 2 if c.flip else 1
            with torch.no_grad():
                for pixels in s.pixels:
                    batch = [pixels, pixels.flip(-1)][:variants]
                    dist = self._encode(torch.stack(batch))
                    s.latent_mean.append(dist.mean.float())
                    s.latent_std.append(dist.std.float())
            s.pixels = []  # not needed any more

    def _encode(self, pixels_uint8: torch.Tensor):
        vae = self.vae
        # fp16 VAEs that ask for it (SD and SDXL do) encode in float32, as diffusers' pipelines decode.
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            x = (pixels_uint8.to(self.device, torch.float32) / 127.5 - 1.0).to(vae.dtype)
            dist = vae.encode(x).latent_dist
            return type(dist)(dist.parameters.float())
        finally:
            if upcast:
                vae.to(torch.float16)

    def _cache_text(self) -> None:
        self.text_cache = {}
        with torch.no_grad():
            for i, variants in enumerate(self.samples.variants):
                for v, prompt in enumerate(variants):
                    if prompt not in self.text_cache:
                        hidden, pooled = self.container.encode(
                            [ids.unsqueeze(0).to(self.device) for ids in self.samples.ids[i][v]]
                        )
                        self.text_cache[prompt] = (hidden[0], None if pooled is None else pooled[0])

    def enable_gradient_checkpointing(self) -> None:
        self.unet_lora.model.enable_gradient_checkpointing()
        for lora in self.te_loras.values():
            enable_activation_checkpointing(lora.model)

    # -- what the loop calls ---------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for g in self.parameter_groups() for p in g["params"]]

    def parameter_groups(self) -> list[dict]:
        c = self.config
        unet = [p for p in self.unet_lora.parameters() if p.requires_grad]
        groups = [{"params": unet}]
        te = [p for lora in self.te_loras.values() for p in lora.parameters() if p.requires_grad]
        te = [p for p in te if not any(p is w.new_rows for w in self.placeholders.values())]
        if te:
            groups.append({"params": te, "lr": c.text_encoder_learning_rate or c.learning_rate})
        rows = [w.new_rows for w in self.placeholders.values() if w.new_rows.requires_grad]
        if rows:
            groups.append(
                {"params": rows, "lr": c.token_learning_rate or c.learning_rate, "weight_decay": 0.0}
            )
        return groups

    def num_batches(self) -> int:
        return sum(1 for _ in bucket_batches(self.samples.buckets, self.config.batch_size, random.Random(0)))

    def train_batches(self, epoch: int, start: int = 0):
        rng = random.Random(self.config.seed * 1_000_003 + epoch)
        s = self.samples
        for i, indices in enumerate(bucket_batches(s.buckets, self.config.batch_size, rng)):
            flips = [self.config.flip and rng.random() < 0.5 for _ in indices]
            crops = []
            if self.config.crop == "random":
                w, h = s.buckets[indices[0]]
                for j in indices:
                    H, W = s.pixels[j].shape[1:]
                    crops.append((rng.randint(0, H - h), rng.randint(0, W - w)))
            variants = [rng.randrange(len(s.variants[j])) for j in indices]
            if i >= start:
                yield {"indices": indices, "flips": flips, "crops": crops, "variants": variants}

    def _latents(self, batch, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents and SDXL time ids of a batch."""
        s = self.samples
        idx, flips = batch["indices"], batch["flips"]
        if self.cached:
            mean = torch.stack([s.latent_mean[i][1 if f else 0] for i, f in zip(idx, flips)])
            std = torch.stack([s.latent_std[i][1 if f else 0] for i, f in zip(idx, flips)])
            latents = mean + std * torch.randn_like(mean) if sample else mean
            crops = [s.crops[i] for i in idx]
        else:
            w, h = s.buckets[idx[0]]
            pixels, crops = [], []
            for k, i in enumerate(idx):
                top, left = (
                    batch["crops"][k]
                    if batch.get("crops")
                    else s.crops[i]
                    if self.config.crop != "random"
                    else (0, 0)
                )
                image = (
                    s.pixels[i]
                    if self.config.crop != "random"
                    else s.pixels[i][:, top : top + h, left : left + w]
                )
                pixels.append(image.flip(-1) if flips[k] else image)
                crops.append((top, left))
            with torch.no_grad():
                dist = self._encode(torch.stack(pixels))
                latents = (dist.sample() if sample else dist.mean).float()
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        latents = (latents - shift) * config.scaling_factor
        time_ids = None
        if self.sdxl:
            w, h = s.buckets[idx[0]]
            time_ids = torch.tensor(
                [[*s.original[i], *crop, h, w] for i, crop in zip(idx, crops)], dtype=torch.float32
            )
        return latents.to(self.device), None if time_ids is None else time_ids.to(self.device)

    def _text_inputs(self, batch) -> dict:
        """The text inputs of a batch: each image's drawn prompt variant (the first without a draw)."""
        s = self.samples
        indices = batch["indices"]
        chosen = batch.get("variants") or [0] * len(indices)
        if self.text_cache is not None:
            prompts = [s.variants[i][v] for i, v in zip(indices, chosen)]
            hidden = torch.stack([self.text_cache[p][0] for p in prompts])
            pooled = torch.stack([self.text_cache[p][1] for p in prompts]) if self.sdxl else None
            return {"hidden": hidden, "pooled": pooled}
        n = len(self.text)
        return {
            "ids": [
                torch.stack([s.ids[i][v][k] for i, v in zip(indices, chosen)]).to(self.device)
                for k in range(n)
            ]
        }

    def _target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def loss(self, batch):
        latents, time_ids = self._latents(batch)
        noise = torch.randn_like(latents)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device
            )
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self._target(latents, noise, timesteps)
        pred = self.model(noisy.to(self.unet_dtype), timesteps, time_ids=time_ids, **self._text_inputs(batch))
        per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.config.snr_gamma:
            per_item = per_item * self._snr_weights(timesteps)
        return per_item.mean(), bsz

    def _snr_weights(self, timesteps):
        ac = self.alphas_cumprod[timesteps].float()
        snr = ac / (1 - ac)
        clipped = torch.clamp(snr, max=self.config.snr_gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr

    def eval_loss(self) -> float | None:
        """Unweighted noise-prediction loss on up to 8 training images at 4 fixed timesteps with fixed
        noise: comparable across steps and runs (the data has no held-out split)."""
        s = self.samples
        generator = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        T = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.tensor([int(T * f) for f in (0.1, 0.35, 0.6, 0.85)], device=self.device)
        for i in range(min(8, len(s.prompts))):
            batch = {"indices": [i] * len(timesteps), "flips": [False] * len(timesteps), "crops": []}
            if self.config.crop == "random":
                w, h = s.buckets[i]
                H, W = s.pixels[i].shape[1:]
                batch["crops"] = [((H - h) // 2, (W - w) // 2)] * len(timesteps)
            latents, time_ids = self._latents(batch, sample=False)
            noise = torch.randn(latents.shape, generator=generator).to(latents.device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = self._target(latents, noise, timesteps)
            # The unwrapped module: this runs on the main process only, where a DDP forward would hang.
            pred = self.container(
                noisy.to(self.unet_dtype), timesteps, time_ids=time_ids, **self._text_inputs(batch)
            )
            total += F.mse_loss(pred.float(), target.float()).item()
            count += 1
        return total / count if count else None

    def validation_prompts(self) -> list[str]:
        if not hasattr(self, "builder"):
            self.builder = prompt_builder(self.config)
        if self.config.validation_prompts:
            return list(self.config.validation_prompts)
        seen = []
        for record in self.records:
            prompt = self.builder(record.caption)
            if prompt not in seen:
                seen.append(prompt)
        return seen[:4]

    def _lora_scale(self, weight: float | None) -> None:
        """Sets the LoRA's strength for sampling (None: off), then back with `_lora_scale(1.0)`."""
        for lora in [self.unet_lora, *self.te_loras.values()]:
            for layer in lora.lora_layers():
                layer.disabled = weight is None
            if weight is not None:
                lora.set_adapters(["default"], [weight])

    def sample(self, step: int, out_dir: Path) -> None:
        """Renders the validation grid: one row per prompt (seed validation_seed + row), columns the base
        (LoRA off, prompt without the learned tokens), the adapter at weight 0.5 and at 1.0."""
        from loraforge.runtime import GenerationSettings, render

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        prompts = self.validation_prompts()
        c = self.config
        rows = []
        try:
            for i, prompt in enumerate(prompts):
                bare = prompt
                for token in self.tokens:
                    bare = bare.replace(token, " ")
                bare = " ".join(bare.split()).strip(" ,")
                images = []
                for weight, text in ((None, bare), (0.5, prompt), (1.0, prompt)):
                    self._lora_scale(weight)
                    settings = GenerationSettings(
                        prompt=text,
                        seed=c.validation_seed + i,
                        steps=c.validation_steps,
                        guidance=c.validation_guidance,
                        width=self.resolution,
                        height=self.resolution,
                    )
                    images += render(self.pipe, settings, 1)
                rows.append((prompt, images))
        finally:
            self._lora_scale(1.0)
        columns = ["base, no tokens", "adapter 0.5", "adapter 1.0"]
        title = (
            f"step {step}: seed {c.validation_seed}+row, {c.validation_steps} steps, "
            f"guidance {c.validation_guidance:g}"
        )
        path = out_dir / f"step-{step:06d}.png"
        labelled_grid(rows, columns, title).save(path)
        (out_dir / f"step-{step:06d}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        self.last_grid = path

    def image_lora(self):
        from loraforge.formats.image_lora import ImageLora, extract

        lora = ImageLora()
        lora.components["unet"] = extract(self.unet_lora, "default", "unet")
        for component, te in self.te_loras.items():
            lora.components[component] = extract(te, "default", component)
        if self.tokens:
            lora.tokens = list(self.tokens)
            lora.embeddings = {c: w.new_rows.detach().float().cpu() for c, w in self.placeholders.items()}
        return lora

    def adapter_info(self) -> dict:
        c = self.config
        return {
            "format": "loraforge-image",
            "file_format": c.format,
            "base": c.base,
            "pipeline": type(self.pipe).__name__,
            "rank": c.lora.r,
            "alpha": c.lora.lora_alpha,
            "target_modules": self.unet_targets,
            "text_encoder_lora": c.train_text_encoder,
            "text_encoder_target_modules": list(c.text_encoder_target_modules)
            if c.train_text_encoder
            else [],
            "caption_template": c.caption_template,
            "caption_templates": list(c.caption_templates),
            "instance_prompt": c.instance_prompt,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "validation_prompts": self.validation_prompts(),
        }

    def save_adapter(self, directory: Path) -> None:
        import shutil

        from loraforge.formats import write_image_lora

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_image_lora(directory, self.image_lora(), self.config.format, self.adapter_info())
        if self.last_grid is not None and self.last_grid.is_file():
            shutil.copyfile(self.last_grid, directory / "validation.png")

    def extra_state(self) -> dict:
        return {"tokens": list(self.tokens)}

    def load_extra_state(self, state: dict) -> None:
        tokens = state.get("tokens")
        if tokens is not None and list(tokens) != self.tokens:
            raise UserError(f"the checkpoint learned tokens {tokens}, this run has {self.tokens}")


def prompt_builder(config: ImageTrainConfig, template: str | None = None) -> PromptBuilder:
    """The run's prompt templates (`template` instead of caption_template if given); without placeholder
    tokens the default templates drop their "in the style of {tokens}" part (custom templates are used
    as given)."""
    template = config.caption_template if template is None else template
    instance = config.instance_prompt
    if not config.placeholder_tokens:
        defaults = {f.name: f.default for f in dataclasses.fields(ImageTrainConfig)}
        if template == defaults["caption_template"] or template in STYLE_TEMPLATES:
            template = "{caption}"
        if instance == defaults["instance_prompt"]:
            instance = "a picture"
    return PromptBuilder(list(config.placeholder_tokens), template, instance)


def prompt_builders(config: ImageTrainConfig) -> list[PromptBuilder]:
    """caption_template's builder, then caption_templates' (the training prompts drawn per step)."""
    return [prompt_builder(config, t) for t in [config.caption_template, *config.caption_templates]]


def _uint8(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy())


def labelled_grid(rows: list[tuple[str, list]], columns: list[str], title: str, min_cell: int = 128):
    """A grid of images with words on it: `title` on top, a header with the `columns`' names, then per
    row its label (the prompt) above its images. Images are upscaled by a whole factor with
    nearest-neighbour (so 32-pixel images stay sharp) until a cell is at least `min_cell` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    images = [im for _, row in rows for im in row]
    w = max(im.size[0] for im in images)
    h = max(im.size[1] for im in images)
    factor = max(1, math.ceil(min_cell / min(w, h)))
    cw, ch = w * factor, h * factor
    font = ImageFont.load_default(size=12)
    gap, line = 4, 16
    ncols = max(len(columns), max(len(row) for _, row in rows))
    texts = [title] + [label for label, _ in rows]
    width = max(ncols * (cw + gap) + gap, max(int(font.getlength(t)) for t in texts) + 2 * gap)
    height = line + gap + line + len(rows) * (line + ch + gap) + gap
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((gap, 2), title, fill="black", font=font)
    y = line + gap
    for j, name in enumerate(columns):
        draw.text((gap + j * (cw + gap), y), name, fill=(60, 60, 60), font=font)
    y += line
    for label, row in rows:
        draw.text((gap, y + 1), label, fill=(20, 20, 120), font=font)
        y += line
        for j, image in enumerate(row):
            grid.paste(
                image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST),
                (gap + j * (cw + gap), y),
            )
        y += ch + gap
    return grid


def native_resolution(base: str) -> int:
    """The pipeline's native image size, read from its configs (no weights are loaded). A local pipeline's
    configs are read as JSON, without importing diffusers (seconds, paid again by the training)."""
    from loraforge.bases import resolve_base

    where = Path(resolve_base(base))
    if (where / "unet" / "config.json").is_file() and (where / "vae" / "config.json").is_file():
        unet = json.loads((where / "unet" / "config.json").read_text())
        vae = json.loads((where / "vae" / "config.json").read_text())
    else:  # a hub id: diffusers finds (and caches) the files
        from diffusers import AutoencoderKL, UNet2DConditionModel

        unet = UNet2DConditionModel.load_config(str(where), subfolder="unet")
        vae = AutoencoderKL.load_config(str(where), subfolder="vae")
    sample = unet["sample_size"]
    sample = sample if isinstance(sample, int) else min(sample)
    return sample * 2 ** (len(vae["block_out_channels"]) - 1)


# -- Python API and command line ------------------------------------------------------------------------


def load_data(config: ImageTrainConfig, resolution: int | None = None):
    """Scans the training data (before any model is loaded); errors name the bad files."""
    data = config.data or str(EXAMPLE_DATA)
    if resolution is None and not config.min_image_size:
        try:
            resolution = config.resolution or native_resolution(config.base)
        except Exception:  # noqa: BLE001 - an unreadable base is reported when it is loaded, after the data
            resolution = 16
    min_size = config.min_image_size or max(1, (resolution or 16) // 2)
    records, report = scan_images(data, min_size=min_size, strict=config.strict)
    return records, report


def train_image(config: ImageTrainConfig | None = None, /, **overrides) -> TrainResult:
    """Teaches a Stable Diffusion pipeline a style or subject: `loraforge train-image` from Python.

    `config` defaults to `ImageTrainConfig()`; `overrides` are config keys as in the YAML file
    (`max_steps=500`, `lora={"r": 16}`, the older `lora_r=16` ...) applied on top of it. The config is
    validated and the images read and checked before any model loads (a `UserError` names the key or
    the files). The resolved config is saved as ``<output_dir>/train_config.yaml``; the adapter goes to
    `result.adapter_dir`. Prints what the training prints (data report, progress); nothing else.
    """
    from accelerate import PartialState

    from loraforge.train.loop import train

    config = resolve_config(ImageTrainConfig, config, overrides)
    task = ImageTask(config)  # reads and checks the images
    # cpu=True without a GPU: how accelerate recognises a multi-process CPU launch (torchrun).
    if not PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        task.log = lambda *a, **k: None
    return train(task, config)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, ImageTrainConfig, example="examples/train_image.yaml")


def run(args) -> int:
    from accelerate import PartialState

    config = config_from_args(ImageTrainConfig, args)
    result = train_image(config)
    if result.interrupted:
        return 130
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    if main and result.already_finished:
        print(f"{result.done_line('images')}; its adapter: {result.adapter_dir}")
    elif main:
        out, task = result.adapter_dir, result.task
        print(result.done_line("images"))
        tokens = "".join(task.tokens)
        example = (task.validation_prompts() or [f"a picture in the style of {tokens}"])[0]
        print(f"adapter: {out} ({config.format} format)")
        if (out / "validation.png").is_file():
            print(f"validation images: {out / 'validation.png'}")
        print(f'try: loraforge generate-image --base {config.base} --adapter {out} --prompt "{example}"')
    sys.stdout.flush()
    return 0
