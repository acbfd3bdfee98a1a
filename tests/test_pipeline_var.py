import accelerate
import numpy as np
import pytest
import torch
from peft import LoraConfig

from var_erase.loaders.lora import adapter_layers
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.pipelines.sampling import guide_logits

from ._tiny import LORA_TARGETS, TINY_SIZE, tiny_pipeline, tiny_transformer


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_generates_pil_images_of_the_requested_size(pipe):
    out = pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=_gen())
    assert len(out.images) == 4
    assert all(im.size == (TINY_SIZE, TINY_SIZE) for im in out.images)


def test_same_generator_same_image_and_seeds_differ(pipe):
    a = pipe("a red circle", generator=_gen(1), output_type="np").images
    b = pipe("a red circle", generator=_gen(1), output_type="np").images
    c = pipe("a red circle", generator=_gen(2), output_type="np").images
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_output_types(pipe):
    np_img = pipe("x", generator=_gen(), output_type="np").images
    assert np_img.shape == (1, TINY_SIZE, TINY_SIZE, 3) and 0 <= np_img.min() and np_img.max() <= 1
    pt = pipe("x", generator=_gen(), output_type="pt").images
    assert pt.shape == (1, 3, TINY_SIZE, TINY_SIZE)
    latent = pipe("x", generator=_gen(), output_type="latent").images
    assert latent.shape == (1, 8, 16, 16)


def test_save_and_reload_regenerates_identical_image(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = pipe("a green star", generator=_gen(3), output_type="np").images
    b = loaded("a green star", generator=_gen(3), output_type="np").images
    assert np.array_equal(a, b)


def test_trajectory_replays_under_teacher_forcing(pipe):
    """The trajectory's inputs teacher-force the model back to the same guided logits (auxiliary visual tokens)."""
    g = 3.0
    out = pipe(["a red circle", "two blue squares"], guidance_scale=g, temperature=1.0, generator=_gen(4),
               return_trajectory=True, output_type="latent")
    traj = out.trajectory
    L, d = traj.schedule.total_tokens, 8
    assert traj.bits.shape == (2, L, d) and traj.inputs.shape == (2, L - 1, d) and traj.logits.shape == (2, L, 2 * d)
    per_scale = [traj.bits[:, traj.schedule.scale_slice(k)] for k in range(traj.schedule.num_scales)]
    assert torch.allclose(pipe.vae.quantizer.teacher_forcing_inputs(per_scale, traj.schedule), traj.inputs)

    states, mask = pipe.encode_prompt(["a red circle", "two blue squares"])
    uncond = pipe.transformer.unconditional_states(2, states.shape[1])
    tf = pipe.transformer
    cond_logits = tf(traj.inputs, states, mask, schedule=traj.schedule).sample
    uncond_logits = tf(traj.inputs, uncond, mask, schedule=traj.schedule).sample
    assert torch.allclose(guide_logits(cond_logits, uncond_logits, g), traj.logits, atol=1e-4)
    assert torch.allclose(cond_logits, traj.cond_logits, atol=1e-4)  # the guidance batch's conditional half


def test_unguided_trajectory_keeps_the_logits_before_temperature_as_conditional(pipe):
    traj = pipe("a red circle", guidance_scale=1.0, temperature=0.5, generator=_gen(4), return_trajectory=True,
                output_type="latent").trajectory
    torch.testing.assert_close(traj.logits, traj.cond_logits / 0.5)


def test_negative_prompt_and_no_guidance_run(pipe):
    a = pipe("a red circle", negative_prompt="blue", generator=_gen(5), output_type="np").images
    b = pipe("a red circle", generator=_gen(5), output_type="np").images
    c = pipe("a red circle", guidance_scale=1.0, generator=_gen(5), output_type="np").images
    assert a.shape == b.shape == c.shape
    assert not np.array_equal(a, b)


def test_callback_sees_every_scale(pipe):
    seen = []

    def callback(p, k, _t, tensors):
        seen.append((k, tensors["bits"].shape))
        return tensors

    pipe("x", generator=_gen(), callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["bits"])
    assert [k for k, _ in seen] == list(range(7))
    assert seen[-1][1] == (1, 256, 8)


def test_bf16_pipeline_generates(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = VARPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    loaded.set_progress_bar_config(disable=True)
    assert loaded("a red circle", generator=_gen(), output_type="np").images.shape == (1, TINY_SIZE, TINY_SIZE, 3)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "non-empty"),
    (dict(prompt=""), None),  # an empty string is a valid (unconditional-like) prompt
    (dict(height=0), "positive integer"),
    (dict(height=-64), "positive integer"),
    (dict(height=64, width=640), "aspect ratio"),
    (dict(height=62), "multiple of the VAE stride"),
    (dict(height=64, width=48), "not a size this model draws"),
    (dict(guidance_scale=-2.0), "guidance_scale"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt"),
])
def test_bad_inputs_name_the_fix(pipe, kwargs, match):
    args = dict(prompt="a red circle", generator=_gen(), output_type="latent") | kwargs
    if match is None:
        pipe(**args)
        return
    with pytest.raises(ValueError, match=match):
        pipe(**args)


