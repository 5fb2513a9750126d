#!/usr/bin/env python
"""Pretrain the tiny shapes model (``model=tiny_shapes``) and its learned scorer from scratch.

    python scripts/pretrain_tiny.py                      # writes ddpo/assets/tiny_shapes
    python scripts/pretrain_tiny.py --out outputs/shapes --device cuda
    python scripts/pretrain_tiny.py --family flow --vae-from ddpo/assets/tiny_shapes --steps 6000
                                                         # the flow-matching twin: ddpo/assets/tiny_shapes_flow

Everything is procedural (ddpo/shapes.py) and seeded: the data set of captioned renders, the
initial weights and the batches follow from ``--seed``. The stages:

1. a VAE (32 px RGB <-> 4 x 16 x 16 latents) trained to reconstruct the renders;
2. a CLIP text encoder (word-level tokenizer of the grammar) and a UNet trained together on the
   diffusion loss of the latents, with 10% of captions dropped for classifier-free guidance, and
   an exponential moving average of both kept for sampling;
3. the learned scorer (rewards/shapes.py: ``ShapeScorer``), a small CNN that reads an image and
   a caption and predicts whether they match, trained on renders and VAE reconstructions paired
   with their caption or a caption with one attribute changed;
4. an evaluation of the pipeline on the held-out prompts with the exact checker, written with
   the settings and wall times to ``pretrain.json`` next to the weights.

``--family flow`` trains the flow-matching twin (``model=tiny_shapes_flow``) instead: a
``StableDiffusion3Pipeline`` without T5 whose SD3 transformer and two CLIP text encoders learn the
rectified-flow objective (velocity of x_t = (1 - t) x0 + t noise, t logit-normal) on the same data;
with ``--vae-from`` it reuses the DDIM model's VAE (same image space) and skips stage 1; the scorer
of stage 3 is shared, not retrained.

The result is a standard diffusers ``StableDiffusionPipeline`` folder (``save_pretrained``,
safetensors) plus ``scorer/``. The defaults take about 43 minutes on 2 CPU cores. A GPU helps less
than one would think at this size: on an H100 a UNet step took 80 ms (launch- and Python-bound)
against 270 ms on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddpo import shapes  # noqa: E402
from ddpo.schedulers.forward import EpsilonProcess, FlowProcess  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "ddpo" / "assets"
DEFAULT_OUT = {"sd": ASSETS / "tiny_shapes", "flow": ASSETS / "tiny_shapes_flow"}
VOCABULARY = sorted({w for s in shapes.all_scenes() for w in s.caption.split()})
TEXT_DIM = 64
MAX_TOKENS = 16

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,
    sample_size=32,
)
UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=16,
    cross_attention_dim=TEXT_DIM,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sample_scene(rng: random.Random, scenes_by_kind: dict[str, list]) -> shapes.Scene:
    """Single objects, counts 2-4 and relations, a third each."""
    kind = rng.choice(("single", "counting", "relation"))
    return rng.choice(scenes_by_kind[kind])


def build_dataset(count: int, seed: int, size: int = 32):
    """``count`` renders with their scenes (uint8 NHWC), all from ``seed``."""
    rng = random.Random(seed)
    by_kind: dict[str, list] = {}
    for scene in shapes.all_scenes():
        by_kind.setdefault(scene.kind, []).append(scene)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    scenes = []
    for i in range(count):
        scene = sample_scene(rng, by_kind)
        images[i] = shapes.render_scene(scene, rng, size)
        scenes.append(scene)
    return images, scenes


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batches(count: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches drawn by epochs of a seeded permutation."""
    done = 0
    while done < steps:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[start : start + batch_size]
            done += 1


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Progress:
    def __init__(self, name: str, total: int, every: int):
        self.name, self.total, self.every, self.start = name, total, every, time.time()

    def __call__(self, step: int, **values):
        if (step + 1) % self.every and step + 1 != self.total:
            return
        elapsed = time.time() - self.start
        eta = elapsed / (step + 1) * (self.total - step - 1)
        text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        log(f"{self.name} {step + 1}/{self.total} {text} ({elapsed:.0f} s, eta {eta:.0f} s)")


def train_vae(images: torch.Tensor, args, device) -> tuple:
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    progress = Progress("vae", args.vae_steps, args.log_every)
    for step, index in enumerate(batches(len(images), args.vae_batch, args.vae_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.vae_steps, args.vae_lr)
        x = images[index].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + args.vae_kl * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress(step, rec=rec.item(), kl=kl.item())
    vae.eval()
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(images[i : i + 1024].to(device)).latent_dist.mean for i in range(0, len(images), 1024)]
        )
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    return vae, means.cpu() * scaling


