"""How a saved ``VARPipeline`` folder loads through diffusers' own custom-pipeline mechanism.

``DiffusionPipeline.from_pretrained(folder_or_repo)`` resolves classes from ``model_index.json`` (diffusers 0.42,
``pipeline_loading_utils``: ``_resolve_custom_pipeline_and_cls``, ``_get_custom_components_and_folders``,
``get_class_obj_and_candidates``):

- the pipeline: a string ``_class_name`` must be an attribute of the ``diffusers`` module, which ``VARPipeline`` is
  not; a ``[module, class]`` list names a file ``<module>.py`` next to ``model_index.json``, which diffusers imports
  (only with ``trust_remote_code=True``) to take the class from;
- a component ``[library, class]``: ``library`` must be ``diffusers``, ``transformers`` (or another library diffusers
  lists) or a file ``<component>/<library>.py`` in the repo; a Hub repo whose component names
  ``var_erase.models.transformer_var`` is refused before anything is downloaded.

So the custom form that ``VARPipeline.save_pretrained`` writes is ``_class_name: ["pipeline", "VARPipeline"]``,
components of var-erase's own models as ``["transformer_var", "VARTransformer2DModel"]``, and one small file per name
(``pipeline.py``, ``transformer/transformer_var.py``, ...) that only re-exports the installed package's class.
``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` then returns a ``VARPipeline`` when
var-erase is installed, and says to install it when it is not.

``VARPipeline.from_pretrained`` needs no remote code: it reads the custom form back as the package's import paths
(:func:`importable_config`), so a folder loads with the plain call and none of those files runs.
"""

from __future__ import annotations

import json
import os
import pkgutil
from pathlib import Path

from ..utils import atomic_write_bytes

PIPELINE_MODULE = "pipeline"
"""The module name in ``_class_name``: diffusers looks for ``pipeline.py`` next to ``model_index.json``."""

_MODELS_PACKAGE = "var_erase.models"

_SOURCE = '''"""`DiffusionPipeline.from_pretrained(<this folder or repo>, trust_remote_code=True)` reads {name} here.

The code is the installed var-erase package's; this file only names it. `VARPipeline.from_pretrained` loads the
folder without running this file.
"""

try:
    from {module} import {name}  # noqa: F401
except ImportError as err:
    raise ImportError(
        "This folder holds a var-erase pipeline: install the var-erase package here, then load it again."
    ) from err
'''


def reexport_source(module: str, name: str) -> str:
    """The text of a custom-code file that imports ``name`` from the installed ``module``, nothing else."""
    return _SOURCE.format(module=module, name=name)


def _public_module(pipeline_class: type) -> str:
    module = pipeline_class.__module__
    return "var_erase" if module == "var_erase.pipelines.pipeline_var" else module


def _model_modules() -> set[str]:
    from .. import models

    return {info.name for info in pkgutil.iter_modules(models.__path__)}


def _is_entry(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)


def custom_form(config: dict, pipeline_class: type) -> dict:
    """``model_index.json``'s content in diffusers' custom form: ``_class_name`` as ``["pipeline", <class>]``, and each
    component from ``var_erase.models.<module>`` as ``[<module>, <class>]``."""
    config = dict(config)
    config["_class_name"] = [PIPELINE_MODULE, pipeline_class.__name__]
    for key, value in config.items():
        if key != "_class_name" and _is_entry(value) and value[0].startswith(f"{_MODELS_PACKAGE}."):
            config[key] = [value[0].rsplit(".", 1)[1], value[1]]
    return config


def importable_config(config: dict) -> dict:
    """The custom form read back (what an explicit ``VARPipeline.from_pretrained`` needs to load a folder without
    ``trust_remote_code``): ``["pipeline", <class>]`` -> ``<class>``, ``[<module>, <class>]`` of a var-erase model
    module -> ``["var_erase.models.<module>", <class>]``. Any other value is kept."""
    config = dict(config)
    name = config.get("_class_name")
    if _is_entry(name) and name[0] == PIPELINE_MODULE:
        config["_class_name"] = name[1]
    modules = _model_modules()
    for key, value in config.items():
        if key != "_class_name" and _is_entry(value) and value[0] in modules:
            config[key] = [f"{_MODELS_PACKAGE}.{value[0]}", value[1]]
    return config


def with_custom_form(config_json: str, pipeline_class: type) -> str:
    """:func:`custom_form` on a ``model_index.json`` text, in diffusers' own layout (two-space indent, sorted keys)."""
    return json.dumps(custom_form(json.loads(config_json), pipeline_class), indent=2, sort_keys=True) + "\n"


def write_custom_code(save_directory: str | os.PathLike, config: dict, pipeline_class: type) -> list[Path]:
    """Write (atomically) the files the custom form names: ``pipeline.py`` and ``<component>/<module>.py`` for each
    var-erase model component of ``config`` (a pipeline's ``config``); returns their paths."""
    folder = Path(save_directory)
    files = {folder / f"{PIPELINE_MODULE}.py": reexport_source(_public_module(pipeline_class), pipeline_class.__name__)}
    for key, value in config.items():
        if key != "_class_name" and _is_entry(value) and value[0].startswith(f"{_MODELS_PACKAGE}."):
            files[folder / key / f"{value[0].rsplit('.', 1)[1]}.py"] = reexport_source(value[0], value[1])
    return [atomic_write_bytes(path, text.encode()) for path, text in files.items()]
