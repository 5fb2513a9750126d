"""The configuration schema and the one place that turns a composed config into components.

Nothing else in ``ddpo`` knows about Hydra: the trainer receives plain dataclasses and objects.
The values and their explanations live in ``conf/config.yaml``; the schema here fixes the types.
"""

import dataclasses
import enum
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from ddpo.errors import ConfigError


class MixedPrecision(enum.Enum):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


@dataclass
class SampleConfig:
    num_steps: int = MISSING
    eta: float = MISSING
    guidance_scale: float = MISSING
    batch_size: int = MISSING
    num_batches_per_epoch: int = MISSING


@dataclass
class TrainConfig:
    batch_size: int = MISSING
    learning_rate: float = MISSING
    adam_beta1: float = MISSING
    adam_beta2: float = MISSING
    adam_weight_decay: float = MISSING
    adam_epsilon: float = MISSING
    gradient_accumulation_steps: int = MISSING
    max_grad_norm: float = MISSING
    num_inner_epochs: int = MISSING
    cfg: bool = MISSING
    adv_clip_max: float = MISSING
    clip_range: float = MISSING
    timestep_fraction: float = MISSING
    timesteps_per_call: int = MISSING
    ema_decay: float = 0.0  # defaults: runs recorded before these keys existed had no EMA
    ema_every: int = 1
    lr_scheduler: str = "constant"  # and no schedule: runs recorded before these keys existed had none
    lr_warmup_steps: int = 0


@dataclass
class StatTrackingConfig:
    enabled: bool = MISSING
    buffer_size: int = MISSING
    min_count: int = MISSING


@dataclass
class EvalConfig:
    every: int = MISSING
    seeds: int = MISSING
    batch_size: int = MISSING
    prompt: Any = None  # a prompt-set config (with _target_), or None for the training prompt set
    rewards: Any = field(default_factory=dict)  # name -> reward config


