"""Forget-Me-Not (var_erase.erasure.fmn): the concept's token positions, the cross-attention probe, the re-steering
loss, and a short run on the tiny model (the attention on the concept falls, the target's logits move, the kept
prompts' stay within a bound)."""

import pytest
import torch
from transformers import ByT5Tokenizer

from var_erase.erasure import fmn
from var_erase.erasure.anchors import sample_anchors
from var_erase.models.attention import CrossAttention, cross_attention_probabilities, text_attention

from ._method_checks import PAIRS, method_anchors, train
from ._tiny import tiny_pipeline


@pytest.fixture(scope="module")
def anchors():
    return method_anchors()


def test_probabilities_are_those_the_attention_uses():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    probs = cross_attention_probabilities(q, k, mask)
    assert probs.shape == (2, 4, 7, 5) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
    assert float(probs[1, ..., 3:].abs().max()) == 0.0  # masked text tokens get nothing
    torch.testing.assert_close(probs @ v, text_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_concept_positions_by_name_then_by_difference_with_the_safe_prompt():
    tok = ByT5Tokenizer()
    assert fmn.concept_token_positions(tok, "a red circle", "circle") == list(range(6, 12))  # bytes 6..11
    assert fmn.concept_token_positions(tok, "a circle, a circle", "circle") == [*range(2, 8), *range(12, 18)]
    # a paraphrase: the name does not occur, the tokens the safe prompt lacks are taken
    assert fmn.concept_token_positions(tok, "a red ring", "circle", "a red box") == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="FMN needs the concept's tokens"):
        fmn.concept_token_positions(tok, "a red ring", "circle", "a red ring")


def test_probe_records_every_cross_attention_and_leaves_the_output_unchanged():
    pipe = tiny_pipeline()
    transformer = pipe.transformer
    anchor = sample_anchors(pipe, ["a red square"], progress=False)
    states, mask = pipe.encode_prompt(["a red circle"])
    concept = fmn.concept_token_mask([fmn.concept_token_positions(pipe.tokenizer, "a red circle", "circle")],
                                     states.shape[1])
    with torch.no_grad():
        plain = transformer(anchor.inputs, states, mask, schedule=anchor.schedule).sample
        with fmn.record_cross_attention(transformer, concept) as recorder:
            probed = transformer(anchor.inputs, states, mask, schedule=anchor.schedule).sample
    layers = [m for m in transformer.modules() if isinstance(m, CrossAttention)]
    assert len(recorder.squares) == len(layers) == transformer.config.num_layers
    assert all(layer.attention_probe is None for layer in layers)  # removed on exit
    torch.testing.assert_close(probed, plain)
    heads, tokens = transformer.config.num_attention_heads, anchor.schedule.total_tokens
    assert recorder.rows == len(layers) * heads * tokens
    assert 0 < float(recorder.concept_mass) < 1


def test_loss_is_the_root_mean_square_of_the_concept_attention():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    concept = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
    recorder = fmn.CrossAttentionRecorder(concept)
    recorder(probs)
    recorder(probs.flip(-1))
    selected = torch.cat([probs * concept[:, None, None], probs.flip(-1) * concept[:, None, None]])
    want = (selected.pow(2).sum() / (2 * 2 * 3 * 4)).sqrt()
    torch.testing.assert_close(fmn.attention_resteering_loss(recorder), want)
    with pytest.raises(ValueError, match="no cross-attention was recorded"):
        fmn.attention_resteering_loss(fmn.CrossAttentionRecorder(concept))


def test_short_run_lowers_the_concept_attention_and_keeps_others_bounded(anchors):
    """Bound: the kept prompts' mean absolute logit change is at most twice the target's, and no kept logit moves by
    more than 1.5; FMN's loss falls by at least 10% in 8 steps at lr 1e-2."""
    trainer, change = train("fmn", anchors)
    assert {".".join(name.split(".")[2:4]) for name in trainer.trainable_state_dict()} == {"attn2.to_q", "attn2.to_k"}
    assert trainer.concept_tokens[PAIRS[0].unsafe] == list(range(6, 12))
    history = trainer.state.history
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]
    assert history[-1]["concept_attn"] < history[0]["concept_attn"]
    assert change["target"] > 0.005
    assert change["kept"] <= 2 * change["target"] and change["kept_max"] <= 1.5
