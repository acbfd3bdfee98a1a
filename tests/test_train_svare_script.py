"""examples/train_svare.py end to end on a tiny pipeline: generated pairs, interrupted run, resume, loadable adapter."""

import json
import os
import sys

import pytest

from var_erase.hub import read_adapter_metadata
from var_erase.pipelines.pipeline_var import VARPipeline

from ._tiny import tiny_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
train_svare = pytest.importorskip("train_svare")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return str(path)


def _args(base, out, steps, *extra):
    return ["--pretrained_model_name_or_path", base, "--output_dir", str(out), "--concept", "red", "--num_pairs", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--num_validation_images", "1",
            "--learning_rate", "1e-3", *extra]


def test_interrupted_run_resumes_and_the_adapter_loads(base, tmp_path):
    out = tmp_path / "run"
    train_svare.main(_args(base, out, 2))  # "killed" after its checkpoint at step 2
    assert (out / "checkpoint-2" / "trainable.safetensors").exists()
    train_svare.main(_args(base, out, 4, "--resume_from_checkpoint", "latest"))
    log = json.loads((out / "training_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3, 4]
    for name in ("pytorch_lora_weights.safetensors", "README.md", "grid.png"):
        assert (out / name).exists(), name
    metadata = read_adapter_metadata(out)
    assert metadata.concepts == ["red"] and metadata.method == "svare" and metadata.lora_rank == 4
    pipe = VARPipeline.from_pretrained(base)
    pipe.load_lora_weights(out, adapter_name="erase")
    assert pipe.get_active_adapters() == ["erase"]


def test_unknown_concept_without_pairs_names_the_fix(base, tmp_path):
    with pytest.raises(SystemExit, match="--prompt_pairs"):
        train_svare.main(_args(base, tmp_path / "x", 1)[:4] + ["--concept", "nudity"])


def test_retain_prompts_option_trains_and_is_logged(base, tmp_path):
    out = tmp_path / "retain"
    extra = tmp_path / "keep.txt"
    extra.write_text("a blue circle\n\na green square\n")
    train_svare.main(_args(base, out, 1, "--retain_prompts_per_concept", "1", "--retain_prompts", str(extra),
                           "--retain_weight", "1.0"))
    log = json.loads((out / "training_log.json").read_text())
    retain = log["retain_prompts"]
    assert retain[:2] == ["a blue circle", "a green square"] and len(retain) == 2 + 7  # + one per other colour
    assert log["config"]["retain_weight"] == 1.0 and not any(w in p.split() for p in retain for w in ("red", "scarlet"))
    assert read_adapter_metadata(out).hyperparameters["num_retain_prompts"] == 9


def test_generated_pairs_never_swap_in_another_erased_concept():
    """Several concepts of one kind: the safe prompts use only values not erased in the run; one concept: all others."""
    args = train_svare.parse_args(["--output_dir", "x", "--concept", "triangle", "--concept", "circle",
                                   "--concept", "star", "--num_pairs", "12", "--pair_wording", "balanced"])
    pairs, concepts = train_svare.resolve_pairs(args)
    assert concepts == ["triangle", "circle", "star"] and len(pairs) == 36
    assert train_svare.replacements_for("triangle", args.concept, []) == ["square", "heart", "cross", "crescent",
                                                                          "diamond"]
    for pair in pairs:
        safe = pair.safe.lower()
        assert "circle" not in safe and "disc" not in safe and "round shape" not in safe, pair
        assert "triangle" not in safe and "triangular" not in safe and "star" not in safe, pair
    assert train_svare.replacements_for("star", ["star"], []) is not None
    assert train_svare.replacements_for("star", ["star"], ["heart", "star"]) == ["heart"]
