"""The start-up summary: what a run is about to train, in the lines a researcher checks before walking away.

Model (and its family), pipeline and sampler, algorithm, reward(s), prompt set, trainable / total
parameters and the LoRA rank, device(s) and dtype, world size and the batch plan, the run directory
and whether it resumes. Built from the composed config and the built components, so it says what
was built, not what was asked for.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def group_choices() -> dict[str, str]:
    """The option picked in each config group (``model=tiny_flux`` -> {"model": "tiny_flux"}), when under Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return {k: str(v) for k, v in OmegaConf.to_container(HydraConfig.get().runtime.choices).items()}
    except Exception:  # a config composed outside a Hydra run (tests, notebooks): the targets say enough
        pass
    return {}


def _named(choices: dict, group: str, node) -> str:
    """``option (target)`` for a group: the option as picked, the ``_target_`` it builds."""
    target = str(node.get("_target_", "?")) if isinstance(node, DictConfig) else "?"
    option = choices.get(group)
    return f"{option} ({target})" if option else target


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def sampler_text(cfg: DictConfig, pipeline) -> str:
    """The sampler as the pipeline was built: steps, noise, guidance and windows."""
    p = cfg.pipeline
    parts = [f"{getattr(pipeline, 'num_steps', cfg.sample.num_steps)} steps"]
    if "noise_level" in p:  # the flow family's SDE
        parts.append(f"SDE noise {p.noise_level} ({p.sigma_schedule})")
        window = getattr(pipeline, "window", None)
        if window is not None and tuple(window) != (0, pipeline.num_steps):
            parts.append(f"SDE window [{window[0]}, {window[1]})")
    else:
        parts.append(f"DDIM eta {cfg.sample.eta}")
    if hasattr(pipeline, "distilled_guidance") and getattr(pipeline, "guidance_embeds", False):
        parts.append(f"distilled guidance {pipeline.distilled_guidance}")
    cfg_scale = getattr(pipeline, "guidance_scale", None)
    parts.append(f"CFG {cfg_scale}" if getattr(pipeline, "sample_cfg", False) else "no CFG")
    evaluation = getattr(pipeline, "eval_num_steps", None)
    if evaluation:
        parts.append(f"evaluation {evaluation} steps")
    return ", ".join(parts)


def startup_lines(cfg: DictConfig, run, comps) -> list[str]:
    """The summary's lines (without the resume status, which the loop knows only after looking)."""
    from ddpo.pipelines.fit import model_class

    choices = group_choices()
    pipeline, accelerator = comps.pipeline, comps.accelerator
    family = type(pipeline).option if hasattr(type(pipeline), "option") else type(pipeline).__name__
    model_node = cfg.model
    where = model_node.get("path") or "built locally"
    trainable = sum(p.numel() for p in pipeline.trainable_parameters())
    module = pipeline.trainable_module()
    total = sum(p.numel() for p in module.parameters())
    weights = (
        f"LoRA rank {run.lora_rank} (alpha {cfg.pipeline.get('lora_alpha') or run.lora_rank})"
        if run.use_lora
        else "full fine-tuning"
    )
    rewards = comps.reward_name
    if comps.evaluator is not None:
        rewards += f"; evaluated every {run.eval.every} epochs on held-out prompts"
    precision = str(getattr(run.mixed_precision, "value", run.mixed_precision))  # an enum in the typed config
    dtype = {"no": "float32", "fp16": "float16 autocast", "bf16": "bfloat16 autocast"}.get(precision, precision)
    return [
        f"model      {_named(choices, 'model', model_node)}: {where}; {model_class(pipeline.sd)}, family {family}",
        f"pipeline   {_named(choices, 'pipeline', cfg.pipeline)}: {sampler_text(cfg, pipeline)}",
        f"algorithm  {_named(choices, 'algorithm', cfg.algorithm)}",
        f"reward     {rewards}",
        f"prompts    {_named(choices, 'prompt', cfg.prompt)}",
        f"weights    {_count(trainable)} trainable of {_count(total)} parameters in the "
        f"{type(module).__name__} ({100 * trainable / max(total, 1):.2f}%), {weights}",
        f"device     {accelerator.device} x {accelerator.num_processes} process(es), {dtype} "
        f"(mixed_precision={precision})",
        f"batches    {comps.plan.summary(run)}; {comps.algorithm.describe(comps.plan.samples_per_epoch)}",
        f"run dir    {comps.run_dir}",
    ]
