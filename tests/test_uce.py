"""UCE (var_erase.erasure.uce): the closed form on a small random layer, the low-rank export, and the whole edit on the
tiny pipeline written as an adapter that ``load_lora_weights`` loads (the target's logits move, the preserved
prompts' stay within a bound)."""

import pytest
import torch

from var_erase import DEFAULT_MODEL
from var_erase.erasure import uce
from var_erase.erasure.config import ErasureConfig
from var_erase.erasure.erase import erase, uce_inputs
from var_erase.erasure.trainer import ErasureTrainer
from var_erase.hub import read_adapter_metadata
from var_erase.pipelines.pipeline_var import VARPipeline

from ._method_checks import KEPT, PAIRS, logits_of_targets_and_kept, method_anchors
from ._tiny import tiny_pipeline


@pytest.fixture(scope="module")
def anchors():
    return method_anchors()


def _layer(seed=0, out_dim=6, in_dim=5, edits=3, preserved=4):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return rand(out_dim, in_dim), rand(edits, in_dim), rand(edits, out_dim), rand(preserved, in_dim)


def test_closed_form_matches_the_formula_on_a_small_random_layer():
    """W' = (sum_i v*_i c_i^T + lambda sum_j W c_j c_j^T)(sum_i c_i c_i^T + lambda sum_j c_j c_j^T)^-1 (r = 0)."""
    w, c, v, p = _layer()
    lam = 0.7
    mat1 = sum(torch.outer(v[i], c[i]) for i in range(3)) + lam * sum(w @ torch.outer(p[j], p[j]) for j in range(4))
    mat2 = sum(torch.outer(c[i], c[i]) for i in range(3)) + lam * sum(torch.outer(p[j], p[j]) for j in range(4))
    want = mat1 @ torch.linalg.inv(mat2)
    got = uce.closed_form_edit(w, c, v, p, erase_scale=1.0, preserve_scale=lam, regularization=0.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_closed_form_is_the_minimiser_of_the_regularised_objective():
    """With every term, the gradient of e||W'C^T - V^T||^2 + p||(W' - W)P^T||^2 + r||W' - W||^2 vanishes at W'."""
    w, c, v, p = _layer(seed=1)
    e, lam, r = 2.0, 0.5, 0.1
    edited = uce.closed_form_edit(w, c, v, p, e, lam, r)
    gradient = e * (edited @ c.T - v.T) @ c + lam * (edited - w) @ p.T @ p + r * (edited - w)
    assert float(gradient.abs().max()) < 1e-10
    # as many independent edits as inputs and no other term: every edited feature maps exactly to its target
    w, c, v, _ = _layer(seed=2, edits=5)
    torch.testing.assert_close(uce.closed_form_edit(w, c, v, regularization=0.0) @ c.T, v.T, rtol=1e-9, atol=1e-9)


def test_closed_form_errors_name_the_fix():
    w, c, v, p = _layer()
    with pytest.raises(ValueError, match="singular.*regularization > 0"):
        uce.closed_form_edit(w, c, v, regularization=0.0)  # 3 features for 5 input dimensions
    with pytest.raises(ValueError, match=r"edit_targets must be \(N, out\)"):
        uce.closed_form_edit(w, c, v[:, :2], p)
    with pytest.raises(ValueError, match=r"preserve_inputs must be \(M, 5\)"):
        uce.closed_form_edit(w, c, v, p[:, :2])
    with pytest.raises(ValueError, match="regularization must be a number >= 0"):
        uce.closed_form_edit(w, c, v, p, regularization=-1.0)


def test_low_rank_factors_hold_the_delta_to_the_tolerance():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(8, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    assert uce.rank_for_tolerance(s, 1e-6) == 3 and uce.rank_for_tolerance(s, 0.999) == 1
    lora_a, lora_b = uce.lora_factors(delta, 3)
    assert lora_a.shape == (3, 6) and lora_b.shape == (8, 3)
    torch.testing.assert_close(lora_b @ lora_a, delta, rtol=1e-10, atol=1e-10)
    padded_a, padded_b = uce.lora_factors(delta, 7)  # above min(out, in): zero padding, the same product
    torch.testing.assert_close(padded_b @ padded_a, delta, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(uce.align_tokens(torch.zeros(3, 2), torch.arange(10.0).reshape(5, 2))[:, 0],
                               torch.tensor([0.0, 4.0, 8.0]))


def test_edit_on_the_tiny_pipeline_is_the_closed_form_and_loads_as_an_adapter(anchors, tmp_path):
    """The loaded adapter equals the closed-form weights; the concept's keys move towards its replacement's; bound: the
    preserved (kept) prompts' logits change by at most a quarter of the target's mean change, which is above 0.01."""
    pipe = tiny_pipeline()
    target_before, kept_before = logits_of_targets_and_kept(pipe, anchors)
    edited = uce.edit(pipe, [p.unsafe for p in PAIRS], [p.safe for p in PAIRS], preserve=KEPT, regularization=0.01)
    features = uce.text_features(pipe, [p.unsafe for p in PAIRS])
    assert 1 <= edited.rank <= sum(f.shape[0] for f in features) and edited.relative_error <= 1e-4
    assert len(edited.state_dict) == 2 * 2 * pipe.transformer.config.num_layers  # to_k, to_v; A and B; per block

    # the closed form, applied to the weights by hand
    concept = torch.cat(features)
    replacement = torch.cat([uce.align_tokens(f, r) for f, r in
                             zip(features, uce.text_features(pipe, [p.safe for p in PAIRS]))])
    preserved = torch.cat(uce.text_features(pipe, KEPT))
    by_hand = tiny_pipeline()
    for layer in uce.target_layers(by_hand.transformer).values():
        w = layer.weight.detach().double()
        layer.weight.data = uce.closed_form_edit(w, concept, replacement @ w.T, preserved, regularization=0.01).float()
    with torch.no_grad():  # the concept's keys move towards its replacement's
        old_key, new_key = pipe.transformer.transformer_blocks[0].attn2.to_k, by_hand.transformer.transformer_blocks[
            0].attn2.to_k
        wanted = old_key(replacement.float())
        before = float((old_key(concept.float()) - wanted).norm())
        after = float((new_key(concept.float()) - wanted).norm())
    assert after < 0.75 * before, (before, after)  # 71 constraints on 64 inputs: the preserved tokens pull back

    uce.write_adapter(edited, tmp_path, pipe, base_model="tiny", concepts=["circle"])
    metadata = read_adapter_metadata(tmp_path)
    assert metadata.method == "uce" and metadata.concepts == ["circle"] and metadata.lora_rank == edited.rank
    assert metadata.hyperparameters["preserve"] == KEPT
    pipe.load_lora_weights(tmp_path)
    target_after, kept_after = logits_of_targets_and_kept(pipe, anchors)
    target_hand, kept_hand = logits_of_targets_and_kept(by_hand, anchors)
    torch.testing.assert_close(target_after, target_hand, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(kept_after, kept_hand, rtol=1e-3, atol=1e-3)
    target_change = float((target_after - target_before).abs().mean())
    assert target_change > 0.01
    assert float((kept_after - kept_before).abs().mean()) <= 0.25 * target_change


def test_edit_refuses_bad_input_and_the_trainer_refuses_uce(anchors):
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="one replacement per concept"):
        uce.edit(pipe, ["a red circle", "a circle"], ["a red square"])
    with pytest.raises(ValueError, match="target_modules must be a non-empty subset"):
        uce.edit(pipe, ["a red circle"], target_modules=["to_q"])
    with pytest.raises(ValueError, match="concepts must be a list of non-empty strings"):
        uce.edit(pipe, [""])
    with pytest.raises(ValueError, match="no training loop.*uce.edit"):
        ErasureTrainer(pipe, ErasureConfig(method="uce"), PAIRS, anchors)


# ---------------------------------------------------------------------------------------------------------------------
# what erase(..., method="uce") edits: the concept's words (the reference's reading) or the pairs' prompts
@pytest.fixture(scope="module")
def toy_pipe():
    return VARPipeline.from_pretrained(DEFAULT_MODEL)


def _key_value_changes(edited, pipe, concept, guide, preserved, tokens):
    """Per edited layer: (relative change of every preserved token's output, the distance of the concept's edited
    features' outputs to their guide's before and after the edit)."""
    feats = uce.select_tokens(pipe, concept + guide, tokens)
    n = len(concept)
    c = torch.cat(feats[:n])
    target = torch.cat([uce.align_tokens(a, b) for a, b in zip(feats[:n], feats[n:])])
    p = torch.cat(uce.text_features(pipe, preserved))
    out = []
    for name, layer in uce.target_layers(pipe.transformer).items():
        w = layer.weight.detach().double()
        lora_a, lora_b = (edited.state_dict[f"{name}.lora_{x}.weight"].double() for x in "AB")
        delta = lora_b @ lora_a
        out.append((float((p @ delta.T).norm() / (p @ w.T).norm()), float(((c - target) @ w.T).norm()),
                    float((c @ (w + delta).T - target @ w.T).norm())))
    return out


def test_toy_concept_texts_are_the_concepts_words_their_replacements_and_every_kept_word():
    edited, guides, preserved = uce.toy_concept_texts(["red"])
    assert edited == ["red", "scarlet"] and guides == ["", ""]  # no replacement: the reference's empty guide
    assert "red" not in preserved and "scarlet" not in preserved
    assert {"blue", "cobalt", "circle", "five-pointed star", "striped", "with dots"} <= set(preserved)
    assert "crimson" not in edited + preserved  # held-out paraphrases are evaluation-only
    edited, guides, _ = uce.toy_concept_texts(["dotted", "star"], ["dotted=striped", "circle"])
    assert dict(zip(edited, guides)) == {"dotted": "striped", "polka-dot": "striped", "with dots": "with stripes",
                                         "with polka dots": "with stripes", "covered in dots": "with stripes",
                                         "star": "circle", "star shape": "circle", "five-pointed star": "circle"}
    with pytest.raises(ValueError, match="need named toy concepts"):
        uce.toy_concept_texts(["nudity"])
    with pytest.raises(ValueError, match="replacement red=circle"):
        uce.toy_concept_texts(["red"], ["red=circle"])


def test_select_tokens_keeps_the_texts_own_tokens(toy_pipe):
    full = uce.text_features(toy_pipe, ["red", "", "round shape"])  # [CLS] red [SEP]; [CLS] [SEP]; 4 tokens
    words = uce.select_tokens(toy_pipe, ["red", "", "round shape"], "words")
    last = uce.select_tokens(toy_pipe, ["red", "", "round shape"], "last")
    torch.testing.assert_close(words[0], full[0][1:2])
    torch.testing.assert_close(words[1], full[1])  # no own token: every token
    torch.testing.assert_close(words[2], full[2][1:3])
    torch.testing.assert_close(last[1], full[1][:1])  # the reference's [BOS] of ""
    torch.testing.assert_close(last[2], full[2][2:3])
    with pytest.raises(ValueError, match=r"tokens must be one of \['all', 'words', 'last'\]"):
        uce.edit(toy_pipe, ["red"], tokens="first")


def test_concept_texts_edit_only_the_concepts_directions(toy_pipe):
    """On the toy model, with the reference's token (the last own one) and a few preserved words: every token of the
    preserved words keeps its keys and values within 2% (relative), while the concept's move 90% of the way to the
    replacement's. Editing every token instead moves the shared [CLS] / [SEP] directions, and the preserved more."""
    concept, guide, preserved = ["red", "scarlet"], ["blue", "blue"], ["circle", "green"]
    changes = {}
    for tokens in ("last", "all"):
        edited = uce.edit(toy_pipe, concept, guide, preserve=preserved, tokens=tokens)
        changes[tokens] = _key_value_changes(edited, toy_pipe, concept, guide, preserved, tokens)
    for preserved_change, before, after in changes["last"]:
        assert preserved_change < 0.02 and after < 0.1 * before, (preserved_change, before, after)
    assert all(a[0] > 2 * b[0] for a, b in zip(changes["all"], changes["last"])), changes


def test_erase_edits_the_concepts_words_by_default_and_whole_prompts_on_request(toy_pipe, tmp_path):
    """``erase(..., method="uce")`` on a named concept: its words towards "", every kept word preserved, a low-rank
    edit that keeps the kept words' keys and values within 5% while the concept's move more than half way."""
    result = erase(VARPipeline.from_pretrained(DEFAULT_MODEL), "red", output_dir=tmp_path / "concept",
                   recipe="svare", config={"method": "uce"}, judge=None, num_grid_images=0, progress=False)
    hyper = read_adapter_metadata(result.output_dir).hyperparameters
    assert hyper["uce_inputs"] == "concept" and hyper["positions"] == "last" and hyper["concepts"] == ["red", "scarlet"]
    assert hyper["replacements"] == ["", ""] and "blue" in hyper["preserve"] and "red" not in hyper["preserve"]
    assert hyper["rank"] <= hyper["num_edited_tokens"] == 2
    edited = uce.edit(toy_pipe, hyper["concepts"], hyper["replacements"], preserve=hyper["preserve"], tokens="last")
    assert edited.rank == hyper["rank"]  # the edit the run wrote, recomputed
    for preserved_change, before, after in _key_value_changes(edited, toy_pipe, hyper["concepts"],
                                                              hyper["replacements"], hyper["preserve"], "last"):
        assert preserved_change < 0.05 and after < 0.5 * before, (preserved_change, before, after)

    config = ErasureConfig(method="uce", uce_inputs="prompts")
    edited_texts, guides, preserved = uce_inputs(config, ["circle"], PAIRS, retain=["a green cross"])
    assert edited_texts == [p.unsafe for p in PAIRS] and guides == [p.safe for p in PAIRS]
    assert preserved == [p.safe for p in PAIRS] + ["a green cross"]  # the safe and the retain prompts
    assert uce_inputs(ErasureConfig(method="uce"), ["nudity"], PAIRS)[0] == [p.unsafe for p in PAIRS]  # auto


def test_uce_inputs_bad_values_are_clear_errors():
    with pytest.raises(ValueError, match=r"uce_inputs must be one of \['auto', 'concept', 'prompts'\]"):
        ErasureConfig(method="uce", uce_inputs="words")
    with pytest.raises(ValueError, match="uce_inputs='concept' edits the words of named toy-world concepts"):
        uce_inputs(ErasureConfig(method="uce", uce_inputs="concept"), ["nudity"], PAIRS)
