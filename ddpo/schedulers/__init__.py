from ddpo.schedulers.ddim import ddim_step_with_logprob, previous_timestep
from ddpo.schedulers.flow_sde import flow_noise_scale, flow_ode_step, flow_sde_step

__all__ = ["ddim_step_with_logprob", "flow_noise_scale", "flow_ode_step", "flow_sde_step", "previous_timestep"]
