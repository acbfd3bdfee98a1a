"""examples/train_svare.py end to end on a tiny pipeline: generated pairs, interrupted run, resume, loadable adapter."""

import json
import os
import sys

import pytest
import torch

from var_erase.hub import read_adapter_metadata
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.concepts import get_concept
from var_erase.toy.pairs import others_erased, replacements_for, toy_prompt_pairs, warn_if_styles_miss_fine_scales

from ._tiny import tiny_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
train_svare = pytest.importorskip("train_svare")


pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "tiny"
    tiny_pipeline().save_pretrained(path)
    return str(path)


def _args(base, out, steps, *extra):
    return ["--pretrained_model_name_or_path", base, "--output_dir", str(out), "--concept", "red", "--num_pairs", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", "2", "--num_validation_images", "1",
            "--learning_rate", "1e-3", "--recipe", "svare", "--judge", "none", *extra]


@pytest.mark.parametrize("mixed_precision, blocks", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_frozen_weights_load_in_the_mixed_precision_dtype(base, mixed_precision, blocks):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        pipe = train_svare.load_pipeline(base, Accelerator(mixed_precision=mixed_precision, cpu=True))
    finally:
        AcceleratorState._reset_state(True)
    transformer = pipe.transformer
    assert next(transformer.transformer_blocks.parameters()).dtype == blocks
    assert next(pipe.text_encoder.parameters()).dtype == next(pipe.vae.parameters()).dtype == blocks
    assert transformer.text_norm.weight.dtype == transformer.proj_out.weight.dtype == torch.float32  # kept in fp32


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


def test_bad_anchor_batch_size_is_refused(capsys):
    with pytest.raises(SystemExit):
        train_svare.parse_args(["--output_dir", "x", "--concept", "red", "--anchor_batch_size", "0"])
    assert "--anchor_batch_size must be >= 1, got 0" in capsys.readouterr().err
    assert train_svare.parse_args(["--output_dir", "x", "--concept", "red"]).anchor_batch_size == 8


def test_validation_phrasings_flag_picks_tuning_side_sets_and_never_the_headline_set(base, tmp_path):
    args = train_svare.parse_args(["--output_dir", "x", "--concept", "red", "--validation_phrasings", "tuning,heldout"])
    assert train_svare.recipe(args).validation_phrasings == ("tuning", "heldout")
    assert train_svare.recipe(args).name == "verified"  # everything else is the recipe's
    default = train_svare.parse_args(["--output_dir", "x", "--concept", "red"])
    assert train_svare.recipe(default).validation_phrasings == ("tuning", "fresh")
    with pytest.raises(SystemExit, match="choose from"):
        train_svare.recipe(train_svare.parse_args(["--output_dir", "x", "--concept", "red",
                                                   "--validation_phrasings", "nope"]))
    with pytest.raises(SystemExit, match="frozen held-out set"):
        train_svare.main(_args(base, tmp_path / "u", 1, "--judge", "oracle", "--validation_phrasings", "unseen"))


@pytest.mark.parametrize("frozen", ["unseen", "unseen2"])
def test_validation_phrasings_flag_refuses_every_frozen_heldout_set(frozen):
    flags = ["--output_dir", "x", "--concept", "red", "--validation_phrasings", f"tuning,{frozen}"]
    args = train_svare.parse_args(flags)
    with pytest.raises(SystemExit, match=f"'{frozen}' is a frozen held-out set"):
        train_svare.recipe(args)


def test_retain_prompts_option_trains_and_is_logged(base, tmp_path):
    out = tmp_path / "retain"
    extra = tmp_path / "keep.txt"
    extra.write_text("a blue circle\n\na green square\n")
    train_svare.main(_args(base, out, 1, "--retain_prompts_per_concept", "1", "--retain_prompts", str(extra),
                           "--retain_weight", "1.0", "--retain_teacher", "guided", "--retain_student", "guided"))
    log = json.loads((out / "training_log.json").read_text())
    retain = log["retain_prompts"]
    assert retain[:2] == ["a blue circle", "a green square"] and len(retain) == 2 + 7  # + one per other colour
    assert log["config"]["retain_weight"] == 1.0 and not any(w in p.split() for p in retain for w in ("red", "scarlet"))
    assert log["config"]["retain_student"] == "guided" and log["config"]["retain_teacher"] == "guided"
    hyperparameters = read_adapter_metadata(out).hyperparameters
    assert hyperparameters["num_retain_prompts"] == 9 and hyperparameters["retain_student"] == "guided"


def test_selective_checkpointing_and_no_validation_grid(base, tmp_path):
    out = tmp_path / "nogrid"
    args = _args(base, out, 1, "--gradient_checkpointing", "selective")
    args[args.index("--num_validation_images") + 1] = "0"
    train_svare.main(args)
    assert (out / "pytorch_lora_weights.safetensors").exists() and (out / "README.md").exists()
    assert not (out / "grid.png").exists() and "grid.png" not in (out / "README.md").read_text()
    assert json.loads((out / "training_log.json").read_text())["args"]["gradient_checkpointing"] == "selective"


def test_two_processes_train_the_adapter_of_one_process_with_the_same_global_batch(base, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) with batch 1 per process gives the adapter of one process with
    batch 2: same pairs, same condition dropout, gradients averaged across the processes (the multi-GPU path)."""
    import subprocess

    from safetensors.torch import load_file

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_svare.py")
    common = ["--pretrained_model_name_or_path", base, "--concept", "red", "--num_pairs", "4", "--max_train_steps", "3",
              "--num_validation_images", "0", "--learning_rate", "1e-3", "--anchor_cache_dir", str(tmp_path / "a"),
              "--recipe", "svare", "--judge", "none"]
    train_svare.main(common + ["--output_dir", str(tmp_path / "one"), "--train_batch_size", "2"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}  # accelerate's CPU multi-process mode
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", script, *common, "--output_dir", str(tmp_path / "two"), "--train_batch_size", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)


def test_generated_pairs_never_swap_in_another_erased_concept():
    """Several concepts of one kind: the safe prompts use only values not erased in the run; one concept: all others."""
    concepts = ["triangle", "circle", "star"]
    pairs = toy_prompt_pairs(concepts, 12, wording="balanced")
    assert len(pairs) == 36
    assert replacements_for("triangle", concepts, []) == ["square", "heart", "cross", "crescent", "diamond"]
    for pair in pairs:
        safe = pair.safe.lower()
        assert "circle" not in safe and "disc" not in safe and "round shape" not in safe, pair
        assert "triangle" not in safe and "triangular" not in safe and "star" not in safe, pair
    assert replacements_for("star", ["star"], []) is not None
    assert replacements_for("star", ["star"], ["heart", "star"]) == ["heart"]


def test_generated_pairs_of_mixed_kinds_never_show_another_erased_concept():
    """A style and shapes in one run: the style's pairs show no erased shape (either side) and the shapes' pairs no
    erased style, so no safe prompt asks for what another pair erases."""
    concepts = ["dotted", "star", "diamond"]
    pairs = toy_prompt_pairs(concepts, 16, wording="balanced")
    assert others_erased("dotted", concepts) == ["star", "diamond"]
    assert others_erased("star", concepts) == ["dotted"]
    shape_words = get_concept("star").training_words + get_concept("diamond").training_words
    for pair in pairs:
        text = f"{pair.unsafe} | {pair.safe}".lower()
        if pair.concept == "dotted":
            assert not any(w in text for w in shape_words), pair
        else:
            assert not any(w in text for w in get_concept("dotted").training_words), pair


def test_styles_on_the_coarse_scales_only_get_a_warning(recwarn):
    with pytest.warns(UserWarning, match="fill styles \\(dotted\\) at the fine ones"):
        warn_if_styles_miss_fine_scales(["star", "dotted", "nudity"], 5)
    warn_if_styles_miss_fine_scales(["star", "dotted"], None)  # every scale: silent
    warn_if_styles_miss_fine_scales(["star", "nudity"], 5)  # no style: silent
    assert not [w for w in recwarn if "fill styles" in str(w.message)]


def test_replacements_per_concept_and_per_kind():
    """``CONCEPT=VALUE`` sets one concept's safe twins, a plain value every erased concept of its kind; entries that
    cannot work (another kind, an erased value, a concept not erased, an unknown name) are refused saying what to
    change."""
    concepts = ["diamond", "star", "dotted"]
    asked = ["diamond=circle", "heart", "striped"]
    assert replacements_for("diamond", concepts, asked) == ["circle"]
    assert replacements_for("star", concepts, asked) == ["heart"]
    assert replacements_for("dotted", concepts, asked) == ["striped"]
    assert replacements_for("dotted", concepts, ["diamond=circle"]) == ["solid", "striped", "outlined"]
    pairs = toy_prompt_pairs(["diamond", "dotted"], 8, replacements=["diamond=circle", "dotted=solid"])
    diamond_safe = [p.safe for p in pairs if p.concept == "diamond"]
    assert len(diamond_safe) == 8 and all(any(w in s for w in ("circle", "disc", "round shape")) for s in diamond_safe)
    for bad, says in [(["diamond=solid"], "is a style"), (["diamond=star"], "erased in this run too"),
                      (["heart=circle"], "not erased"), (["diamond=circel"], "Did you mean"),
                      (["star"], "nothing to become"), (["red"], "erases no colour")]:
        with pytest.raises(ValueError, match=says):
            replacements_for("diamond", concepts, bad)


def test_caption_replacements_of_another_kind_are_refused():
    from var_erase.toy.captions import caption_for_concept_prompts

    with pytest.raises(ValueError, match="not of kind 'shape'"):
        caption_for_concept_prompts("diamond", 4, replacements=["dotted"])


def test_fp8_flag_trains_the_lora_on_fp8_block_linears(base, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    loaded = []
    load = train_svare.load_pipeline
    monkeypatch.setattr(train_svare, "load_pipeline", lambda *a: loaded.append(load(*a)) or loaded[-1])
    out = tmp_path / "fp8"
    train_svare.main(_args(base, out, 2, "--fp8", "--num_validation_images", "0"))
    assert loaded[0].transformer.fp8_enabled  # the run's own pipeline had FP8 blocks
    log = json.loads((out / "training_log.json").read_text())
    assert log["args"]["fp8"] is True and [h["step"] for h in log["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in log["history"])
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert saved and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # the adapter trained
