"""The DDPO loop: sample -> reward (async) -> advantages -> PPO updates -> log -> checkpoint.

Each phase is a function with plain inputs and outputs; ``train`` runs them in order. The loop
reads a ``RunConfig`` (plain dataclasses) and the components built by ``ddpo.config.build``.
"""

import contextlib
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.errors import DDPOError
from ddpo.logging import MetricsFile, RunTracker, plot_reward_curve
from ddpo.pipelines.base import DDPOPipeline, SampleBatch
from ddpo.preemption import PreemptionGuard
from ddpo.stat_tracking import PerPromptStatTracker, global_advantages

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "ddpo_state.json"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"


class RewardError(DDPOError):
    """A reward function failed or returned unusable values."""


@dataclass
class Components:
    """What the loop runs on; built from the config by ``ddpo.config.build``."""

    accelerator: Any
    pipeline: DDPOPipeline
    reward_fn: Callable
    reward_name: str
    prompt_fn: Callable
    tracker: RunTracker
    image_hook: Callable | None
    run_dir: str
    plan: Any  # ddpo.config.BatchPlan


@dataclass
class TrainingState:
    """The loop's own state, saved in every checkpoint (registered with accelerate)."""

    epochs_completed: int = 0
    global_step: int = 0
    stat_tracker: PerPromptStatTracker | None = None

    def state_dict(self) -> dict:
        return {
            "epochs_completed": self.epochs_completed,
            "global_step": self.global_step,
            "stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epochs_completed = state["epochs_completed"]
        self.global_step = state["global_step"]
        if self.stat_tracker is not None and state["stat_tracker"] is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and processes (unlike hash())."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**63 - 1)
    return value


# -- rewards ------------------------------------------------------------------------------------
def reward_executor(device) -> ThreadPoolExecutor:
    """One background thread for rewards, so they run while the next batch samples.

    On the CPU the thread computes with one intra-op thread: a second OpenMP team would make the
    OpenMP runtime count more threads than cores and stop spin-waiting, which slows every UNet
    call of the sampling and training loop by about 1.7x on 2 cores.
    """
    init = (lambda: torch.set_num_threads(1)) if torch.device(device).type == "cpu" else None
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward", initializer=init)


def check_reward_output(name: str, output, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Validate what a reward returned: one finite number per image (and an info dict)."""
    if not (isinstance(output, tuple) and len(output) == 2):
        raise RewardError(f"reward {name!r} must return (rewards, info), got {type(output).__name__}")
    rewards, info = output
    rewards = torch.as_tensor(np.asarray(rewards.detach().cpu() if torch.is_tensor(rewards) else rewards,
                                         dtype=np.float32)).reshape(-1) if rewards is not None else None
    if rewards is None or rewards.numel() != batch_size:
        got = "None" if rewards is None else rewards.numel()
        raise RewardError(f"reward {name!r} returned {got} values for {batch_size} images")
    bad = (~torch.isfinite(rewards)).sum().item()
    if bad:
        raise RewardError(f"reward {name!r} returned {bad} non-finite value(s) (NaN/inf) for {batch_size} images")
    clean_info = {}
    for key, value in (info or {}).items():
        value = torch.as_tensor(np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float32))
        if value.numel() == batch_size:
            clean_info[key] = value.reshape(-1)
    return rewards, clean_info


def timed_call(fn: Callable, *args):
    """``(fn(*args), seconds)``: how long the reward itself ran, in its own thread."""
    started = time.perf_counter()
    output = fn(*args)
    return output, time.perf_counter() - started


def collect_reward(name: str, future: Future, batch_size: int) -> tuple[torch.Tensor, dict, float]:
    try:
        output, seconds = future.result()
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
    return (*check_reward_output(name, output, batch_size), seconds)


# -- phases ---------------------------------------------------------------------------------------
@dataclass
class EpochSamples:
    """This process's samples of one epoch, concatenated over its sampling batches."""

    batch: SampleBatch
    prompts: list[str]
    metadata: list[dict]
    rewards: torch.Tensor  # (N,)
    reward_info: dict[str, torch.Tensor]
    batch_images: list  # [[images, prompts, metadata, rewards], ...] for image hooks
    sample_s: float  # sampling alone
    reward_wait_s: float  # waiting for rewards after sampling ended
    reward_s: float  # the rewards' own run time (overlapped with sampling, except the wait)


def sample_epoch(comps: Components, run, epoch: int, executor: ThreadPoolExecutor) -> EpochSamples:
    """Sample ``num_batches_per_epoch`` batches; each batch's reward runs while the next samples."""
    s = run.sample
    accelerator, pipeline = comps.accelerator, comps.pipeline
    # sample k of process p is sample p * n + k of the epoch (the order gather() returns), and its
    # prompt and noise come from its own seed: an epoch holds the same samples for any process count
    first = accelerator.process_index * s.batch_size * s.num_batches_per_epoch
    batches, prompts_all, meta_all, futures = [], [], [], []
    pipeline.trainable_module().eval()
    started = time.perf_counter()
    bar = tqdm(range(s.num_batches_per_epoch), desc=f"epoch {epoch}: sampling", leave=False,
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for i in bar:
        seeds = [derived_seed(run.seed, epoch, first + i * s.batch_size + j) for j in range(s.batch_size)]
        prompts, metadata = map(list, zip(*(comps.prompt_fn(random.Random(derived_seed(seed, 1))) for seed in seeds)))
        generator = [torch.Generator(device=accelerator.device).manual_seed(derived_seed(seed, 2)) for seed in seeds]
        batch = pipeline.sample(
            pipeline.encode_prompts(prompts),
            num_steps=s.num_steps,
            guidance_scale=s.guidance_scale,
            eta=s.eta,
            generator=generator,
        )
        futures.append(executor.submit(timed_call, comps.reward_fn, batch.images, prompts, metadata))
        batches.append(batch)
        prompts_all.extend(prompts)
        meta_all.extend(metadata)
    waited = time.perf_counter()
    results = [collect_reward(comps.reward_name, f, s.batch_size) for f in futures]
    reward_wait_s = time.perf_counter() - waited
    rewards = torch.cat([r for r, _, _ in results])
    info = {key: torch.cat([inf[key] for _, inf, _ in results])
            for key in results[0][1] if all(key in inf for _, inf, _ in results)}
    merged = SampleBatch(**{k: torch.cat([getattr(b, k) for b in batches]) for k in batches[0].tensors()})
    hook_data = [  # copied to the host only when a hook will read it
        [b.images.float().cpu(), prompts_all[j * s.batch_size:(j + 1) * s.batch_size],
         meta_all[j * s.batch_size:(j + 1) * s.batch_size], r.cpu()]
        for j, (b, (r, _, _)) in enumerate(zip(batches, results))
    ] if comps.image_hook is not None else []
    return EpochSamples(merged, prompts_all, meta_all, rewards, info, hook_data, sample_s=waited - started,
                        reward_wait_s=reward_wait_s, reward_s=sum(t for _, _, t in results))


def compute_advantages(comps: Components, run, samples: EpochSamples, tracker: PerPromptStatTracker | None):
    """Gather rewards and prompts from every process, normalise, and return this process's share."""
    accelerator = comps.accelerator
    device = accelerator.device
    all_rewards = accelerator.gather(samples.rewards.to(device)).cpu().numpy()
    all_info = {k: accelerator.gather(v.to(device)).cpu().numpy() for k, v in samples.reward_info.items()}
    if tracker is not None:
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            all_prompts = gather_object(samples.prompts)
        else:
            all_prompts = samples.prompts
        advantages = tracker.update(all_prompts, all_rewards)
    else:
        advantages = global_advantages(all_rewards)
    mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
    mine = np.clip(mine, -run.train.adv_clip_max, run.train.adv_clip_max)
    return torch.as_tensor(mine, dtype=torch.float32, device=device), all_rewards, all_info


def ppo_loss(pipeline: DDPOPipeline, run, batch: dict[str, torch.Tensor], advantages: torch.Tensor):
    """PPO clipped loss on a set of stored transitions (one per row), with diagnostics."""
    t = run.train
    log_prob = pipeline.log_prob(
        batch["latents"], batch["next_latents"], batch["timesteps"], batch["prompt_embeds"],
        num_steps=run.sample.num_steps, guidance_scale=run.sample.guidance_scale, eta=run.sample.eta, cfg=t.cfg,
    )
    ratio = torch.exp(log_prob - batch["log_probs"])
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - t.clip_range, 1.0 + t.clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * torch.mean((log_prob - batch["log_probs"]) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > t.clip_range).float()),
            "ratio_dev_max": torch.max(torch.abs(ratio - 1.0)),
        }
    return loss, stats


def transition_rows(samples: SampleBatch, rows: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The transitions (rows[i], steps[i, j]) flattened into one batch of B * k rows."""
    k = steps.shape[1]
    pick = lambda x: x[rows[:, None], steps].flatten(0, 1)  # noqa: E731
    return {
        "latents": pick(samples.latents),
        "next_latents": pick(samples.next_latents),
        "timesteps": pick(samples.timesteps),
        "log_probs": pick(samples.log_probs),
        "prompt_embeds": samples.prompt_embeds[rows].repeat_interleave(k, dim=0),
    }


def train_epoch(comps: Components, run, epoch: int, samples: SampleBatch, advantages: torch.Tensor,
                optimizer, model, state: TrainingState) -> dict[str, float]:
    """``num_inner_epochs`` passes of PPO over this process's samples; returns mean diagnostics."""
    t, plan = run.train, comps.plan
    accelerator, pipeline = comps.accelerator, comps.pipeline
    device = accelerator.device
    n, num_steps = samples.log_probs.shape
    trained = plan.trained_timesteps
    generator = torch.Generator().manual_seed(derived_seed(run.seed, epoch, accelerator.process_index, 3))
    totals: dict[str, list] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio_dev_max": [], "grad_norm": []}
    parameters = pipeline.trainable_parameters()
    model.train()
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(n)])[:, :trained]
        bar = tqdm(range(plan.train_batches_per_epoch), desc=f"epoch {epoch}.{inner}: training", leave=False,
                   disable=not accelerator.is_local_main_process, dynamic_ncols=True)
        for b in bar:
            rows = order[b * t.batch_size:(b + 1) * t.batch_size]
            batch_advantages = advantages[rows.to(device)]
            last_of_step = (b + 1) % t.gradient_accumulation_steps == 0
            for start in range(0, trained, t.timesteps_per_call):
                steps = step_order[rows, start:start + t.timesteps_per_call]
                batch = {k: v.to(device) for k, v in transition_rows(samples, rows, steps).items()}
                adv = batch_advantages.repeat_interleave(steps.shape[1])
                sync = last_of_step and start + t.timesteps_per_call >= trained
                # every transition weighs the same in an optimizer step, however they are grouped
                weight = steps.shape[1] / (trained * t.gradient_accumulation_steps)
                context = contextlib.nullcontext() if sync else accelerator.no_sync(model)
                with context:
                    loss, stats = ppo_loss(pipeline, run, batch, adv)
                    accelerator.backward(loss * weight)
                totals["loss"].append(loss.detach())
                for key, value in stats.items():
                    totals[key].append(value)
                if sync:
                    grad_norm = accelerator.clip_grad_norm_(parameters, t.max_grad_norm)
                    totals["grad_norm"].append(torch.as_tensor(grad_norm, device=device).float())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
    means = {}
    for key, values in totals.items():
        value = torch.stack([v.float() for v in values]).mean() if values else torch.zeros((), device=device)
        means[key] = accelerator.reduce(value.to(device), reduction="mean").item()
    return means


