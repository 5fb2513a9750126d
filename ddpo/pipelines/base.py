"""The interface the training loop needs from a diffusion model.

A new model family (SDXL, SD3, ...) is a new subclass of ``DDPOPipeline`` plus a YAML file in
``conf/pipeline/``; the loop does not change.
"""

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ddpo.errors import ConfigError, WeightsMismatch
from ddpo.schedulers.ddim import draw_noise

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # the trained tensors under their own names
OLD_POLICY_FILE = "old_policy.safetensors"  # the old policy's weights (forward-process algorithms), by the same names
EMA_FILE = "ema.safetensors"  # the EMA of the trained weights (train.ema_decay > 0), by the same names
# the kinds of rollout an algorithm asks for (Algorithm.rollout); a differentiable one is sampled inside the loss
TRANSITIONS, FINAL, DIFFERENTIABLE = "transitions", "final", "differentiable"
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # mixed_precision -> frozen dtype


def check_window(window, num_steps: int, key: str, null_means: str) -> tuple[int, int] | None:
    """``window`` ([start, end) step indices, or None) as a tuple; a window outside the chain is one ConfigError."""
    if window is None:
        return None
    window = tuple(int(i) for i in window)
    if len(window) != 2 or not 0 <= window[0] < window[1] <= num_steps:
        raise ConfigError(
            f"{key} must be [start, end) with 0 <= start < end <= num_steps={num_steps} "
            f"(got {list(window)}); null {null_means}"
        )
    return window


def forward_seeds(generator: list[torch.Generator]) -> torch.Tensor:
    """One seed per sample for its forward-process noise, drawn from its own sampling generator (after sampling)."""
    return torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) for g in generator])


def initial_generator(generator, shared_generator, branch_steps):
    """The generators of the initial latents: the shared ones if given (a group's common noise),
    else each sample's own; branched chains need the shared ones for every step but one."""
    if branch_steps is not None and shared_generator is None:
        raise ValueError("branched chains need a shared generator per sample")
    return shared_generator or generator