def ema_step(loss, optimizer, params, ema, step: int, ema_decay: float, running: float | None) -> float:
    """One optimizer step (gradient norm clipped to 1) and the EMA update of ``params`` into ``ema``
    (decay warmed up as (1 + step) / (10 + step)); returns the running mean of the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - decay)
    return loss.item() if running is None else 0.98 * running + 0.02 * loss.item()


def load_ema(ema, params) -> None:
    """Put the EMA weights into the parameters (sampling uses the average)."""
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)


def encode_captions(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def train_diffusion(latents: torch.Tensor, scenes: list, tokenizer, args, device, unet=None, text_encoder=None):
    """The UNet and text encoder trained on the diffusion loss (from random weights, or from the
    given ``unet`` and ``text_encoder``: scripts/pretrain_testbed.py fine-tunes the shapes model)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(args.seed + 2)
    if unet is None:
        unet = UNet2DConditionModel(**UNET_CONFIG)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=4 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        text_encoder = CLIPTextModel(text_config)
    unet, text_encoder = unet.to(device).train(), text_encoder.to(device).train()
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )
    process = EpsilonProcess(noise_scheduler.alphas_cumprod)  # the forward process the DDIM pipelines train on
    captions = encode_captions(tokenizer, [s.caption for s in scenes])
    empty = encode_captions(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(args.seed + 3)
    progress = Progress("diffusion", args.steps, args.log_every)
    running = None
    for step, index in enumerate(batches(len(latents), args.batch, args.steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        x0 = latents[index].to(device)
        ids = captions[index].clone()
        ids[torch.rand(len(ids), generator=generator) < args.caption_dropout] = empty
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, 1000, (len(x0),), generator=generator).to(device)
        xt = process.noise(x0, noise, t)
        hidden = text_encoder(ids.to(device)).last_hidden_state
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=hidden).sample, process.target(x0, noise, t))
        running = ema_step(loss, optimizer, params, ema, step, args.ema, running)
        progress(step, loss=running)
    load_ema(ema, params)
    return unet.eval(), text_encoder.eval()


FLOW_TEXT_LAYERS = 3  # SD3 conditions on the penultimate hidden state: 3 layers leave 2 under it
FLOW_TRANSFORMER_CONFIG = dict(
    sample_size=16,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=2 * TEXT_DIM,  # the two CLIP encoders' hidden states side by side
    caption_projection_dim=128,  # = heads x head dim
    pooled_projection_dim=2 * TEXT_DIM,  # their pooled projections, concatenated
    pos_embed_max_size=16,
    qk_norm="rms_norm",
)
FLOW_SHIFT = 1.0  # the scheduler's time shift: SD3 uses 3 at 1024 px; a 32 px image needs none


