"""The erasure loop on a tiny pipeline: anchors, every method, LoRA and full fine-tune, checkpoint and resume."""

import os

import pytest
import torch

from var_erase.erasure.anchors import AnchorSet, load_or_sample_anchors, sample_anchors
from var_erase.erasure.config import ErasureConfig
from var_erase.erasure.prompts import PromptPair
from var_erase.erasure.trainer import ErasureTrainer, latest_checkpoint, read

from ._tiny import tiny_pipeline

PAIRS = [PromptPair("a red circle", "a red square", "circle"), PromptPair("a big blue circle", "a big blue square",
                                                                          "circle"),
         PromptPair("a circle on grey", "a square on grey", "circle")]


@pytest.fixture(scope="module")
def anchors():
    return sample_anchors(tiny_pipeline(), [p.safe for p in PAIRS], anchors_per_prompt=2, progress=False)


def _trainer(anchors, **config):
    pipe = tiny_pipeline()
    cfg = ErasureConfig(**({"learning_rate": 1e-2, "max_train_steps": 2} | config))
    return ErasureTrainer(pipe, cfg, PAIRS, anchors, seed=0)


def test_anchor_set_shapes_cache_and_replay(anchors, tmp_path):
    L = anchors.schedule.total_tokens
    assert len(anchors) == 6 and anchors.bits.shape == (6, L, 8) and anchors.inputs.shape == (6, L - 1, 8)
    assert anchors.logits.shape == anchors.cond_logits.shape == (6, L, 16)
    assert anchors.rows_for("a red square") == [0, 3]  # anchor j of every prompt uses seed 42 + j
    assert not torch.equal(anchors.bits[0], anchors.bits[3])
    path = tmp_path / "a.safetensors"
    anchors.save(path)
    loaded = AnchorSet.load(path)
    assert loaded.prompts == anchors.prompts and torch.equal(loaded.bits, anchors.bits)
    cached = load_or_sample_anchors(tiny_pipeline(), ["a red square"], str(tmp_path), "tiny", progress=False)
    again = load_or_sample_anchors(None, ["a red square"], str(tmp_path), "tiny", progress=False,
                                   cuda_graphs=True)  # no model needed; how the tokens were sampled is not in the key
    assert torch.equal(cached.bits, again.bits) and torch.equal(cached.bits[0], anchors.bits[0])


def test_anchor_conditional_logits_are_the_teacher_forced_forward(anchors):
    """The conditional logits kept from the sampler's guidance batch are what a forward along the anchor gives."""
    pipe = tiny_pipeline()
    states, mask = pipe.encode_prompt([anchors.prompts[0], anchors.prompts[4]])
    forced = pipe.transformer(anchors.inputs[[0, 4]], states, mask, schedule=anchors.schedule, cond_drop_prob=0.0)
    torch.testing.assert_close(anchors.cond_logits[[0, 4]], forced.sample, rtol=1e-4, atol=1e-4)


def test_anchor_sampling_refuses_cuda_graphs_off_the_gpu():
    with pytest.raises(ValueError, match="CUDA device"):
        sample_anchors(tiny_pipeline(), ["a red square"], cuda_graphs=True, progress=False)


@pytest.mark.gpu
def test_anchors_sampled_with_cuda_graphs_are_the_eager_ones_and_the_graphs_are_dropped():
    prompts = ["a red square", "two big blue squares on a grey background", "a square"]  # three text lengths
    pipe = tiny_pipeline().to("cuda")
    eager = sample_anchors(pipe, prompts, batch_size=2, cuda_graphs=False, progress=False)
    graphed = sample_anchors(pipe, prompts, batch_size=2, progress=False)  # default on a GPU: graphs
    assert not pipe.cuda_graphs_enabled
    assert torch.equal(graphed.bits, eager.bits)
    for key in ("inputs", "logits", "cond_logits"):
        torch.testing.assert_close(getattr(graphed, key), getattr(eager, key), rtol=1e-5, atol=1e-5)


