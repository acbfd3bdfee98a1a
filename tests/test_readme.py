"""The README's first screen runs as written: its Python example on the embedded model with an adapter in
``outputs/erase-red``, its training command parses with ``examples/train_svare.py``, and its install line is the
Makefile's."""

import re
import shlex
from pathlib import Path

import numpy as np
from diffusers.training_utils import _collate_lora_metadata
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from var_erase import DEFAULT_MODEL
from var_erase.pipelines.pipeline_var import VARPipeline

from ._scripts import ROOT, load_script

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _first_block_with(language: str, text: str) -> str:
    return next(block for block in _blocks(language) if text in block)


def _save_an_adapter(folder: Path) -> None:
    """What the README's training command writes, minus the training: a LoRA with non-zero weights on the model."""
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    transformer = pipe.transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False))
    VARPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  **_collate_lora_metadata({"transformer": transformer}))


def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
    code = _first_block_with("python", "load_lora_weights")
    assert len(code.strip().splitlines()) <= 8
    _save_an_adapter(tmp_path / "outputs" / "erase-red")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    before, after = scope["before"], scope["after"]
    assert before.size == after.size == (64, 64)
    assert not np.array_equal(np.asarray(before), np.asarray(after))  # the adapter changes the image
    assert "erase" in scope["pipe"].get_active_adapters()


def test_the_training_command_parses_and_writes_where_the_example_reads():
    command = _first_block_with("bash", "examples/train_svare.py").split("#")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "examples/train_svare.py"]
    args = load_script("examples/train_svare.py").parse_args(argv[2:])
    assert args.concept == ["red"] and args.output_dir == "outputs/erase-red"


def test_the_install_line_is_the_makefiles():
    install = _first_block_with("bash", "pip install")
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"pip install -q (torch==\S+)", makefile).group(1)
    extras = re.search(r'pip install -q -e "(\.\[[^\]]+\])"', makefile).group(1)
    assert f"pip install {torch_pin}" in install and f'pip install -e "{extras}"' in install