# ---------------------------------------------------------------------------------------------------------------------
# callbacks and the per-call state, as in diffusers

def test_callback_gets_the_latent_after_each_scale_and_output_type_latent_returns_it(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, t, kwargs["latents"].clone(), None if kwargs["f_hat"] is None else kwargs["f_hat"].clone()))
        return kwargs

    out = pipe("a red circle", generator=_gen(6), output_type="latent", return_trajectory=True,
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "f_hat"])
    assert [(i, t) for i, t, _, _ in seen] == [(k, k) for k in range(7)]
    assert seen[0][3] is None  # nothing accumulated before scale 0
    for (_, _, before, _), (_, _, _, f_hat) in zip(seen, seen[1:]):
        assert torch.equal(f_hat, before)  # f_hat: the latent before the scale's codes, latents: after them
    torch.testing.assert_close(out.images, seen[-1][2], rtol=0, atol=0)
    quantizer, schedule, latent = pipe.vae.quantizer, out.trajectory.schedule, None
    for k, grid in enumerate(schedule.grids):  # every step's latent is the sum of the codes sampled so far
        codes = quantizer.bits_to_codes(out.trajectory.bits[:, schedule.scale_slice(k)], grid)
        latent = quantizer.accumulate(latent, codes, k, schedule)
        torch.testing.assert_close(seen[k][2], latent, rtol=0, atol=0)


def test_callback_defaults_to_latents_and_accepts_none(pipe):
    names = []
    pipe("x", generator=_gen(), output_type="latent", callback_on_step_end=lambda p, i, t, kw: names.append(sorted(kw)))
    assert names == [["latents"]] * 7


def test_latents_returned_by_the_callback_replace_the_state(pipe):
    plain = pipe("a red circle", generator=_gen(7), output_type="latent").images

    def zero_last(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])} if i == p.num_timesteps - 1 else {}

    zeroed = pipe("a red circle", generator=_gen(7), output_type="latent", callback_on_step_end=zero_last).images
    assert plain.abs().sum() > 0 and torch.equal(zeroed, torch.zeros_like(plain))

    def shift_scale_2(p, i, t, kwargs):  # a change mid-run feeds the next scale's input
        return {"latents": kwargs["latents"] + 0.5} if i == 2 else kwargs

    shifted = pipe("a red circle", generator=_gen(7), output_type="latent", return_trajectory=True,
                   callback_on_step_end=shift_scale_2).trajectory
    reference = pipe("a red circle", generator=_gen(7), output_type="latent", return_trajectory=True).trajectory
    later = slice(shifted.schedule.offsets[3] - 1, None)  # the inputs of scales 3.. are made from the shifted latent
    assert torch.equal(shifted.inputs[:, :later.start], reference.inputs[:, :later.start])
    assert not torch.allclose(shifted.inputs[:, later], reference.inputs[:, later])