def test_anchor_sampling_refuses_an_empty_batch():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sample_anchors(tiny_pipeline(), ["a red square"], batch_size=0, progress=False)


def test_svare_lora_trains_every_adapter_tensor(anchors):
    trainer = _trainer(anchors)
    before = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
    assert before and all("attn1" not in k for k in before)  # default targets: cross-attention + FFN
    decay = {id(p): group["weight_decay"] for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(decay[id(p)] == (trainer.config.adam_weight_decay if p.ndim >= 2 else 0.0)
               for p in trainer.trainable_parameters())
    on_cuda = trainer.accelerator.device.type == "cuda"
    assert bool(trainer.optimizer.defaults["fused"]) == on_cuda  # the fused AdamW kernel on CUDA, the plain one off it
    trainer.train(progress=False)
    after = trainer.trainable_state_dict()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    logs = trainer.state.history[-1]
    assert {"loss", "pre", "kept"} <= set(logs) and 0 <= logs["kept"] <= 1


def test_train_reads_each_iterations_logs_after_queueing_the_next(anchors):
    """``training_step(read_logs=False)`` hands back detached device scalars (nothing waits for the GPU); ``train``
    reads them one step late, and its history equals that of iterations read at once."""
    lazy = _trainer(anchors)
    queued = lazy.training_step(0, read_logs=False)
    assert {"loss", "pre", "kept", "bit_err"} <= set(queued)
    assert all(v.ndim == 0 and not v.requires_grad for k, v in queued.items() if k != "lr")
    eager = _trainer(anchors)
    assert read(queued) == pytest.approx(eager.training_step(0))

    trained = _trainer(anchors, max_train_steps=3)
    trained.train(progress=False)
    stepped = _trainer(anchors, max_train_steps=3)
    history = [{"step": step + 1, **stepped.training_step(step)} for step in range(3)]
    assert [h["step"] for h in trained.state.history] == [1, 2, 3]
    assert all(isinstance(v, float) for h in trained.state.history for k, v in h.items() if k != "step")
    for got, want in zip(trained.state.history, history):
        assert got == pytest.approx(want)


@pytest.mark.parametrize("method", ["fce", "vare", "naive", "esd"])
def test_baselines_run_and_train(anchors, method):
    trainer = _trainer(anchors, method=method, max_train_steps=1)
    before = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
    trainer.train(progress=False)
    assert any(not torch.equal(before[k], v) for k, v in trainer.trainable_state_dict().items())
    assert "pre" not in trainer.state.history[-1]


def test_joint_update_and_full_finetune_of_named_modules(anchors):
    trainer = _trainer(anchors, update="joint", train_modules=["attn2", "ff"])
    names = set(trainer.trainable_state_dict())
    assert names and all(".attn2." in n or ".ff." in n for n in names)
    trainer.train(max_train_steps=1, progress=False)


def test_batches_depend_only_on_seed_and_step(anchors):
    a, b = _trainer(anchors), _trainer(anchors)
    assert [a.batch_indices(s) for s in range(5)] == [b.batch_indices(s) for s in range(5)]


def test_checkpoint_resume_matches_uninterrupted_run(anchors, tmp_path):
    full = _trainer(anchors, max_train_steps=3, cond_drop_rate=0.0)
    full.train(progress=False)
    first = _trainer(anchors, max_train_steps=3, cond_drop_rate=0.0)
    first.train(max_train_steps=2, checkpointing_steps=2, output_dir=str(tmp_path), progress=False)
    resumed = _trainer(anchors, max_train_steps=3, cond_drop_rate=0.0)
    resumed.load_checkpoint(latest_checkpoint(str(tmp_path)))
    assert resumed.state.step == 2
    resumed.train(progress=False)
    for k, v in full.trainable_state_dict().items():
        assert torch.allclose(v, resumed.trainable_state_dict()[k], atol=1e-6), k


def test_a_checkpoint_interrupted_while_saving_is_never_picked(anchors, tmp_path):
    """Checkpoints are written to ``.checkpoint-<step>.tmp`` and renamed when complete: a kill during the save
    leaves no ``checkpoint-<step>``; an incomplete folder (from an older version) or a temp folder is skipped with
    a warning, and the run resumes from the last complete one."""
    trainer = _trainer(anchors, max_train_steps=2)
    trainer.train(checkpointing_steps=1, output_dir=str(tmp_path), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    assert {"trainable.safetensors", "trainer_state.pt"} <= set(os.listdir(tmp_path / "checkpoint-2"))
    real_save = trainer.accelerator.save_state

    def killed(path):  # writes part of the checkpoint, then the process dies
        real_save(path)
        os.remove(os.path.join(path, "trainer_state.pt"))
        raise KeyboardInterrupt

    trainer.accelerator.save_state = killed
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(tmp_path / "checkpoint-3"))
    assert sorted(os.listdir(tmp_path)) == [".checkpoint-3.tmp", "checkpoint-1", "checkpoint-2"]
    (tmp_path / "checkpoint-4").mkdir()  # killed mid-save by a version that wrote in place
    (tmp_path / "checkpoint-4" / "optimizer.bin").write_bytes(b"")
    with pytest.warns(UserWarning) as record:
        latest = latest_checkpoint(str(tmp_path))
    assert latest == str(tmp_path / "checkpoint-2")
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint-4: it lacks trainable.safetensors, trainer_state.pt" in messages
    assert ".checkpoint-3.tmp: a checkpoint whose saving was interrupted" in messages
    resumed = _trainer(anchors, max_train_steps=2)
    resumed.load_checkpoint(latest)
    assert resumed.state.step == 2
    trainer.accelerator.save_state = real_save
    trainer.save_checkpoint(str(tmp_path / "checkpoint-3"))  # a later save replaces the leftover temp folder
    assert ".checkpoint-3.tmp" not in os.listdir(tmp_path)
    assert (tmp_path / "checkpoint-3" / "trainer_state.pt").is_file()


def test_checkpoints_total_limit_keeps_the_newest(anchors, tmp_path):
    trainer = _trainer(anchors, max_train_steps=4)
    (tmp_path / "checkpoint-0").mkdir()  # an older run's checkpoint counts too (diffusers' rule)
    trainer.train(checkpointing_steps=1, output_dir=str(tmp_path), progress=False, checkpoints_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="checkpoints_total_limit must be None .* or an integer >= 1"):
            trainer.train(checkpoints_total_limit=bad)


def test_missing_anchors_is_a_clear_error(anchors):
    with pytest.raises(ValueError, match="no auxiliary visual tokens"):
        ErasureTrainer(tiny_pipeline(), ErasureConfig(), [PromptPair("x", "never sampled")], anchors)


def test_bf16_autocast_lora_step_skips_peft_input_casts(anchors):
    """Under bf16 autocast the adapters take the half-precision input as it is (PEFT's float32 cast is switched off
    for the step only) and every adapter tensor still trains."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from peft.tuners.tuners_utils import BaseTunerLayer

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        cfg = ErasureConfig(learning_rate=1e-2, max_train_steps=1)
        trainer = ErasureTrainer(tiny_pipeline(), cfg, PAIRS, anchors, Accelerator(mixed_precision="bf16", cpu=True),
                                 seed=0)
        layers = [m for m in trainer.transformer.modules() if isinstance(m, BaseTunerLayer)]
        seen = []
        hook = layers[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.cast_input_dtype_enabled))
        before = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
        trainer.train(progress=False)
        hook.remove()
        after = trainer.trainable_state_dict()
        assert seen and not any(seen) and all(m.cast_input_dtype_enabled for m in layers)  # restored after the step
        assert [k for k in before if torch.equal(before[k], after[k])] == []
        assert all(v.dtype == torch.float32 for v in after.values())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


RETAIN = ["a green star", "a big green heart", "a star on grey"]


@pytest.fixture(scope="module")
def retain_anchors():
    return sample_anchors(tiny_pipeline(), [p.safe for p in PAIRS] + RETAIN, progress=False)


def test_retain_prompts_add_a_kl_on_their_own_trajectories(retain_anchors):
    plain = ErasureTrainer(tiny_pipeline(), ErasureConfig(learning_rate=1e-2, cond_drop_rate=0.0), PAIRS,
                           retain_anchors, seed=0)
    config = ErasureConfig(learning_rate=1e-2, cond_drop_rate=0.0, retain_weight=2.0, retain_batch_size=2,
                           retain_teacher="guided")
    trainer = ErasureTrainer(tiny_pipeline(), config, PAIRS, retain_anchors, seed=0,
                             retain_prompts=RETAIN + RETAIN[:1])  # repeats are dropped
    assert trainer.retain_prompts == RETAIN and plain.retain_prompts == [] and plain.retain_batch(0) == ([], [])
    prompts, rows = trainer.retain_batch(0)
    assert len(prompts) == 2 and [retain_anchors.prompts[r] for r in rows] == prompts
    assert [trainer.retain_batch(s) for s in range(4)] == [trainer.retain_batch(s) for s in range(4)]
    # over an epoch every retain prompt is seen
    assert {p for s in range(3) for p in trainer.retain_batch(s)[0]} >= set(RETAIN[:2])
    pairs, anchor = [PAIRS[0]], trainer._anchor_batch(retain_anchors.rows_for(PAIRS[0].safe))
    retain = (prompts, trainer._anchor_batch(rows))
    torch.manual_seed(0)
    base = trainer.preserve_loss(pairs, anchor).item()
    with_retain = trainer.preserve_loss(pairs, anchor, retain).item()
    from var_erase.erasure.losses import preservation_kl
    student = trainer._logits(retain[1]["inputs"], prompts)
    expected = 2.0 * preservation_kl(student, retain[1]["logits"]).item()
    assert expected > 0 and with_retain == pytest.approx(base + expected, rel=1e-4)
    before = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
    trainer.train(max_train_steps=1, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in trainer.trainable_state_dict().items())


def test_retain_prompts_need_anchors_and_a_preservation_loss(anchors, retain_anchors):
    with pytest.raises(ValueError, match="no auxiliary visual tokens"):
        ErasureTrainer(tiny_pipeline(), ErasureConfig(), PAIRS, anchors, retain_prompts=["a green star"])
    with pytest.raises(ValueError, match="preservation loss"):
        ErasureTrainer(tiny_pipeline(), ErasureConfig(method="fce"), PAIRS, retain_anchors, retain_prompts=RETAIN)


def test_guided_retain_student_compares_the_students_guided_logits_on_the_retain_prompts(retain_anchors):
    """Extension: with retain_student="guided" the retain KL is KL(teacher || g*cond + (1-g)*uncond of the student,
    over the anchors' temperature) on the retain prompts, where the default compares the conditional logits. With the
    guided retain teacher the retain term is 0 at initialisation (LoRA a no-op) for the guided student only; once the
    adapter moves it equals the hand computation, differs from the conditional student's and has gradients."""
    from var_erase.erasure.losses import preservation_kl
    from var_erase.pipelines.sampling import guide_logits

    settings = dict(learning_rate=1e-2, cond_drop_rate=0.0, retain_weight=2.0, retain_teacher="guided")
    trainers = {s: ErasureTrainer(tiny_pipeline(), ErasureConfig(retain_student=s, **settings), PAIRS, retain_anchors,
                                  seed=0, retain_prompts=RETAIN) for s in ("conditional", "guided")}
    assert ErasureConfig().retain_student == "conditional"
    guided = trainers["guided"]
    prompts, rows = guided.retain_batch(0)
    pairs, anchor = [PAIRS[0]], guided._anchor_batch(retain_anchors.rows_for(PAIRS[0].safe)[:1])
    retain = (prompts, guided._anchor_batch(rows))

    def retain_term(trainer):  # the retain KL alone: preserve loss with it minus without it
        with torch.no_grad():
            return (trainer.preserve_loss(pairs, anchor, retain) - trainer.preserve_loss(pairs, anchor)).item()

    assert retain_term(guided) == pytest.approx(0.0, abs=1e-5) and retain_term(trainers["conditional"]) > 1e-4
    torch.manual_seed(0)
    _move_adapter_off_zero(guided)
    trainers["conditional"].load_trainable_state_dict(guided.trainable_state_dict())
    states, mask = guided._text_batch(prompts)
    uncond = guided.transformer.unconditional_states(len(prompts), states.shape[1]).to(states)
    with torch.no_grad():
        cond = guided.transformer(retain[1]["inputs"], states, mask, schedule=guided.schedule).sample.float()
        unc = guided.transformer(retain[1]["inputs"], uncond, mask, schedule=guided.schedule).sample.float()
    cfg = guided.config
    student = guide_logits(cond, unc, cfg.anchor_guidance_scale) / cfg.anchor_temperature
    expected = 2.0 * preservation_kl(student, retain[1]["logits"]).item()
    conditional = 2.0 * preservation_kl(cond, retain[1]["logits"]).item()
    assert expected > 1e-6 and retain_term(guided) == pytest.approx(expected, rel=1e-4)
    assert retain_term(trainers["conditional"]) == pytest.approx(conditional, rel=1e-4)
    assert abs(expected - conditional) > 1e-3 * max(expected, conditional)
    guided.optimizer.zero_grad(set_to_none=True)
    (guided.preserve_loss(pairs, anchor, retain) - guided.preserve_loss(pairs, anchor).detach()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in guided.trainable_parameters())
    with pytest.raises(ValueError, match="retain_student must be one of"):
        ErasureConfig(retain_student="unconditional")


def test_conditional_teacher_is_the_frozen_model_itself(anchors):
    """At initialisation the LoRA is a no-op: the conditional teacher's KL is 0, the reference's guided one is not."""
    rows = anchors.rows_for(PAIRS[0].safe)[:1]
    losses = {}
    for teacher in ("guided", "conditional"):
        trainer = _trainer(anchors, cond_drop_rate=0.0, preservation_teacher=teacher)
        losses[teacher] = trainer.preserve_loss([PAIRS[0]], trainer._anchor_batch(rows)).item()
    assert losses["conditional"] == pytest.approx(0.0, abs=1e-6) and losses["guided"] > 1e-4
    with pytest.raises(ValueError, match="retain_teacher must be one of"):
        ErasureConfig(retain_teacher="uncond")


def test_selective_checkpointing_trains_like_full_checkpointing(anchors):
    """Keeping the attention outputs (selective) or recomputing whole blocks (full) gives the same step."""
    from var_erase.erasure.trainer import checkpoint_function

    results = {}
    for mode in (False, "full", "selective"):
        torch.manual_seed(0)
        trainer = ErasureTrainer(tiny_pipeline(), ErasureConfig(learning_rate=1e-2, max_train_steps=1), PAIRS,
                                 anchors, seed=0, gradient_checkpointing=mode)
        assert trainer.transformer.gradient_checkpointing is bool(mode)
        trainer.train(progress=False)
        results[mode] = trainer.trainable_state_dict()
    for mode in ("full", "selective"):
        for key, value in results[False].items():
            torch.testing.assert_close(results[mode][key], value, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="selective"):
        checkpoint_function("partial")


def test_a_multi_process_launch_accelerate_does_not_see_is_refused(anchors, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. torchrun on CPUs without ACCELERATE_USE_CPU=1
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        _trainer(anchors)


def _move_adapter_off_zero(trainer) -> None:
    with torch.no_grad():
        for name, param in trainer.transformer.named_parameters():
            if "lora_B" in name:
                param.add_(0.05 * torch.randn_like(param))


def test_unconditional_preservation_keeps_the_unconditional_branch(anchors):
    """Extension: w * KL(frozen unconditional || student unconditional) on the anchors; 0 while the LoRA is a no-op."""
    from var_erase.erasure.losses import preservation_kl

    rows = anchors.rows_for(PAIRS[0].safe)[:1]
    trainer = _trainer(anchors, cond_drop_rate=0.0, preservation_teacher="conditional", uncond_preservation_weight=2.0)
    batch = trainer._anchor_batch(rows)
    assert trainer.preserve_loss([PAIRS[0]], batch).item() == pytest.approx(0.0, abs=1e-6)
    _move_adapter_off_zero(trainer)
    with_u = trainer.preserve_loss([PAIRS[0]], batch).item()
    trainer.config.uncond_preservation_weight = 0.0
    without = trainer.preserve_loss([PAIRS[0]], batch).item()
    states, mask = trainer._text_batch([PAIRS[0].safe])
    uncond = trainer.transformer.unconditional_states(1, states.shape[1]).to(states)
    with torch.no_grad():
        student = trainer.transformer(batch["inputs"], uncond, mask, schedule=trainer.schedule).sample.float()
    expected = 2.0 * preservation_kl(student, trainer._frozen_logits(batch["inputs"], uncond, mask)).item()
    assert expected > 1e-6 and with_u == pytest.approx(without + expected, rel=1e-4)
    with pytest.raises(ValueError, match="uncond_preservation_weight"):
        ErasureConfig(uncond_preservation_weight=-1.0)


def test_first_erase_scale_erases_only_the_later_scales(anchors):
    """Extension: with first_erase_scale = k the erase loss is the reference's on the tokens of scales >= k only."""
    from var_erase.erasure.losses import filtered_cross_entropy

    plain = _trainer(anchors, cond_drop_rate=0.0)
    later = _trainer(anchors, cond_drop_rate=0.0, first_erase_scale=2)
    assert plain.erase_token_weight is None
    first = plain.schedule.grids[0][0] * plain.schedule.grids[0][1]
    weight = later.erase_token_weight
    assert weight.shape == (plain.schedule.total_tokens,) and weight[:first].eq(0).all()
    assert weight[first:].eq(1.0 / plain.schedule.total_tokens).all()
    batch = later._anchor_batch(anchors.rows_for(PAIRS[0].safe)[:1])
    loss, _ = later.erase_loss([PAIRS[0]], batch)
    logits = later._logits(batch["inputs"], [PAIRS[0].unsafe])
    expected = filtered_cross_entropy(logits, batch["bits"], token_weight_L=weight).loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="first_erase_scale"):
        ErasureConfig(num_train_scales=3, first_erase_scale=4)


def test_guided_student_compares_the_students_guided_logits_with_the_teacher(anchors):
    """Extension: with preservation_student="guided" L_Pre is KL(guided teacher || g*cond + (1-g)*uncond of the
    student); at initialisation (LoRA a no-op) the student's guided logits are the frozen model's, which the anchors
    stored, so the KL is 0, and gradients reach the adapter through both rows."""
    from var_erase.erasure.losses import preservation_kl
    from var_erase.pipelines.sampling import guide_logits

    rows = anchors.rows_for(PAIRS[0].safe)[:1]
    trainer = _trainer(anchors, cond_drop_rate=0.0, preservation_student="guided")
    batch = trainer._anchor_batch(rows)
    assert trainer.preserve_loss([PAIRS[0]], batch).item() == pytest.approx(0.0, abs=1e-5)
    _move_adapter_off_zero(trainer)
    loss = trainer.preserve_loss([PAIRS[0]], batch)
    states, mask = trainer._text_batch([PAIRS[0].safe])
    uncond = trainer.transformer.unconditional_states(1, states.shape[1]).to(states)
    with torch.no_grad():
        cond = trainer.transformer(batch["inputs"], states, mask, schedule=trainer.schedule).sample.float()
        unc = trainer.transformer(batch["inputs"], uncond, mask, schedule=trainer.schedule).sample.float()
    g = trainer.config.anchor_guidance_scale
    expected = trainer.config.preservation_weight * preservation_kl(guide_logits(cond, unc, g), batch["logits"])
    assert expected.item() > 1e-6 and loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.trainable_parameters())
    with pytest.raises(ValueError, match="preservation_student must be one of"):
        ErasureConfig(preservation_student="unconditional")


@pytest.mark.gpu
@pytest.mark.parametrize("checkpointing, budget", [("full", None), (False, 0.1)])
def test_compiled_blocks_train_like_eager_blocks(anchors, checkpointing, budget):
    """``compile_blocks=True`` (regional torch.compile; inside full checkpointing, or with the compiler's activation
    memory budget instead) gives the eager run's losses and updates.

    The losses of three steps agree to 1e-3; the adapters' updates to 10% of their norm (5.1% measured on an H200),
    not elementwise: AdamW turns the compiler's rounding differences on near-zero gradients into whole
    learning-rate-sized steps."""
    results = {}
    for compile_blocks in (False, True):
        torch.manual_seed(0)
        trainer = ErasureTrainer(tiny_pipeline(), ErasureConfig(learning_rate=1e-3, max_train_steps=3), PAIRS,
                                 anchors, seed=0, gradient_checkpointing=checkpointing, compile_blocks=compile_blocks,
                                 activation_memory_budget=budget if compile_blocks else None)
        assert trainer.transformer.device.type == "cuda" and trainer.optimizer.defaults["fused"]  # fused AdamW
        start = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
        logs = [trainer.training_step(step) for step in range(3)]
        update = torch.cat([(v - start[k]).flatten().float() for k, v in trainer.trainable_state_dict().items()])
        results[compile_blocks] = (torch.tensor([(log["loss"], log["pre"]) for log in logs]), update)
    (eager_logs, eager), (compiled_logs, compiled) = results[False], results[True]
    torch.testing.assert_close(compiled_logs, eager_logs, rtol=1e-3, atol=1e-5)
    assert eager.norm() > 0 and (compiled - eager).norm() <= 0.1 * eager.norm()
    assert torch.nn.functional.cosine_similarity(compiled, eager, dim=0) > 0.99


def test_activation_memory_budget_needs_compiled_blocks_without_checkpointing(anchors):
    config = ErasureConfig(max_train_steps=1)
    with pytest.raises(ValueError, match="compile_blocks=True"):
        ErasureTrainer(tiny_pipeline(), config, PAIRS, anchors, activation_memory_budget=0.1)
    with pytest.raises(ValueError, match="replaces gradient checkpointing"):
        ErasureTrainer(tiny_pipeline(), config, PAIRS, anchors, compile_blocks=True, gradient_checkpointing="full",
                       activation_memory_budget=0.1)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        ErasureTrainer(tiny_pipeline(), config, PAIRS, anchors, compile_blocks=True, activation_memory_budget=1.5)


def test_lr_schedule_spans_the_run_and_resumes_where_it_stopped(anchors, tmp_path):
    """Cosine over 4 iterations of two optimizer steps each: the rate falls every iteration and reaches 0 with the
    last step; a run resumed from step 2 continues the same rates and ends with the same weights."""
    settings = dict(max_train_steps=4, cond_drop_rate=0.0, lr_scheduler="cosine", lr_warmup_steps=1)
    full = _trainer(anchors, **settings)
    full.train(progress=False)
    rates = [h["lr"] for h in full.state.history]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(1e-2)  # one iteration of warm-up from 0
    assert rates[1] > rates[2] > rates[3] > 0 and full.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0)
    first = _trainer(anchors, **settings)
    first.train(max_train_steps=2, checkpointing_steps=2, output_dir=str(tmp_path), progress=False)
    resumed = _trainer(anchors, **settings)
    resumed.load_checkpoint(latest_checkpoint(str(tmp_path)))
    resumed.train(progress=False)
    assert [h["lr"] for h in resumed.state.history] == pytest.approx(rates)
    for k, v in full.trainable_state_dict().items():
        assert torch.allclose(v, resumed.trainable_state_dict()[k], atol=1e-6), k


