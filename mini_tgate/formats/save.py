"""Saving a pipeline as a complete diffusers folder."""

from __future__ import annotations

from pathlib import Path

from ..core.weights import write_json


def save_pipeline(pipe, folder) -> None:
    """Write a pipeline as a complete diffusers folder: `model_index.json` naming each
    component's library and class, then one sub-folder per component. diffusers'
    `DiffusionPipeline.from_pretrained(folder)` and `load_pipeline(folder)` both read it.
    A StableVideoDiffusionPipeline (no text encoder) is written by `save_video_pipeline`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(pipe, "image_encoder") and getattr(pipe, "text_encoder", None) is None:
        return save_video_pipeline(pipe, folder)
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
    save_scheduler(pipe, folder, index)
    write_json(folder / "model_index.json", index)


def save_scheduler(pipe, folder: Path, index: dict) -> None:
    """scheduler/scheduler_config.json (without diffusers' bookkeeping key), named in `index`."""
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    write_json(folder / "scheduler" / "scheduler_config.json", config)
    index["scheduler"] = ["diffusers", config["_class_name"]]


def save_video_pipeline(pipe, folder: Path) -> None:
    """A StableVideoDiffusionPipeline: unet and vae (diffusers), image_encoder (transformers'
    CLIPVisionModelWithProjection), the feature extractor as a CLIPImageProcessor's
    preprocessor_config.json carrying the pipeline's mean and std, the scheduler."""
    index = {"_class_name": type(pipe).__name__}
    for name in ("unet", "vae", "image_encoder"):
        model = getattr(pipe, name)
        model.save_pretrained(folder / name)
        index[name] = ["transformers" if name == "image_encoder" else "diffusers", model.saved_names()[0]]
    size = pipe.image_encoder.config.image_size  # 224 for SVD; diffusers resizes to 224 whatever it is
    (folder / "feature_extractor").mkdir(exist_ok=True)
    write_json(folder / "feature_extractor" / "preprocessor_config.json", {
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(pipe.image_mean), "image_processor_type": "CLIPImageProcessor",
        "image_std": list(pipe.image_std), "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size}})
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    save_scheduler(pipe, folder, index)
    write_json(folder / "model_index.json", index)


class SaveMixin:
    """diffusers' `pipe.save_pretrained(folder)` for the pipeline classes (save_pipeline)."""

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None) -> None:
        """Write the pipeline as a complete diffusers folder (save_pipeline): safetensors only, no variant."""
        if safe_serialization is not True or variant is not None:
            raise ValueError("save_pretrained writes plain safetensors only: safe_serialization=True, variant=None")
        save_pipeline(self, save_directory)