def test_bits_returned_by_the_callback_rebuild_the_latent(pipe):
    def zero_bits_of_scale_1(p, i, t, kwargs):
        return {"bits": torch.zeros_like(kwargs["bits"])} if i == 1 else kwargs

    out = pipe("a red circle", generator=_gen(8), output_type="latent", return_trajectory=True,
               callback_on_step_end=zero_bits_of_scale_1, callback_on_step_end_tensor_inputs=["bits", "latents"])
    traj = out.trajectory
    assert not traj.bits[:, traj.schedule.scale_slice(1)].any()
    per_scale = [traj.bits[:, traj.schedule.scale_slice(k)] for k in range(traj.schedule.num_scales)]
    latent = None
    for k, bits in enumerate(per_scale):
        codes = pipe.vae.quantizer.bits_to_codes(bits, traj.schedule.grids[k])
        latent = pipe.vae.quantizer.accumulate(latent, codes, k, traj.schedule)
    torch.testing.assert_close(out.images, latent, rtol=0, atol=0)
    torch.testing.assert_close(pipe.vae.quantizer.teacher_forcing_inputs(per_scale, traj.schedule), traj.inputs)


@pytest.mark.parametrize("inputs, returned, match", [
    (["noise_pred"], None, r"not in \['latents', 'f_hat', 'bits'\].*'latents' is the accumulated latent"),
    (["latents"], {"prompt_embeds": torch.zeros(1)}, r"returned \['prompt_embeds'\]"),
    (["latents"], {"latents": torch.zeros(1, 8, 4, 4)}, "returned latents .* replaces a tensor of shape"),
    (["latents"], [1, 2], "must return a dict"),
])
def test_callback_misuse_names_the_fix(pipe, inputs, returned, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pipe("x", generator=_gen(), output_type="latent", callback_on_step_end=lambda *a: returned,
             callback_on_step_end_tensor_inputs=inputs)


def test_callback_reads_the_call_state_and_lowers_guidance_mid_run(pipe):
    state = []

    def callback(p, i, t, kwargs):
        state.append((p.guidance_scale, p.do_classifier_free_guidance, p.num_timesteps, p.attention_kwargs))
        if i == 2:
            p._guidance_scale = 1.0  # guidance off from scale 3 on
        return kwargs

    traj = pipe("a red circle", guidance_scale=3.0, temperature=1.0, generator=_gen(9), return_trajectory=True,
                output_type="latent", callback_on_step_end=callback, attention_kwargs={"scale": 1.0}).trajectory
    assert state[:3] == [(3.0, True, 7, {"scale": 1.0})] * 3 and state[3][:2] == (1.0, False)
    unguided = slice(traj.schedule.offsets[3], None)
    torch.testing.assert_close(traj.logits[:, unguided], traj.cond_logits[:, unguided], rtol=0, atol=0)
    guided = slice(0, traj.schedule.offsets[3])
    assert not torch.allclose(traj.logits[:, guided], traj.cond_logits[:, guided])


def test_guidance_cannot_be_switched_on_mid_run(pipe):
    def callback(p, i, t, kwargs):
        p._guidance_scale = 3.0
        return kwargs

    with pytest.raises(ValueError, match="started without guidance"):
        pipe("x", guidance_scale=1.0, generator=_gen(), output_type="latent", callback_on_step_end=callback)


def test_interrupt_stops_after_the_scale_and_decodes_what_was_accumulated(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append(i)
        p._interrupt = i == 2
        return kwargs

    out = pipe("a red circle", generator=_gen(10), output_type="latent", return_trajectory=True,
               callback_on_step_end=callback)
    traj = out.trajectory
    assert seen == [0, 1, 2] and pipe.interrupt
    assert traj.bits.shape[1] == traj.schedule.offsets[3] and traj.inputs.shape[1] == traj.schedule.offsets[3] - 1
    full = pipe("a red circle", generator=_gen(10), output_type="latent", return_trajectory=True).trajectory
    assert torch.equal(traj.bits, full.bits[:, :traj.bits.shape[1]])
    assert not pipe.interrupt  # the next call starts afresh


# ---------------------------------------------------------------------------------------------------------------------
# prompt embeddings

def test_encode_prompt_on_the_text_components_alone_feeds_prompt_embeds(pipe):
    text_only = VARPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transformer=None, vae=None)
    no_text = VARPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, vae=pipe.vae)
    no_text.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "two blue squares"]
    args = dict(guidance_scale=3.0, num_images_per_prompt=2, output_type="latent")

    embeds, mask, neg, neg_mask = text_only.encode_prompt(prompts, do_classifier_free_guidance=True)
    assert embeds.shape[0] == 2 and mask.dtype == torch.bool and neg is None and neg_mask is None
    expected = pipe(prompts, generator=_gen(11), **args).images
    got = no_text(prompt_embeds=embeds, prompt_attention_mask=mask, generator=_gen(11), **args).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    embeds, mask, neg, neg_mask = text_only.encode_prompt(prompts, do_classifier_free_guidance=True,
                                                          negative_prompt="green")
    expected = pipe(prompts, negative_prompt="green", generator=_gen(12), **args).images
    got = no_text(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_attention_mask=neg_mask, generator=_gen(12), **args).images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_encode_prompt_repeats_per_image_and_keeps_its_two_output_form(pipe):
    embeds, mask = pipe.encode_prompt(["a", "bb"], num_images_per_prompt=3)
    assert embeds.shape[:2] == mask.shape == (6, 3) and torch.equal(embeds[0], embeds[2])
    again, again_mask = pipe.encode_prompt(None, prompt_embeds=embeds[::3], prompt_attention_mask=mask[::3],
                                           num_images_per_prompt=3)
    assert torch.equal(again, embeds) and torch.equal(again_mask, mask)


