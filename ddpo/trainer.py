"""The DDPO loop: sample -> reward (async) -> advantages -> PPO updates -> log -> checkpoint.

Each phase is a function with plain inputs and outputs; ``train`` runs them in order. The loop
reads a ``RunConfig`` (plain dataclasses) and the components built by ``ddpo.config.build``.
"""

import contextlib
import functools
import logging
import math
import os
import random
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpo.algorithms import DIFFERENTIABLE, Algorithm
from ddpo.checkpointing import (
    CHECKPOINT_DIR,
    FINAL_DIR,
    TrainingState,
    append_record,
    check_resume,
    list_checkpoints,
    load_checkpoint,
    plan_resume,
    register_weight_hooks,
    save_checkpoint,
    write_final,
)
from ddpo.config_history import RunRecord
from ddpo.distributed import any_rank
from ddpo.errors import DDPOError, Interrupted
from ddpo.logging import EVAL_FILE, MetricsFile, RunTracker, log_to_files, plot_reward_curve
from ddpo.pipelines.base import DDPOPipeline, Rollout
from ddpo.preemption import PreemptionGuard
from ddpo.progress import RunProgress, bar_disabled
from ddpo.reward_calls import (
    RewardWorker,
    abandon_reward,
    collect_reward,
    finite_mean,
    timed_call,
)
from ddpo.seeds import shuffle_seed
from ddpo.sharding import is_sharded, local, prepare_sharded, whole

log = logging.getLogger(__name__)


@dataclass
class Components:
    """What the loop runs on; built from the config by ``ddpo.config.build``."""

    accelerator: Any
    pipeline: DDPOPipeline
    algorithm: Algorithm
    reward_fn: Callable
    reward_name: str
    prompt_fn: Callable
    tracker: RunTracker
    image_hook: Callable | None
    run_dir: str
    plan: Any  # ddpo.config.BatchPlan
    run_lock: Any = None  # ddpo.run_lock.RunLock held by the main process, released when training ends
    evaluator: Any = None  # ddpo.evaluation.Evaluator when eval.every > 0
    record: RunRecord | None = None  # the config this start trains with: into every checkpoint, and the history
    resume: Any = None  # ResumePlan: what to resume from, found (and checked) before the model was built
    optimizer: Callable | None = (
        None  # params -> optimizer (the config's ``optimizer`` node, a partial); None: AdamW from train.*
    )
    summary: list[str] = field(default_factory=list)  # the start-up summary's lines (ddpo/summary.py)
    progress: Any = None  # ddpo.progress.RunProgress while the loop runs
    lr_scheduler: Any = (
        None  # the learning-rate schedule (train.lr_scheduler), stepped with the optimizer; None: constant
    )


# -- rewards ------------------------------------------------------------------------------------


# -- phases ---------------------------------------------------------------------------------------
@dataclass
class EpochSamples:
    """This process's samples of one epoch, concatenated over its sampling batches."""

    batch: Rollout
    prompts: list[str]
    metadata: list[dict]
    rewards: torch.Tensor  # (N,)
    reward_info: dict[str, torch.Tensor]
    batch_images: list  # [[images, prompts, metadata, rewards], ...] for image hooks
    sample_s: float  # sampling alone
    reward_wait_s: float  # waiting for rewards after sampling ended
    reward_s: float  # the rewards' own run time (overlapped with sampling, except the wait)
    all_rewards: np.ndarray | None = None  # every process's rewards, in global index order (after the gather)
    all_prompts: list[str] | None = None  # and their prompts


def sampling_batches(comps: Components, run, description: str):
    """This process's sampling batches of an epoch as lists of sample indices, with a progress bar.

    Sample k of process p is sample p * n + k of the epoch (the order gather() returns), and its prompt
    and noise come from seeds of its index: an epoch holds the same samples for any process count."""
    s, accelerator = run.sample, comps.accelerator
    first = accelerator.process_index * s.batch_size * s.num_batches_per_epoch
    bar = tqdm(
        range(s.num_batches_per_epoch),
        desc=description,
        leave=False,
        disable=bar_disabled(accelerator.is_local_main_process),
        dynamic_ncols=True,
    )
    for i in bar:
        yield [first + i * s.batch_size + j for j in range(s.batch_size)]