def test_weight_average_follows_the_trained_weights_and_gives_them_back(anchors):
    """``ema_decay``: after each optimizer step the average moves by diffusers' ramped decay, ``min((1 + t) / (10 +
    t), ema_decay)`` with ``t`` the steps before this one (0 at the first: the average starts as the weights).
    ``averaged_weights()`` swaps it in and restores the trained weights on exit; without ``ema_decay`` it is a no-op."""
    trainer = _trainer(anchors, update="joint", ema_decay=0.2, max_train_steps=3, cond_drop_rate=0.0)
    expected = None
    for t in range(3):  # joint update: one optimizer step per iteration
        trainer.train(max_train_steps=t + 1, progress=False)
        raw = {k: v.clone() for k, v in trainer.trainable_state_dict().items()}
        decay = 0.0 if t == 0 else min((1 + t) / (10 + t), 0.2)
        expected = raw if expected is None else {k: decay * expected[k] + (1 - decay) * raw[k] for k in raw}
    with trainer.averaged_weights():
        averaged = trainer.trainable_state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(averaged[k], v, rtol=1e-5, atol=1e-7)
        assert any(not torch.equal(averaged[k], raw[k]) for k in raw)  # the average is not the last weights
    for k, v in trainer.trainable_state_dict().items():
        assert torch.equal(v, raw[k]), k
    plain = _trainer(anchors, max_train_steps=1)
    with plain.averaged_weights():
        pass
    assert plain.ema is None


