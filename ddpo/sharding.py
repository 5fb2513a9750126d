"""Full fine-tuning sharded over processes: accelerate's FSDP2 (``accelerate launch --config_file
accelerate_configs/fsdp.yaml``).

Under FSDP2 the trained module's parameters are DTensors: each process holds 1/N of every weight,
its gradient and its AdamW moments, and a forward pass gathers each block's weights just before it
runs. What the loop does differently (README: "Full fine-tuning at 12B: FSDP"):

- the old policy and the EMA (``ddpo.policies.ShadowWeights``) are made after ``accelerator.prepare``,
  from the sharded parameters, so they are sharded too; the full fine-tuning reference (a frozen
  copy) is sharded like the trained module (``shard_like``);
- a checkpoint is accelerate's sharded ``save_state`` (the model and the optimizer as
  torch.distributed.checkpoint shards, what a resume loads) plus the diffusers export of the gathered
  weights, written by the main process (``full_weights``), as ``final/`` is;
- every process calls the module equally often (FSDP's gathers are collectives): what would make
  them differ is refused before the model is loaded (``check_sharding``).
"""

import contextlib
import os
from dataclasses import dataclass

import torch

from ddpo.errors import ConfigError

CONFIG_FILE = "accelerate_configs/fsdp.yaml"  # the accelerate config shipped with the project, from the repository root


def fsdp_requested() -> bool:
    """Whether accelerate was launched with an FSDP config (``accelerate launch`` exports this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    """Whether accelerate runs the trained module under FSDP."""
    return accelerator is not None and getattr(accelerator, "distributed_type", None) == "FSDP"


def check_sharding(accelerator, run, algorithm) -> None:
    """Refuse, in one line and before the model is loaded, what FSDP here does not run."""
    if not fsdp_requested() and not is_sharded(accelerator):
        return
    if not is_sharded(accelerator):
        runs = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
        if accelerator.device.type == "cpu":
            why = "accelerate enables FSDP only on GPUs (on CPUs it would train unsharded): launch without it on CPUs"
        else:
            why = "FSDP shards over 2 or more processes, one per GPU: launch with --num_processes 2 or more"
        raise ConfigError(
            f"accelerate was launched with an FSDP config but runs {runs} ({accelerator.num_processes} "
            f"process(es) on {accelerator.device.type}): {why}"
        )
    if not accelerator.is_fsdp2:
        raise ConfigError(f"FSDP needs fsdp_version: 2 in the accelerate config (FSDP2, as {CONFIG_FILE})")
    if run.use_lora:
        raise ConfigError(
            "FSDP shards full fine-tuning (use_lora=false); LoRA trains unsharded: launch it without the FSDP "
            "config (at 12B, LoRA in bf16 with gradient checkpointing fits one 80 GB GPU per process)"
        )
    if getattr(algorithm, "truncation", None) is not None:
        raise ConfigError(
            "algorithm.truncation (AlignProp's random K) differentiates a different number of steps on each "
            "process, which FSDP's collectives cannot follow: use a fixed algorithm.grad_steps (DRaFT) with FSDP"
        )
    if getattr(algorithm, "base_decay", 0) > 0:
        raise ConfigError("algorithm.base_decay > 0 is not supported with FSDP (its start copy is unsharded)")


def check_sharded_evaluation(accelerator, evaluator) -> None:
    """Evaluation splits its prompts over processes: under FSDP each must run the same number of batches."""
    if not is_sharded(accelerator) or evaluator is None:
        return
    count, world = len(evaluator.prompts), accelerator.num_processes
    if count % world:
        raise ConfigError(
            f"with FSDP the evaluation prompts must split evenly over the {world} processes (each runs the same "
            f"number of batches): eval.prompt has {count}; use a multiple of {world}, or eval.every=0"
        )


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (a DTensor), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(value):
    """A sharded (DTensor) result as a plain tensor (a collective where it is partial), or ``value`` itself."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def prepare_sharded(model: torch.nn.Module) -> None:
    """After ``accelerator.prepare``: reshard every block after each forward pass, the root's too.

    FSDP2 keeps the root's gathered weights after a forward pass; then a shadow swapped into the
    shards (old policy, EMA) would not reach the next pass. Resharded, each pass gathers afresh."""
    model.set_reshard_after_forward(True)


def host_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of ``module`` in host memory, floating tensors in ``dtype``, copied one at a time
    (``copy.deepcopy`` would hold a second whole copy on the module's GPU)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        copy = type(module).from_config(module.config)
    state = {
        name: value.detach().to("cpu", dtype if value.is_floating_point() else value.dtype)
        for name, value in module.state_dict().items()
    }
    copy.load_state_dict(state, assign=True)
    if hasattr(module, "attn_processors"):  # the same attention (pipeline.attention) as the trained module
        copy.set_attn_processor(dict(module.attn_processors))
    return copy.requires_grad_(False).eval()


def shard_like(copy: torch.nn.Module, trained: torch.nn.Module) -> torch.nn.Module:
    """Shard a frozen copy of the trained module (the full fine-tuning reference) into the same units;
    each unit's part moves to the trained module's device as it is sharded."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    units = [name for name, module in trained.named_modules() if isinstance(module, FSDPModule) and name]
    mesh = next(trained.parameters()).device_mesh
    for name in sorted(units, key=lambda n: -n.count(".")):  # innermost first
        fully_shard(copy.get_submodule(name), mesh=mesh, reshard_after_forward=True)
    fully_shard(copy, mesh=mesh, reshard_after_forward=True)
    return copy


@dataclass
class FullWeights:
    """The gathered weights the main process writes: the trained module's state dict, and each shadow's
    tensors by file name (``DDPOPipeline.shadow_files``)."""

    trained: dict[str, torch.Tensor]
    shadows: dict[str, dict[str, torch.Tensor]]


def gather_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Full copies in host memory of (sharded) tensors, one at a time; kept only where ``keep``."""
    gathered = {}
    for name, tensor in tensors.items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if keep:
            gathered[name] = full.detach().cpu()
        del full
    return gathered


@contextlib.contextmanager
def full_weights(accelerator, pipeline):
    """Yields whether this process writes the trained weights (the main process).

    Unsharded, nothing else happens. Under FSDP every process must enter (the gathers are
    collectives): the trained module's and the shadows' full weights are gathered into the main
    process's host memory, where ``pipeline.export`` and ``save_trained`` write them."""
    main = accelerator is None or accelerator.is_main_process
    if not is_sharded(accelerator):
        yield main
        return
    trained = accelerator.get_state_dict(pipeline.trainable_module())  # full on the main process, empty elsewhere
    shadows = {name: gather_tensors(weights.tensors, main) for weights, name, _ in pipeline.shadow_files()}
    pipeline.full_weights = FullWeights(trained, shadows) if main else None
    try:
        yield main
    finally:
        pipeline.full_weights = None


def unsharded_module(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module of the sharded ``module``'s own class and config holding ``state`` (its gathered weights),
    for ``save_pretrained``: built with empty weights, then given the gathered tensors (no second copy)."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    cls = next(base for base in type(module).__bases__ if base is not FSDPModule)  # FSDP2's FSDP<class>
    with init_empty_weights():
        twin = cls.from_config(module.config)
    twin.load_state_dict(state, assign=True)
    return twin
