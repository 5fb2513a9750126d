"""Benchmark the real training loop and compare it with its compute floor.

    python scripts/bench.py experiment=tiny_bench
    python scripts/bench.py model=sd15_arch model.resolution=256 sample.num_steps=2 sample.batch_size=1 \
        train.batch_size=1 sample.num_batches_per_epoch=1 --epochs 1
    python scripts/bench.py model=sd15_arch mixed_precision=fp16 sample.batch_size=8 train.batch_size=4 \
        sample.num_batches_per_epoch=1 --epochs 2 --json bench_sd15_512.json       # on a GPU
    python scripts/bench.py model=sd3_arch pipeline=flow_sde mixed_precision=bf16 sample.num_steps=10 sample.batch_size=8 \
        train.batch_size=4 sample.num_batches_per_epoch=1 --epochs 2                # SD3.5-M's sizes, on a GPU

Arguments other than the options below are Hydra overrides of conf/config.yaml (logger=none is
forced). The loop runs ``--warmup`` epochs, then ``--epochs`` timed epochs of ``ddpo.trainer.train``
itself. Then, in the same process, the floor: the time of one UNet forward at the sampling batch
(with CFG: twice the batch), one UNet forward+backward at the training batch, the forwards without
gradients of the other policies the algorithm's loss reads there (the reference for a KL; NFT's old
policy, AWM's EMA), and one VAE decode
(for a flow-matching model, pipeline=flow_sde, its transformer in the UNet's place),
each timed alone after warm-up with the loop's shapes, dtype and settings, multiplied by the number
of such calls an epoch made. The ratio epoch time / floor says how much the loop adds.
"""

import argparse
import functools
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_host_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2]


def saved_for_backward_mb(fn) -> float:
    """MiB of tensors autograd keeps for the backward pass of ``fn()``'s result (its activations): the
    memory gradient checkpointing saves, measured the same on any device."""
    import torch

    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    result.backward()
    return total[0] / 2**20


def measure_differentiable_floor(components, run, repeats: int) -> dict:
    """The floor of a reward-gradient epoch: per sampling batch, the chain's forwards without gradients, K
    denoiser forward+backward calls, the decode's and the reward's forward+backward; and the activation
    memory of one batch's tail with and without gradient checkpointing."""
    import torch

    pipeline, device, algorithm = components.pipeline, components.accelerator.device, components.algorithm
    s = run.sample
    unet, denoiser = pipeline.trainable_module(), pipeline._denoiser
    size = pipeline.resolution // pipeline.vae_scale_factor
    channels = getattr(pipeline, "latent_channels", unet.config.in_channels)  # FLUX packs 4x its channels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prompts, metadata = map(
        list, zip(*(components.prompt_fn(__import__("random").Random(i)) for i in range(s.batch_size)))
    )
    conditioning = pipeline.encode_prompts(prompts)
    latents = torch.randn(s.batch_size, channels, size, size, device=device)
    timesteps = torch.full((s.batch_size,), 500, device=device, dtype=torch.long)
    inputs = pipeline.denoiser_inputs(latents, timesteps, conditioning, pipeline.sample_cfg)

    def forward():
        with torch.no_grad(), pipeline._autocast():
            denoiser(**inputs)

    def forward_backward():
        with pipeline._autocast():
            out = denoiser(**inputs)
        out = out.sample if hasattr(out, "sample") else out[0]
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    def decode_backward():
        pipeline.decode_with_grad(latents.clone().requires_grad_(True)).mean().backward()

    images = pipeline.decode(latents)

    def reward_backward():
        components.reward_fn.score_with_grad(images.clone().requires_grad_(True), prompts, metadata).sum().backward()

    unet.eval()
    per_call = {
        "unet_forward_s": timed(forward, repeats, sync),
        "unet_forward_backward_s": timed(forward_backward, repeats, sync),
        "vae_decode_forward_backward_s": timed(decode_backward, repeats, sync),
        "reward_forward_backward_s": timed(reward_backward, repeats, sync),
    }
    if algorithm.truncation is None:
        k = algorithm.grad_steps
    else:  # the mean of K drawn uniformly from [k_min, k_max]
        k = (algorithm.truncation[0] + (algorithm.truncation[1] or s.num_steps)) / 2
    draws, batches = algorithm.draws, s.num_batches_per_epoch
    calls = {  # DRaFT-LV: the whole chain without gradients, then `draws` last steps with them
        "unet_forward": batches * (s.num_steps - (k if draws == 1 else 0)),
        "unet_forward_backward": batches * k * draws,
        "vae_decode_forward_backward": batches * draws,
        "reward_forward_backward": batches * draws,
    }
    floor = {
        "sampling_s": calls["unet_forward"] * per_call["unet_forward_s"],
        "training_s": calls["unet_forward_backward"] * per_call["unet_forward_backward_s"],
        "decode_s": calls["vae_decode_forward_backward"] * per_call["vae_decode_forward_backward_s"],
        "reward_s": calls["reward_forward_backward"] * per_call["reward_forward_backward_s"],
    }
    floor["total_s"] = sum(floor.values())
    grad_steps = max(1, round(k))

    def tail(checkpoint: bool):
        generators = [torch.Generator(device=device).manual_seed(i) for i in range(s.batch_size)]
        out = pipeline.sample_with_grad(conditioning, generators, grad_steps, draws, checkpoint=checkpoint)
        return components.reward_fn.score_with_grad(out.images, [p for p in prompts for _ in range(draws)], None).sum()

    memory = {}
    for checkpoint in (True, False):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        key = "with_checkpointing" if checkpoint else "without_checkpointing"
        memory[f"saved_for_backward_mb_{key}"] = saved_for_backward_mb(functools.partial(tail, checkpoint))
        if device.type == "cuda":
            memory[f"peak_device_memory_mb_{key}"] = torch.cuda.max_memory_allocated(device) / 2**20
        unet.zero_grad(set_to_none=True)
    return {
        "per_call": per_call,
        "calls_per_epoch": calls,
        "floor_per_epoch": floor,
        "tail_memory": {"grad_steps": grad_steps, "draws": draws, **memory},
        "rollout_bytes_per_sample": 0,
        "shapes": {"sample_rows": s.batch_size * (2 if pipeline.sample_cfg else 1), "latent": [channels, size, size]},
    }