def _embeds(pipe, prompts=("a red circle",)):
    return pipe.encode_prompt(list(prompts))


@pytest.mark.parametrize("case, match", [
    ("prompt_and_embeds", "either prompt or prompt_embeds"),
    ("neither", "non-empty string"),
    ("embeds_without_mask", "needs prompt_attention_mask"),
    ("mask_without_embeds", "prompt_attention_mask goes with prompt_embeds"),
    ("mask_shape", r"prompt_attention_mask must be a tensor of shape \(1, 13\)"),
    ("text_dim", "takes text_dim=32"),
    ("negative_both", "either negative_prompt or negative_prompt_embeds"),
    ("negative_batch", "negative_prompt_embeds has 2 rows but there are 1 prompts"),
    ("negative_without_mask", "needs negative_prompt_attention_mask"),
])
def test_bad_prompt_embeds_name_the_fix(pipe, case, match):
    embeds, mask = _embeds(pipe)
    neg, neg_mask = _embeds(pipe, ["blue", "green"])
    args = {
        "prompt_and_embeds": dict(prompt="x", prompt_embeds=embeds, prompt_attention_mask=mask),
        "neither": dict(),
        "embeds_without_mask": dict(prompt_embeds=embeds),
        "mask_without_embeds": dict(prompt="x", prompt_attention_mask=mask),
        "mask_shape": dict(prompt_embeds=embeds, prompt_attention_mask=mask[:, :-1]),
        "text_dim": dict(prompt_embeds=embeds[..., :16], prompt_attention_mask=mask),
        "negative_both": dict(prompt="x", negative_prompt="y", negative_prompt_embeds=neg[:1],
                              negative_prompt_attention_mask=neg_mask[:1]),
        "negative_batch": dict(prompt="x", negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask),
        "negative_without_mask": dict(prompt="x", negative_prompt_embeds=neg[:1]),
    }[case]
    with pytest.raises(ValueError, match=match):
        pipe(generator=_gen(), output_type="latent", **args)


