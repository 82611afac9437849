"""Saving a pipeline as a complete diffusers folder."""

from __future__ import annotations

from pathlib import Path

from ..core.weights import write_json


def save_pipeline(pipe, folder) -> None:
    """Write a pipeline as a complete diffusers folder: `model_index.json` naming each
    component's library and class, then one sub-folder per component. diffusers'
    `DiffusionPipeline.from_pretrained(folder)` and `load_pipeline(folder)` both read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl, pixart = hasattr(pipe, "text_encoder_2"), hasattr(pipe, "transformer")
    index = {"_class_name": type(pipe).__name__}  # StableDiffusionPipeline, ..., PixArtSigmaPipeline
    if sdxl:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    elif not pixart:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    if not pixart:
        index.update(feature_extractor=[None, None], image_encoder=[None, None])  # components not saved
    models = ["transformer" if pixart else "unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    for name in models:
        model = getattr(pipe, name)
        model.save_pretrained(folder / name)
        library = "transformers" if name.startswith("text_encoder") else "diffusers"
        index[name] = [library, model.saved_names()[0]]
    for name in ["tokenizer"] + (["tokenizer_2"] if sdxl else []):
        getattr(pipe, name).save_pretrained(folder / name)
        index[name] = ["transformers", type(getattr(pipe, name)).__name__]
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    write_json(folder / "scheduler" / "scheduler_config.json", config)
    index["scheduler"] = ["diffusers", config["_class_name"]]
    write_json(folder / "model_index.json", index)
