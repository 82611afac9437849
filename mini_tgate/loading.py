"""load_pipeline: the pipeline of a diffusers folder, a hub repo or one single file.

Above the model families: it reads which pipeline class a checkpoint names (a folder's
`model_index.json`, or what kind of LDM file it is) and lets that family's class load it.
The families know how to build themselves (`from_pretrained`, `from_single_file`); this module
only picks one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .core.inputs import check_loading_args
from .core.pipeline import DiffusionPipeline, pipeline_class
from .core.weights import CheckpointError, read_model_index, resolve
from .formats.single_file import is_single_file, pipeline_name
from .pixart import pipeline as pixart  # noqa: F401  (its classes are among those pipeline_class finds)
from .stable_diffusion.pipeline import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                                        StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from .svd.pipeline import StableVideoDiffusionPipeline

# each text-to-image class's img2img class (AutoPipelineForImage2Image), and the way back
IMAGE2IMAGE = {StableDiffusionPipeline: StableDiffusionImg2ImgPipeline,
               StableDiffusionXLPipeline: StableDiffusionXLImg2ImgPipeline}
TEXT2IMAGE = {v: k for k, v in IMAGE2IMAGE.items()}


def load_pipeline(source, device="cpu", dtype: torch.dtype | None = None, variant: str | None = None,
                  local_files_only: bool = False, cache_dir=None, revision: str | None = None,
                  torch_dtype: torch.dtype | None = None, prediction_type: str | None = None,
                  **kwargs) -> DiffusionPipeline:
    """The pipeline for a diffusers checkpoint (folder or hub repo id, at `revision`
    on the hub), chosen by its model_index.json. dtype (diffusers' name, torch_dtype, is an alias)
    defaults to float32. The VAE stays in float32 when dtype is float16 and its config says
    force_upcast (the SDXL VAE overflows in float16). A `.safetensors` file in the original LDM
    layout goes to formats/single_file.py, with `prediction_type` where the file cannot tell
    (SD-2: v_prediction). kwargs: diffusers' harmless loading arguments (use_safetensors, ...)."""
    return load_as(source, None, device, dtype, variant, local_files_only, cache_dir, revision, torch_dtype,
                   prediction_type, "load_pipeline", **kwargs)


def load_as(source, kind: dict | None, device="cpu", dtype=None, variant=None, local_files_only=False,
            cache_dir=None, revision=None, torch_dtype=None, prediction_type=None, where="load_pipeline", **kwargs):
    """load_pipeline, with the class the checkpoint names replaced by its counterpart in `kind`
    (IMAGE2IMAGE or TEXT2IMAGE: the AutoPipelines; a class not in it stays itself)."""
    check_loading_args(where, kwargs)
    kind = kind or {}
    if is_single_file(source):
        if variant is not None or revision is not None:
            raise ValueError(f"{source}: variant and revision are for diffusers folders and hub repos, not one file")
        cls = pipeline_class(pipeline_name(source), source)
        return kind.get(cls, cls).from_single_file(source, device, dtype, prediction_type, torch_dtype=torch_dtype)
    if prediction_type is not None:
        raise ValueError("prediction_type is for single-file checkpoints; a diffusers folder's scheduler config sets it")
    folder = resolve(source, variant, local_files_only, cache_dir, revision=revision)
    cls = pipeline_class(read_model_index(folder)["_class_name"], folder / "model_index.json")
    pipe = kind.get(cls, cls).from_pretrained(folder, device, dtype, variant, torch_dtype=torch_dtype)
    if not Path(source).expanduser().is_dir():  # a hub repo: named by its id, never by a local path
        pipe.model_info["name"] = str(source)
    return pipe


def load_single_file(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
                     prediction_type: str | None = None, config: str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """The pipeline of one LDM-layout `.safetensors` file (SD 1.x, SD 2.x or SDXL base): see
    `StableDiffusionPipeline.from_single_file`, which this calls on the file's own class."""
    return pipeline_class(pipeline_name(path), path).from_single_file(path, device, dtype, prediction_type, config,
                                                                      torch_dtype)


class AutoPipelineForText2Image:
    """diffusers' AutoPipelineForText2Image: the text-to-image pipeline of a checkpoint (an img2img
    folder gives its text-to-image class), or of another pipeline's models."""

    kind, task = TEXT2IMAGE, "text to image"

    @classmethod
    def from_pretrained(cls, source, *args, **kwargs) -> DiffusionPipeline:
        """load_pipeline's arguments (diffusers' harmless loading arguments included)."""
        pipe = load_as(source, cls.kind, *args, where=f"{cls.__name__}.from_pretrained", **kwargs)
        return cls.checked(pipe)

    @classmethod
    def from_pipe(cls, pipe: DiffusionPipeline, **components) -> DiffusionPipeline:
        """The pipeline of this task on `pipe`'s models (shared), any replaced by `components`."""
        target = cls.kind.get(type(pipe), type(pipe))
        return cls.checked(target.from_pipe(pipe, **components))

    @classmethod
    def checked(cls, pipe: DiffusionPipeline) -> DiffusionPipeline:
        if isinstance(pipe, StableVideoDiffusionPipeline) or (cls.task == "img2img" and pipe.default_strength is None):
            raise CheckpointError(f"{cls.__name__}: {type(pipe).__name__} has no {cls.task} pipeline")
        return pipe


class AutoPipelineForImage2Image(AutoPipelineForText2Image):
    """diffusers' AutoPipelineForImage2Image: the img2img pipeline of a checkpoint (SD, SDXL; a
    text-to-image folder gives its img2img class), or of another pipeline's models."""

    kind, task = IMAGE2IMAGE, "img2img"