@dataclass
class Rollout:
    """Sampled images and the denoising chains that produced them, in tensors the pipeline names.

    ``conditioning`` holds per-sample tensors (B, ...) (text embeddings, pooled embeddings, time ids:
    whatever the family needs to score a transition again); ``steps`` holds per-sample, per-step
    tensors (B, T, ...), among them ``log_probs`` (B, T), float32: the log probability of each
    transition under the sampling policy. The loop moves, shuffles and gathers these without knowing
    what they are; ``transitions`` flattens a choice of (sample, step) pairs into what ``log_prob``
    reads.

    A rollout of final samples (``FINAL``: forward-process algorithms) stores nothing per step but an
    index: ``conditioning`` holds the clean latents (``x0``) beside the text conditioning, and
    ``steps`` only ``step_index`` (B, T), the forward process's T training timesteps of each sample,
    and ``forward_seed`` (B,) seeds the noise each sample is trained with (``forward_noise``).
    """

    conditioning: dict[str, torch.Tensor]
    steps: dict[str, torch.Tensor]
    images: torch.Tensor  # (B, 3, H, W), float32 in [0, 1]

    @property
    def log_probs(self) -> torch.Tensor:
        return self.steps["log_probs"]

    @property
    def num_steps(self) -> int:
        """Trainable steps per sample: stored transitions, or the forward process's timesteps (final samples)."""
        return next(iter(self.steps.values())).shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    @staticmethod
    def cat(rollouts: list["Rollout"]) -> "Rollout":
        first = rollouts[0]
        return Rollout(
            conditioning={k: torch.cat([r.conditioning[k] for r in rollouts]) for k in first.conditioning},
            steps={k: torch.cat([r.steps[k] for r in rollouts]) for k in first.steps},
            images=torch.cat([r.images for r in rollouts]),
        )

    def transitions(self, rows: torch.Tensor, steps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transitions (rows[i], steps[i, j]) flattened into one batch of B * k rows."""
        k = steps.shape[1]
        batch = {name: value[rows].repeat_interleave(k, dim=0) for name, value in self.conditioning.items()}
        batch.update({name: value[rows[:, None], steps].flatten(0, 1) for name, value in self.steps.items()})
        return batch


class DDPOPipeline(ABC):
    """Sampling with log probabilities, log-prob recomputation with gradients, trained weights.

    A pipeline reads its sampler settings (steps, noise, guidance, guidance while training) once,
    in its constructor, and checks them there.
    """

    # the diffusers pipeline classes (of the model group) this class runs; None: not checked (ddpo/pipelines/fit.py)
    accepts: tuple[str, ...] | None = None
    option: str | None = None  # the conf/pipeline option that selects this class, named in mismatch errors

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-sample conditioning of a batch of prompts (no gradients)."""

    @abstractmethod
    def sample(
        self,
        conditioning: dict[str, torch.Tensor],
        generator: list[torch.Generator],
        shared_generator: list[torch.Generator] | None = None,
        branch_steps: list[int] | None = None,
    ) -> Rollout:
        """Sample images and record every transition with its log probability (no gradients).

        ``generator`` holds one generator per sample: each sample's initial latent and step noise
        come from its own generator, whatever batch it is drawn in.

        ``shared_generator`` (one per sample; the samples of a group hold generators seeded alike):
        the initial latents come from it and ``generator`` gives only the step noise, so a group
        shares its initial noise and still differs in every step. With ``branch_steps`` as well (a
        step index per sample, the same within a group), every step's noise except the branch
        step's comes from ``shared_generator`` too: a group's chains agree up to their branch step
        and part there, and only the branch step's transition is stored (``supports_branching``).
        """

    @abstractmethod
    def log_prob(self, transitions: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log prob (N,), Gaussian mean (N, ...), std (N,)) of stored transitions, with gradients.

        ``transitions`` is what ``Rollout.transitions`` returns: one row per transition, which may
        come from different steps of the chain. The policy is evaluated exactly as in sampling.
        """

    def fill(self, kind: str, conditioning, generator, **noise) -> Rollout:
        """The rollout an algorithm asks for: ``TRANSITIONS`` (``sample``) or ``FINAL`` (``sample_final``)."""
        if kind == FINAL:
            return self.sample_final(conditioning, generator)
        return self.sample(conditioning, generator, **noise)

    def sample_final(self, conditioning: dict[str, torch.Tensor], generator: list[torch.Generator]) -> Rollout:
        """Sample with the collection sampler (``pipeline.sampler``: any, no log probabilities) and keep
        the clean latents and the conditioning only (a ``FINAL`` rollout)."""
        raise NotImplementedError(f"{type(self).__name__} has no forward process (forward-process algorithms)")

    # -- the differentiable tail (reward-gradient algorithms: DRaFT, AlignProp) ----------------------
    def sample_with_grad(self, conditioning, generator, grad_steps: int, draws: int = 1, checkpoint: bool = True):
        """Images whose graph reaches the trained weights through the chain's last ``grad_steps`` steps
        and the decode (``DifferentiableSample``); see ``DenoiserPipeline.sample_with_grad``."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample with gradients (reward-gradient algorithms)")

    # -- the forward process (forward-process algorithms: DiffusionNFT, AWM) --------------------------
    forward_process = None  # ddpo.schedulers.forward: EpsilonProcess or FlowProcess

    def forward_times(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the forward process's times, the network's timesteps) of the training steps, indexed by ``step_index``."""
        raise NotImplementedError(f"{type(self).__name__} has no forward process")

    def network_output(self, x_t: torch.Tensor, timesteps: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's raw output (epsilon, v or velocity) at (x_t, t), with gradients, without guidance."""
        raise NotImplementedError(f"{type(self).__name__} has no forward process")

    def forward_noise(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The noise of a forward-process training batch: a function of each sample's ``forward_seed``
        (drawn from its sampling generator) and the training step, so that the same samples get the
        same noise in any batch and on any number of processes (and again after a resume)."""
        x0, seeds = batch["x0"], batch.get("forward_seed")
        if seeds is None:
            return torch.randn_like(x0)
        from ddpo.seeds import derived_seed

        pairs = zip(seeds.tolist(), batch["step_index"].tolist())
        generators = [torch.Generator().manual_seed(derived_seed(seed, step)) for seed, step in pairs]
        return draw_noise(x0.shape, generators, x0.device, x0.dtype)

    def noised(self, x0: torch.Tensor, step_index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t of clean latents ``x0`` at training steps ``step_index`` with ``noise``."""
        times, _ = self.forward_times()
        return self.forward_process.noise(x0.float(), noise.float(), times[step_index])

    def loss_scale(self, step_index: torch.Tensor) -> torch.Tensor:
        """Per row: the factor that makes an x0-space loss normalised by its own mean error (DiffusionNFT's
        adaptive weight) the same loss in the family's training space. 1: x0 space (flow matching, as
        DiffusionNFT trains SD3); an epsilon model's x0 error is its epsilon error times sigma/alpha
        (about 15 at SD's top timestep, 0.03 at its last), which this factor divides out."""
        return torch.ones(step_index.shape, device=step_index.device)

    def predict_output(self, x_t: torch.Tensor, step_index: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The network output (epsilon, v or velocity) of the policy in effect at (x_t, step), float32."""
        _, timesteps = self.forward_times()
        return self.network_output(x_t, timesteps[step_index], conditioning).float()

    def x0_from_output(self, output: torch.Tensor, x_t: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """The clean latent a network output implies at (x_t, step): affine in the output."""
        times, _ = self.forward_times()
        return self.forward_process.x0(output, x_t, times[step_index])

    def predict_x0(self, x_t: torch.Tensor, step_index: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The clean latent the policy in effect (trained, ``old_policy()``, ``reference()``) predicts from x_t."""
        return self.x0_from_output(self.predict_output(x_t, step_index, conditioning), x_t, step_index)

    def output_target(self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t = noised(x0, step_index, noise): epsilon, v or velocity."""
        times, _ = self.forward_times()
        return self.forward_process.target(x0.float(), noise.float(), times[step_index])

    def noise_coefficient(self, step_index: torch.Tensor) -> torch.Tensor:
        """Per row, the weight of the noise in x_t, in (0, 1]: sigma (flow matching), sqrt(1 - alpha_bar) (DDPM)."""
        times, _ = self.forward_times()
        return self.forward_process.noise_coefficient(times[step_index])

    # -- the old policy (a slowly moving copy of the trained weights) --------------------------------
    _old_policy = None

    def keep_old_policy(self) -> None:
        """Called before training when the algorithm keeps an old policy: it starts as the trained weights."""
        from ddpo.policies import ShadowWeights

        if self._old_policy is None:
            named = self.trainable_module().named_parameters()
            self._old_policy = ShadowWeights({name: p for name, p in named if p.requires_grad})

    @contextlib.contextmanager
    def old_policy(self):
        """Within this context the pipeline is the old policy."""
        if self._old_policy is None:
            raise RuntimeError("keep_old_policy() was not called before training")
        with self._old_policy.swapped():
            yield

    def update_old_policy(self, decay: float) -> None:
        """theta_old <- decay theta_old + (1 - decay) theta."""
        self._old_policy.blend(decay)

    # -- the EMA of the trained weights (train.ema_decay): what evaluation samples and final/ holds -------
    _ema = None

    def keep_ema(self, decay: float, every: int = 1) -> None:
        """Called before training when ``train.ema_decay > 0``: the EMA starts as the trained weights."""
        from ddpo.policies import EMAWeights

        if self._ema is None:
            named = self.trainable_module().named_parameters()
            self._ema = EMAWeights({name: p for name, p in named if p.requires_grad}, decay, every)

    def update_ema(self, global_step: int) -> None:
        """After optimizer step ``global_step``: theta_ema <- d theta_ema + (1 - d) theta (no EMA: nothing)."""
        if self._ema is not None:
            self._ema.step(global_step)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within this context the pipeline holds the EMA weights (the trained ones when there is no EMA)."""
        if self._ema is None:
            yield
            return
        with self._ema.swapped():
            yield

    def shadow_files(self) -> list[tuple[object, str, str]]:
        """The copies beside the trained weights a checkpoint holds: (weights, file name, why it is kept)."""
        kept = [
            (self._old_policy, OLD_POLICY_FILE, "the algorithm keeps an old policy"),
            (self._ema, EMA_FILE, "train.ema_decay > 0"),
        ]
        return [entry for entry in kept if entry[0] is not None]

    @contextlib.contextmanager
    def reference(self):
        """Within this context the pipeline is the reference policy (the model before training)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference model")
        yield

    def keep_reference(self) -> None:
        """Called before training when the algorithm will ask for the reference policy."""

    @property
    def max_num_steps(self) -> int | None:
        """The most denoising steps the scheduler can take (None: no limit)."""
        return None

    # whether sample() takes branch_steps (an algorithm that branches chains refuses other pipelines)
    supports_branching = False

    @property
    def stored_steps(self) -> int | None:
        """Transitions stored (and trainable) per sample; None: one per denoising step (``sample.num_steps``)."""
        return None

    @contextlib.contextmanager
    def evaluation(self):
        """Within this context ``sample`` draws evaluation images (a family may evaluate with another sampler)."""
        yield

    @abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters are trained (handed to accelerate.prepare)."""

    @abstractmethod
    def use_wrapped(self, wrapped: torch.nn.Module) -> None:
        """Run forward passes through ``wrapped`` (the module accelerate.prepare returned)."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.trainable_module().parameters() if p.requires_grad]

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the trained tensors, by name: what a checkpoint must hold."""
        return {name: p.detach() for name, p in self.trainable_module().named_parameters() if p.requires_grad}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy trained tensors in; WeightsMismatch (naming the config key where the weights tell it)
        when their names or shapes are not this model's."""
        params = dict(self.trainable_module().named_parameters())
        expected = {name for name, p in params.items() if p.requires_grad}
        if set(state) != expected:
            saved_lora, lora_here = any("lora_" in k for k in state), any("lora_" in k for k in expected)
            if saved_lora != lora_here:
                held = "LoRA adapters" if saved_lora else "fully fine-tuned weights"
                raise WeightsMismatch(
                    f"the trained weights are {held} but this run has use_lora={str(lora_here).lower()} "
                    f"(they were trained with use_lora={str(saved_lora).lower()})"
                )
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise WeightsMismatch(
                f"the trained weights are not this model's (missing {missing[:2]}, unexpected {unexpected[:2]}): "
                "they were trained with another model or pipeline (model=..., pipeline=...)"
            )
        for name, value in state.items():
            here = tuple(params[name].shape)
            if tuple(value.shape) == here:
                continue
            if "lora_A" in name or "lora_B" in name:
                axis = 0 if "lora_A" in name else 1  # A: (rank, in), B: (out, rank)
                raise WeightsMismatch(
                    f"the trained LoRA has rank {value.shape[axis]} but this run has lora_rank={here[axis]} "
                    f"({name}: {tuple(value.shape)} vs {here})"
                )
            raise WeightsMismatch(
                f"{name} has shape {tuple(value.shape)} in the trained weights but {here} in this model: they "
                "were trained with another model (model=...)"
            )
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    @abstractmethod
    def export(self, directory: str) -> list[str]:
        """Write the trained weights in the model family's diffusers format; return the files.

        What ``final/`` and every checkpoint hold: ``pipe.load_lora_weights(directory)`` (LoRA) or
        ``from_pretrained`` (full fine-tuning) loads it.
        """

    def read_export(self, directory: str) -> dict[str, torch.Tensor]:
        """The trained tensors by name, read back from an ``export`` (when ``export_is_exact``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot read its export back")

    @property
    def export_is_exact(self) -> bool:
        """Whether ``export`` holds exactly the trained tensors under recoverable names (full fine-tuning).

        When it does not (LoRA: diffusers renames the adapter's keys), checkpoints also keep the
        trained tensors by their own names.
        """
        return False

    # whether the trained module is sharded over processes (FSDP: ddpo/sharding.py), set by the trainer
    sharded = False
    # the gathered full weights of a sharded module (ddpo.sharding.FullWeights), set on the main process
    # while ``export`` and ``save_trained`` write them; None: the module holds its own weights
    full_weights = None

    def save_trained(self, directory: str) -> list[str]:
        """A checkpoint's weights: the diffusers export, plus the exact trained tensors if it is not exact."""
        from safetensors.torch import save_file

        files = self.export(directory)
        if not self.export_is_exact:
            path = os.path.join(directory, TRAINED_WEIGHTS_FILE)
            save_file({k: v.contiguous().cpu() for k, v in self.trained_state_dict().items()}, path)
            files.append(path)
        for weights, name, _ in self.shadow_files():
            path = os.path.join(directory, name)
            state = weights.state_dict() if self.full_weights is None else self.full_weights.shadows[name]
            save_file({k: v.contiguous().cpu() for k, v in state.items()}, path)
            files.append(path)
        return files

    def load_trained(self, directory: str) -> None:
        """Load what ``save_trained`` wrote (or a checkpoint of an older version, which always has the file)."""
        self.load_trained_weights(directory)
        self.load_shadows(directory)

    def load_trained_weights(self, directory: str) -> None:
        """The trained module's part of ``load_trained``."""
        from safetensors.torch import load_file

        path = os.path.join(directory, TRAINED_WEIGHTS_FILE)
        if not os.path.isfile(path) and not self.export_is_exact:  # this run trains LoRA adapters
            if any(os.path.isfile(os.path.join(directory, d, "config.json")) for d in os.listdir(directory)):
                raise WeightsMismatch(
                    "the trained weights are fully fine-tuned weights (a model folder, no "
                    f"{TRAINED_WEIGHTS_FILE}) but this run has use_lora=true (they were trained with use_lora=false)"
                )
            raise FileNotFoundError(f"{path} is missing")
        self.load_trained_state_dict(load_file(path) if os.path.isfile(path) else self.read_export(directory))

    def load_shadows(self, directory: str) -> None:
        """The old policy's and the EMA's part of ``load_trained`` (sharded where the trained module is)."""
        from safetensors.torch import load_file

        for weights, name, why in self.shadow_files():
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing ({why})")
            try:
                weights.load_state_dict(load_file(path))
            except ValueError as exc:
                raise WeightsMismatch(f"{path}: {exc}") from None


@dataclass
class DifferentiableSample:
    """What ``sample_with_grad`` returns: images with their graph, and the differentiated steps' outputs."""

    images: torch.Tensor  # (B * draws, 3, H, W) in [0, 1]; draws of one sample are adjacent rows
    step_outputs: list[torch.Tensor]  # the network outputs of the differentiated steps, oldest first
    grad_steps: int  # steps differentiated
    draws: int  # images per sample (DRaFT-LV's re-drawn last step; 1 otherwise)


def _checkpointed(function, *args, enabled: bool):
    """``function(*args)``, its activations recomputed in the backward pass when ``enabled``."""
    if not enabled:
        return function(*args)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False)


class LatentDenoiser:
    """What the pipelines that run a VAE and a denoiser under mixed precision share; the pipeline
    sets ``self.vae``, ``self.device`` and ``self.dtype``, and defines ``decode_with_grad``."""

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] of clean latents."""
        return self.decode_with_grad(latents)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # the dtype the chain's latents, network outputs and images are computed in: float32 (float64 in the
    # tests that check the reward's gradient against finite differences, with every module in float64)
    chain_dtype = torch.float32

    def _autocast(self):
        if self.dtype in (torch.float32, torch.float64):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # the trained module's folder in an export of full fine-tuning (``unet``, ``transformer``) and its class
    trained_folder: str = ""
    trained_class: str = ""

    def set_up_weights(self, trained, frozen: list, *, lora: dict | None, gradient_checkpointing: bool) -> None:
        """Freeze everything, cast the frozen modules (the trained module too under LoRA) to the mixed-
        precision dtype on the device; then LoRA adapters (``lora``: rank, alpha, target modules) in
        float32 on ``trained``, or all of ``trained`` in float32 and trainable."""
        for module in (trained, *frozen):
            module.requires_grad_(False)
            module.eval()
        for module in [*frozen, *([trained] if lora else [])]:
            module.to(self.device)
            if self.dtype != torch.float32:
                module.to(dtype=self.dtype)
        if lora:
            from peft import LoraConfig

            trained.add_adapter(
                LoraConfig(
                    r=lora["rank"],
                    lora_alpha=lora["alpha"],
                    init_lora_weights="gaussian",
                    target_modules=lora["targets"],
                )
            )
            for p in trained.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            trained.to(self.device).float().requires_grad_(True)
        if gradient_checkpointing:
            trained.enable_gradient_checkpointing()

    @property
    def export_is_exact(self) -> bool:
        return not self.use_lora  # the full module saved by save_pretrained: parameters under their own names

    def read_export(self, directory: str) -> dict[str, torch.Tensor]:
        if self.use_lora:
            return super().read_export(directory)
        import diffusers

        folder = os.path.join(directory, self.trained_folder)
        if not os.path.isdir(folder):  # from_pretrained would take a missing path for a Hub id
            raise FileNotFoundError(f"{folder} is missing")
        loaded = getattr(diffusers, self.trained_class).from_pretrained(folder, torch_dtype=torch.float32)
        return {name: p.detach() for name, p in loaded.named_parameters()}

    def export_full(self, directory: str) -> list[str]:
        """Full fine-tuning's export: the trained module's folder, loadable with ``from_pretrained``."""
        folder = os.path.join(directory, self.trained_folder)
        module = self.trainable_module()
        if self.full_weights is not None:  # sharded (FSDP): the gathered weights in a module of the same class
            from ddpo.sharding import unsharded_module

            module = unsharded_module(module, self.full_weights.trained)
        module.save_pretrained(folder)
        return [folder]


class DenoiserReference:
    """The reference policy of a pipeline whose trainable module (``trainable_module()``) is called
    through ``self._denoiser``: with LoRA, the same module with its adapters disabled (no second copy
    of the weights); with full fine-tuning, a frozen copy of the module made by ``keep_reference``.
    The pipeline sets ``self._reference = None``, ``self.use_lora`` and ``self.dtype``."""

    def keep_reference(self) -> None:
        if not self.use_lora and self._reference is None:  # full fine-tuning: a frozen copy of the start
            # to be sharded (FSDP): built in host memory, so that no GPU holds a second whole copy
            if getattr(self, "sharded", False):
                from ddpo.sharding import host_copy

                self._reference = host_copy(self.trainable_module(), self.dtype)
                return
            import copy

            self._reference = copy.deepcopy(self.trainable_module()).requires_grad_(False).eval().to(self.dtype)

    def shard_reference(self) -> None:
        """Under FSDP, after the trained module is sharded: shard the full fine-tuning reference into the same units."""
        if self._reference is not None:
            from ddpo.sharding import shard_like

            self._reference = shard_like(self._reference, self.trainable_module())

    @contextlib.contextmanager
    def reference(self):
        if self.use_lora:  # the same module with its adapters off: no second copy of the weights
            module = self.trainable_module()
            module.disable_adapters()
            try:
                yield
            finally:
                module.enable_adapters()
            return
        if self._reference is None:
            raise RuntimeError("keep_reference() was not called before training")
        denoiser, self._denoiser = self._denoiser, self._reference
        try:
            yield
        finally:
            self._denoiser = denoiser


class DenoiserPipeline(LatentDenoiser, DenoiserReference, DDPOPipeline):
    """The base of the families here: a VAE, text encoders and one trained denoiser (a UNet or a
    transformer) under mixed precision, with the reference and export they share. The pipeline sets
    ``self.scheduler`` and ``self.compile_denoiser`` (torch.compile the denoiser's calls)."""

    supports_branching = True
    compile_denoiser = False

    def set_placement(self, device, use_lora: bool, mixed_precision: str) -> None:
        """Where the pipeline runs, whether it trains LoRA adapters, and its frozen modules' dtype."""
        self.device = torch.device(device)
        self.use_lora = use_lora
        self.dtype = DTYPES[mixed_precision]

    @property
    def max_num_steps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    # the chain step by step, which each family defines: chain_start(conditioning, generator) ->
    # (conditioning, initial latents, steps); chain_output(i, latents, conditioning) -> the (guided)
    # network output at step i; chain_step(i, output, latents, generator) -> the next latents. ``sample``
    # draws the same chain (same noise from the same generators) without gradients.
    def sample_with_grad(self, conditioning, generator, grad_steps: int, draws: int = 1, checkpoint: bool = True):
        """The chain of ``sample`` with gradients through its last ``grad_steps`` steps and the decode
        (DRaFT-K; AlignProp draws ``grad_steps`` per batch); the steps before run without gradients.

        ``draws`` > 1 (DRaFT-LV, ``grad_steps`` = 1): the chain is finished without gradients, its clean
        latent re-noised to the last step's input ``draws`` times with fresh noise (from each sample's
        generator), and the last step differentiated from each. ``checkpoint``: the denoiser calls and
        the decode keep no activations; the backward pass recomputes them (memory for compute).
        """
        conditioning, latents, num_steps = self.chain_start(conditioning, generator)
        if not 1 <= grad_steps <= num_steps:
            raise ConfigError(
                f"the reward gradient must pass through 1 to {num_steps} sampling steps (got {grad_steps}): "
                "with 0 nothing reaches the trained weights"
            )
        if draws > 1 and grad_steps != 1:
            raise ConfigError(f"re-drawing the last step (DRaFT-LV, {draws} draws) differentiates one step only")
        first = num_steps - grad_steps
        with torch.no_grad():
            for i in range(first if draws == 1 else num_steps):
                latents = self.chain_step(i, self.chain_output(i, latents, conditioning), latents, generator)
        if draws > 1:
            latents, conditioning, generator = self._redrawn_last_input(latents, conditioning, generator, draws)
        outputs = []
        for i in range(first, num_steps):
            output = _checkpointed(self.chain_output, i, latents, conditioning, enabled=checkpoint)
            outputs.append(output)
            latents = self.chain_step(i, output, latents, generator)
        images = _checkpointed(self.decode_with_grad, latents, enabled=checkpoint)
        return DifferentiableSample(images, outputs, grad_steps, draws)

    def _redrawn_last_input(self, x0, conditioning, generator, draws: int):
        """``draws`` re-noisings of each clean latent to the last step's input, sample-major, with the
        conditioning and generators repeated to match (each sample's noise from its own generator)."""
        times, _ = self.forward_times()
        rows = x0.shape[0] * draws
        repeated = [g for g in generator for _ in range(draws)]
        noise = draw_noise((rows, *x0.shape[1:]), repeated, self.device, torch.float32)
        x0 = x0.repeat_interleave(draws, dim=0)
        latents = self.forward_process.noise(x0.float(), noise, times[-1].expand(rows)).float()
        conditioning = {key: value.repeat_interleave(draws, dim=0) for key, value in conditioning.items()}
        return latents, conditioning, repeated

    def use_wrapped(self, wrapped: torch.nn.Module) -> None:
        self._denoiser = torch.compile(wrapped) if self.compile_denoiser else wrapped