def measure_floor(components, run, repeats: int) -> dict:
    """Per-call times of the UNet and VAE at the loop's batch shapes (same module, dtype, autocast)."""
    import torch

    from ddpo.algorithms import DIFFERENTIABLE, FINAL

    if components.algorithm.rollout == DIFFERENTIABLE:
        return measure_differentiable_floor(components, run, repeats)

    pipeline, device = components.pipeline, components.accelerator.device
    s, t = run.sample, run.train
    unet = pipeline.trainable_module()  # the UNet, or a flow model's transformer
    denoiser = pipeline._denoiser
    size = pipeline.resolution // pipeline.vae_scale_factor
    channels = getattr(pipeline, "latent_channels", unet.config.in_channels)  # FLUX packs 4x its channels
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def unet_inputs(samples: int, cfg: bool) -> dict:
        """The denoiser's keyword arguments for ``samples`` samples, as the loop calls it (rows doubled with CFG)."""
        conditioning = pipeline.encode_prompts(["a photo of a cat"] * samples)
        latents = torch.randn(samples, channels, size, size, device=device)
        timesteps = torch.full((samples,), 500, device=device, dtype=torch.long)
        return pipeline.denoiser_inputs(latents, timesteps, conditioning, cfg)

    inputs = unet_inputs(s.batch_size, pipeline.sample_cfg)
    sample_rows = s.batch_size * (2 if pipeline.sample_cfg else 1)

    def forward():
        with torch.no_grad(), pipeline._autocast():
            denoiser(**inputs)

    algorithm = components.algorithm
    forward_process = algorithm.rollout == FINAL  # trained without guidance, on noised final samples
    train_cfg = pipeline.train_cfg and not forward_process
    k = min(t.timesteps_per_call, components.plan.trained_timesteps)
    train_inputs = unet_inputs(t.batch_size * k, train_cfg)
    train_rows = t.batch_size * k * (2 if train_cfg else 1)

    def other_policy_forward():  # an old policy's, an EMA's or the reference's prediction, no gradients
        with torch.no_grad(), pipeline._autocast():
            denoiser(**train_inputs)

    def forward_backward():
        with pipeline._autocast():
            out = denoiser(**train_inputs).sample
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    decode_latents = torch.randn(s.batch_size, channels, size, size, device=device)

    def decode():
        pipeline.decode(decode_latents)

    unet.eval()
    per_call = {
        "unet_forward_s": timed(forward, repeats, sync),
        "unet_forward_backward_s": timed(forward_backward, repeats, sync),
        "vae_decode_s": timed(decode, repeats, sync),
        "other_policy_forward_s": timed(other_policy_forward, repeats, sync),
    }
    plan = components.plan
    training_calls = (
        t.num_inner_epochs * plan.train_batches_per_epoch * math.ceil(plan.trained_timesteps / t.timesteps_per_call)
    )
    calls = {
        "unet_forward": s.num_batches_per_epoch * s.num_steps,
        "unet_forward_backward": training_calls,
        "other_policy_forward": training_calls * algorithm.other_forwards_per_training_call,
        "vae_decode": s.num_batches_per_epoch,
    }
    floor = {
        "sampling_s": calls["unet_forward"] * per_call["unet_forward_s"],
        "training_s": calls["unet_forward_backward"] * per_call["unet_forward_backward_s"]
        + calls["other_policy_forward"] * per_call["other_policy_forward_s"],
        "decode_s": calls["vae_decode"] * per_call["vae_decode_s"],
    }
    floor["total_s"] = sum(floor.values())
    # what one sample's rollout holds (images aside): per-step transitions, or a final sample
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(s.batch_size)]
    with torch.no_grad():
        rollout = pipeline.fill(
            algorithm.rollout, pipeline.encode_prompts(["a photo of a cat"] * s.batch_size), generators
        )
    stored = [*rollout.conditioning.values(), *rollout.steps.values()]
    return {
        "per_call": per_call,
        "calls_per_epoch": calls,
        "floor_per_epoch": floor,
        "rollout_bytes_per_sample": sum(v.numel() * v.element_size() for v in stored) / s.batch_size,
        "shapes": {"sample_rows": sample_rows, "train_rows": train_rows, "latent": [channels, size, size]},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each floor call")
    parser.add_argument("--json", help="write the results here as JSON")
    args, overrides = parser.parse_known_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from ddpo.config import build, register_configs
    from ddpo.logging import MetricsFile
    from ddpo.trainer import train

    register_configs()
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    total_epochs = args.warmup + args.epochs
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = compose(
            "config", overrides=[*overrides, "logger=none", f"num_epochs={total_epochs}", f"save_freq={total_epochs}"]
        )
    with tempfile.TemporaryDirectory() as run_dir:
        build_started = time.perf_counter()
        run, components = build(cfg, run_dir)
        build_s = time.perf_counter() - build_started
        device = components.accelerator.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loop_started = time.perf_counter()
        train(components, run)
        loop_s = time.perf_counter() - loop_started
        records = MetricsFile(run_dir).read()[args.warmup :]
        floor = measure_floor(components, run, args.repeats)

    def mean(key):
        return sum(r[key] for r in records) / len(records)

    epoch_s = mean("epoch_time_s")
    sample_s, train_s = mean("sample_time_s"), mean("train_time_s")
    reward_s, wait_s = mean("reward_time_s"), mean("reward_wait_s")
    plan = components.plan
    result = {
        "overrides": overrides,
        "machine": {
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__,
        },
        "settings": {
            "model": cfg.model._target_,
            "resolution": components.pipeline.resolution,
            "mixed_precision": run.mixed_precision.value,
            "use_lora": run.use_lora,
            "samples_per_epoch": plan.samples_per_epoch,
            "num_steps": run.sample.num_steps,
            "trained_timesteps": plan.trained_timesteps,
            "timesteps_per_call": run.train.timesteps_per_call,
            "train_batch_size": run.train.batch_size,
            "cfg": run.train.cfg,
            "guidance_scale": run.sample.guidance_scale,
        },
        "epochs_timed": len(records),
        "build_s": build_s,
        "phases_per_epoch": {
            "sampling_s": sample_s,
            "reward_s": reward_s,
            "reward_overlapped_s": max(0.0, reward_s - wait_s),
            "reward_wait_s": wait_s,
            "training_s": train_s,
            "other_s": epoch_s - sample_s - wait_s - train_s,
            "epoch_s": epoch_s,
        },
        "throughput": {
            "images_per_s_sampled": plan.samples_per_epoch / sample_s,
            "timesteps_per_s_trained": plan.samples_per_epoch
            * plan.trained_timesteps
            * run.train.num_inner_epochs
            / train_s,
        },
        "loop_wall_s_including_warmup_and_checkpoint": loop_s,
        "peak_host_memory_mb": peak_host_mb(),
        **floor,
        "epoch_over_floor": epoch_s / floor["floor_per_epoch"]["total_s"],
    }
    if device.type == "cuda":
        result["peak_device_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


def report(r: dict) -> None:
    p, f, c, n = r["phases_per_epoch"], r["floor_per_epoch"], r["per_call"], r["calls_per_epoch"]
    s = r["settings"]
    print(f"\n{r['machine']['device']}, torch {r['machine']['torch']}")
    if "tail_memory" in r:  # a reward-gradient epoch: sampled and trained batch by batch
        report_differentiable(r)
        return
    print(
        f"{s['model']} {s['resolution']}px {s['mixed_precision']} lora={s['use_lora']}: {s['samples_per_epoch']} samples x "
        f"{s['num_steps']} steps, {s['trained_timesteps']} trained (x{s['timesteps_per_call']} per call), "
        f"train batch {s['train_batch_size']}, cfg={s['cfg']}; {r['epochs_timed']} timed epoch(s)"
    )
    print(
        f"per epoch: sampling {p['sampling_s']:.3f}s | reward {p['reward_s']:.3f}s "
        f"({p['reward_overlapped_s']:.3f}s overlapped, {p['reward_wait_s']:.3f}s waited) | "
        f"training {p['training_s']:.3f}s | other {p['other_s']:.3f}s | epoch {p['epoch_s']:.3f}s"
    )
    print(
        f"throughput: {r['throughput']['images_per_s_sampled']:.2f} images/s sampled, "
        f"{r['throughput']['timesteps_per_s_trained']:.2f} timesteps/s trained"
    )
    print(
        f"floor: {n['unet_forward']} denoiser fwd x {c['unet_forward_s'] * 1e3:.2f} ms = {f['sampling_s']:.3f}s, "
        f"{n['unet_forward_backward']} fwd+bwd x {c['unet_forward_backward_s'] * 1e3:.2f} ms = {f['training_s']:.3f}s, "
        f"{n['other_policy_forward']} other-policy fwd x {c['other_policy_forward_s'] * 1e3:.2f} ms (in training), "
        f"{n['vae_decode']} VAE decode x {c['vae_decode_s'] * 1e3:.2f} ms = {f['decode_s']:.3f}s; total {f['total_s']:.3f}s"
    )
    print(f"rollout: {r['rollout_bytes_per_sample'] / 1024:.1f} KiB per sample (images aside)")
    print(f"epoch / floor = {r['epoch_over_floor']:.3f}")
    mem = f"peak host memory {r['peak_host_memory_mb']:.0f} MB"
    if "peak_device_memory_mb" in r:
        mem += f", peak device memory {r['peak_device_memory_mb']:.0f} MB"
    print(mem)


def report_differentiable(r: dict) -> None:
    p, f, c, n, m = r["phases_per_epoch"], r["floor_per_epoch"], r["per_call"], r["calls_per_epoch"], r["tail_memory"]
    s = r["settings"]
    print(
        f"{s['model']} {s['resolution']}px {s['mixed_precision']} lora={s['use_lora']}: {s['samples_per_epoch']} samples "
        f"x {s['num_steps']} steps, reward gradient through the last {m['grad_steps']} step(s), {m['draws']} draw(s), "
        f"guidance {s['guidance_scale']:g}; {r['epochs_timed']} timed epoch(s)"
    )
    print(
        f"per epoch: sampling with gradients {p['sampling_s']:.3f}s | backward passes and optimizer steps "
        f"{p['training_s']:.3f}s | other {p['other_s']:.3f}s | epoch {p['epoch_s']:.3f}s"
    )
    print(
        f"floor: {n['unet_forward']:g} denoiser fwd x {c['unet_forward_s'] * 1e3:.2f} ms = {f['sampling_s']:.3f}s, "
        f"{n['unet_forward_backward']:g} fwd+bwd x {c['unet_forward_backward_s'] * 1e3:.2f} ms = {f['training_s']:.3f}s, "
        f"{n['vae_decode_forward_backward']} decode fwd+bwd x {c['vae_decode_forward_backward_s'] * 1e3:.2f} ms = "
        f"{f['decode_s']:.3f}s, {n['reward_forward_backward']} reward fwd+bwd x "
        f"{c['reward_forward_backward_s'] * 1e3:.2f} ms = {f['reward_s']:.3f}s; total {f['total_s']:.3f}s"
    )
    device = (
        f"; peak device memory {m['peak_device_memory_mb_with_checkpointing']:.0f} vs "
        f"{m['peak_device_memory_mb_without_checkpointing']:.0f} MB"
        if "peak_device_memory_mb_with_checkpointing" in m
        else ""
    )
    print(
        f"activations kept for one batch's backward pass: {m['saved_for_backward_mb_with_checkpointing']:.1f} MiB "
        f"with gradient checkpointing, {m['saved_for_backward_mb_without_checkpointing']:.1f} MiB without{device}"
    )
    print(f"epoch / floor = {r['epoch_over_floor']:.3f}")
    print(f"peak host memory {r['peak_host_memory_mb']:.0f} MB")


if __name__ == "__main__":
    main()
