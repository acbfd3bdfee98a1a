"""A saved VARPipeline loads through diffusers' own custom-pipeline mechanism: ``DiffusionPipeline.from_pretrained(
folder_or_repo, trust_remote_code=True)`` returns a ``VARPipeline`` (folder, embedded model, fake-Hub repo id), and
``VARPipeline.from_pretrained`` still loads the same folder without remote code."""

import json
import sys

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from var_erase import DEFAULT_MODEL
from var_erase.pipelines.custom_pipeline import importable_config, reexport_source
from var_erase.pipelines.pipeline_var import VARPipeline

from ._tiny import tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny pipeline and the folder its ``save_pretrained`` wrote."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("custom") / "pipe"
    pipe.save_pretrained(folder)
    return pipe, folder


def _image(pipe, seed=0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_save_pretrained_writes_the_custom_pipeline_form(saved):
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "VARPipeline"]
    assert index["transformer"] == ["transformer_var", "VARTransformer2DModel"]
    assert index["vae"] == ["autoencoder_bsq", "BSQAutoencoder"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]  # library components stay as diffusers wrote
    assert (folder / "pipeline.py").read_text() == reexport_source("var_erase", "VARPipeline")
    assert (folder / "transformer" / "transformer_var.py").read_text() == reexport_source(
        "var_erase.models.transformer_var", "VARTransformer2DModel")
    assert (folder / "vae" / "autoencoder_bsq.py").exists()


def test_diffusion_pipeline_loads_a_saved_folder_as_a_var_pipeline(saved):
    pipe, folder = saved
    loaded = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded) is VARPipeline
    assert np.array_equal(_image(loaded), _image(pipe))


def test_diffusion_pipeline_without_trust_remote_code_says_to_pass_it(saved):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved[1])


def test_var_pipeline_loads_the_folder_without_running_its_code_files(saved, tmp_path):
    """The explicit class needs no remote code: custom-code files that would fail on import are never imported."""
    import shutil

    pipe, folder = saved
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in ("pipeline.py", "transformer/transformer_var.py", "vae/autoencoder_bsq.py"):
        (copy / name).write_text("raise RuntimeError('pipeline.py was executed')\n")
    loaded = VARPipeline.from_pretrained(copy)
    assert type(loaded) is VARPipeline
    assert np.array_equal(_image(loaded), _image(pipe))
    with pytest.raises(RuntimeError, match="pipeline.py was executed"):  # whereas diffusers' route does run it
        DiffusionPipeline.from_pretrained(copy, trust_remote_code=True)


def test_pipeline_py_without_var_erase_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "var_erase", None)  # `import var_erase` now raises ImportError
    with pytest.raises(ImportError, match="install the var-erase package"):
        exec(compile(reexport_source("var_erase", "VARPipeline"), "pipeline.py", "exec"), {})


def test_importable_config_reads_back_only_the_var_erase_form():
    custom = {"_class_name": ["pipeline", "VARPipeline"], "transformer": ["transformer_var", "VARTransformer2DModel"],
              "tokenizer": ["transformers", "BertTokenizer"], "scheduler": [None, None]}
    assert importable_config(custom) == {
        "_class_name": "VARPipeline", "transformer": ["var_erase.models.transformer_var", "VARTransformer2DModel"],
        "tokenizer": ["transformers", "BertTokenizer"], "scheduler": [None, None]}
    for other in ("VARPipeline", ["my_module", "MyPipeline"], ["pipeline"]):
        assert importable_config({"_class_name": other}) == {"_class_name": other}
    assert importable_config({"unet": ["my_unet", "UNet"]}) == {"unet": ["my_unet", "UNet"]}  # not a var-erase module


def test_the_embedded_model_loads_through_diffusion_pipeline():
    loaded = DiffusionPipeline.from_pretrained(DEFAULT_MODEL, trust_remote_code=True)
    direct = VARPipeline.from_pretrained(DEFAULT_MODEL)
    assert type(loaded) is VARPipeline
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(direct, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_diffusion_pipeline_loads_by_repo_id_from_the_hub(saved, tmp_path, hub_server, hub_repo_id):
    pipe, _ = saved
    pipe.save_pretrained(str(tmp_path / "pushed"), push_to_hub=True, repo_id=hub_repo_id)
    pushed = hub_server.files(hub_repo_id)
    assert "pipeline.py" in pushed and json.loads(pushed["model_index.json"])["_class_name"][0] == "pipeline"

    loaded = DiffusionPipeline.from_pretrained(hub_repo_id, trust_remote_code=True)
    assert type(loaded) is VARPipeline
    assert np.array_equal(_image(loaded), _image(pipe))