def test_weight_average_resumes_from_a_checkpoint(anchors, tmp_path):
    settings = dict(max_train_steps=3, cond_drop_rate=0.0, ema_decay=0.5)
    full = _trainer(anchors, **settings)
    full.train(progress=False)
    first = _trainer(anchors, **settings)
    first.train(max_train_steps=2, checkpointing_steps=2, output_dir=str(tmp_path / "ema"), progress=False)
    resumed = _trainer(anchors, **settings)
    resumed.load_checkpoint(latest_checkpoint(str(tmp_path / "ema")))
    resumed.train(progress=False)
    with full.averaged_weights(), resumed.averaged_weights():
        for k, v in full.trainable_state_dict().items():
            assert torch.allclose(v, resumed.trainable_state_dict()[k], atol=1e-6), k
    _trainer(anchors, max_train_steps=2).train(checkpointing_steps=2, output_dir=str(tmp_path / "plain"),
                                               progress=False)
    with pytest.raises(ValueError, match="written without ema_decay"):
        _trainer(anchors, **settings).load_checkpoint(latest_checkpoint(str(tmp_path / "plain")))


def test_ema_decay_outside_0_1_is_refused_and_0_turns_the_average_off(anchors):
    for bad in (1, 1.5, -0.1, "0.9"):
        with pytest.raises(ValueError, match="ema_decay"):
            ErasureConfig(ema_decay=bad).validate()
    assert _trainer(anchors, ema_decay=0, max_train_steps=1).ema is None  # how a recipe's average is switched off


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["svare", "naive"])
def test_training_keeps_the_models_it_does_not_run_in_cpu_memory(anchors, method):
    """During ``train`` the text encoder (every prompt is encoded at set-up) and the VAE wait on the CPU, except the
    text encoder of ``naive``, whose rollouts encode prompts; afterwards they are back on their devices."""
    trainer = _trainer(anchors, method=method, max_train_steps=1)
    trainer.pipe.vae.to("cuda")
    assert trainer.pipe.text_encoder.device.type == "cuda"  # the trainer encoded the prompts there
    with trainer.unused_models_offloaded():
        assert next(trainer.pipe.vae.parameters()).device.type == "cpu"
        assert trainer.pipe.text_encoder.device.type == ("cuda" if method == "naive" else "cpu")
        assert trainer.transformer.device.type == "cuda"
        trainer.training_step(0)
    assert trainer.pipe.text_encoder.device.type == "cuda" and next(trainer.pipe.vae.parameters()).is_cuda
    trainer.train(progress=False)
    assert trainer.state.step == 1 and trainer.pipe.text_encoder.device.type == "cuda"
