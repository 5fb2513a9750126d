"""Flow-GRPO on Stable Diffusion 3 components from diffusers: rectified flow sampled with an SDE.

SD3's transformer predicts a velocity and diffusers samples it with the Euler ODE
(``FlowMatchEulerDiscreteScheduler``), which has no log probability to optimise. Here each step of
a window of the chain is replaced by the SDE with the same marginals (``ddpo/schedulers/flow_sde.py``;
Flow-GRPO, Liu et al. 2025); the scheduler's own sigmas (its shift included) give the times. What
the sampler does, read once from ``conf/pipeline/flow_sde.yaml``:

- ``num_steps`` steps for training rollouts, ``eval_num_steps`` for evaluation, which samples with
  the ODE (Flow-GRPO trains with 10 steps and evaluates with 40; its evaluation sets the noise to 0);
- ``noise_level`` a and ``sigma_schedule``: sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO) or a (DanceGRPO);
- ``sde_window`` [start, end): only these steps are stochastic and stored as trainable transitions,
  the others are deterministic Euler steps (MixGRPO, Flow-GRPO-Fast); null = every step;
- guidance as in diffusers' ``StableDiffusion3Pipeline``: the negative is the empty prompt encoded, and
  a scale of 1 or less runs no unconditional pass at all; ``train_cfg`` scores transitions the same way.

Conditioning is diffusers' own ``encode_prompt``: both CLIP encoders' penultimate hidden states side
by side, padded to the T5 width and followed by T5's (zeros when the model was loaded without T5,
``model.drop_t5``), and the two pooled projections. Only the transformer is trained: LoRA on its
joint-attention projections (image and text streams, Flow-GRPO's targets) or all of it. Export:
``StableDiffusion3Pipeline.save_lora_weights`` with the adapter's config (rank and alpha), which
``load_lora_weights`` reads; a full fine-tune is ``transformer/`` (``from_pretrained``).
"""

import contextlib
import os

import torch

from ddpo.errors import ConfigError
from ddpo.pipelines.base import (
    DenoiserPipeline,
    Rollout,
    check_window,
    forward_seeds,
    initial_generator,
)
from ddpo.schedulers.ddim import draw_noise
from ddpo.schedulers.flow_sde import SIGMA_SCHEDULES, flow_noise_scale, flow_ode_step, flow_sde_step
from ddpo.schedulers.forward import FlowProcess

# samplers of FINAL rollouts (forward-process algorithms): the Euler ODE (diffusers' sampler), or the SDE
SAMPLERS = ("euler", "sde")

# the attention projections of both streams of SD3's joint blocks (Flow-GRPO's LoRA targets); the
# "attn." prefix keeps SD3.5's second, image-only attention (attn2) out, as Flow-GRPO does
LORA_TARGET_MODULES = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]


class _Schedule:
    """One sampling schedule (a number of steps) as per-device tables: no host sync inside the loop."""

    def __init__(
        self, scheduler, num_steps: int, device, noise_level: float, sigma_schedule: str, mu=None, sigmas=None
    ):
        kwargs = {"mu": mu} if mu is not None else {}
        if sigmas is not None:  # the family's own sigmas before the shift (FLUX: linspace(1, 1 / n, n))
            kwargs["sigmas"] = sigmas
        scheduler.set_timesteps(None if sigmas is not None else num_steps, device="cpu", **kwargs)
        sigmas = scheduler.sigmas.detach().to(torch.float32)  # num_steps + 1 values, the last 0
        self.num_steps = num_steps
        self.sigmas = sigmas.to(device)
        self.timesteps = scheduler.timesteps.detach().to(device, torch.float32)  # sigma x 1000: the model's input
        scales = flow_noise_scale(sigmas[:-1], sigmas[1:], noise_level, sigma_schedule)
        self.noise_scales = scales.to(device)


