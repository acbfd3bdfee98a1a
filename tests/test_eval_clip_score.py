"""CLIP score: the formula 100 * max(cos, 0), shapes and pairing on a tiny randomly initialised CLIP saved like a real
one (no real CLIP weights exist offline), loading from a folder or the Hub cache, and errors that name what is
missing."""

import string

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import snapshot_download
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip import CLIPImageProcessorPil

from var_erase.evaluation.clip_score import CLIPScorer, clip_score_from_embeddings, missing_clip_files

PROMPTS = ["a red square", "a photo of a dog", "a temple by a lake"]


def save_tiny_clip(folder):
    """A 44k-parameter CLIP with a character-level tokenizer, saved as save_pretrained saves a real one."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab[char], vocab[char + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(
        text_config=dict(**tower, vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(**tower, image_size=30, patch_size=10), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 50, 3), dtype=np.uint8)) for i in range(3)]


def test_formula_on_known_vectors():
    """100 * cos, clamped at 0, invariant to the embeddings' norms."""
    image_ND = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    text_ND = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5 * 3**0.5], [6.0, 8.0]])
    torch.testing.assert_close(clip_score_from_embeddings(image_ND, text_ND),
                               torch.tensor([100.0, 0.0, 0.0, 50.0, 100.0]))
    with pytest.raises(ValueError, match="paired"):
        clip_score_from_embeddings(torch.ones(2, 4), torch.ones(3, 4))


def test_tiny_clip_scores_are_the_models_cosines(tiny_clip_dir, images):
    """Per-image scores equal 100 * max(cos, 0) from CLIPModel's own forward (logits_per_image / logit_scale)."""
    scorer = CLIPScorer.from_pretrained(tiny_clip_dir, batch_size=2)
    scores_N = scorer.scores(images, PROMPTS, progress=False)
    assert scores_N.shape == (3,) and bool(((scores_N >= 0) & (scores_N <= 100)).all())
    assert (scores_N == 0).any() and (scores_N > 0).any()  # seed 0: cosines -0.21, 0.03, -0.09, both clamp sides

    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = scorer.model(**inputs)
    cos_N = output.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    torch.testing.assert_close(scores_N, 100 * cos_N.clamp_min(0), atol=1e-4, rtol=1e-4)

    result = scorer(images, PROMPTS, progress=False)
    assert result["n_images"] == 3 and result["clip_score"] == pytest.approx(float(scores_N.mean()), abs=1e-5)
    assert result["settings"]["clip_model"] == str(tiny_clip_dir) and result["settings"]["projection_dim"] == 16
    one_prompt = scorer.scores(images, "a temple by a lake", progress=False)
    assert one_prompt[2] == pytest.approx(float(scores_N[2]), abs=1e-4)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.scores(images, PROMPTS[:2], progress=False)


def test_missing_files_are_named(tiny_clip_dir, tmp_path):
    assert missing_clip_files(tiny_clip_dir) == []
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((tiny_clip_dir / "config.json").read_bytes())
    missing = missing_clip_files(partial)
    assert [m.split(" (")[0] for m in missing] == ["safetensors weights", "tokenizer", "image processor config"]
    with pytest.raises(FileNotFoundError, match="missing: safetensors weights.*save_pretrained"):
        CLIPScorer.from_pretrained(partial)
    with pytest.raises(FileNotFoundError, match="not a local folder, nor a repo id in the Hugging Face cache"):
        CLIPScorer.from_pretrained("openai/clip-vit-base-patch32")


def test_loads_a_hub_repo_from_the_cache_without_requests(tiny_clip_dir, hub_server, hub_repo_id, images):
    hub_server.seed(hub_repo_id, {p.name: p.read_bytes() for p in tiny_clip_dir.iterdir()})
    snapshot_download(hub_repo_id)  # once, online (the fake Hub)
    requests_before = len(hub_server.requests)
    scorer = CLIPScorer.from_pretrained(hub_repo_id)
    assert len(hub_server.requests) == requests_before
    reference = CLIPScorer.from_pretrained(tiny_clip_dir)
    torch.testing.assert_close(scorer.scores(images, PROMPTS, progress=False),
                               reference.scores(images, PROMPTS, progress=False))
