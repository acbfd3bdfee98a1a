"""LoRA products computed at a rank rounded up to a multiple of 8 (``var_erase.erasure.rank_padding``): the same
outputs, the same gradients and the same stored adapter as PEFT's own products."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn

from var_erase.erasure.config import ErasureConfig
from var_erase.erasure.rank_padding import (
    RANK_MULTIPLE,
    _PaddedLoraA,
    pad_lora_ranks,
    padded_lora_ranks,
    unpad_lora_ranks,
)
from var_erase.erasure.trainer import ErasureTrainer

from ._tiny import tiny_pipeline
from .test_trainer import PAIRS, _move_adapter_off_zero, anchors  # noqa: F401 - the fixture


def _model(rank: int, lora_bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12), nn.Conv1d(12, 12, 1)).double()
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0", "2", "3"],
                                            init_lora_weights=True if lora_bias else "gaussian", lora_bias=lora_bias))
    with torch.no_grad():  # B off zero, so that every gradient is non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _linear_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.base_model.model[2](model.base_model.model[1](model.base_model.model[0](x)))


def test_padded_products_give_the_same_outputs_gradients_and_adapter():
    model = _model(rank=3)
    x = torch.randn(5, 12, dtype=torch.float64)
    plain_out, plain = _linear_out(model, x), _grads_of(model, x)
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    assert pad_lora_ranks(model) == 2  # the two Linear layers; the Conv1d's LoRA is not a plain linear pair
    lora_a = model.base_model.model[0].lora_A["default"]
    assert isinstance(lora_a, _PaddedLoraA) and lora_a.weight.shape == (3, 12)  # the parameters are not touched
    assert lora_a(x).shape == (5, RANK_MULTIPLE)
    torch.testing.assert_close(_linear_out(model, x), plain_out, rtol=1e-12, atol=1e-12)
    padded = _grads_of(model, x)
    assert padded.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-12, atol=1e-12, msg=name)
    saved = get_peft_model_state_dict(model)
    assert saved.keys() == state.keys() and all(saved[k].shape == state[k].shape for k in state)

    unpad_lora_ranks(model)
    assert type(model.base_model.model[0].lora_A["default"]) is nn.Linear


def _grads_of(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a loss of the two Linear layers' output w.r.t. the LoRA parameters and the input."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = _linear_out(model, x)
    (out.square().sum() + out[:, :3].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == 4  # A and B of both Linear layers
    return grads | {"input": x.grad}


def test_ranks_already_aligned_and_layers_with_a_bias_compute_as_peft_does():
    assert pad_lora_ranks(_model(rank=RANK_MULTIPLE)) == 0
    assert pad_lora_ranks(_model(rank=3, lora_bias=True)) == 0


def test_padded_context_restores_every_class_also_after_an_exception():
    model = _model(rank=3)
    lora_a = model.base_model.model[0].lora_A["default"]
    with padded_lora_ranks(model) as padded:
        assert padded == 2 and isinstance(lora_a, _PaddedLoraA)
        with padded_lora_ranks(model):  # nested: the inner exit gives back the padded class of the outer
            pass
        assert isinstance(lora_a, _PaddedLoraA)
    assert type(lora_a) is nn.Linear
    with pytest.raises(RuntimeError, match="mid-step"), padded_lora_ranks(model):
        raise RuntimeError("mid-step")
    assert _classes(model) == _classes(_model(rank=3))


def _classes(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def _lora_classes(transformer: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in transformer.named_modules() if name.split(".")[-2:-1] in (["lora_A"],
                                                                                                   ["lora_B"])}


@pytest.mark.parametrize("pad", [None, False, True])
def test_trainer_pads_lora_ranks_only_inside_its_steps_and_by_default_on_cuda(anchors, pad):  # noqa: F811
    trainer = ErasureTrainer(tiny_pipeline(), ErasureConfig(max_train_steps=1), PAIRS, anchors, pad_lora_rank=pad)
    expected = torch.cuda.is_available() if pad is None else pad  # the trainer's device: CUDA when there is one
    assert not any(isinstance(m, _PaddedLoraA) for m in trainer.transformer.modules())
    with trainer.lora_ranks_padded():
        assert any(isinstance(m, _PaddedLoraA) for m in trainer.transformer.modules()) == expected


def test_training_pads_its_steps_and_leaves_peft_modules_and_the_same_adapter(anchors, tmp_path):  # noqa: F811
    """Padded inside every step, PEFT's own classes after training and after an exception mid-training, and the
    adapter saved afterwards loads back unchanged."""
    pipe = tiny_pipeline()
    trainer = ErasureTrainer(pipe, ErasureConfig(max_train_steps=3, learning_rate=1e-2), PAIRS, anchors,
                             pad_lora_rank=True)
    original = _lora_classes(trainer.transformer)
    assert original and set(original.values()) == {nn.Linear}
    lora_a = next(m for n, m in trainer.transformer.named_modules() if n.endswith("lora_A.default"))
    seen = []
    hook = lora_a.register_forward_hook(lambda module, args, out: seen.append((type(module), out.shape[-1])))
    trainer.train(2, progress=False)
    assert seen and set(seen) == {(_PaddedLoraA, RANK_MULTIPLE)}  # every forward of the steps ran padded
    assert _lora_classes(trainer.transformer) == original

    def fail(module, args, out):
        if len(seen) > 3:
            raise RuntimeError("stop mid-training")

    failing = lora_a.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="stop mid-training"):
        trainer.train(3, progress=False)
    failing.remove()
    hook.remove()
    assert _lora_classes(trainer.transformer) == original

    state = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
    pipe.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(trainer.transformer),
                           safe_serialization=True)
    fresh = tiny_pipeline()
    fresh.load_lora_weights(tmp_path)
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=next(iter(fresh.transformer.peft_config)))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)


def test_scoped_padding_trains_bitwise_as_padding_kept_on(anchors):  # noqa: F811
    """Padding per step computes exactly what the modules padded once for good (the earlier mechanism) computed."""
    runs = []
    for scoped in (True, False):
        torch.manual_seed(0)
        trainer = ErasureTrainer(tiny_pipeline(), ErasureConfig(max_train_steps=2, learning_rate=1e-2), PAIRS,
                                 anchors, pad_lora_rank=scoped)
        if not scoped:
            assert pad_lora_ranks(trainer.transformer) > 0
        trainer.train(progress=False)
        runs.append((trainer.state.history, trainer.trainable_state_dict()))
    (history, state), (kept_history, kept_state) = runs
    assert history == kept_history and state.keys() == kept_state.keys()
    assert all(torch.equal(state[k], kept_state[k]) for k in state)


def test_padded_lora_trains_like_peft_products(anchors):  # noqa: F811
    """One erase and one preserve backward on the tiny model: the same losses and gradients (float32 rounding)."""
    results = []
    for pad in (False, True):
        torch.manual_seed(0)
        trainer = ErasureTrainer(tiny_pipeline(), ErasureConfig(cond_drop_rate=0.0, max_train_steps=1), PAIRS,
                                 anchors, pad_lora_rank=pad)
        torch.manual_seed(1)
        _move_adapter_off_zero(trainer)
        batch = trainer._anchor_batch(anchors.rows_for(PAIRS[0].safe)[:1])
        with trainer.lora_ranks_padded() as padded:
            assert (padded > 0) == pad
            loss, _ = trainer.erase_loss([PAIRS[0]], batch)
            loss = loss + trainer.preserve_loss([PAIRS[0]], batch)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (plain_loss, plain), (padded_loss, padded) = results
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-5, atol=1e-7)
    assert padded.keys() == plain.keys() and all(g.abs().sum() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-4, atol=1e-7, msg=name)
