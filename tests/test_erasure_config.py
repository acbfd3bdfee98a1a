"""ErasureConfig: the reference code's defaults, the paper's options, validation and JSON round trips."""

import json
import math

import pytest
from peft import LoraConfig

from var_erase.erasure import losses
from var_erase.erasure.config import (
    DEFAULT_LORA_TARGET_MODULES,
    FLAT_FIELDS,
    LR_SCHEDULERS,
    METHODS,
    REFERENCE_LEARNING_RATE,
    ErasureConfig,
    ErasureMethodConfig,
    ErasureTrainingArguments,
    default_learning_rate,
    default_lora_config,
    default_lora_target_modules,
    loss_function,
    losses_for,
)


def test_defaults_are_the_reference_code():
    c = ErasureConfig()
    assert c.method == "svare"
    assert c.bit_threshold == math.log(2.0) and c.token_threshold == 0.25
    assert c.comparison == ">=" and c.normalize == "all_tokens" and c.kl_reduction == "code"
    assert c.preservation_weight == 0.5 and c.update == "alternating"
    assert c.max_train_steps == 500 and c.train_batch_size == 2 and c.cond_drop_rate == 0.1
    assert (c.lr_scheduler, c.lr_warmup_steps) == ("constant", 0)  # the reference's lin0 with wpe=1.0
    assert (c.adam_beta1, c.adam_beta2, c.adam_weight_decay, c.max_grad_norm) == (0.9, 0.97, 0.005, 5.0)
    assert (c.anchor_guidance_scale, c.anchor_temperature, c.anchor_top_k, c.anchor_top_p, c.anchor_seed) == (
        4.0, 1.0, 900, 0.97, 42)
    assert (c.inference_guidance_scale, c.inference_temperature) == (4.0, 0.5)
    assert c.num_train_scales is None and c.negative_guidance == 1.0
    assert c.retain_weight is None and c.retain_batch_size is None  # the retain set (an extension) follows L_Pre's
    assert c.effective_retain_weight == c.preservation_weight and c.effective_retain_batch_size == c.train_batch_size
    assert c.preservation_teacher == "guided"  # the reference's CFG-guided teacher
    assert c.lora_target_modules == ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out", "ff.net.0.proj",
                                     "ff.net.2"]


def test_learning_rate_follows_the_finetune_mode():
    assert REFERENCE_LEARNING_RATE == pytest.approx(2.34375e-5)
    assert default_learning_rate("full") == REFERENCE_LEARNING_RATE
    assert default_learning_rate("lora") > default_learning_rate("full")
    lora = ErasureConfig()
    full = ErasureConfig(train_modules=["attn2", "ff"])
    assert (lora.finetune_mode, full.finetune_mode) == ("lora", "full")
    assert full.effective_learning_rate == REFERENCE_LEARNING_RATE
    assert lora.effective_learning_rate == default_learning_rate("lora")
    assert ErasureConfig(learning_rate=3e-4).effective_learning_rate == 3e-4
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        default_learning_rate("qlora")


def test_paper_preset_flips_only_the_disputed_points():
    p = ErasureConfig.paper()
    assert (p.comparison, p.kl_reduction, p.preservation_weight, p.update) == (">", "paper", 1.0, "joint")
    assert p.token_threshold == 0.25 and p.normalize == "all_tokens"
    assert ErasureConfig.paper(update="alternating").update == "alternating"


def test_losses_table_names_real_loss_functions():
    assert losses_for("svare") == ("filtered_cross_entropy", "preservation_kl")
    assert losses_for("fce") == ("filtered_cross_entropy",)
    assert losses_for("vare") == ("vare_basic_loss",)
    assert losses_for("naive") == ("naive_loss",)
    assert losses_for("esd") == ("esd_loss",)
    assert losses_for("esd-u") == losses_for("esd-x") == ("esd.negative_guidance_loss",)
    assert losses_for("uce") == ()  # a closed-form edit: nothing to train
    assert loss_function("esd_loss") is losses.esd_loss
    for method in METHODS:
        assert all(callable(loss_function(name)) for name in losses_for(method))
        assert ErasureConfig(method=method).losses == losses_for(method)
    with pytest.raises(ValueError, match="unknown erasure method 'sdd'"):
        losses_for("sdd")