@dataclass
class RunConfig:
    """Everything the loop reads (the component groups are built by ``build``)."""

    seed: int = MISSING
    num_epochs: int = MISSING
    save_freq: int = MISSING
    checkpoints_total_limit: int | None = MISSING
    resume_from: str | None = MISSING
    resume_with_changes: bool = MISSING
    preemption_grace_s: float = MISSING
    mixed_precision: MixedPrecision = MISSING
    allow_tf32: bool = MISSING
    use_lora: bool = MISSING
    lora_rank: int = MISSING
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    per_prompt_stat_tracking: StatTrackingConfig = field(default_factory=StatTrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Config(RunConfig):
    model: Any = MISSING
    pipeline: Any = MISSING
    algorithm: Any = MISSING
    reward: Any = MISSING
    prompt: Any = MISSING
    logger: Any = MISSING
    optimizer: Any = None  # a partial (params -> optimizer); None: AdamW from train.*


def register_configs() -> None:
    ConfigStore.instance().store(name="ddpo_schema", node=Config)


# -- validation ---------------------------------------------------------------------------------
@dataclass
class BatchPlan:
    """The batch arithmetic of one epoch, per process and in total."""

    world_size: int
    samples_per_epoch_per_process: int
    train_batches_per_epoch: int
    optimizer_steps_per_epoch: int
    trained_timesteps: int

    @property
    def samples_per_epoch(self) -> int:
        return self.samples_per_epoch_per_process * self.world_size

    differentiable: bool = False  # reward-gradient training: one optimizer step per accumulated sampling batches

    def summary(self, run: RunConfig) -> str:
        s, t = run.sample, run.train
        if self.differentiable:
            return (
                f"world size {self.world_size}; per epoch: {self.samples_per_epoch} samples "
                f"({self.world_size} process(es) x {s.num_batches_per_epoch} batches x {s.batch_size}), sampled "
                f"with gradients; {self.optimizer_steps_per_epoch} optimizer steps (global batch "
                f"{s.batch_size * self.world_size * t.gradient_accumulation_steps} samples)"
            )
        return (
            f"world size {self.world_size}; per epoch: {self.samples_per_epoch} samples "
            f"({self.world_size} process(es) x {s.num_batches_per_epoch} batches x {s.batch_size}), "
            f"{self.optimizer_steps_per_epoch * t.num_inner_epochs} optimizer steps "
            f"({t.num_inner_epochs} inner epoch(s) x {self.optimizer_steps_per_epoch}; global train batch "
            f"{t.batch_size * self.world_size * t.gradient_accumulation_steps} samples x "
            f"{self.trained_timesteps} of {s.num_steps} timesteps)"
        )


def check_finite(node, prefix: str = "") -> None:
    """Every float of the config is a real number: NaN passes every ``x <= 0`` check, and trains NaN weights."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{f.name} must be a finite number (got {value})")


@dataclass(frozen=True)
class Bounds:
    """An interval of numbers; ``None`` leaves that end open to infinity."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    text: str = ""  # how messages state it, where the interval's own notation would not read well

    def __contains__(self, value) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class NumberRule:
    """The values one numeric key may take (outside: ConfigError) and those runs use (outside: a warning)."""

    key: str
    allowed: Bounds
    why: str = ""  # appended to the error: what the value means
    usual: Bounds | None = None
    usual_why: str = ""  # appended to the warning: what papers and the presets use
    only_if: str = ""  # a key that turns the feature on: the rule applies only when it is true (non-zero)


POSITIVE, NON_NEGATIVE = Bounds(0, low_open=True), Bounds(0)
UNIT_INTERVAL = Bounds(0, 1, high_open=True)  # [0, 1): Adam's decay rates

# Every numeric key of RunConfig, in the order they are checked (tests/test_input_checks.py keeps it complete).
NUMBER_RULES = (
    NumberRule("seed", Bounds(0, 2**32, high_open=True, text="in [0, 2**32)"), "numpy's generators take 32 bits"),
    NumberRule("num_epochs", POSITIVE),
    NumberRule("save_freq", POSITIVE),
    NumberRule("checkpoints_total_limit", POSITIVE, "null keeps every checkpoint"),
    NumberRule("preemption_grace_s", NON_NEGATIVE),
    NumberRule("lora_rank", POSITIVE, usual=Bounds(1, 256), usual_why="papers use 4 to 128"),
    NumberRule("sample.num_steps", POSITIVE),
    NumberRule(
        "sample.eta",
        NON_NEGATIVE,
        "it scales DDIM's noise",
        Bounds(0, 1),
        "1 is DDPM's noise, the DDPO paper's value; more adds noise beyond it",
    ),
    NumberRule(
        "sample.guidance_scale",
        Bounds(1),
        "1 disables classifier-free guidance, above 1 guides; below 1 would mix in the unconditional prediction",
        Bounds(1, 20),
        "Stable Diffusion runs use 4.5 to 7.5",
    ),
    NumberRule("sample.batch_size", POSITIVE),
    NumberRule("sample.num_batches_per_epoch", POSITIVE),
    NumberRule("train.batch_size", POSITIVE),
    NumberRule(
        "train.learning_rate", NON_NEGATIVE, usual=Bounds(0, 0.1), usual_why="AdamW fine-tuning uses 1e-5 to 1e-3"
    ),
    NumberRule("train.adam_beta1", UNIT_INTERVAL, "a decay rate of AdamW's moment estimates"),
    NumberRule(
        "train.adam_beta2",
        UNIT_INTERVAL,
        "a decay rate of AdamW's moment estimates",
        Bounds(0.9, 1, high_open=True),
        "AdamW's default is 0.999",
    ),
    NumberRule(
        "train.adam_weight_decay", NON_NEGATIVE, usual=Bounds(0, 0.1), usual_why="DDPO uses 1e-4, AdamW's default 1e-2"
    ),
    NumberRule(
        "train.adam_epsilon",
        POSITIVE,
        "it keeps AdamW's step finite where a gradient is 0",
        Bounds(0, 1e-4, low_open=True),
        "AdamW's default is 1e-8",
    ),
    NumberRule("train.gradient_accumulation_steps", POSITIVE),
    NumberRule("train.max_grad_norm", POSITIVE),
    NumberRule("train.num_inner_epochs", POSITIVE),
    NumberRule("train.adv_clip_max", POSITIVE),
    NumberRule(
        "train.clip_range", POSITIVE, usual=Bounds(0, 1, low_open=True), usual_why="DDPO uses 1e-4, image PPO 0.2"
    ),
    NumberRule("train.timestep_fraction", Bounds(0, 1, low_open=True)),
    NumberRule("train.timesteps_per_call", POSITIVE),
    NumberRule(
        "train.ema_decay",
        UNIT_INTERVAL,
        "0 keeps no EMA; the EMA moves by (1 - decay) of the way to the trained weights each step",
        Bounds(0.5, 0.9999),
        "DiffusionNFT and Flow-GRPO use 0.9",
        only_if="train.ema_decay",
    ),
    NumberRule("train.ema_every", POSITIVE, only_if="train.ema_decay"),
    NumberRule("train.lr_warmup_steps", NON_NEGATIVE, "optimizer steps of warm-up; 0 = none"),
    NumberRule("eval.every", NON_NEGATIVE, "0 turns evaluation off"),
    NumberRule("eval.seeds", POSITIVE, only_if="eval.every"),
    NumberRule("eval.batch_size", POSITIVE, only_if="eval.every"),
    NumberRule("per_prompt_stat_tracking.buffer_size", POSITIVE, only_if="per_prompt_stat_tracking.enabled"),
    NumberRule("per_prompt_stat_tracking.min_count", NON_NEGATIVE, only_if="per_prompt_stat_tracking.enabled"),
)


def _get(run: RunConfig, key: str):
    value = run
    for name in key.split("."):
        value = getattr(value, name)
    return value


def _applies(run: RunConfig, rule: NumberRule):
    """The rule's value, or None where it does not apply (a null value, a feature turned off)."""
    if rule.only_if and not _get(run, rule.only_if):
        return None
    return _get(run, rule.key)


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_ranges(run: RunConfig) -> None:
    """Every numeric key is in its range (NUMBER_RULES); ConfigError names the key and the range."""
    if run.train.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(
            f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)} (got {run.train.lr_scheduler!r})"
        )
    if run.train.lr_scheduler == "constant" and run.train.lr_warmup_steps:
        raise ConfigError(
            "train.lr_warmup_steps needs a schedule with warm-up: train.lr_scheduler=constant_with_warmup "
            "(or linear, cosine, ...); plain constant ignores warm-up in diffusers' get_scheduler"
        )
    for rule in NUMBER_RULES:
        value = _applies(run, rule)
        if value is not None and value not in rule.allowed:
            why = f": {rule.why}" if rule.why else ""
            raise ConfigError(f"{rule.key} must be {rule.allowed} (got {value}){why}")
    st = run.per_prompt_stat_tracking
    if st.enabled and st.min_count > st.buffer_size:
        raise ConfigError(
            f"per_prompt_stat_tracking.min_count={st.min_count} exceeds buffer_size={st.buffer_size}: a prompt's "
            "buffer never holds that many rewards, so its own statistics would never be used"
        )