def batch_prompts(comps: Components, run, epoch: int, indices: list[int]):
    """(prompts, metadata, noise generators) of the epoch's samples ``indices``: functions of their seeds only."""
    seeds = [comps.algorithm.sample_seeds(run.seed, epoch, index) for index in indices]
    prompts, metadata = map(list, zip(*(comps.prompt_fn(random.Random(prompt_seed)) for prompt_seed, _ in seeds)))
    device = comps.accelerator.device
    return prompts, metadata, [torch.Generator(device=device).manual_seed(noise_seed) for _, noise_seed in seeds]


def sample_epoch(
    comps: Components, run, epoch: int, executor: RewardWorker, stop: Callable[[], None] | None = None
) -> EpochSamples:
    """Sample ``num_batches_per_epoch`` batches; each batch's reward runs while the next samples.

    ``stop``: called while waiting for rewards; it raises to abandon the epoch (see ``collect_reward``).
    """
    s = run.sample
    accelerator, pipeline, algorithm = comps.accelerator, comps.pipeline, comps.algorithm
    batches, prompts_all, meta_all, futures = [], [], [], []
    pipeline.trainable_module().eval()
    started = time.perf_counter()
    for indices in sampling_batches(comps, run, f"epoch {epoch + 1}: sampling"):
        prompts, metadata, generator = batch_prompts(comps, run, epoch, indices)
        shared = [algorithm.shared_noise_seed(run.seed, epoch, index) for index in indices]
        branch = [algorithm.branch_step(run.seed, epoch, index) for index in indices]
        noise = {}  # only what the algorithm asks for: a pipeline written for sample(conditioning, generator) still runs
        if any(seed is not None for seed in shared):
            noise["shared_generator"] = [torch.Generator(device=accelerator.device).manual_seed(x) for x in shared]
        if any(k is not None for k in branch):
            noise["branch_steps"] = branch
        with algorithm.sampling_policy(pipeline):
            batch = pipeline.fill(algorithm.rollout, pipeline.encode_prompts(prompts), generator, **noise)
        futures.append(executor.submit(timed_call, comps.reward_fn, batch.images, prompts, metadata))
        batches.append(batch)
        prompts_all.extend(prompts)
        meta_all.extend(metadata)
    waited = time.perf_counter()
    results = [collect_reward(comps.reward_name, f, s.batch_size, stop) for f in futures]
    reward_wait_s = time.perf_counter() - waited
    rewards = torch.cat([r for r, _, _ in results])
    info = {
        key: torch.cat([inf[key] for _, inf, _ in results])
        for key in results[0][1]
        if all(key in inf for _, inf, _ in results)
    }
    hook_data = (
        [  # copied to the host only when a hook will read it
            [
                b.images.float().cpu(),
                prompts_all[j * s.batch_size : (j + 1) * s.batch_size],
                meta_all[j * s.batch_size : (j + 1) * s.batch_size],
                r.cpu(),
            ]
            for j, (b, (r, _, _)) in enumerate(zip(batches, results))
        ]
        if comps.image_hook is not None
        else []
    )
    return EpochSamples(
        Rollout.cat(batches),
        prompts_all,
        meta_all,
        rewards,
        info,
        hook_data,
        sample_s=waited - started,
        reward_wait_s=reward_wait_s,
        reward_s=sum(t for _, _, t in results),
    )


def compute_advantages(comps: Components, samples: EpochSamples):
    """Gather rewards and prompts from every process, let the algorithm turn them into advantages,
    and return this process's share.

    Returns (this process's advantages, all rewards, all reward extras, all prompts).
    """
    accelerator = comps.accelerator
    device = accelerator.device
    all_rewards = accelerator.gather(samples.rewards.to(device)).cpu().numpy()
    all_info = {k: accelerator.gather(v.to(device)).cpu().numpy() for k, v in samples.reward_info.items()}
    all_prompts = samples.prompts  # every process's, in gather() order: the algorithm and the logs need them
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        all_prompts = gather_object(samples.prompts)
    advantages = comps.algorithm.advantages(all_rewards, all_prompts)
    mine = advantages.reshape(accelerator.num_processes, -1)[accelerator.process_index]
    return torch.as_tensor(mine, dtype=torch.float32, device=device), all_rewards, all_info, all_prompts


