"""DDPO on Stable Diffusion 1.x / 2.x components from diffusers (epsilon or v-prediction)."""

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
from ddpo.schedulers.ddim import ddim_step_with_logprob, draw_noise
from ddpo.schedulers.forward import EpsilonProcess

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# samplers of FINAL rollouts (forward-process algorithms: no log probabilities needed, any sampler collects)
SAMPLERS = {
    "ddim": ("DDIMScheduler", {}),  # deterministic DDIM (eta 0)
    "dpm_solver": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2},
    ),  # DPM-Solver++(2M)
}


class StableDiffusionDDPOPipeline(DenoiserPipeline):
    """Wraps a diffusers ``StableDiffusionPipeline``; the scheduler is replaced by DDIM.

    Only the UNet is trained: its LoRA adapters (``use_lora``) or all of its weights. Frozen
    modules are cast to the mixed-precision dtype; trainable weights stay in float32 and the
    forward passes run under autocast.
    """

    accepts = ("StableDiffusionPipeline",)
    option = "ddim"
    trained_folder, trained_class = "unet", "UNet2DConditionModel"

    def __init__(
        self,
        components,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        mixed_precision: str = "no",
        device: str | torch.device = "cpu",
        resolution: int | None = None,
        num_steps: int = 50,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        train_cfg: bool = True,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        compile_unet: bool = False,
        train_window: list[int] | tuple[int, int] | None = None,
        sampler: str = "ddim",
    ):
        import diffusers
        from diffusers import DDIMScheduler

        if not eta > 0:  # NaN included
            raise ConfigError(
                f"sample.eta must be > 0 (got {eta}): with eta = 0 DDIM is deterministic and a transition has no "
                "log probability to optimise"
            )
        self.num_steps, self.eta, self.guidance_scale = num_steps, eta, guidance_scale
        self.window = check_window(train_window, num_steps, "pipeline.train_window", "trains every step")
        # guided exactly when sampling is (a scale of 1 means no guidance, as in diffusers)
        self.sample_cfg = guidance_scale > 1.0
        self.train_cfg = train_cfg and self.sample_cfg

        self.sd = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler = DDIMScheduler.from_config(components.scheduler.config)
        if sampler not in SAMPLERS:
            raise ConfigError(f"pipeline.sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")
        name, options = SAMPLERS[sampler]
        self.sampler = sampler
        self.collector = getattr(diffusers, name).from_config(components.scheduler.config, **options)
        self.forward_process = EpsilonProcess(
            self.scheduler.alphas_cumprod, self.scheduler.config.get("prediction_type", "epsilon")
        )
        self.set_placement(device, use_lora, mixed_precision)
        if resolution is not None and (resolution <= 0 or resolution % self.vae_scale_factor):
            raise ConfigError(
                f"model.resolution must be a positive multiple of the VAE's downsampling factor "
                f"{self.vae_scale_factor} (got {resolution})"
            )
        self.resolution = resolution or self.unet.config.sample_size * self.vae_scale_factor

        lora = {"rank": lora_rank, "alpha": lora_rank, "targets": LORA_TARGET_MODULES} if use_lora else None
        self.set_up_weights(
            self.unet, [self.vae, self.text_encoder], lora=lora, gradient_checkpointing=gradient_checkpointing
        )
        self._set_attention(attention)
        self.compile_denoiser = compile_unet
        self._denoiser = torch.compile(self.unet) if compile_unet else self.unet
        self._negative_embeds = None
        self._reference = None  # full fine-tuning with KL: a frozen copy of the UNet before training

    # -- structure -------------------------------------------------------------------------
    @property
    def stored_steps(self) -> int | None:
        if self.window is None:
            return None
        start, end = self.window
        return end - start

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def _set_attention(self, attention: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processors = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
        if attention not in processors:
            raise ValueError(f"pipeline.attention must be one of {sorted(processors)}, got {attention!r}")
        self.unet.set_attn_processor(processors[attention]())

    # -- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self._embed(prompts)}

    def negative_embeds(self, batch_size: int) -> torch.Tensor:
        if self._negative_embeds is None:
            self._negative_embeds = self._embed([""])
        return self._negative_embeds.expand(batch_size, -1, -1)

    # -- the policy --------------------------------------------------------------------------
    # the conditioning keys a transition needs (encode_prompts' keys); subclasses add theirs
    CONDITIONING_KEYS = ("prompt_embeds",)

    def unet_conditioning(self, conditioning: dict[str, torch.Tensor], cfg: bool) -> dict:
        """The UNet's keyword arguments for a batch of per-sample ``conditioning`` (negatives first with CFG).

        The one place a family differs in how its UNet is conditioned (SDXL adds pooled embeddings
        and time ids); sampling, scoring and benchmarking all go through it.
        """
        embeds = conditioning["prompt_embeds"]
        if cfg:
            embeds = torch.cat([self.negative_embeds(len(embeds)), embeds])
        return {"encoder_hidden_states": embeds}

    def denoiser_inputs(self, latents, timesteps, conditioning, cfg: bool) -> dict:
        """The UNet's keyword arguments for a batch (latents and timesteps doubled with CFG): what bench times."""
        if cfg:
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        return {"sample": latents, "timestep": timesteps, **self.unet_conditioning(conditioning, cfg)}

    def _guided_output(self, latents, timesteps, conditioning, guidance_scale, cfg):
        if cfg:
            model_in = torch.cat([latents, latents])
            t_in = torch.cat([timesteps, timesteps])
        else:
            model_in, t_in = latents, timesteps
        unet_kwargs = self.unet_conditioning(conditioning, cfg)
        model_in = self.scheduler.scale_model_input(model_in, t_in)
        with self._autocast():
            output = self._denoiser(model_in, t_in, **unet_kwargs).sample
        output = output.to(self.chain_dtype)
        if not cfg:
            return output
        uncond, cond = output.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, conditioning, generator, shared_generator=None, branch_steps=None) -> Rollout:
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        self.scheduler.set_timesteps(self.num_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        size = self.resolution // self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, size, size)
        latents = draw_noise(
            shape, initial_generator(generator, shared_generator, branch_steps), self.device, torch.float32
        )
        latents = latents * self.scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for i, t in enumerate(timesteps):
            t_batch = t.expand(batch)
            output = self._guided_output(latents, t_batch, conditioning, self.guidance_scale, cfg=self.sample_cfg)
            step_generator = generator
            if branch_steps is not None:  # the group's shared noise, except at its branch step
                step_generator = [
                    own if i == k else shared for own, shared, k in zip(generator, shared_generator, branch_steps)
                ]
            latents, log_prob = ddim_step_with_logprob(
                self.scheduler, output, t_batch, latents, eta=self.eta, generator=step_generator
            )
            trajectory.append(latents)
            log_probs.append(log_prob)
        chain = torch.stack(trajectory, dim=1)
        if branch_steps is not None:  # one transition per sample: its branch step
            rows = torch.arange(batch, device=chain.device)
            index = torch.as_tensor(branch_steps, device=chain.device)
            return Rollout(
                conditioning=conditioning,
                steps={
                    "timesteps": timesteps[index].unsqueeze(1),
                    "latents": chain[rows, index].unsqueeze(1),
                    "next_latents": chain[rows, index + 1].unsqueeze(1),
                    "log_probs": torch.stack(log_probs, dim=1)[rows, index].unsqueeze(1),
                },
                images=self.decode(latents),
            )
        # every step samples with eta; with a train window only its transitions are kept for training
        start, end = self.window or (0, len(timesteps))
        return Rollout(
            conditioning=conditioning,
            steps={
                "timesteps": timesteps[start:end].expand(batch, -1).clone(),
                "latents": chain[:, start:end],
                "next_latents": chain[:, start + 1 : end + 1],
                "log_probs": torch.stack(log_probs[start:end], dim=1),
            },
            images=self.decode(latents),
        )

    @torch.no_grad()
    def sample_final(self, conditioning, generator) -> Rollout:
        """``pipeline.sampler`` from the same initial noise as ``sample``; only x0 and the conditioning kept."""
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        collector = self.collector
        collector.set_timesteps(self.num_steps, device=self.device)
        size = self.resolution // self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, size, size)
        latents = draw_noise(shape, generator, self.device, torch.float32) * collector.init_noise_sigma
        for t in collector.timesteps:
            t_batch = t.expand(batch)
            model_in = collector.scale_model_input(latents, t)
            output = self._guided_output(model_in, t_batch, conditioning, self.guidance_scale, cfg=self.sample_cfg)
            latents = collector.step(output, t, latents).prev_sample.float()
        steps = {"step_index": torch.arange(self.num_steps, device=self.device).expand(batch, -1).clone()}
        seeds = forward_seeds(generator).to(self.device)
        return Rollout({**conditioning, "x0": latents, "forward_seed": seeds}, steps, images=self.decode(latents))

    # -- the chain, step by step (the differentiable tail: DenoiserPipeline.sample_with_grad) ---------
    def chain_start(self, conditioning, generator):
        conditioning = {key: conditioning[key] for key in self.CONDITIONING_KEYS}
        batch = conditioning["prompt_embeds"].shape[0]
        self.scheduler.set_timesteps(self.num_steps, device=self.device)
        size = self.resolution // self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, size, size)
        latents = draw_noise(shape, generator, self.device, self.chain_dtype) * self.scheduler.init_noise_sigma
        return conditioning, latents, self.num_steps

    def chain_output(self, i: int, latents, conditioning):
        t_batch = self.scheduler.timesteps[i].expand(latents.shape[0])
        return self._guided_output(latents, t_batch, conditioning, self.guidance_scale, cfg=self.sample_cfg)

    def chain_step(self, i: int, output, latents, generator):
        t_batch = self.scheduler.timesteps[i].expand(latents.shape[0])
        return ddim_step_with_logprob(self.scheduler, output, t_batch, latents, eta=self.eta, generator=generator)[0]

    def forward_times(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDIM grid of ``num_steps`` timesteps (the sampler's steps, as DiffusionNFT trains on): both
        the process's time and the UNet's timestep."""
        if self.scheduler.num_inference_steps != self.num_steps:
            self.scheduler.set_timesteps(self.num_steps, device=self.device)
        timesteps = self.scheduler.timesteps.to(self.device)
        return timesteps, timesteps

    def loss_scale(self, step_index: torch.Tensor) -> torch.Tensor:
        """The epsilon (or v) space: x0 errors divided by d x0 / d output, as SD's own training loss weighs timesteps."""
        times, _ = self.forward_times()
        return 1.0 / self.forward_process.output_scale(times[step_index])

    def network_output(self, x_t, timesteps, conditioning) -> torch.Tensor:
        with self._autocast():
            output = self._denoiser(x_t, timesteps, **self.unet_conditioning(conditioning, cfg=False)).sample
        return output.float()

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            images = self.vae.decode(latents.to(self.dtype) / self.vae.config.scaling_factor).sample
        return (images.to(self.chain_dtype) / 2 + 0.5).clamp(0, 1)

    def log_prob(self, transitions):
        if self.scheduler.num_inference_steps != self.num_steps:
            self.scheduler.set_timesteps(self.num_steps, device=self.device)
        latents, timesteps = transitions["latents"], transitions["timesteps"]
        output = self._guided_output(latents, timesteps, transitions, self.guidance_scale, cfg=self.train_cfg)
        _, log_prob, mean, std = ddim_step_with_logprob(
            self.scheduler,
            output,
            timesteps,
            latents,
            eta=self.eta,
            prev_sample=transitions["next_latents"],
            return_gaussian=True,
        )
        return log_prob, mean, std

    # -- export ------------------------------------------------------------------------------
    def export(self, directory: str) -> list[str]:
        os.makedirs(directory, exist_ok=True)
        if self.use_lora:
            from diffusers import StableDiffusionPipeline
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True)
            return [os.path.join(directory, "pytorch_lora_weights.safetensors")]
        return self.export_full(directory)