_WARNED = weakref.WeakValueDictionary()  # id -> the run configs warn_unusual has spoken about


def warn_unusual(run: RunConfig) -> None:
    """A warning, once per run config, for each value far from what runs use (NUMBER_RULES' ``usual``)."""
    if _WARNED.get(id(run)) is run:
        return
    _WARNED[id(run)] = run
    import logging

    for rule in NUMBER_RULES:
        value = _applies(run, rule)
        if rule.usual is not None and value is not None and value not in rule.usual:
            why = f"; {rule.usual_why}" if rule.usual_why else ""
            logging.getLogger(__name__).warning(
                "%s=%s is unusual (runs use values %s%s): check it", rule.key, value, rule.usual, why
            )


def plan_batches(run: RunConfig, world_size: int = 1, stored_steps: int | None = None) -> BatchPlan:
    """Check the run's numbers and return its batch arithmetic; ConfigError names the bad key.

    ``stored_steps``: the transitions stored per sample when not one per step (a pipeline's train or
    SDE window, or 1 for branched chains); ``train.timestep_fraction`` is a fraction of them.
    """
    check_finite(run)
    check_ranges(run)
    warn_unusual(run)
    s, t = run.sample, run.train

    per_process = s.batch_size * s.num_batches_per_epoch
    if per_process % t.batch_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide the samples per epoch per process "
            f"(sample.batch_size x sample.num_batches_per_epoch = {s.batch_size} x "
            f"{s.num_batches_per_epoch} = {per_process})"
        )
    train_batches = per_process // t.batch_size
    if train_batches % t.gradient_accumulation_steps:
        raise ConfigError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} does not divide the "
            f"{train_batches} training batches per epoch (samples per epoch per process {per_process} / "
            f"train.batch_size {t.batch_size})"
        )
    return BatchPlan(
        world_size=world_size,
        samples_per_epoch_per_process=per_process,
        train_batches_per_epoch=train_batches,
        optimizer_steps_per_epoch=train_batches // t.gradient_accumulation_steps,
        trained_timesteps=max(1, int((stored_steps or s.num_steps) * t.timestep_fraction)),
    )


