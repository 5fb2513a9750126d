"""Loading Stable Diffusion components from the Hugging Face Hub or a local directory."""

import os

from ddpo.errors import ConfigError


def load_stable_diffusion(
    path: str, revision: str | None = None, variant: str | None = None, resolution: int | None = None
):
    """A diffusers ``StableDiffusionPipeline`` (float32, CPU) from a hub id or a local directory.

    ``resolution`` (the model group's sampling size) is accepted so that the model YAML can be
    instantiated as is; the pipeline, not the loader, uses it.

    Hub downloads are cached by huggingface_hub as usual. Failure to load (offline, wrong id,
    incomplete directory) stops the run with one line instead of a long traceback.
    """
    return _from_pretrained(
        "StableDiffusionPipeline", "tiny", path, revision, variant, safety_checker=None, requires_safety_checker=False
    )


def load_stable_diffusion_xl(
    path: str, revision: str | None = None, variant: str | None = None, resolution: int | None = None
):
    """A diffusers ``StableDiffusionXLPipeline`` (float32, CPU) from a hub id or a local directory.

    As ``load_stable_diffusion``: ``resolution`` is the pipeline's, and failure to load is one line.
    """
    return _from_pretrained("StableDiffusionXLPipeline", "tiny_sdxl", path, revision, variant)


def load_stable_diffusion_3(
    path: str,
    revision: str | None = None,
    variant: str | None = None,
    resolution: int | None = None,
    drop_t5: bool = False,
):
    """A diffusers ``StableDiffusion3Pipeline`` (float32, CPU) from a hub id or a local directory.

    ``drop_t5`` loads it without the T5 text encoder (``text_encoder_3=None``, as diffusers allows: the
    transformer then sees zeros in T5's place), which saves its memory and time. As the loaders above,
    ``resolution`` is the pipeline's and failure to load is one line; a gated model the Hub refuses
    (SD3.5 needs its license accepted) says how to log in.
    """
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if drop_t5 else {}
    return _from_pretrained("StableDiffusion3Pipeline", "tiny_flow", path, revision, variant, **kwargs)


def load_flux(path: str, revision: str | None = None, variant: str | None = None, resolution: int | None = None):
    """A diffusers ``FluxPipeline`` (float32, CPU) from a hub id or a local directory (FLUX.1-dev, schnell).

    As the loaders above: ``resolution`` is the pipeline's, failure to load is one line, and a gated
    model the Hub refuses (FLUX.1-dev needs its license accepted) says how to log in.
    """
    return _from_pretrained("FluxPipeline", "tiny_flux", path, revision, variant)


def _gated(exc: BaseException) -> bool:
    """Whether loading failed because the Hub wants a login or an accepted license (401 / gated repo)."""
    from huggingface_hub.errors import GatedRepoError

    while exc is not None:
        text = str(exc).lower()
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, GatedRepoError) or status == 401 or "gated" in text or "401 client error" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _from_pretrained(
    pipeline_class: str, offline_model: str, path: str, revision: str | None, variant: str | None, **kwargs
):
    """``<pipeline_class>.from_pretrained`` with the Hub probe and one-line errors of the loaders above."""
    local = os.path.isdir(os.path.expanduser(path))
    if not local and (os.path.isabs(os.path.expanduser(path)) or path.startswith((".", "~"))):
        # a filesystem path, not a hub id: say so instead of the hub's "not a valid repo id"
        raise ConfigError(
            f"model.path={path}: no such directory (give a hub id or a directory "
            f"saved with save_pretrained; without network access, model={offline_model})"
        )
    import diffusers

    from ddpo.network import work_offline_unless_hub_reachable

    if not local and work_offline_unless_hub_reachable():
        kwargs = {**kwargs, "local_files_only": True}  # diffusers' per-call offline switch
    source = os.path.abspath(os.path.expanduser(path)) if local else path
    try:
        return getattr(diffusers, pipeline_class).from_pretrained(
            source,
            revision=None if local else revision,
            variant=variant,
            **kwargs,
        )
    except Exception as exc:  # diffusers/hub raise many types; all mean "cannot load this model"
        if not local and _gated(exc):
            raise ConfigError(
                f"cannot load hub model {path!r}: it is gated (401); accept its license on "
                f"https://huggingface.co/{path} and log in with `hf auth login` (or set HF_TOKEN), "
                f"or use model={offline_model} without network access"
            ) from None
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = reason.replace(f"Cannot load model {source}: ", "")
        if len(reason) > 120:
            reason = reason[:117] + "..."
        where = f"local directory {source}" if local else f"hub model {path!r}"
        raise ConfigError(
            f"cannot load {where} ({reason}); without network access use model={offline_model}, "
            "or model.path=<directory saved with save_pretrained>"
        ) from None


def tiny_model(path: str | None = None, seed: int = 0, resolution: int = 64, prediction_type: str = "epsilon"):
    """The tiny local model: built from configs, or loaded from ``path`` if given (with its own scheduler)."""
    if path:
        return load_stable_diffusion(path)
    from ddpo.models.tiny import build_tiny_pipeline

    return build_tiny_pipeline(seed=seed, resolution=resolution, prediction_type=prediction_type)