# -- checkpoints --------------------------------------------------------------------------------
def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(epochs_completed, path) of every complete checkpoint under ``run_dir``, oldest first."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            state_file = os.path.join(root, name, STATE_FILE)
            if os.path.isfile(state_file):
                with open(state_file) as handle:
                    found.append((json.load(handle)["epochs_completed"], os.path.join(root, name)))
    return sorted(found)


def resolve_resume(path: str) -> str:
    """A checkpoint directory from a checkpoint or a run directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise DDPOError(f"resume_from={path}: no checkpoint there (expected {CHECKPOINT_DIR}/*/{STATE_FILE})")
    return found[-1][1]


def save_checkpoint(comps: Components, run, state: TrainingState) -> str:
    """save_state on every rank into a temporary directory, then publish it and prune old ones."""
    accelerator = comps.accelerator
    root = os.path.join(comps.run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, f"checkpoint_{state.epochs_completed:05d}")
    tmp = final + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, STATE_FILE), "w") as handle:
            json.dump({"epochs_completed": state.epochs_completed, "global_step": state.global_step}, handle)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if run.checkpoints_total_limit:
            for _, old in list_checkpoints(comps.run_dir)[: -run.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def register_weight_hooks(accelerator, pipeline: DDPOPipeline) -> None:
    """Checkpoints hold only the trained tensors (the LoRA, or the UNet when fully fine-tuned)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {k: v.contiguous().cpu() for k, v in pipeline.trained_state_dict().items()}
            save_file(state, os.path.join(output_dir, TRAINED_WEIGHTS_FILE))
        weights.clear()

    def load_hook(models, input_dir):
        pipeline.load_trained_state_dict(load_file(os.path.join(input_dir, TRAINED_WEIGHTS_FILE)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# -- the loop -------------------------------------------------------------------------------------
def train(comps: Components, run) -> float | None:
    """Run (or resume) the training described by ``run``; return the last epoch's mean reward."""
    accelerator, pipeline, plan = comps.accelerator, comps.pipeline, comps.plan
    t = run.train
    metrics = MetricsFile(comps.run_dir)
    tracker = (
        PerPromptStatTracker(run.per_prompt_stat_tracking.buffer_size, run.per_prompt_stat_tracking.min_count)
        if run.per_prompt_stat_tracking.enabled else None
    )
    state = TrainingState(stat_tracker=tracker)

    optimizer = torch.optim.AdamW(
        pipeline.trainable_parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    model, optimizer = accelerator.prepare(pipeline.trainable_module(), optimizer)
    pipeline.use_wrapped(model)
    register_weight_hooks(accelerator, pipeline)
    accelerator.register_for_checkpointing(state)

    resume = None
    own_checkpoints = list_checkpoints(comps.run_dir)
    if own_checkpoints:
        resume = own_checkpoints[-1][1]
    elif run.resume_from:
        resume = resolve_resume(run.resume_from)
    if resume:
        accelerator.load_state(resume)
        log.info("resumed from %s: %d epoch(s) done, global step %d", resume, state.epochs_completed, state.global_step)
    if state.epochs_completed >= run.num_epochs:
        log.info("run in %s is already complete (%d of num_epochs=%d); nothing to do",
                 comps.run_dir, state.epochs_completed, run.num_epochs)
        records = metrics.read()
        return records[-1]["reward_mean"] if records else None
    if accelerator.is_main_process:
        metrics.keep_epochs_before(state.epochs_completed)
    log.info(plan.summary(run))

    last_reward = None
    executor = reward_executor(accelerator.device)
    preemption = PreemptionGuard(run.preemption_grace_s).install()
    try:
        for epoch in range(state.epochs_completed, run.num_epochs):
            started = time.perf_counter()
            samples = sample_epoch(comps, run, epoch, executor)
            advantages, all_rewards, all_info = compute_advantages(comps, run, samples, tracker)
            train_started = time.perf_counter()
            train_stats = train_epoch(comps, run, epoch, samples.batch, advantages, optimizer, model, state)
            train_s = time.perf_counter() - train_started
            state.epochs_completed = epoch + 1
            elapsed = time.perf_counter() - started
            record = {
                "epoch": epoch,
                "global_step": state.global_step,
                "reward_mean": float(all_rewards.mean()),
                "reward_std": float(all_rewards.std()),
                "num_samples": int(all_rewards.size),
                **{f"reward_{k}_mean": float(v.mean()) for k, v in all_info.items()},
                **train_stats,
                "sample_time_s": samples.sample_s,
                "reward_time_s": samples.reward_s,
                "reward_wait_s": samples.reward_wait_s,
                "train_time_s": train_s,
                "epoch_time_s": elapsed,
                "samples_per_s": all_rewards.size / elapsed,
            }
            if tracker is not None:
                record.update(tracker.stats())
            last_reward = record["reward_mean"]
            if accelerator.is_main_process:
                metrics.append(record)
                comps.tracker.log({k: v for k, v in record.items() if k != "epoch"} | {"epoch": epoch},
                                  step=state.global_step)
                if comps.image_hook is not None:
                    comps.image_hook(samples.batch_images, state.global_step, comps.tracker)
            log.info("epoch %d/%d  reward %.4f ± %.4f  loss %.3g  kl %.2g  clipfrac %.3f  %.1fs",
                     epoch + 1, run.num_epochs, record["reward_mean"], record["reward_std"], record["loss"],
                     record["approx_kl"], record["clipfrac"], elapsed)
            # a preemption/time-limit signal (any rank) is answered here: checkpoint, then requeue
            preempted = preemption.requested(accelerator) and state.epochs_completed < run.num_epochs
            if preempted or state.epochs_completed % run.save_freq == 0 or state.epochs_completed == run.num_epochs:
                save_checkpoint(comps, run, state)
                if accelerator.is_main_process:
                    plot_reward_curve(metrics.read(), os.path.join(comps.run_dir, "reward_curve.png"),
                                      title=comps.reward_name)
            if preempted:
                preemption.hand_over()
        if accelerator.is_main_process:
            files = pipeline.save_final(os.path.join(comps.run_dir, "final"))
            log.info("trained weights: %s", ", ".join(files))
        accelerator.wait_for_everyone()
    finally:
        preemption.uninstall()
        executor.shutdown(wait=False, cancel_futures=True)
        comps.tracker.finish()
    return last_reward
