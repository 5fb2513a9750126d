from ddpo.schedulers.ddim import ddim_step_with_logprob, previous_timestep

__all__ = ["ddim_step_with_logprob", "previous_timestep"]