def tiny_sdxl_model(path: str | None = None, seed: int = 0, resolution: int = 64):
    """The tiny local SDXL model (``ddpo/models/tiny_sdxl.py``), or one loaded from ``path`` if given."""
    if path:
        return load_stable_diffusion_xl(path)
    from ddpo.models.tiny_sdxl import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(seed=seed, resolution=resolution)


def tiny_flow_model(path: str | None = None, seed: int = 0, resolution: int = 64, drop_t5: bool = False):
    """The tiny local SD3 model (``ddpo/models/tiny_flow.py``), or one loaded from ``path`` if given."""
    if path:
        return load_stable_diffusion_3(path, drop_t5=drop_t5)
    from ddpo.models.tiny_flow import build_tiny_flow_pipeline

    return build_tiny_flow_pipeline(seed=seed, resolution=resolution, with_t5=not drop_t5)


def tiny_flux_model(path: str | None = None, seed: int = 0, resolution: int = 64, guidance: bool = True):
    """The tiny local FLUX model (``ddpo/models/tiny_flux.py``), or one loaded from ``path`` if given."""
    if path:
        return load_flux(path)
    from ddpo.models.tiny_flux import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=seed, resolution=resolution, guidance=guidance)


def flux_architecture(
    seed: int = 0, resolution: int = 1024, num_layers: int | None = None, num_single_layers: int | None = None
):
    """FLUX.1-dev's transformer and VAE with random weights (stand-in text encoders), optionally fewer blocks."""
    from ddpo.models.tiny_flux import build_flux_architecture

    return build_flux_architecture(seed, resolution, num_layers, num_single_layers)


def sd3_architecture(seed: int = 0, resolution: int = 512):
    """Stable Diffusion 3.5 Medium's transformer and VAE with random weights (tiny text encoders, no T5)."""
    from ddpo.models.sd3_arch import build_sd3_architecture

    return build_sd3_architecture(seed=seed, resolution=resolution)


def sd15_architecture(seed: int = 0, resolution: int = 512):
    """Stable Diffusion 1.5's architecture with random weights: real sizes, no download."""
    from ddpo.models.sd15_arch import build_sd15_architecture

    return build_sd15_architecture(seed=seed, resolution=resolution)


# the builders above that make random weights (unless given a ``path`` to load): no trained denoiser
RANDOM_WEIGHT_BUILDERS = tuple(
    f"ddpo.models.{f.__name__}"
    for f in (
        tiny_model,
        tiny_sdxl_model,
        tiny_flow_model,
        tiny_flux_model,
        sd3_architecture,
        sd15_architecture,
        flux_architecture,
    )
)


def random_weights(model_cfg) -> bool:
    """Whether a model config builds random weights (a tiny or architecture-only model, no ``path``)."""
    return model_cfg.get("_target_") in RANDOM_WEIGHT_BUILDERS and not model_cfg.get("path")


def tiny_shapes_dir(name: str = "tiny_shapes"):
    """A shipped tiny shapes model (``scripts/pretrain_tiny.py``): package data in ``ddpo/assets``
    (``tiny_shapes``: the DDIM model; ``tiny_shapes_flow``: its flow-matching twin)."""
    from importlib import resources
    from pathlib import Path

    return Path(str(resources.files("ddpo.assets").joinpath(name)))


def tiny_shapes_model(path: str | None = None, resolution: int = 32):
    """The pretrained tiny shapes model: a ``StableDiffusionPipeline`` loaded from safetensors files
    with no network (``path``: another directory written by ``scripts/pretrain_tiny.py``)."""
    directory = path or str(tiny_shapes_dir())
    if not path and not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ConfigError(
            f"the shipped tiny shapes model is missing from {directory} (python scripts/pretrain_tiny.py writes it)"
        )
    return load_stable_diffusion(directory)


def tiny_testbed_model(path: str | None = None, resolution: int = 32):
    """The testbed model (``scripts/pretrain_testbed.py``): the shapes model fine-tuned on renders whose
    colour slips to its partner half of the time, so that it draws the named colour about half of the time."""
    directory = path or str(tiny_shapes_dir("tiny_testbed"))
    if not path and not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ConfigError(
            f"the shipped testbed model is missing from {directory} (python scripts/pretrain_testbed.py writes it)"
        )
    return load_stable_diffusion(directory)


def tiny_shapes_flow_model(path: str | None = None, resolution: int = 32):
    """The flow-matching twin of the tiny shapes model: a ``StableDiffusion3Pipeline`` (no T5) loaded
    from safetensors files with no network (``scripts/pretrain_tiny.py --family flow``)."""
    directory = path or str(tiny_shapes_dir("tiny_shapes_flow"))
    if not path and not os.path.isfile(os.path.join(directory, "model_index.json")):
        raise ConfigError(
            f"the shipped tiny shapes flow model is missing from {directory} "
            "(python scripts/pretrain_tiny.py --family flow writes it)"
        )
    return load_stable_diffusion_3(directory, drop_t5=True)