def test_long_prompts_are_cut_with_a_warning_naming_the_dropped_text(pipe, caplog):
    long_prompt = "a red circle " * 5 + "and the tail that gets dropped"  # 95 bytes: ByT5 gives 96 tokens, limit 64
    with caplog.at_level("WARNING", logger="var_erase.pipelines.pipeline_var"):
        embeds, _ = pipe.encode_prompt(["short", long_prompt])
    assert embeds.shape[1] == 64
    (record,) = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert "prompt 1 has 96 text tokens but the limit is 64" in record.getMessage()
    assert "last 32 tokens were dropped" in record.getMessage()
    assert repr(long_prompt[63:]) in record.getMessage()

    caplog.clear()
    with caplog.at_level("WARNING", logger="var_erase.pipelines.pipeline_var"):
        pipe.encode_prompt("a red circle", max_sequence_length=8)
        pipe.encode_prompt("a red circle")
    assert [r.getMessage() for r in caplog.records] == [
        "prompt 0 has 13 text tokens but the limit is 8 (max_sequence_length, at most the transformer's "
        "max_text_len): its last 5 tokens were dropped: 'ircle'"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# non-finite and other bad numbers

@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(guidance_scale="4"), "guidance_scale must be a finite number, got '4'"),
    (dict(attention_kwargs={"scale": float("nan")}), r"attention_kwargs\['scale'\] must be a finite number"),
    (dict(attention_kwargs={"lora_scale": 0.5}), r"\['lora_scale'\] are not used.*only key is 'scale'"),
    (dict(max_sequence_length=0), "max_sequence_length must be a positive number"),
])
def test_non_finite_and_unknown_settings_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", generator=_gen(), output_type="latent", **kwargs)


def test_a_callback_setting_a_non_finite_guidance_is_refused(pipe):
    def callback(p, i, t, kwargs):
        p._guidance_scale = float("nan")
        return kwargs

    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        pipe("x", generator=_gen(), output_type="latent", callback_on_step_end=callback)


# ---------------------------------------------------------------------------------------------------------------------
# batching, attention slicing

def test_a_batch_gives_the_images_of_its_prompts_one_by_one(pipe):
    """Per-image generators make a batch reproduce single generations: on CPU the bits are identical, the logits
    agree to 1e-5 (measured 4.8e-7) and the images to 1e-5 (measured 3.2e-6); prompts of different lengths share
    one padded (masked) text memory."""
    prompts, seeds = ["a red circle", "two small blue squares on the left side"], (10, 11)
    batch = pipe(prompts, generator=[_gen(s) for s in seeds], output_type="np", return_trajectory=True)
    singles = [pipe(p, generator=_gen(s), output_type="np", return_trajectory=True) for p, s in zip(prompts, seeds)]
    assert torch.equal(batch.trajectory.bits, torch.cat([s.trajectory.bits for s in singles]))
    torch.testing.assert_close(batch.trajectory.cond_logits, torch.cat([s.trajectory.cond_logits for s in singles]),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(batch.images, np.concatenate([s.images for s in singles]), rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_a_batch_on_the_gpu_agrees_with_one_by_one_within_the_kernels_tolerance():
    """On CUDA a batch runs other GEMM tilings than single prompts, so its float32 logits differ in the last bits;
    the tolerance stated for users: logits within 1e-4, at most 0.1% of the sampled bits flipped (a bit flips only
    when its uniform draw falls between two nearly equal probabilities), images within 1e-3 where no bit flipped.
    Written from the CPU test's bounds and the issue's H100 measurement (6.8e-4 on images); passed on an H100."""
    pipe = tiny_pipeline().to("cuda")
    prompts, seeds = ["a red circle", "two small blue squares on the left side"], (10, 11)
    gens = [torch.Generator("cuda").manual_seed(s) for s in seeds]
    batch = pipe(prompts, generator=gens, output_type="np", return_trajectory=True)
    singles = [pipe(p, generator=torch.Generator("cuda").manual_seed(s), output_type="np", return_trajectory=True)
               for p, s in zip(prompts, seeds)]
    one_by_one_bits = torch.cat([s.trajectory.bits for s in singles])
    flipped = (batch.trajectory.bits != one_by_one_bits).float().mean().item()
    assert flipped <= 1e-3, flipped
    if flipped == 0:
        torch.testing.assert_close(batch.trajectory.cond_logits,
                                   torch.cat([s.trajectory.cond_logits for s in singles]), rtol=0, atol=1e-4)
        np.testing.assert_allclose(batch.images, np.concatenate([s.images for s in singles]), rtol=0, atol=1e-3)


def test_attention_slicing_is_refused_with_what_to_use_instead(pipe):
    with pytest.raises(NotImplementedError, match=r"does not slice attention.*enable_model_cpu_offload\(\)"):
        pipe.enable_attention_slicing()
    with pytest.raises(NotImplementedError, match="no xformers attention"):
        pipe.enable_xformers_memory_efficient_attention()
    pipe.disable_attention_slicing()  # nothing is sliced: nothing to undo


# ---------------------------------------------------------------------------------------------------------------------
# per-call LoRA scale

def _with_random_lora(seed=0) -> VARPipeline:
    pipe = tiny_pipeline()
    torch.manual_seed(seed)  # init_lora_weights=False: random A and B, so the adapter changes every output
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LORA_TARGETS),
                                 adapter_name="erase")
    return pipe