def test_each_method_has_its_default_lora_targets():
    assert ErasureConfig(method="svare").lora_target_modules == list(DEFAULT_LORA_TARGET_MODULES)
    assert ErasureConfig(method="esd").lora_target_modules == list(DEFAULT_LORA_TARGET_MODULES)
    esd_u, esd_x = ErasureConfig(method="esd-u").lora_target_modules, ErasureConfig(method="esd-x").lora_target_modules
    assert esd_u and all(m.startswith(("attn1.", "ff.")) for m in esd_u)  # ESD-u: no cross-attention
    assert esd_x and all(m.startswith("attn2.") for m in esd_x)  # ESD-x: cross-attention only
    assert ErasureConfig(method="fmn").lora_target_modules == ["attn2.to_q", "attn2.to_k"]
    for method in ("uce", "ac-n", "ac-m"):
        assert ErasureConfig(method=method).lora_target_modules == ["attn2.to_k", "attn2.to_v"]
    assert ErasureConfig(method="esd-x", lora_target_modules=["ff.net.2"]).lora_target_modules == ["ff.net.2"]
    assert ErasureConfig.from_dict(ErasureConfig(method="fmn").to_dict()) == ErasureConfig(method="fmn")
    with pytest.raises(ValueError, match="unknown erasure method"):
        default_lora_target_modules("sdd")


def test_json_round_trip():
    c = ErasureConfig(method="esd", negative_guidance=2.0, train_modules=("attn2",), num_train_scales=3)
    data = json.loads(json.dumps(c.to_dict()))
    assert data["train_modules"] == ["attn2"]
    assert ErasureConfig.from_dict(data) == c
    assert ErasureConfig.from_dict({"method": "vare"}) == ErasureConfig(method="vare")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown ErasureConfig field\(s\) \['alpha'\]"):
        ErasureConfig.from_dict({"alpha": 0.25})