# the largest image side: 4x SDXL's 1024; model.resolution=100000 would ask for a 10 GB latent before any check
MAX_RESOLUTION = 4096


def check_resolution(resolution) -> None:
    """``model.resolution`` (when the model has one): an integer in (0, MAX_RESOLUTION]; whether the
    VAE's factor divides it is the model's to check."""
    if resolution is None:
        return
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise ConfigError(f"model.resolution must be an integer, the image side in pixels (got {resolution!r})")
    if not 0 < resolution <= MAX_RESOLUTION:
        raise ConfigError(f"model.resolution must be in (0, {MAX_RESOLUTION}] pixels (got {resolution})")


def check_reward_gradient(algorithm, reward_fn, reward_name: str, run: RunConfig) -> None:
    """A reward-gradient algorithm needs a reward with gradients and whole optimizer steps per epoch."""
    from ddpo.algorithms import DIFFERENTIABLE

    if algorithm.rollout != DIFFERENTIABLE:
        return
    name = type(algorithm).__name__
    if not getattr(reward_fn, "differentiable", False):
        raise ConfigError(
            f"algorithm={name.lower()} backpropagates the reward, but reward={reward_name} gives no gradients "
            "(JPEG sizes, exact checkers and remote rewards cannot): use aesthetic, pickscore, hpsv2, clip_score, "
            "shape_proxy or a mix of them, or a policy-gradient algorithm (algorithm=ddpo, grpo)"
        )
    s, t = run.sample, run.train
    if s.num_batches_per_epoch % t.gradient_accumulation_steps:
        raise ConfigError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} does not divide "
            f"sample.num_batches_per_epoch={s.num_batches_per_epoch} (algorithm={name.lower()} takes an optimizer "
            "step every gradient_accumulation_steps sampling batches)"
        )
    algorithm.check_steps(s.num_steps)