def _scalings(pipe) -> list[dict]:
    return [dict(layer.scaling) for layer in adapter_layers(pipe.transformer)]


def test_attention_kwargs_scale_equals_set_adapters_and_fuse_lora():
    """``attention_kwargs={"scale": s}`` for one call = ``set_adapters(weights=s)`` = ``fuse_lora(lora_scale=s)``:
    the same bits, and logits within float rounding (the scale is multiplied in another order, or merged)."""
    pipe = _with_random_lora()
    args = dict(prompt="a red circle", guidance_scale=3.0, output_type="latent", return_trajectory=True)
    before = _scalings(pipe)
    per_call = pipe(generator=_gen(13), attention_kwargs={"scale": 0.5}, **args).trajectory
    assert _scalings(pipe) == before  # restored exactly after the call
    full = pipe(generator=_gen(13), **args).trajectory
    assert not torch.allclose(per_call.cond_logits, full.cond_logits)

    pipe.set_adapters(["erase"], [0.5])
    weighted = pipe(generator=_gen(13), **args).trajectory
    pipe.set_adapters(["erase"], [1.0])
    pipe.fuse_lora(lora_scale=0.5)
    fused = pipe(generator=_gen(13), **args).trajectory
    pipe.unfuse_lora()
    for other, atol in ((weighted, 1e-6), (fused, 1e-5)):
        assert torch.equal(per_call.bits, other.bits)
        torch.testing.assert_close(per_call.cond_logits, other.cond_logits, rtol=0, atol=atol)