def test_lr_schedulers_are_diffusers_names():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULERS) <= {t.value for t in SchedulerType}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "sdd"}, "method must be one of"),
        ({"comparison": "=>"}, "comparison must be one of"),
        ({"normalize": "mean"}, "normalize must be one of"),
        ({"kl_reduction": "sum"}, "kl_reduction must be one of"),
        ({"update": "sum"}, "update must be one of"),
        ({"token_threshold": 25}, r"token_threshold must be a share of bits in \[0, 1\]"),
        ({"bit_threshold": 0.0}, "bit_threshold must be a positive number"),
        ({"preservation_weight": -1}, "preservation_weight must be a number >= 0"),
        ({"negative_guidance": math.inf}, "negative_guidance must be a finite number"),
        ({"num_train_scales": 0}, "num_train_scales must be None"),
        ({"retain_weight": -0.5}, "retain_weight must be None"),
        ({"retain_batch_size": 0}, "retain_batch_size must be None"),
        ({"learning_rate": 0.0}, "learning_rate must be None"),
        ({"max_train_steps": 0}, "max_train_steps must be an integer >= 1"),
        ({"lr_scheduler": "cosine_annealing"}, r"lr_scheduler must be one of \['constant'"),
        ({"lr_warmup_steps": -1}, "lr_warmup_steps must be an integer >= 0"),
        ({"lr_warmup_steps": 10}, "'constant' has none: use 'constant_with_warmup'"),
        ({"train_batch_size": 1.5}, "train_batch_size must be an integer >= 1"),
        ({"adam_beta2": 1.0}, r"adam_beta2 must be in \[0, 1\)"),
        ({"cond_drop_rate": 1.0}, r"cond_drop_rate must be a probability in \[0, 1\)"),
        ({"lora_rank": 0}, "lora_rank must be an integer >= 1"),
        ({"lora_target_modules": []}, "lora_target_modules must be a non-empty list"),
        ({"train_modules": "ff"}, "train_modules must be None"),
        ({"anchor_temperature": 0}, "anchor_temperature must be a number > 0"),
        ({"inference_top_p": 1.5}, r"inference_top_p must be in \(0, 1\]"),
        ({"inference_top_k": -1}, "inference_top_k must be an integer >= 0"),
        ({"anchor_seed": True}, "anchor_seed must be an integer >= 0"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        ErasureConfig(**overrides)


def test_validation_lists_every_error_and_catches_later_edits():
    with pytest.raises(ValueError) as info:
        ErasureConfig(method="x", token_threshold=2.0)
    assert "method" in str(info.value) and "token_threshold" in str(info.value)
    c = ErasureConfig()
    c.comparison = ">>"
    with pytest.raises(ValueError, match="comparison"):
        c.validate()


def test_config_is_a_method_config_with_a_peft_lora_config_and_training_arguments():
    c = ErasureConfig(method="fmn", lora_rank=8, lora_dropout=0.1, max_train_steps=3, learning_rate=1e-3)
    assert isinstance(c.method_config, ErasureMethodConfig) and isinstance(c.training_args, ErasureTrainingArguments)
    assert isinstance(c.lora_config, LoraConfig) and c.lora_config is c.method_config.lora_config
    assert (c.lora_config.r, c.lora_config.lora_alpha, c.lora_config.lora_dropout) == (8, 4.0, 0.1)
    assert c.lora_config.init_lora_weights == "gaussian"
    assert c.lora_config.target_modules == ["attn2.to_q", "attn2.to_k"]
    assert (c.training_args.max_train_steps, c.training_args.learning_rate) == (3, 1e-3)
    parts = ErasureConfig(method_config=ErasureMethodConfig(method="fmn", lora_config=default_lora_config(
        "fmn", rank=8, dropout=0.1)), training_args=ErasureTrainingArguments(max_train_steps=3, learning_rate=1e-3))
    assert parts == c and parts.to_dict() == c.to_dict()
    assert list(c.to_dict()) == list(FLAT_FIELDS) and c.to_dict()["lora_dropout"] == 0.1
    c.lora_rank = 16  # a flat name writes through to the part that holds it
    assert c.lora_config.r == 16 and c != parts
    c.max_train_steps = 7
    assert c.training_args.max_train_steps == 7


def test_a_given_lora_config_is_copied_and_flat_lora_names_override_it():
    given = LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=["attn2.to_k"])
    c = ErasureConfig(lora_config=given, lora_rank=6)
    assert c.lora_config is not given and given.r == 2  # the caller's config is never edited
    assert (c.lora_rank, c.lora_alpha, c.lora_target_modules, c.lora_config.use_rslora) == (6, 8, ["attn2.to_k"], True)
    assert ErasureConfig(lora_config=LoraConfig(r=2)).lora_target_modules == list(DEFAULT_LORA_TARGET_MODULES)
    with pytest.raises(ValueError, match="lora_config must be a peft.LoraConfig, got dict"):
        ErasureConfig(lora_config={"r": 4})
    with pytest.raises(ValueError, match=r"lora_dropout must be a probability in \[0, 1\)"):
        ErasureConfig(lora_dropout=1.0)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['lora_r'\]; valid names are"):
        ErasureConfig(lora_r=4)


def test_the_trainer_adds_a_copy_of_the_configs_lora_config():
    from var_erase.erasure.anchors import sample_anchors
    from var_erase.erasure.prompts import PromptPair
    from var_erase.erasure.trainer import ErasureTrainer

    from ._tiny import tiny_pipeline

    pipe, pairs = tiny_pipeline(), [PromptPair("a red circle", "a red square", "circle")]
    anchors = sample_anchors(pipe, ["a red square"], anchors_per_prompt=1, progress=False)
    config = ErasureConfig(lora_config=LoraConfig(r=3, lora_alpha=6, use_rslora=True, init_lora_weights="gaussian",
                                                  target_modules=["attn2.to_v"]), max_train_steps=1)
    trainer = ErasureTrainer(pipe, config, pairs, anchors, pad_lora_rank=False)
    added = trainer.transformer.peft_config["default"]
    assert added is not config.lora_config and config.lora_config.r == 3
    assert (added.r, added.lora_alpha, added.use_rslora) == (3, 6, True)
    adapted = {name.rsplit(".lora_A", 1)[0] for name in trainer.trainable_state_dict() if ".lora_A" in name}
    assert adapted and all(name.endswith("attn2.to_v") for name in adapted)
    lora_a = next(m for n, m in trainer.transformer.named_modules() if n.endswith("attn2.to_v"))
    assert lora_a.scaling["default"] == pytest.approx(6 / 3**0.5)  # rsLoRA's alpha / sqrt(r)