def flow_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=4 * TEXT_DIM,
        num_hidden_layers=FLOW_TEXT_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_DIM,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def assemble_flow_pipeline(transformer, vae, text_encoder, text_encoder_2, tokenizer):
    """A diffusers ``StableDiffusion3Pipeline`` without T5 (diffusers conditions on zeros in its place)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        text_encoder_3=None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
    )


def train_flow(latents: torch.Tensor, scenes: list, tokenizer, vae, args, device):
    """Rectified flow (SD3's objective): x_t = (1 - t) x_0 + t noise, the transformer predicts the
    velocity noise - x_0 at timestep 1000 t, t logit-normal (Esser et al. 2024); captions are encoded
    exactly as ``StableDiffusion3Pipeline.encode_prompt`` encodes them when sampling."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(args.seed + 2)
    transformer = SD3Transformer2DModel(**FLOW_TRANSFORMER_CONFIG).to(device)
    text_encoder = flow_text_encoder(tokenizer).to(device)
    text_encoder_2 = flow_text_encoder(tokenizer).to(device)
    pipe = assemble_flow_pipeline(transformer, vae, text_encoder, text_encoder_2, tokenizer)
    captions = [s.caption for s in scenes]
    params = [p for m in (transformer, text_encoder, text_encoder_2) for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(args.seed + 3)
    process = FlowProcess()  # the forward process pipeline=flow_sde trains on
    progress = Progress("flow", args.steps, args.log_every)
    running = None
    for step, index in enumerate(batches(len(latents), args.batch, args.steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr)
        x0 = latents[index].to(device)
        drop = torch.rand(len(index), generator=generator) < args.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(index.tolist(), drop.tolist())]
        embeds, _, pooled, _ = pipe.encode_prompt(
            batch_captions,
            batch_captions,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=MAX_TOKENS,
        )
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.sigmoid(torch.randn(len(x0), generator=generator)).to(device)
        xt = process.noise(x0, noise, t)
        velocity = transformer(
            hidden_states=xt, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t * 1000
        ).sample
        loss = F.mse_loss(velocity, process.target(x0, noise, t))
        running = ema_step(loss, optimizer, params, ema, step, args.ema, running)
        progress(step, loss=running)
    load_ema(ema, params)
    for module in (transformer, text_encoder, text_encoder_2):
        module.eval()
    return pipe


def load_vae(path: Path, images: torch.Tensor, device, shift_factor: float | None = None):
    """A VAE saved by an earlier run (e.g. the DDIM model's) and the scaled latents of ``images``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, use_safetensors=True).to(device).eval()
    if shift_factor is not None:
        vae.register_to_config(shift_factor=shift_factor)
    with torch.no_grad():
        means = torch.cat(
            [vae.encode(images[i : i + 1024].to(device)).latent_dist.mean for i in range(0, len(images), 1024)]
        )
    return vae, (means.cpu() - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def train_scorer(images_uint8: np.ndarray, scenes: list, vae, args, device):
    from ddpo.rewards.shapes import ShapeScorer, scene_vector

    torch.manual_seed(args.seed + 4)
    scorer = ShapeScorer().to(device)
    # half the inputs are VAE reconstructions, closer to what the diffusion model draws
    images = to_tensor(images_uint8)
    with torch.no_grad():
        recon = torch.cat(
            [
                vae.decode(vae.encode(images[i : i + 1024].to(device)).latent_dist.mean).sample.clamp(-1, 1).cpu()
                for i in range(0, len(images), 1024)
            ]
        )
    pool = torch.cat([images, recon]).add(1).div(2)
    pool_scenes = scenes + scenes
    rng = random.Random(args.seed + 5)
    generator = torch.Generator().manual_seed(args.seed + 6)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=args.scorer_lr, weight_decay=1e-4)
    progress = Progress("scorer", args.scorer_steps, args.log_every)
    running = None
    for step, index in enumerate(batches(len(pool), args.scorer_batch, args.scorer_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.scorer_steps, args.scorer_lr)
        labels = torch.tensor([rng.random() < 0.5 for _ in index], dtype=torch.float32)
        vectors = torch.stack(
            [
                scene_vector(pool_scenes[i] if label else shapes.perturb(pool_scenes[i], rng))
                for i, label in zip(index.tolist(), labels.tolist())
            ]
        )
        x = pool[index]
        x = x + args.scorer_noise * torch.rand(len(x), 1, 1, 1, generator=generator) * torch.randn(
            x.shape, generator=generator
        )
        logits = scorer(x.clamp(0, 1).to(device), vectors.to(device))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress(step, bce=running)
    return scorer.eval()


def scorer_accuracy(scorer, args, device, count: int = 2000) -> float:
    """Accuracy of the scorer on fresh renders, half with their caption and half with a changed one."""
    from ddpo.rewards.shapes import scene_vector

    images, scenes = build_dataset(count, args.seed + 100)
    rng = random.Random(args.seed + 101)
    labels = [i % 2 == 0 for i in range(count)]
    vectors = torch.stack([scene_vector(s if ok else shapes.perturb(s, rng)) for s, ok in zip(scenes, labels)])
    with torch.no_grad():
        logits = scorer(to_tensor(images).add(1).div(2).to(device), vectors.to(device)).cpu()
    return float(((logits > 0) == torch.tensor(labels)).float().mean())


def evaluate_pipeline(pipe, args, device, prompts=None, **sampler) -> dict:
    """Exact-checker accuracy of the pipeline on the held-out prompts (each with several seeds);
    ``sampler``: the family's extra arguments of the diffusers pipeline call."""
    from ddpo.prompts import shapes_eval_prompts

    prompts = prompts or shapes_eval_prompts("heldout")
    results = {name: [] for name in ("correct",) + shapes.ATTRIBUTES}
    pipe.to(device)
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        batch = [p for p in chunk for _ in range(args.eval_seeds)]
        generator = torch.Generator(device="cpu").manual_seed(args.seed + start)
        images = pipe(
            batch,
            num_inference_steps=20,
            guidance_scale=args.guidance,
            height=32,
            width=32,
            output_type="np",
            generator=generator,
            **sampler,
        ).images
        for image, prompt in zip(images, batch):
            verdict = shapes.check_image((image * 255).round().astype(np.uint8), prompt)
            results["correct"].append(verdict.correct)
            for name, value in verdict.attributes.items():
                results[name].append(value)
    from ddpo.evaluation import interval

    return {name: interval(np.array(values, dtype=float)) for name, values in results.items()}


def write_record(args, device, timings, heldout, argv, script: str = "pretrain_tiny.py", **extra) -> None:
    record = {
        "command": f"python scripts/{script} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "device": str(device)
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "timings": timings,
        **extra,
        "heldout": heldout,
    }
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log(f"saved {args.out} ({size / 1e6:.1f} MB) in {timings['total_s']:.0f} s")


def log_heldout(heldout: dict) -> None:
    for name, values in heldout.items():
        log(
            f"held-out {name}: {values['mean']:.3f} (95% CI {values['ci95'][0]:.3f}-{values['ci95'][1]:.3f}, n={values['n']})"
        )


def finish_flow(args, device, images, scenes, vae, latents, timings, start, argv) -> int:
    """The flow-matching twin: train the transformer and text encoders, evaluate, save (no scorer:
    ``reward=shape_proxy`` uses the DDIM model's, which reads images only)."""
    from ddpo.models.tokenizer import build_word_tokenizer

    stage = time.time()
    tokenizer = build_word_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)
    pipe = train_flow(latents, scenes, tokenizer, vae, args, device)
    timings["diffusion_s"] = time.time() - stage
    pipe.set_progress_bar_config(disable=True)
    stage = time.time()
    heldout = evaluate_pipeline(pipe, args, device, max_sequence_length=MAX_TOKENS)
    timings["eval_s"] = time.time() - stage
    timings["total_s"] = time.time() - start
    log_heldout(heldout)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    write_record(args, device, timings, heldout, argv)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--family",
        choices=sorted(DEFAULT_OUT),
        default="sd",
        help="sd: UNet + DDIM (model=tiny_shapes); flow: SD3 transformer + flow matching (model=tiny_shapes_flow)",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: ddpo/assets/tiny_shapes[_flow]")
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="reuse the VAE of an earlier run's folder instead of training one (the flow twin shares the DDIM model's)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=60000, help="size of the rendered training set")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=8000, help="diffusion training steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--scorer-steps", type=int, default=3000)
    parser.add_argument("--scorer-batch", type=int, default=128)
    parser.add_argument("--scorer-lr", type=float, default=1e-3)
    parser.add_argument("--scorer-noise", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=4.0, help="guidance scale of the final evaluation")
    parser.add_argument("--eval-seeds", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    args.out = args.out or DEFAULT_OUT[args.family]

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ddpo.models.tokenizer import build_word_tokenizer
    from ddpo.rewards.shapes import save_scorer

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    timings = {}
    start = time.time()
    log(f"rendering {args.images} captioned images (seed {args.seed}) on {device}, {torch.get_num_threads()} threads")
    images_uint8, scenes = build_dataset(args.images, args.seed)
    images = to_tensor(images_uint8)
    timings["data_s"] = time.time() - start

    stage = time.time()
    if args.vae_from:
        # SD3's pipeline decodes latents / scaling + shift: a VAE without a shift gets shift 0
        vae, latents = load_vae(args.vae_from / "vae", images, device, 0.0 if args.family == "flow" else None)
        log(f"VAE from {args.vae_from}, latent scaling factor {vae.config.scaling_factor:.4f}")
    else:
        vae, latents = train_vae(images, args, device)
        if args.family == "flow":
            vae.register_to_config(shift_factor=0.0)
        log(f"VAE done, latent scaling factor {vae.config.scaling_factor:.4f}")
    timings["vae_s"] = time.time() - stage
    if args.family == "flow":
        return finish_flow(args, device, images, scenes, vae, latents, timings, start, argv)

    stage = time.time()
    tokenizer = build_word_tokenizer(VOCABULARY, model_max_length=MAX_TOKENS)
    unet, text_encoder = train_diffusion(latents, scenes, tokenizer, args, device)
    timings["diffusion_s"] = time.time() - stage

    stage = time.time()
    scorer = train_scorer(images_uint8, scenes, vae, args, device)
    timings["scorer_s"] = time.time() - stage
    accuracy = scorer_accuracy(scorer, args, device)
    log(f"scorer accuracy on fresh renders (half mismatched captions): {accuracy:.3f}")

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    stage = time.time()
    heldout = evaluate_pipeline(pipe, args, device, eta=0.0)
    timings["eval_s"] = time.time() - stage
    timings["total_s"] = time.time() - start
    log_heldout(heldout)

    args.out.mkdir(parents=True, exist_ok=True)
    pipe.to("cpu")
    pipe.save_pretrained(args.out, safe_serialization=True)
    save_scorer(scorer.cpu(), args.out / "scorer")
    write_record(args, device, timings, heldout, argv, scorer_accuracy=accuracy)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