def run_config(cfg: DictConfig) -> RunConfig:
    """The typed, plain-Python part of the config that the loop reads."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except InterpolationResolutionError as exc:  # ${nosuch}
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"{exc.full_key}: cannot resolve its interpolation ({detail})") from None
    for group in ("model", "pipeline", "algorithm", "reward", "prompt", "logger", "optimizer"):
        data.pop(group, None)
    data.pop("experiment", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data)
    except ConfigKeyError as exc:  # a key added with +key=value that the schema does not know
        raise ConfigError(
            f"unknown config key {exc.full_key!r} (check its spelling; python train.py --cfg job lists every key)"
        ) from None
    try:
        return OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:  # ~key, or a ??? that no preset filled in
        raise ConfigError(f"{exc.full_key} is mandatory and has no value (set {exc.full_key}=...)") from None


# -- building -----------------------------------------------------------------------------------
def _instantiate(node, what: str, **kwargs):
    """hydra.utils.instantiate with the error reduced to one line that names the config group."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    from ddpo.errors import DDPOError

    try:
        return instantiate(node, **kwargs)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "a value"
        raise ConfigError(f"cannot build {what}: {key} is mandatory (set {key}=...)") from None
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DDPOError):
            raise cause from None
        detail = f"{type(cause).__name__}: {cause}" if cause else str(exc).splitlines()[0]
        raise ConfigError(f"cannot build {what} ({node.get('_target_')}): {detail}") from None


def _make_accelerator(run: RunConfig, run_dir: str, backend: str):
    from accelerate import Accelerator, PartialState
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, parse_flag_from_env

    from ddpo.distributed import share_main_output

    # PartialState ignores ACCELERATE_USE_CPU (only Accelerator reads it): without it a CPU-only
    # multi-process launch would start N 1-process runs
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    # every rank writes into rank 0's run directory (Hydra's ${now:} can differ between ranks)
    if state.num_processes > 1:
        own_dir, run_dir = run_dir, broadcast_object_list([run_dir])[0]
        share_main_output(own_dir, run_dir, state.process_index)
    # a local Hydra multirun runs its jobs in one process: forget the previous job's mixed
    # precision (AcceleratorState refuses a change); the process group (PartialState) is kept
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision.value,
        log_with=None if backend == "none" else backend,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
    )
    return accelerator, run_dir


