"""Copies of the trained weights beside the trained ones: an old policy, or an EMA for evaluation.

``ShadowWeights`` keeps one float32 tensor per trained parameter and can stand in for the trained
weights for a while (``swapped``): parameters' storage is exchanged, nothing is copied, and the
autograd graph of the trained weights is untouched. One mechanism serves LoRA (the copy is as small
as the adapter, like DiffusionNFT's second adapter) and full fine-tuning (a copy of the module's
trained weights), in every family, with no adapter switching (peft's ``set_adapter`` also changes
which parameters require gradients).
"""

from __future__ import annotations

import contextlib

import torch


class ShadowWeights:
    """theta_shadow, moved towards the trained theta by ``blend``: theta_shadow <- d theta_shadow + (1 - d) theta."""

    def __init__(self, named_parameters: dict[str, torch.nn.Parameter]):
        self.parameters = named_parameters
        with torch.no_grad():
            # at least float32 (bf16 trained weights would round every small blend away)
            self.tensors = {
                name: p.detach().clone().to(torch.promote_types(p.dtype, torch.float32))
                for name, p in named_parameters.items()
            }

    @torch.no_grad()
    def blend(self, decay: float) -> None:
        for name, p in self.parameters.items():
            self.tensors[name].mul_(decay).add_(p.detach().to(self.tensors[name].dtype), alpha=1 - decay)

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2's shards (DTensors); then the shadow is sharded alike."""
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.parameters.values())

    @contextlib.contextmanager
    def swapped(self):
        """Within this context the parameters hold the shadow weights (in the parameters' dtype)."""
        if self.sharded:
            with self._copied_in():
                yield
            return
        saved = {}
        with torch.no_grad():
            for name, p in self.parameters.items():
                saved[name] = p.data
                p.data = self.tensors[name].to(p.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    p.data = saved[name]

    @contextlib.contextmanager
    def _copied_in(self):
        """``swapped`` for FSDP2's shards: FSDP gathers each pass's weights from its own buffer, which the
        shards' storage is, so the shadow is copied into it (and the trained shards back afterwards)."""
        from ddpo.sharding import local

        with torch.no_grad():
            saved = {name: local(p).clone() for name, p in self.parameters.items()}
            for name, p in self.parameters.items():
                local(p).copy_(local(self.tensors[name]))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.parameters.items():
                    local(p).copy_(saved[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.tensors):
            missing, unexpected = sorted(set(self.tensors) - set(state)), sorted(set(state) - set(self.tensors))
            raise ValueError(f"the saved weights do not match (missing {missing[:2]}, unexpected {unexpected[:2]})")
        with torch.no_grad():
            for name, value in state.items():
                if value.shape != self.tensors[name].shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)}, expected {tuple(self.tensors[name].shape)}")
                target = self.tensors[name]
                if hasattr(target, "device_mesh"):  # sharded: this process's part of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    # every process read the whole file: each keeps its own part, no communication
                    placed = distribute_tensor(
                        value.to(target.device), target.device_mesh, target.placements, src_data_rank=None
                    )
                    value, target = placed.to_local(), target.to_local()
                target.copy_(value)


def ema_decay(decay: float, step: int) -> float:
    """The EMA's decay after optimizer step ``step`` (1, 2, ...): min((1 + n) / (10 + n), decay).

    The warm-up of the EMA that DiffusionNFT and Flow-GRPO keep for evaluation (flow_grpo/ema.py,
    ``get_current_decay``): early steps move it most, so it does not stay at the base weights.
    """
    return min((1 + step) / (10 + step), decay)


class EMAWeights(ShadowWeights):
    """An exponential moving average of the trained weights, updated after every optimizer step."""

    def __init__(self, named_parameters: dict[str, torch.nn.Parameter], decay: float, every: int = 1):
        super().__init__(named_parameters)
        self.decay, self.every = decay, every

    def step(self, global_step: int) -> None:
        """After optimizer step ``global_step``: blend every ``every``-th step (Flow-GRPO: every 8th)."""
        if global_step % self.every == 0:
            self.blend(ema_decay(self.decay, global_step))