class FlowMatchingDDPOPipeline(DenoiserPipeline):
    """Wraps a diffusers ``StableDiffusion3Pipeline``; its Euler ODE steps become SDE steps with log probabilities.

    Frozen modules are cast to the mixed-precision dtype; trainable weights stay in float32 and the
    forward passes run under autocast; the step and its log probability are computed in float32.
    """

    accepts = ("StableDiffusion3Pipeline",)
    option = "flow_sde"
    trained_folder, trained_class = "transformer", "SD3Transformer2DModel"
    CONDITIONING_KEYS = ("prompt_embeds", "pooled_prompt_embeds")
    lora_targets = LORA_TARGET_MODULES

    def __init__(
        self,
        components,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: float | None = None,
        mixed_precision: str = "no",
        device: str | torch.device = "cpu",
        resolution: int | None = None,
        num_steps: int = 10,
        eval_num_steps: int | None = None,
        noise_level: float = 0.7,
        sigma_schedule: str = "flow_grpo",
        sde_window: list[int] | tuple[int, int] | None = None,
        guidance_scale: float = 4.5,
        train_cfg: bool = True,
        max_sequence_length: int = 256,
        gradient_checkpointing: bool = False,
        compile_transformer: bool = False,
        sampler: str = "euler",
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ddpo.pipelines.fit import mismatch, model_class

        why = mismatch(type(self), model_class(components))
        if why is not None:
            raise ConfigError(f"the model {why}")
        if not noise_level > 0:  # NaN included
            raise ConfigError(
                f"pipeline.noise_level must be > 0 (got {noise_level}): with no noise the flow is the "
                "deterministic ODE and a transition has no log probability to optimise"
            )
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ConfigError(
                f"pipeline.sigma_schedule must be one of {', '.join(SIGMA_SCHEDULES)} (got {sigma_schedule!r})"
            )
        if sampler not in SAMPLERS:
            raise ConfigError(f"pipeline.sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")
        self.sampler = sampler
        self.forward_process = FlowProcess()
        eval_num_steps = eval_num_steps or num_steps
        if num_steps <= 0 or eval_num_steps <= 0:
            raise ConfigError(f"the number of steps must be > 0 (got {num_steps} and eval_num_steps {eval_num_steps})")
        if not 0 < max_sequence_length <= 512:
            raise ConfigError(f"pipeline.max_sequence_length must be in 1..512 (got {max_sequence_length})")
        window = check_window(sde_window, num_steps, "pipeline.sde_window", "makes every step stochastic")
        self.window = window or (0, num_steps)
        self.num_steps, self.eval_num_steps = num_steps, eval_num_steps
        self.noise_level, self.sigma_schedule = noise_level, sigma_schedule
        self.guidance_scale = guidance_scale
        self.sample_cfg = guidance_scale > 1.0  # diffusers' SD3 pipeline guides only above 1
        self.train_cfg = train_cfg and self.sample_cfg
        self.max_sequence_length = max_sequence_length

        self.sd = components
        self.transformer = components.transformer
        self.vae = components.vae
        self.text_encoders = self.text_encoders_of(components)
        self.set_placement(device, use_lora, mixed_precision)
        if resolution is not None and (resolution <= 0 or resolution % (self.vae_scale_factor * self.patch_size)):
            raise ConfigError(
                f"model.resolution must be a positive multiple of {self.vae_scale_factor * self.patch_size} "
                f"(the VAE's downsampling x the transformer's patch size; got {resolution})"
            )
        self.resolution = resolution or self.transformer.config.sample_size * self.vae_scale_factor

        lora = {"rank": lora_rank, "alpha": lora_alpha or lora_rank, "targets": self.lora_targets} if use_lora else None
        self.set_up_weights(
            self.transformer, [self.vae, *self.text_encoders], lora=lora, gradient_checkpointing=gradient_checkpointing
        )
        self.compile_denoiser = compile_transformer
        self._denoiser = torch.compile(self.transformer) if compile_transformer else self.transformer
        self._reference = None  # full fine-tuning with KL: a frozen copy of the transformer before training
        self._negative = None
        self._evaluating = False

        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(components.scheduler.config)
        self._train_schedule = self._schedule(num_steps)
        self._eval_schedule = self._schedule(eval_num_steps) if eval_num_steps != num_steps else self._train_schedule

    # -- what a flow family defines (FLUX overrides these: ddpo/pipelines/flux.py) ----------------
    @staticmethod
    def text_encoders_of(components) -> list:
        encoders = (components.text_encoder, components.text_encoder_2, components.text_encoder_3)
        return [e for e in encoders if e is not None]

    def _schedule(self, num_steps: int) -> "_Schedule":
        """The sampling schedule of ``num_steps`` steps: the scheduler's own sigmas, shifted as diffusers' SD3 pipeline does."""
        mu = self._dynamic_shift()
        return _Schedule(self.scheduler, num_steps, self.device, self.noise_level, self.sigma_schedule, mu)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """The shape of a batch of latents as the chain keeps them (B, C, H, W): the VAE's layout."""
        size = self.resolution // self.vae_scale_factor
        return (batch, self.latent_channels, size, size)

    def _dynamic_shift(self) -> float | None:
        """The resolution-dependent shift ``mu``, as diffusers' SD3 pipeline computes it, if the scheduler uses one."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        side = self.resolution // self.vae_scale_factor // self.patch_size
        return calculate_shift(
            side * side,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )

    # -- structure -------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def stored_steps(self) -> int:
        start, end = self.window
        return end - start

    def trainable_module(self) -> torch.nn.Module:
        return self.transformer

    @contextlib.contextmanager
    def evaluation(self):
        """Evaluation samples with the ODE (no noise) and ``eval_num_steps`` steps, as Flow-GRPO evaluates."""
        previous, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = previous

    # -- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.sd.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled = self._encode(prompts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def negative_conditioning(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds, pooled_prompt_embeds) of the empty prompt: diffusers' SD3 negative by default."""
        if self._negative is None:
            self._negative = self._encode([""])
        embeds, pooled = self._negative
        return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    # -- the policy --------------------------------------------------------------------------
    def denoiser_inputs(self, latents, timesteps, conditioning, cfg: bool) -> dict:
        """The transformer's keyword arguments for a batch (negatives first with CFG, latents doubled)."""
        embeds = conditioning["prompt_embeds"]
        pooled = conditioning["pooled_prompt_embeds"]
        if cfg:
            negative, negative_pooled = self.negative_conditioning(len(embeds))
            embeds = torch.cat([negative, embeds])
            pooled = torch.cat([negative_pooled, pooled])
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
        return {
            "hidden_states": latents,
            "timestep": timesteps,
            "encoder_hidden_states": embeds,
            "pooled_projections": pooled,
        }

    def unpacked(self, output: torch.Tensor) -> torch.Tensor:
        """The denoiser's output in the chain's latent layout (SD3's transformer already returns it)."""
        return output

    def _velocity(self, latents, timesteps, conditioning, cfg: bool) -> torch.Tensor:
        inputs = self.denoiser_inputs(latents, timesteps, conditioning, cfg)
        with self._autocast():
            output = self._denoiser(**inputs, return_dict=False)[0]
        output = self.unpacked(output.float())
        if not cfg:
            return output
        uncond, cond = output.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, conditioning, generator, shared_generator=None, branch_steps=None) -> Rollout:
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        evaluating = self._evaluating
        schedule = self._eval_schedule if evaluating else self._train_schedule
        start, end = (0, 0) if evaluating else self.window
        shape = self.latent_shape(batch)
        # t = 1: pure noise
        latents = draw_noise(
            shape, initial_generator(generator, shared_generator, branch_steps), self.device, torch.float32
        )
        if branch_steps is not None:  # TempFlow-GRPO's branching: the ODE everywhere but the branch step
            return self._sample_branched(conditioning, latents, schedule, generator, branch_steps)
        stored = {"latents": [], "next_latents": [], "log_probs": []}
        for i in range(schedule.num_steps):
            t, t_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            velocity = self._velocity(latents, schedule.timesteps[i].expand(batch), conditioning, self.sample_cfg)
            if start <= i < end:
                following, log_prob, _, _ = flow_sde_step(
                    velocity, latents, t, t_next, schedule.noise_scales[i], generator=generator
                )
                stored["latents"].append(latents)
                stored["next_latents"].append(following)
                stored["log_probs"].append(log_prob)
            else:
                following = flow_ode_step(velocity, latents, t, t_next)
            latents = following
        steps = {
            "step_index": torch.arange(start, end, device=self.device).expand(batch, -1).clone(),
            **{
                key: torch.stack(values, dim=1)
                if values
                else torch.zeros((batch, 0, *(shape[1:] if key != "log_probs" else ())), device=self.device)
                for key, values in stored.items()
            },
        }
        return Rollout(conditioning=conditioning, steps=steps, images=self.decode(latents))

    def _sample_branched(self, conditioning, latents, schedule, generator, branch_steps) -> Rollout:
        """Each chain takes the SDE at its branch step and the deterministic ODE at every other, so
        a group (same initial noise) agrees up to its branch step and parts there; that step's
        transition is the only one stored."""
        batch = latents.shape[0]
        before, after = torch.empty_like(latents), torch.empty_like(latents)  # each chain's branch transition
        log_probs = torch.empty(batch, device=self.device)
        for i in range(schedule.num_steps):
            t, t_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            velocity = self._velocity(latents, schedule.timesteps[i].expand(batch), conditioning, self.sample_cfg)
            following = flow_ode_step(velocity, latents, t, t_next)
            rows = [j for j, k in enumerate(branch_steps) if k == i]  # from the host list: no device sync
            if rows:
                branched, log_probs[rows], _, _ = flow_sde_step(
                    velocity[rows],
                    latents[rows],
                    t,
                    t_next,
                    schedule.noise_scales[i],
                    generator=[generator[j] for j in rows],
                )
                before[rows], after[rows] = latents[rows], branched
                following[rows] = branched
            latents = following
        steps = {
            "step_index": torch.as_tensor(branch_steps, device=self.device).unsqueeze(1),
            "latents": before.unsqueeze(1),
            "next_latents": after.unsqueeze(1),
            "log_probs": log_probs.unsqueeze(1),
        }
        return Rollout(conditioning=conditioning, steps=steps, images=self.decode(latents))

    @torch.no_grad()
    def sample_final(self, conditioning, generator) -> Rollout:
        """``pipeline.sampler`` (the Euler ODE, or the SDE at every step) on the training schedule; only x0
        and the conditioning kept."""
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        schedule = self._train_schedule
        latents = draw_noise(self.latent_shape(batch), generator, self.device, torch.float32)
        for i in range(schedule.num_steps):
            t, t_next = schedule.sigmas[i], schedule.sigmas[i + 1]
            velocity = self._velocity(latents, schedule.timesteps[i].expand(batch), conditioning, self.sample_cfg)
            if self.sampler == "sde":
                latents = flow_sde_step(velocity, latents, t, t_next, schedule.noise_scales[i], generator=generator)[0]
            else:
                latents = flow_ode_step(velocity, latents, t, t_next)
        steps = {"step_index": torch.arange(schedule.num_steps, device=self.device).expand(batch, -1).clone()}
        seeds = forward_seeds(generator).to(self.device)
        return Rollout({**conditioning, "x0": latents, "forward_seed": seeds}, steps, images=self.decode(latents))

    # -- the chain, step by step (the differentiable tail: DenoiserPipeline.sample_with_grad) ---------
    def chain_start(self, conditioning, generator):
        """The chain ``sample`` draws (the training schedule: the SDE inside ``sde_window``, the ODE outside)."""
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        shape = self.latent_shape(batch)
        return conditioning, draw_noise(shape, generator, self.device, torch.float32), self._train_schedule.num_steps

    def chain_output(self, i: int, latents, conditioning):
        timesteps = self._train_schedule.timesteps[i].expand(latents.shape[0])
        return self._velocity(latents, timesteps, conditioning, self.sample_cfg)

    def chain_step(self, i: int, output, latents, generator):
        schedule, (start, end) = self._train_schedule, self.window
        t, t_next = schedule.sigmas[i], schedule.sigmas[i + 1]
        if start <= i < end:
            return flow_sde_step(output, latents, t, t_next, schedule.noise_scales[i], generator=generator)[0]
        return flow_ode_step(output, latents, t, t_next)

    def forward_times(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training schedule's sigmas (its shift included; the sampler's steps) and the model's timesteps."""
        schedule = self._train_schedule
        return schedule.sigmas[:-1], schedule.timesteps

    def network_output(self, x_t, timesteps, conditioning) -> torch.Tensor:
        return self._velocity(x_t, timesteps, conditioning, cfg=False)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        latents = latents.float() / config.scaling_factor + (config.get("shift_factor") or 0.0)
        with self._autocast():
            images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def log_prob(self, transitions):
        schedule = self._train_schedule
        index = transitions["step_index"]
        latents = transitions["latents"]
        velocity = self._velocity(latents, schedule.timesteps[index], transitions, self.train_cfg)
        _, log_prob, mean, std = flow_sde_step(
            velocity,
            latents,
            schedule.sigmas[index],
            schedule.sigmas[index + 1],
            schedule.noise_scales[index],
            prev_sample=transitions["next_latents"],
        )
        return log_prob, mean, std

    # -- export ------------------------------------------------------------------------------
    def export(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        if self.use_lora:
            from diffusers import StableDiffusion3Pipeline
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(self.transformer)
            # the adapter's config travels with the weights: load_lora_weights then uses this alpha, not alpha = rank
            metadata = self.transformer.peft_config["default"].to_dict()
            StableDiffusion3Pipeline.save_lora_weights(
                directory,
                transformer_lora_layers=layers,
                transformer_lora_adapter_metadata=metadata,
                safe_serialization=True,
            )
            return [os.path.join(directory, "pytorch_lora_weights.safetensors")]
        return self.export_full(directory)