def train_epoch(
    comps: Components,
    run,
    epoch: int,
    samples: Rollout,
    advantages: torch.Tensor,
    optimizer,
    model,
    state: TrainingState,
) -> dict[str, float]:
    """``num_inner_epochs`` passes of the algorithm's loss over this process's samples; returns mean diagnostics."""
    t, plan = run.train, comps.plan
    accelerator, pipeline, algorithm = comps.accelerator, comps.pipeline, comps.algorithm
    device = accelerator.device
    n, num_steps = len(samples), samples.num_steps
    trained = plan.trained_timesteps
    generator = torch.Generator().manual_seed(shuffle_seed(run.seed, epoch, accelerator.process_index))
    totals: dict[str, list] = {"loss": [], "grad_norm": []}
    parameters = pipeline.trainable_parameters()
    model.train()
    for inner in range(t.num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        step_order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(n)])[:, :trained]
        bar = tqdm(
            range(plan.train_batches_per_epoch),
            desc=f"epoch {epoch + 1}: training" + (f" (pass {inner + 1})" if t.num_inner_epochs > 1 else ""),
            leave=False,
            disable=bar_disabled(accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        for b in bar:
            rows = order[b * t.batch_size : (b + 1) * t.batch_size]
            batch_advantages = advantages[rows.to(device)]
            last_of_step = (b + 1) % t.gradient_accumulation_steps == 0
            for start in range(0, trained, t.timesteps_per_call):
                steps = step_order[rows, start : start + t.timesteps_per_call]
                batch = {k: v.to(device) for k, v in samples.transitions(rows, steps).items()}
                adv = batch_advantages.repeat_interleave(steps.shape[1])
                sync = last_of_step and start + t.timesteps_per_call >= trained
                # every transition weighs the same in an optimizer step, however they are grouped
                weight = steps.shape[1] / (trained * t.gradient_accumulation_steps)
                # FSDP reduce-scatters every backward pass: unsynchronised, each process would hold whole gradients
                unsynced = not sync and not is_sharded(accelerator)
                context = accelerator.no_sync(model) if unsynced else contextlib.nullcontext()
                with context:
                    loss, stats = algorithm.loss(pipeline, batch, adv)
                    accelerator.backward(loss * weight)
                totals["loss"].append(loss.detach())
                for key, value in stats.items():
                    totals.setdefault(key, []).append(value)
                if sync:
                    grad_norm = whole(accelerator.clip_grad_norm_(parameters, t.max_grad_norm))
                    totals["grad_norm"].append(torch.as_tensor(grad_norm, device=device).float())
                    optimizer.step()
                    step_lr_schedule(comps)
                    optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
                    pipeline.update_ema(state.global_step)
    means = {}
    for key, values in totals.items():
        value = torch.stack([v.float() for v in values]).mean() if values else torch.zeros((), device=device)
        means[key] = accelerator.reduce(value.to(device), reduction="mean").item()
    return means


def record_norm(norms: list, index: int, gradient: torch.Tensor) -> None:
    """A tensor hook: keep the norm of the gradient that reaches it (``norms[index]``)."""
    norms[index] = gradient.detach().float().norm()


def differentiable_epoch(comps: Components, run, epoch: int, optimizer, model, state: TrainingState):
    """Reward-gradient training (a ``DIFFERENTIABLE`` rollout): each sampling batch is drawn with
    gradients through its chain's last K steps and the decode, scored by the reward's differentiable
    path, and its loss backpropagated; an optimizer step every ``train.gradient_accumulation_steps``
    batches. Gradients are averaged over processes by hand (the tail's checkpointed denoiser calls
    rerun in the backward pass, where a DDP wrapper must not be called).

    Returns (this process's samples, mean diagnostics, seconds in backward passes and optimizer steps)."""
    t = run.train
    accelerator, pipeline, algorithm = comps.accelerator, comps.pipeline, comps.algorithm
    device, world = accelerator.device, accelerator.num_processes
    parameters = pipeline.trainable_parameters()
    totals: dict[str, list] = {"loss": [], "grad_norm": [], "grad_steps": []}
    batches, prompts_all, meta_all, rewards_all, hook_data = [], [], [], [], []
    started, backward_s = time.perf_counter(), 0.0
    pipeline.use_wrapped(accelerator.unwrap_model(model))
    model.eval()  # no dropout: the chain is the one ``sample`` draws
    try:
        for i, indices in enumerate(sampling_batches(comps, run, f"epoch {epoch + 1}: sampling with gradients")):
            prompts, metadata, generator = batch_prompts(comps, run, epoch, indices)
            k = algorithm.steps_of_batch(run.seed, epoch, indices[0])  # keyed by the batch's first sample
            out = pipeline.sample_with_grad(
                pipeline.encode_prompts(prompts), generator, k, algorithm.draws, algorithm.checkpoint
            )
            repeat = algorithm.draws
            drawn_prompts = [p for p in prompts for _ in range(repeat)]
            drawn_meta = [m for m in metadata for _ in range(repeat)]
            scores = comps.reward_fn.score_with_grad(out.images, drawn_prompts, drawn_meta)
            step_norms = [torch.zeros((), device=device) for _ in out.step_outputs]
            for j, output in enumerate(out.step_outputs):  # how much of the gradient each step carries
                output.register_hook(functools.partial(record_norm, step_norms, j))
            loss, stats = algorithm.loss(pipeline, {"rewards": scores}, None)
            backward_started = time.perf_counter()
            accelerator.backward(loss / t.gradient_accumulation_steps)
            totals["loss"].append(loss.detach())
            totals["grad_steps"].append(torch.tensor(float(k), device=device))
            norms = torch.stack(step_norms)
            totals.setdefault("grad_share_last_step", []).append(norms[-1] / norms.sum().clamp(min=1e-30))
            for key, value in stats.items():
                totals.setdefault(key, []).append(value)
            if (i + 1) % t.gradient_accumulation_steps == 0:
                if world > 1 and not is_sharded(accelerator):  # what DDP does (FSDP reduces in the backward pass)
                    for p in parameters:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
                grad_norm = whole(accelerator.clip_grad_norm_(parameters, t.max_grad_norm))
                totals["grad_norm"].append(torch.as_tensor(grad_norm, device=device).float())
                optimizer.step()
                step_lr_schedule(comps)
                optimizer.zero_grad(set_to_none=True)
                state.global_step += 1
                pipeline.update_ema(state.global_step)
            backward_s += time.perf_counter() - backward_started
            images = out.images.detach()[::repeat].float()
            rewards = scores.detach().float().reshape(-1, repeat).mean(dim=1).cpu()
            batches.append(Rollout({}, {}, images))
            prompts_all.extend(prompts)
            meta_all.extend(metadata)
            rewards_all.append(rewards)
            if comps.image_hook is not None:
                hook_data.append([images.cpu(), prompts, metadata, rewards])
    finally:
        pipeline.use_wrapped(model)
    means = {}
    for key, values in totals.items():
        value = torch.stack([v.float() for v in values]).mean() if values else torch.zeros((), device=device)
        means[key] = accelerator.reduce(value.to(device), reduction="mean").item()
    elapsed = time.perf_counter() - started
    samples = EpochSamples(
        Rollout.cat(batches),
        prompts_all,
        meta_all,
        torch.cat(rewards_all),
        {},
        hook_data,
        sample_s=elapsed - backward_s,
        reward_wait_s=0.0,
        reward_s=0.0,
    )
    return samples, means, backward_s


# -- checkpoints --------------------------------------------------------------------------------


def check_finite_training(stats: dict[str, float], epoch: int, run_dir: str) -> None:
    """Stop before a diverged epoch is saved: its weights are NaN, the last checkpoint is still good."""
    for key in ("loss", "grad_norm"):
        if not math.isfinite(stats[key]):
            raise DDPOError(
                f"epoch {epoch + 1}: the training {key} is {stats[key]} (not finite), so the weights diverged; "
                "nothing of this epoch was saved (the last checkpoint in "
                f"{os.path.join(run_dir, CHECKPOINT_DIR)} is intact); lower train.learning_rate"
            )


def check_finite_weights(pipeline: DDPOPipeline, epoch: int, run_dir: str, accelerator=None) -> None:
    """Never checkpoint or export NaN weights: the last step of an epoch can diverge after its loss was finite."""
    parameters = [local(p) for p in pipeline.trainable_parameters()]  # sharded: this process's part
    finite = bool(torch.stack([p.detach().isfinite().all() for p in parameters]).all())
    if is_sharded(accelerator):
        finite = not any_rank(accelerator, not finite)
    if not finite:
        raise DDPOError(
            f"epoch {epoch + 1}: the trained weights hold NaN or infinite values (training diverged); "
            f"nothing of this epoch was saved (the last checkpoint in {os.path.join(run_dir, CHECKPOINT_DIR)}"
            " is intact); lower train.learning_rate"
        )


def run_image_hook(comps: Components, image_data, global_step: int, epoch: int) -> str | None:
    """Call the image hook; a failure is returned as a one-line reason (the epoch is checkpointed first)."""
    if comps.image_hook is None:
        return None
    try:
        comps.image_hook(image_data, global_step, comps.tracker)
    except Exception as exc:
        name = getattr(comps.image_hook, "func", comps.image_hook)
        name = f"{getattr(name, '__module__', '?')}.{getattr(name, '__qualname__', repr(name))}"
        log_to_files(f"the image hook {name} failed at epoch {epoch + 1}:\n{traceback.format_exc()}")  # for its author
        return (
            f"the image hook {name} (logger.image_hook) failed at epoch {epoch + 1}: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}"
        )
    return None


def run_evaluation(comps: Components, evals: MetricsFile, state: TrainingState) -> dict[str, float]:
    """Evaluate the current policy (``eval.*``); append it to eval.jsonl and the tracker; return its eval_* numbers."""
    from ddpo.evaluation import flat_metrics

    set_phase(comps, "evaluating")
    started = time.perf_counter()
    # the family's evaluation sampler (flow: the ODE, eval_num_steps), with the EMA weights if the run keeps one
    with comps.pipeline.evaluation(), comps.pipeline.ema_weights():
        summary = comps.evaluator.run(comps.pipeline, comps.accelerator)
    values = flat_metrics(summary)
    values["eval_time_s"] = time.perf_counter() - started
    if comps.accelerator.is_main_process:
        evals.append({"epoch": state.epochs_completed, "global_step": state.global_step, **values, "summary": summary})
        comps.tracker.log(values | {"eval_epochs_trained": state.epochs_completed}, step=state.global_step)
    shown = ", ".join(
        f"{k[5:]} {v:.3f}" for k, v in values.items() if not k.endswith(("_ci_low", "_ci_high", "_time_s"))
    )
    log.info("eval after %d epoch(s): %s (%.1fs)", state.epochs_completed, shown, values["eval_time_s"])
    return values | {"eval_epochs_trained": state.epochs_completed}


# -- around the loop -----------------------------------------------------------------------------
def prepare(comps: Components, run):
    """The policies beside the trained one, the optimizer (``optimizer``: a partial of the config's
    node), accelerate's wrapping, and the checkpoint hooks; returns (model, optimizer)."""
    pipeline, algorithm = comps.pipeline, comps.algorithm
    sharded = pipeline.sharded = is_sharded(comps.accelerator)
    if algorithm.needs_reference:
        pipeline.keep_reference()  # before training moves the weights
    if not sharded:
        keep_shadows(pipeline, algorithm, run)
    algorithm.start(pipeline)  # before resume_run loads trained weights: what the run starts from
    optimizer = (comps.optimizer or default_optimizer(run.train))(pipeline.trainable_parameters())
    model, optimizer = comps.accelerator.prepare(pipeline.trainable_module(), optimizer)
    if sharded:  # FSDP2 replaced the parameters by their shards: the copies beside them are made of the shards
        prepare_sharded(model)
        pipeline.shard_reference()
        keep_shadows(pipeline, algorithm, run)
    comps.lr_scheduler = lr_schedule(comps, run, optimizer)
    pipeline.use_wrapped(model)
    register_weight_hooks(comps.accelerator, pipeline)
    return model, optimizer


def keep_shadows(pipeline: DDPOPipeline, algorithm: Algorithm, run) -> None:
    """The old policy and the EMA, as copies of the trained weights (before any is trained)."""
    if algorithm.needs_old_policy:
        pipeline.keep_old_policy()
    if run.train.ema_decay > 0:
        pipeline.keep_ema(run.train.ema_decay, run.train.ema_every)


def lr_schedule(comps: Components, run, optimizer):
    """diffusers' ``get_scheduler`` over the run's optimizer steps (``train.lr_scheduler``, ``lr_warmup_steps``);
    None for a constant rate without warm-up, so such a run and its checkpoints are exactly as before.

    It is registered for checkpointing (resumed with the run) but not passed through ``accelerator.prepare``,
    whose wrapper would step it once per process."""
    t = run.train
    if t.lr_scheduler == "constant" and t.lr_warmup_steps == 0:
        return None
    from diffusers.optimization import get_scheduler

    total = run.num_epochs * comps.plan.optimizer_steps_per_epoch
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps, num_training_steps=max(total, 1)
    )
    comps.accelerator.register_for_checkpointing(scheduler)
    return scheduler


def resync_lr(comps: Components) -> None:
    """After a resume: the optimizer's rate as the schedule gives it at the restored step. The checkpoint holds
    the rate its own run's schedule set; a run resumed with more epochs has a longer schedule (cosine, linear
    decay over the new total), whose next step must not start from the old schedule's rate."""
    scheduler = comps.lr_scheduler
    if scheduler is None or scheduler.last_epoch <= 0:
        return
    for group, base, schedule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def step_lr_schedule(comps: Components) -> None:
    if comps.lr_scheduler is not None:
        comps.lr_scheduler.step()


def default_optimizer(t):
    """AdamW from ``train.*``: what the config's ``optimizer`` node builds unless a preset replaces it."""
    return functools.partial(
        torch.optim.AdamW,
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def resume_run(comps: Components, run, state: TrainingState) -> None:
    """Load the newest loadable checkpoint of the run (or of ``resume_from``) into ``state``, if any."""
    resume = comps.resume or plan_resume(comps.run_dir, run.resume_from)
    if comps.resume is None:
        check_resume(resume, comps.record, run.num_epochs)
    if resume.candidates or resume.damaged:
        loaded = load_checkpoint(comps.accelerator, state, resume.candidates, resume.damaged)
        if comps.record is not None and loaded != resume.candidates[0]:  # fell back: compare with that one
            comps.record.check_against(loaded, own_run=resume.own)
        log.info("resumed from %s: %d epoch(s) done, global step %d", loaded, state.epochs_completed, state.global_step)


def set_phase(comps: Components, name: str) -> None:
    if comps.progress is not None:
        comps.progress.phase(name)


def log_startup_summary(comps: Components, run, state: TrainingState) -> None:
    """What this run trains (``ddpo/summary.py``) and where it starts, one log line per item."""
    if state.epochs_completed:
        status = f"resumed: {state.epochs_completed} of {run.num_epochs} epochs done (global step {state.global_step})"
    else:
        status = f"new run: {run.num_epochs} epochs to train"
    for line in [*comps.summary, f"resume     {status}"]:
        log.info("%s", line)


def finish_complete_run(comps: Components, run, state: TrainingState, metrics: MetricsFile) -> float | None:
    """Nothing left to train: say so, write final/ if a kill left it missing, return the last reward."""
    log.info(
        "run in %s is already complete (%d of num_epochs=%d); nothing to do",
        comps.run_dir,
        state.epochs_completed,
        run.num_epochs,
    )
    final_dir = os.path.join(comps.run_dir, FINAL_DIR)
    missing = comps.accelerator.is_main_process and not os.path.isdir(final_dir)  # killed while writing it
    if is_sharded(comps.accelerator):  # every process gathers the weights it is written from
        missing = any_rank(comps.accelerator, missing)
    if missing:
        if comps.accelerator.is_main_process:
            log.warning("%s is missing: writing it from the last checkpoint", final_dir)
        write_final(comps.pipeline, final_dir, comps.accelerator)
    comps.accelerator.wait_for_everyone()
    records = metrics.read()
    return records[-1]["reward_mean"] if records else None


def start_logs(comps: Components, state: TrainingState) -> tuple[MetricsFile, MetricsFile]:
    """metrics.jsonl and eval.jsonl without the epochs a resume redoes; the config history's entry."""
    metrics, evals = MetricsFile(comps.run_dir), MetricsFile(comps.run_dir, EVAL_FILE)
    if comps.accelerator.is_main_process:
        metrics.keep_epochs_before(state.epochs_completed)
        evals.keep_epochs_before(state.epochs_completed)
        if comps.record is not None:
            comps.record.append_history(state.epochs_completed)
    return metrics, evals


def resume_hint(run_dir: str) -> str:
    done = list_checkpoints(run_dir)
    return f"from the checkpoint after epoch {done[-1][0]}" if done else "from the start"


class Stops:
    """The signals a run answers: USR2 (preemption: checkpoint, then requeue) and, outside submitit,
    SIGTERM (checkpoint at the end of the epoch, then stop; while a reward hangs, give up after half
    the grace period)."""

    def __init__(self, comps: Components, run):
        self.comps, self.grace = comps, run.preemption_grace_s
        self.preemption = PreemptionGuard(self.grace).install()
        self.termination = (
            None if os.environ.get("SUBMITIT_EXECUTOR") else PreemptionGuard(self.grace, signal.SIGTERM).install()
        )

    def waiting_for_rewards(self, epoch: int) -> Callable[[], None]:
        """What ``collect_reward`` calls while it waits: raises once SIGTERM is half the grace period old."""

        def check() -> None:
            signalled = self.termination.received_at if self.termination is not None else None
            if signalled is not None and time.monotonic() - signalled > self.grace / 2:
                abandon_reward(self.comps.reward_fn)
                raise Interrupted(
                    f"terminated (SIGTERM) while waiting for the reward {self.comps.reward_name} in epoch {epoch + 1} "
                    f"(still pending {self.grace / 2:.0f} s after the signal): this epoch is lost; rerun the same "
                    f"command to resume ({resume_hint(self.comps.run_dir)})",
                    exit_code=128 + signal.SIGTERM,
                )

        return check

    def requested(self, accelerator, unfinished: bool) -> tuple[bool, bool]:
        """(preempted, terminated) on any rank, for a run with epochs left."""
        preempted = self.preemption.requested(accelerator) and unfinished
        terminated = self.termination is not None and self.termination.requested(accelerator) and unfinished
        return preempted, terminated

    def uninstall(self) -> None:
        self.preemption.uninstall()
        if self.termination is not None:
            self.termination.uninstall()


def epoch_record(comps: Components, epoch: int, state: TrainingState, samples: EpochSamples, gathered, stats, times):
    """The epoch's line of metrics.jsonl: rewards, the training diagnostics, the algorithm's numbers, timings."""
    all_rewards, all_info = gathered
    sample_s, train_s, elapsed = times
    return {
        "epoch": epoch,
        "global_step": state.global_step,
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std()),
        "num_samples": int(all_rewards.size),
        **{f"reward_{k}_mean": finite_mean(v) for k, v in all_info.items()},
        **stats,
        "sample_time_s": sample_s,
        "reward_time_s": samples.reward_s,
        "reward_wait_s": samples.reward_wait_s,
        "train_time_s": train_s,
        "epoch_time_s": elapsed,
        "samples_per_s": all_rewards.size / elapsed,
        **comps.algorithm.stats(),
    }


def run_epoch(comps: Components, run, epoch: int, state: TrainingState, executor, optimizer, model, stops: Stops):
    """Sample, reward, advantages, train, the algorithm's end of epoch; returns (record, samples)."""
    started = time.perf_counter()
    set_phase(comps, f"epoch {epoch + 1}: sampling")
    if comps.algorithm.rollout == DIFFERENTIABLE:  # sampling and training interleaved, batch by batch
        samples, stats, train_s = differentiable_epoch(comps, run, epoch, optimizer, model, state)
        _, all_rewards, all_info, all_prompts = compute_advantages(comps, samples)
    else:
        samples = sample_epoch(comps, run, epoch, executor, stops.waiting_for_rewards(epoch))
        advantages, all_rewards, all_info, all_prompts = compute_advantages(comps, samples)
        train_started = time.perf_counter()
        set_phase(comps, f"epoch {epoch + 1}: training")
        stats = train_epoch(comps, run, epoch, samples.batch, advantages, optimizer, model, state)
        train_s = time.perf_counter() - train_started
    check_finite_training(stats, epoch, comps.run_dir)
    comps.algorithm.end_epoch(comps.pipeline, state.global_step)
    check_finite_weights(comps.pipeline, epoch, comps.run_dir, comps.accelerator)
    state.epochs_completed = epoch + 1
    times = (samples.sample_s, train_s, time.perf_counter() - started)
    record = epoch_record(comps, epoch, state, samples, (all_rewards, all_info), stats, times)
    if comps.lr_scheduler is not None:
        record["lr"] = float(comps.lr_scheduler.get_last_lr()[0])  # the rate the next step will use
    samples.all_rewards, samples.all_prompts = all_rewards, all_prompts
    return record, samples


def publish_epoch(comps: Components, run, record: dict, samples: EpochSamples, logs, state: TrainingState):
    """Evaluation when due, the record into metrics.jsonl and the tracker, the image hook, the log line;
    returns the hook's failure (one line) or None."""
    metrics, evals = logs
    if comps.evaluator is not None and comps.evaluator.due(state.epochs_completed, run.num_epochs):
        record.update(run_evaluation(comps, evals, state))
    epoch, hook_error = record["epoch"], None
    if comps.accelerator.is_main_process:
        append_record(metrics, record, comps.run_dir)
        # the evaluation's numbers are in the record (metrics.jsonl) but reached the tracker in run_evaluation:
        # logged again here, TensorBoard would hold each eval_* scalar twice at this step
        comps.tracker.log(
            {k: v for k, v in record.items() if k != "epoch" and v is not None and not k.startswith("eval_")}
            | {"epoch": epoch},
            step=state.global_step,
        )
        comps.tracker.log_epoch_rewards(samples.all_rewards, samples.all_prompts, step=state.global_step, epoch=epoch)
        if comps.tracker.images_due(epoch, run.num_epochs):
            hook_error = run_image_hook(comps, samples.batch_images, state.global_step, epoch)
    eta = ""
    if comps.progress is not None:
        comps.progress.epoch_done()
        eta = comps.progress.eta_text()
    log.info(
        "epoch %d/%d  reward %.4f ± %.4f  %s  %.1fs%s",
        epoch + 1,
        run.num_epochs,
        record["reward_mean"],
        record["reward_std"],
        comps.algorithm.summary(record),
        record["epoch_time_s"],
        f"  {eta}" if eta else "",
    )
    return hook_error


def checkpoint_or_stop(comps: Components, run, state: TrainingState, stops: Stops, hook_error, metrics) -> None:
    """Checkpoint when due or asked (a signal on any rank, a failed hook); then stop or requeue if asked."""
    epoch = state.epochs_completed - 1
    preempted, terminated = stops.requested(comps.accelerator, state.epochs_completed < run.num_epochs)
    hook_failed = any_rank(comps.accelerator, hook_error is not None)
    due = state.epochs_completed % run.save_freq == 0 or state.epochs_completed == run.num_epochs
    if preempted or terminated or hook_failed or due:
        set_phase(comps, "checkpoint")
        save_checkpoint(comps, run, state)
        if comps.accelerator.is_main_process:
            plot_reward_curve(metrics.read(), os.path.join(comps.run_dir, "reward_curve.png"), title=comps.reward_name)
    if hook_failed:
        raise DDPOError(
            f"{hook_error or 'the image hook failed on the main process'} (the checkpoint of "
            f"epoch {epoch + 1} is saved: fix the hook and rerun the same command to resume)"
        )
    if terminated:
        raise Interrupted(
            f"terminated (SIGTERM) during epoch {epoch + 1}: its checkpoint is saved; rerun the same command to resume",
            exit_code=128 + signal.SIGTERM,
        )
    if preempted:
        stops.preemption.hand_over()


# -- the loop -------------------------------------------------------------------------------------
def train(comps: Components, run) -> float | None:
    """Run (or resume) the training described by ``run``; return the last epoch's mean reward."""
    accelerator, state = comps.accelerator, TrainingState(algorithm=comps.algorithm)
    try:
        model, optimizer = prepare(comps, run)
        resume_run(comps, run, state)
        resync_lr(comps)
        if state.epochs_completed >= run.num_epochs:
            return finish_complete_run(comps, run, state, MetricsFile(comps.run_dir))
        metrics, evals = start_logs(comps, state)
        log_startup_summary(comps, run, state)
        comps.progress = RunProgress(run.num_epochs, state.epochs_completed, accelerator.is_main_process)
        if comps.evaluator is not None and comps.evaluator.due(state.epochs_completed, run.num_epochs):
            run_evaluation(comps, evals, state)  # the policy the first epoch starts from (the base model on a new run)
        last_reward, epoch = None, state.epochs_completed
        executor, stops = RewardWorker(accelerator.device), Stops(comps, run)
        try:
            for epoch in range(state.epochs_completed, run.num_epochs):
                record, samples = run_epoch(comps, run, epoch, state, executor, optimizer, model, stops)
                hook_error = publish_epoch(comps, run, record, samples, (metrics, evals), state)
                last_reward = record["reward_mean"]
                checkpoint_or_stop(comps, run, state, stops, hook_error, metrics)
            if accelerator.is_main_process or is_sharded(accelerator):  # sharded: every process gathers
                files = write_final(comps.pipeline, os.path.join(comps.run_dir, FINAL_DIR), accelerator)
                if accelerator.is_main_process:
                    log.info("trained weights: %s", ", ".join(files))
            accelerator.wait_for_everyone()
        except KeyboardInterrupt:
            abandon_reward(comps.reward_fn)
            raise Interrupted(
                f"interrupted during epoch {epoch + 1}; rerun the same command to resume ({resume_hint(comps.run_dir)})",
                exit_code=130,
            ) from None
        finally:
            if comps.progress is not None:
                comps.progress.close()
            stops.uninstall()
            executor.shutdown()
            comps.tracker.finish()
        return last_reward
    finally:
        if comps.run_lock is not None:
            comps.run_lock.release()
