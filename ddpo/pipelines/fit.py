"""Whether the model group's model is one the pipeline group's class can run.

Each ``DDPOPipeline`` class names the diffusers pipeline classes it runs (``accepts``) and the
``conf/pipeline`` option that selects it (``option``). A mismatch (``model=sdxl pipeline=ddim``)
stops the run with one line naming both groups' options and the pipeline that fits: first from the
config alone, before any weight is loaded (for this project's loaders, whose output class is known
below), then on the model actually loaded (any loader, any ``model.path``).
"""

from ddpo.errors import ConfigError

# the diffusers pipeline class each of this project's model loaders returns, by the model group's _target_
LOADER_OUTPUTS = {
    "ddpo.models.load_stable_diffusion": "StableDiffusionPipeline",
    "ddpo.models.tiny_model": "StableDiffusionPipeline",
    "ddpo.models.sd15_architecture": "StableDiffusionPipeline",
    "ddpo.models.load_stable_diffusion_xl": "StableDiffusionXLPipeline",
    "ddpo.models.tiny_sdxl_model": "StableDiffusionXLPipeline",
    "ddpo.models.tiny_shapes_model": "StableDiffusionPipeline",
    "ddpo.models.tiny_testbed_model": "StableDiffusionPipeline",
    "ddpo.models.load_stable_diffusion_3": "StableDiffusion3Pipeline",
    "ddpo.models.tiny_flow_model": "StableDiffusion3Pipeline",
    "ddpo.models.sd3_architecture": "StableDiffusion3Pipeline",
    "ddpo.models.tiny_shapes_flow_model": "StableDiffusion3Pipeline",
    "ddpo.models.load_flux": "FluxPipeline",
    "ddpo.models.tiny_flux_model": "FluxPipeline",
    "ddpo.models.flux_architecture": "FluxPipeline",
}


def model_class(components) -> str:
    """The diffusers pipeline class a loaded model is, by what it holds.

    A UNet with SDXL's added conditioning makes it SDXL whatever class loaded it:
    ``StableDiffusionPipeline.from_pretrained`` of an SDXL directory loads without complaint.
    """
    unet = getattr(components, "unet", None)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "StableDiffusionXLPipeline"
    return type(components).__name__


def pipelines_for(model: str) -> list[str]:
    """The ``pipeline=`` options of this project whose class runs ``model``."""
    import ddpo.pipelines as pipelines
    from ddpo.pipelines.base import DDPOPipeline

    found = []
    for name in pipelines.__all__:
        cls = getattr(pipelines, name)
        if isinstance(cls, type) and issubclass(cls, DDPOPipeline) and model in (cls.accepts or ()) and cls.option:
            found.append(cls.option)
    return found


def mismatch(pipeline_cls, model: str) -> str | None:
    """Why ``pipeline_cls`` cannot run a ``model`` (a diffusers pipeline class name), or None when it can."""
    accepts = getattr(pipeline_cls, "accepts", None)
    if not accepts or model in accepts:
        return None
    fitting = pipelines_for(model)
    advice = " or ".join(f"pipeline={o}" for o in fitting)
    advice = f"use {advice}" if fitting else "no pipeline of this project runs it"
    return f"is a {model}, which {pipeline_cls.__name__} cannot run (it runs {', '.join(accepts)}); {advice}"


def _group_choices() -> dict:
    """The options picked for each config group, when running under Hydra (train.py); {} otherwise."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def check_fit(cfg, components=None) -> None:
    """Stop with one line if ``cfg.pipeline``'s class cannot run ``cfg.model``'s model.

    Without ``components`` the model class comes from the loader (``LOADER_OUTPUTS``; unknown loaders
    pass); with them, from the loaded model.
    """
    from hydra.utils import get_class

    try:
        pipeline_cls = get_class(cfg.pipeline._target_)
    except Exception:  # a bad _target_ is reported, with its group, when the pipeline is built
        return
    model = model_class(components) if components is not None else LOADER_OUTPUTS.get(cfg.model.get("_target_"))
    if model is None:
        return
    why = mismatch(pipeline_cls, model)
    if why is None:
        return
    choices = _group_choices()
    model_key = f"model={choices['model']}" if choices.get("model") else f"model._target_={cfg.model.get('_target_')}"
    pipeline_name = choices.get("pipeline") or getattr(pipeline_cls, "option", None)
    pipeline_key = f"pipeline={pipeline_name}" if pipeline_name else f"pipeline._target_={cfg.pipeline._target_}"
    raise ConfigError(f"{model_key} does not fit {pipeline_key}: the model {why}")