def build(cfg: DictConfig, run_dir: str, reward_name: str = "reward", sweep: dict | None = None):
    """Validate ``cfg`` and build every component of a run (the trainer's ``Components``).

    ``sweep``: the wandb group and tags of a sweep job (``sweep_labels``), unless the logger config sets them.
    """
    run = run_config(cfg)
    plan_batches(run)  # fail on bad numbers before anything heavy (torch, diffusers) is imported
    logger_cfg = cfg.logger
    backend = logger_cfg.backend
    if backend not in ("tensorboard", "wandb", "none"):
        raise ConfigError(f"logger.backend must be tensorboard, wandb or none (got {backend!r})")
    if backend == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:  # an optional dependency of the package: the [wandb] extra
            raise ConfigError("logger=wandb needs the wandb package: pip install 'ddpo-diffusion[wandb]' (or wandb)")
    from ddpo.pipelines.fit import check_fit

    check_fit(cfg)  # model=sdxl pipeline=ddim stops here, before any weight is loaded
    check_resolution(cfg.model.get("resolution"))

    import torch

    from ddpo.logging import RunTracker, wandb_run_id
    from ddpo.trainer import Components

    accelerator, run_dir = _make_accelerator(run, run_dir, backend)
    plan = plan_batches(run, accelerator.num_processes)
    algorithm = _instantiate(cfg.algorithm, "the algorithm (algorithm=...)")
    algorithm.check_plan(plan.samples_per_epoch)
    from ddpo.sharding import check_sharded_evaluation, check_sharding

    check_sharding(accelerator, run, algorithm)  # FSDP: what it cannot run stops here, before the model loads
    torch.backends.cuda.matmul.allow_tf32 = run.allow_tf32
    torch.backends.cudnn.allow_tf32 = run.allow_tf32
    run_lock = None
    if accelerator.is_main_process:
        from ddpo.run_lock import RunLock

        os.makedirs(run_dir, exist_ok=True)
        run_lock = RunLock(run_dir).acquire()  # before anything (trackers included) writes into the directory
    from ddpo.checkpointing import check_resume, plan_resume
    from ddpo.config_history import RunRecord

    # a changed config (or a resume_from with nothing left to train) is refused before the model is built
    record = RunRecord(OmegaConf.to_container(cfg, resolve=True), run_dir, is_main=accelerator.is_main_process)
    record.resume_with_changes = run.resume_with_changes
    resume = plan_resume(run_dir, run.resume_from)
    check_resume(resume, record, run.num_epochs)
    prompt_fn = _instantiate(cfg.prompt, "the prompt set (prompt=...)")
    reward_fn = _instantiate(cfg.reward, "the reward (reward=...)")
    if hasattr(reward_fn, "to"):
        reward_fn.to(accelerator.device)  # in the reward's own dtype (reward.dtype), not the run's mixed precision
    check_reward_prompts(reward_fn, prompt_fn, reward_name)
    check_reward_gradient(algorithm, reward_fn, reward_name, run)
    from accelerate.utils import set_seed

    set_seed(run.seed)  # LoRA's random init, and anything else drawn from the global generators
    components = _instantiate(cfg.model, "the model (model=...)")
    check_fit(cfg, components)  # the model actually loaded (any loader, any model.path)
    pipeline = _instantiate(
        cfg.pipeline,
        "the pipeline (pipeline=...)",
        components=components,
        use_lora=run.use_lora,
        lora_rank=run.lora_rank,
        mixed_precision=run.mixed_precision.value,
        device=accelerator.device,
        resolution=cfg.model.get("resolution"),
    )
    if pipeline.max_num_steps is not None and run.sample.num_steps > pipeline.max_num_steps:
        raise ConfigError(
            f"sample.num_steps={run.sample.num_steps} exceeds the scheduler's "
            f"{pipeline.max_num_steps} training timesteps"
        )
    from ddpo.algorithms import DIFFERENTIABLE, FINAL
    from ddpo.pipelines.base import DDPOPipeline

    if algorithm.rollout == DIFFERENTIABLE:
        if type(pipeline).sample_with_grad is DDPOPipeline.sample_with_grad:
            raise ConfigError(
                f"{type(pipeline).__name__} cannot sample with gradients, which "
                f"algorithm={type(algorithm).__name__.lower()} trains through"
            )
        s = run.sample
        plan = dataclasses.replace(
            plan,
            train_batches_per_epoch=s.num_batches_per_epoch,
            optimizer_steps_per_epoch=s.num_batches_per_epoch // run.train.gradient_accumulation_steps,
            differentiable=True,
        )
    # a forward-process algorithm trains each final sample at the sampler's steps; windows choose transitions
    stored_steps = pipeline.stored_steps if algorithm.rollout != FINAL else None
    if algorithm.rollout == FINAL and pipeline.forward_process is None:
        raise ConfigError(
            f"{type(pipeline).__name__} has no forward process: algorithm={type(algorithm).__name__} cannot train it"
        )
    from ddpo.models.loading import random_weights

    if algorithm.rollout == FINAL and random_weights(cfg.model):
        import logging

        logging.getLogger(__name__).warning(
            "model %s has random weights: %s scores samples by the diffusion loss, which is the sampler's "
            "likelihood only for a trained denoiser, and does not learn on it (README: forward-process "
            "methods need a denoiser; try experiment=tiny_shapes_compressibility)",
            cfg.model._target_.rsplit(".", 1)[-1],
            type(algorithm).__name__,
        )
    if algorithm.stored_steps is not None:  # the algorithm decides the transitions (branched chains)
        if not pipeline.supports_branching:
            raise ConfigError(f"{type(pipeline).__name__} cannot branch chains (algorithm.branch_window)")
        if pipeline.stored_steps not in (None, run.sample.num_steps):
            raise ConfigError(
                "algorithm.branch_window and the pipeline's window (pipeline.train_window / sde_window) both "
                "choose the trained steps: set one"
            )
        algorithm.check_steps(run.sample.num_steps)
        stored_steps = algorithm.stored_steps
    if stored_steps is not None:  # only some steps are transitions (an SDE or train window, branched chains)
        plan = plan_batches(run, accelerator.num_processes, stored_steps)
    evaluator = build_evaluator(cfg, run, prompt_fn, {reward_name: reward_fn}, accelerator.device)
    check_sharded_evaluation(accelerator, evaluator)
    optimizer = _instantiate(cfg.optimizer, "the optimizer (optimizer)") if cfg.get("optimizer") else None
    if optimizer is not None and not callable(optimizer):
        raise ConfigError("optimizer must build an optimizer from the trained parameters: set optimizer._partial_=true")
    hook_cfg = logger_cfg.get("image_hook")
    image_hook = _instantiate(hook_cfg, "the image hook (logger.image_hook)") if hook_cfg else None

    if backend != "none":
        init_kwargs = {}
        if backend == "wandb":
            # the logger config's own group/tags win over the sweep's
            labels = {**(sweep or {}), **{k: v for k in ("group", "tags") if (v := logger_cfg.get(k)) is not None}}
            init_kwargs["wandb"] = {
                "dir": run_dir,
                "name": logger_cfg.get("name") or os.path.basename(run_dir),
                "entity": logger_cfg.get("entity"),
                "mode": logger_cfg.get("mode"),
                # one wandb run per run directory: a restarted or requeued run continues it
                "id": wandb_run_id(run_dir) if accelerator.is_main_process else None,
                "resume": "allow",
                "group": labels.get("group"),
                "tags": list(labels["tags"]) if labels.get("tags") is not None else None,
            }
        accelerator.init_trackers(
            logger_cfg.get("project", "ddpo"),
            config=_flat_config(cfg),
            init_kwargs=init_kwargs,
        )
    images_every, max_images = logger_cfg.get("images_every", 1), logger_cfg.get("max_images", 16)
    for key, value, low in (("images_every", images_every, 0), ("max_images", max_images, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"logger.{key} must be an integer >= {low} (got {value!r})")
    tracker = RunTracker(
        accelerator,
        backend,
        run_dir,
        prompt_table_every=logger_cfg.get("prompt_table_every", 0),
        images_every=images_every,
        max_images=max_images,
    )
    comps = Components(
        accelerator=accelerator,
        pipeline=pipeline,
        algorithm=algorithm,
        reward_fn=reward_fn,
        reward_name=f"{reward_name} ({type(reward_fn).__name__})",
        prompt_fn=prompt_fn,
        tracker=tracker,
        image_hook=image_hook,
        run_dir=run_dir,
        plan=plan,
        run_lock=run_lock,
        evaluator=evaluator,
        record=record,
        resume=resume,
        optimizer=optimizer,
    )
    from ddpo.summary import startup_lines

    comps.summary = startup_lines(cfg, run, comps)
    return run, comps


def check_reward_prompts(reward_fn, prompt_fn, name: str) -> None:
    """Let a reward refuse the prompt set before anything is sampled (e.g. shape_alignment needs shapes captions)."""
    import random

    if hasattr(reward_fn, "check_prompts"):
        rng = random.Random(0)
        try:
            reward_fn.check_prompts([prompt_fn(rng)[0] for _ in range(8)])
        except ConfigError as exc:
            raise ConfigError(f"reward={name} cannot score this prompt set: {exc}") from None


def build_evaluator(cfg: DictConfig, run: RunConfig, prompt_fn, train_rewards: dict, device):
    """The held-out evaluation of ``eval.*`` (None when ``eval.every`` is 0).

    It scores the training reward under its own name plus every reward of ``eval.rewards``, on the
    fixed prompts of ``eval.prompt`` (the training prompt set when null) x ``eval.seeds`` seeds.
    """
    if not run.eval.every:
        return None
    from ddpo.evaluation import Evaluator, eval_prompts

    eval_cfg = cfg.eval
    prompt_set = (
        prompt_fn
        if eval_cfg.prompt is None
        else _instantiate(eval_cfg.prompt, "the evaluation prompt set (eval.prompt)")
    )
    rewards = dict(train_rewards)
    for name, node in (eval_cfg.rewards or {}).items():
        if name in rewards:
            continue  # the training reward, listed again: scored once
        reward = _instantiate(node, f"the evaluation reward eval.rewards.{name}")
        if hasattr(reward, "to"):
            reward.to(device)
        rewards[name] = reward
    for name, reward in rewards.items():
        check_reward_prompts(reward, prompt_set, f"{name} (in evaluation)")
    return Evaluator(
        eval_prompts(prompt_set), list(range(run.eval.seeds)), rewards, run.eval.batch_size, run.eval.every
    )


def _flat_config(cfg: DictConfig) -> dict:
    """Scalars of the config as flat ``a.b.c`` keys (what trackers display as hyperparameters)."""
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            elif isinstance(value, (int, float, str, bool)):
                flat[name] = value
            elif value is None:
                flat[name] = "null"

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


WANDB_TAG_MAX = 64  # wandb refuses longer tags
WANDB_GROUP_MAX = 128  # and longer groups (server side)


def sweep_labels(hydra_cfg) -> dict:
    """``{"group": sweep dir, "tags": the job's overrides}`` for a Hydra multirun job, ``{}`` otherwise.

    A sweep's jobs then show as one wandb group, each tagged with the values it was given.
    """
    from hydra.types import RunMode

    if hydra_cfg.get("mode") != RunMode.MULTIRUN:
        return {}
    tags = [override[:WANDB_TAG_MAX] for override in hydra_cfg.overrides.task if override]
    # the tail of the sweep directory is its timestamp: what tells two sweeps apart
    return {"group": str(hydra_cfg.sweep.dir)[-WANDB_GROUP_MAX:], "tags": list(dict.fromkeys(tags))}


def main(cfg: DictConfig) -> float | None:
    """What ``train.py`` runs: build from the composed config, train, and return the final reward.

    A ``DDPOError`` (bad value, missing file, failing reward, unloadable model) ends the process
    with its one-line message and exit status 1, without a traceback.
    """
    import logging
    import sys

    from hydra.core.hydra_config import HydraConfig

    from ddpo.distributed import init_from_submitit
    from ddpo.errors import DDPOError, Interrupted
    from ddpo.resources import limit_threads

    # a log file that cannot be written (a full disk) must not print a traceback per record: the
    # error that stops the run says what happened, on stderr
    logging.raiseExceptions = False
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    reward_name = hydra_cfg.runtime.choices.get("reward", "reward")
    try:
        check_launcher(hydra_cfg)
        limit_threads()  # a sweep or SLURM job: its share of the cores, before torch starts its thread pool
        init_from_submitit()  # a multi-task submitit/SLURM job: torch.distributed before accelerate starts
        run, components = build(cfg, run_dir, reward_name=reward_name, sweep=sweep_labels(hydra_cfg))
        from ddpo.trainer import train  # imports torch: after the config checks, which fail fast

        return train(components, run)
    except KeyboardInterrupt:  # before training started (the loop turns it into Interrupted)
        exc = Interrupted("interrupted before training started", exit_code=130)
    except DDPOError as error:
        exc = error
    message = f"error: {exc}"
    from ddpo.logging import log_to_files

    log_to_files(message)
    print(message, file=sys.stderr)
    sys.exit(exc.exit_code if isinstance(exc, Interrupted) else 1)


def check_launcher(hydra_cfg) -> None:
    """``launcher=...`` picks where a sweep's jobs run: without ``-m`` it would silently run here."""
    from hydra.types import RunMode

    launcher = hydra_cfg.runtime.choices.get("launcher")
    if launcher and hydra_cfg.mode != RunMode.MULTIRUN:
        raise ConfigError(
            f"launcher={launcher} applies to sweeps only: add -m (python train.py -m launcher={launcher} ...) "
            "to run through submitit, or drop launcher= to train in this process"
        )