def test_attention_kwargs_scale_zero_is_the_base_model_and_one_changes_nothing():
    pipe = _with_random_lora(1)
    args = dict(prompt="a red circle", output_type="latent", return_trajectory=True)
    zero = pipe(generator=_gen(14), attention_kwargs={"scale": 0.0}, **args).trajectory
    one = pipe(generator=_gen(14), attention_kwargs={"scale": 1.0}, **args).trajectory
    full = pipe(generator=_gen(14), **args).trajectory
    pipe.disable_lora()
    base = pipe(generator=_gen(14), **args).trajectory
    torch.testing.assert_close(zero.cond_logits, base.cond_logits, rtol=0, atol=0)
    torch.testing.assert_close(one.cond_logits, full.cond_logits, rtol=0, atol=0)
    pipe.enable_lora()
    again = pipe(generator=_gen(14), **args).trajectory  # scale 0 was undone exactly (unscale_lora_layers cannot)
    torch.testing.assert_close(again.cond_logits, full.cond_logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# offloading: the hooks run on CPU too, so what they must place is checked here; the GPU tests below compare images

def _offloaded_pipeline(mode: str, tmp_path) -> VARPipeline:
    """The tiny pipeline with the transformer and the VAE under an offloading hook whose weights are unusable until
    the hook places them: accelerate's sequential offload keeps them on the meta device, diffusers' group offloading
    to disk leaves uninitialised memory in their place. (The text encoder is left out: it is transformers' T5, whose
    tied embedding these CPU set-ups do not support, and the pipeline only calls its forward.)"""
    pipe = tiny_pipeline()
    for name in ("transformer", "vae"):
        module = getattr(pipe, name)
        if mode == "sequential":
            accelerate.cpu_offload(module, torch.device("cpu"))
        else:
            module.enable_group_offload(torch.device("cpu"), torch.device("cpu"), offload_type=mode,
                                        num_blocks_per_group=1, offload_to_disk_path=str(tmp_path / name))
    return pipe


@pytest.mark.parametrize("mode", ["sequential", "block_level", "leaf_level"])
def test_offloading_hooks_place_every_weight_the_scale_loop_reads(pipe, mode, tmp_path):
    offloaded = _offloaded_pipeline(mode, tmp_path)
    if mode == "sequential":
        assert offloaded.transformer.sos_embed.is_meta and offloaded.vae.decoder.conv_in.weight.is_meta
    expected = pipe(["a red circle", "a blue square"], guidance_scale=3.0, generator=_gen(15), output_type="np").images
    for _ in range(2):
        images = offloaded(["a red circle", "a blue square"], guidance_scale=3.0, generator=_gen(15),
                           output_type="np").images
        np.testing.assert_array_equal(images, expected)


def test_transformer_entry_points_go_through_forward_only_under_a_hook(pipe):
    """prepare_condition / unconditional_states / forward_scale run inside forward when a hook wraps it (so the
    hook sees them) and directly otherwise; both give the same values."""
    calls = []

    class Recorder(accelerate.hooks.ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(kwargs["_entry_point"][0] if kwargs.get("_entry_point") else "forward")
            return args, kwargs

    tf = tiny_transformer()
    states, mask = pipe.encode_prompt("a red circle")
    schedule = pipe.prepare_schedule(64, 64)
    direct = tf.forward_scale(None, 0, schedule, tf.prepare_condition(states, mask), tf.new_kv_cache())
    accelerate.hooks.add_hook_to_module(tf, Recorder())
    condition = tf.prepare_condition(states, mask)
    hooked = tf.forward_scale(None, 0, schedule, condition, tf.new_kv_cache())
    tf.unconditional_states(1, 4)
    assert calls == ["_prepare_condition", "_forward_scale", "_unconditional_states"]
    torch.testing.assert_close(hooked, direct, rtol=0, atol=0)
    with pytest.raises(ValueError, match="_entry_point must name one of"):
        tf(None, _entry_point=("save_pretrained", (), {}))


def test_model_cpu_offload_runs_and_frees_the_hooks(pipe):
    offloaded = tiny_pipeline()
    offloaded.enable_model_cpu_offload(device="cpu")
    expected = pipe("a red circle", generator=_gen(16), output_type="np").images
    for _ in range(2):
        np.testing.assert_array_equal(offloaded("a red circle", generator=_gen(16), output_type="np").images, expected)


_OFFLOAD_MODES = ["model", "sequential", "group_block", "group_leaf", "group_block_pipeline"]


def _offload(pipe: VARPipeline, mode: str, device: torch.device) -> None:
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group_block_pipeline":
        pipe.enable_group_offload(device, offload_type="block_level", num_blocks_per_group=1)
    else:  # per component, as diffusers' tests apply it
        for name in ("transformer", "vae"):
            getattr(pipe, name).enable_group_offload(device, offload_type=mode.removeprefix("group_") + "_level",
                                                     num_blocks_per_group=1)
        pipe.text_encoder.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("lora", ["none", "loaded", "deleted"])
@pytest.mark.parametrize("mode", _OFFLOAD_MODES)
def test_offloaded_gpu_pipeline_gives_the_plain_gpu_images_twice(mode, lora, tmp_path):
    device = torch.device("cuda")
    plain, offloaded = tiny_pipeline(), tiny_pipeline()
    if lora != "none":
        for p in (plain, offloaded):
            torch.manual_seed(3)
            p.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=LORA_TARGETS), adapter_name="erase")
            if lora == "deleted":
                p.delete_adapters("erase")
    plain.to(device)
    _offload(offloaded, mode, device)
    args = dict(prompt=["a red circle", "a blue square"], guidance_scale=3.0, output_type="np")
    expected = plain(generator=_gen(17), **args).images
    for _ in range(2):
        np.testing.assert_array_equal(offloaded(generator=_gen(17), **args).images, expected)


def test_encode_prompt_without_prompt_or_embeds_names_the_fix(pipe):
    with pytest.raises(ValueError, match="needs a prompt .* or prompt_embeds"):
        pipe.encode_prompt(None)
