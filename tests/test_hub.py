"""Erasure adapters on the Hub: metadata in the safetensors header, base-model fingerprints, model cards, and
push / download / load by repo id against the local fake Hub (``tests/hub_server.py``).

The fake Hub tests drive the real, unmodified ``huggingface_hub`` client over HTTP on loopback. What they do NOT
prove: LFS or xet uploads and downloads (every file goes as a regular git blob, so large adapters take another path
on the real Hub), authentication and permissions (tokens are sent but never checked; private repos are readable),
and the Hub's server-side validation of model-card metadata (``validate-yaml`` accepts everything).
"""

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import var_erase
from var_erase.hub import (
    ADAPTER_METADATA_KEY,
    FULL_FINETUNE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    TOY_BASE_MODEL,
    AdapterMetadata,
    AdapterMismatchWarning,
    check_adapter_compatibility,
    default_template_path,
    model_fingerprint,
    pipeline_fingerprint,
    push_adapter_to_hub,
    read_adapter_metadata,
    redact_secrets,
    render_model_card,
    save_model_card,
    write_adapter_metadata,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_" + "Zq7" * 12  # shaped like a Hub access token


class TinyTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Stand-in for VARTransformer2DModel: a ConfigMixin model with the same kind of LoRA target names."""

    @register_to_config
    def __init__(self, dim: int = 16, num_layers: int = 2, patch_nums: tuple[int, ...] = (1, 2, 4)):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict({"to_k": torch.nn.Linear(dim, dim), "to_v": torch.nn.Linear(dim, dim)})
            for _ in range(num_layers)
        )


def _tiny(seed: int = 0, **config) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**config).eval()


def _metadata(transformer=None, **overrides) -> AdapterMetadata:
    fields = dict(
        base_model="org/var-tiny", transformer=transformer if transformer is not None else _tiny(), concepts=["church"],
        method="svare", hyperparameters={"learning_rate": 1e-4, "max_train_steps": 20, "seed": 0},
        lora_config=LoraConfig(r=4, lora_alpha=8, target_modules=["to_v", "to_k"]),
    )
    fields.update(overrides)
    return AdapterMetadata.from_training(**fields)


def _adapter_folder(path: Path, metadata: AdapterMetadata | None, card: bool = True) -> Path:
    """An adapter folder as train_svare.py writes it: LoRA weights with metadata, a card, and training leftovers."""
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    tensors = {f"transformer.blocks.{i}.to_k.lora_{ab}.weight": torch.randn(4, 16) for i in range(2) for ab in "AB"}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    header.update(metadata.to_safetensors_metadata() if metadata else {})
    save_file(tensors, path / LORA_WEIGHT_NAME, metadata=header)
    (path / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    if card and metadata:
        save_model_card(render_model_card(metadata, "org/var-erased-church", images={"Before / after": "grid.png"}),
                        path)
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "optimizer.bin").write_bytes(b"x" * 10)
    (path / "stray.pt").write_bytes(b"pickle")
    return path


# -- fingerprints ----------------------------------------------------------------------------------------------------
def test_fingerprint_is_stable_across_save_and_load(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    assert model_fingerprint(TinyTransformer.from_pretrained(tmp_path)) == model_fingerprint(model)
    assert model_fingerprint(model) == model_fingerprint(_tiny())  # and across runs


def test_fingerprint_differs_for_other_weights_or_config():
    digests = {model_fingerprint(_tiny(0)), model_fingerprint(_tiny(1)), model_fingerprint(_tiny(0, num_layers=3)),
               model_fingerprint(_tiny(0, patch_nums=(1, 2, 3)))}
    assert len(digests) == 4


def test_fingerprint_ignores_a_loaded_lora_but_not_a_fused_one():
    model, digest = _tiny(), model_fingerprint(_tiny())
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_k"], init_lora_weights=False))
    assert any(".base_layer." in name for name, _ in model.named_parameters())
    assert model_fingerprint(model) == digest
    model.fuse_lora()
    assert model_fingerprint(model) != digest


def test_fingerprint_needs_a_config():
    with pytest.raises(TypeError, match="has no `config`.*Pass `pipe.transformer`"):
        model_fingerprint(torch.nn.Linear(2, 2))


# -- metadata in the safetensors header ------------------------------------------------------------------------------
def test_metadata_round_trip_through_a_safetensors_file(tmp_path):
    metadata = _metadata(eval_results={"acc_e": 0.04, "acc_i": 0.96, "n_images": 64})
    folder = _adapter_folder(tmp_path / "adapter", metadata)
    with safe_open(folder / LORA_WEIGHT_NAME, framework="pt") as f:
        header = f.metadata()
    assert all(isinstance(v, str) for v in header.values())
    assert {"format", "lora_adapter_metadata", ADAPTER_METADATA_KEY} <= set(header)
    assert read_adapter_metadata(folder) == metadata
    assert read_adapter_metadata(folder / LORA_WEIGHT_NAME) == metadata
    assert AdapterMetadata.from_safetensors_metadata(metadata.to_safetensors_metadata()) == metadata


def test_metadata_from_training_reads_the_lora_config():
    metadata = _metadata()
    assert (metadata.lora_rank, metadata.lora_alpha, metadata.lora_target_modules) == (4, 8, ["to_k", "to_v"])
    assert metadata.base_model_fingerprint == model_fingerprint(_tiny())
    assert metadata.var_erase_version == var_erase.__version__
    assert _metadata(base_model=var_erase.DEFAULT_MODEL).base_model == TOY_BASE_MODEL  # not a machine-specific path


def test_write_adapter_metadata_keeps_tensors_and_other_entries(tmp_path):
    folder = _adapter_folder(tmp_path / "adapter", None)
    with safe_open(folder / LORA_WEIGHT_NAME, framework="pt") as f:
        before = {k: f.get_tensor(k) for k in f.keys()}
    assert read_adapter_metadata(folder) is None  # a LoRA from another tool
    metadata = replace(_metadata(), eval_results={"acc_e": 0.0})
    write_adapter_metadata(folder, metadata)
    assert read_adapter_metadata(folder) == metadata
    with safe_open(folder / LORA_WEIGHT_NAME, framework="pt") as f:
        assert f.metadata()["lora_adapter_metadata"]
        assert all(torch.equal(f.get_tensor(k), v) for k, v in before.items())
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    assert oct((folder / LORA_WEIGHT_NAME).stat().st_mode & 0o777) == oct(0o644)


def test_metadata_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights.safetensors"):
        read_adapter_metadata(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a .safetensors file"):
        read_adapter_metadata(tmp_path / "missing.safetensors")
    (tmp_path / LORA_WEIGHT_NAME).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_adapter_metadata(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON.*write_adapter_metadata"):
        AdapterMetadata.from_safetensors_metadata({ADAPTER_METADATA_KEY: "{oops"})
    with pytest.raises(ValueError, match=r"lacks \['method'\]"):
        AdapterMetadata.from_safetensors_metadata({ADAPTER_METADATA_KEY: '{"base_model": "a/b", "concepts": ["x"]}'})
    with pytest.raises(ValueError, match="concepts must be a non-empty list"):
        AdapterMetadata(base_model="org/m", concepts=[], method="svare")


# -- compatibility ---------------------------------------------------------------------------------------------------
def test_same_base_model_is_compatible_even_in_another_dtype():
    metadata = _metadata()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_adapter_compatibility(metadata, _tiny())
        bf16 = _tiny().to(torch.bfloat16)
        assert model_fingerprint(bf16) != metadata.base_model_fingerprint  # the digest is exact ...
        assert check_adapter_compatibility(metadata, bf16, strict=True)  # ... the check tolerates re-casting


def test_other_base_model_warns_or_raises_with_the_fix(tmp_path):
    metadata = _metadata()
    other = _tiny(seed=7)
    other.save_pretrained(tmp_path / "other")
    other = TinyTransformer.from_pretrained(tmp_path / "other")
    with pytest.warns(AdapterMismatchWarning) as record:
        assert not check_adapter_compatibility(metadata, other, adapter="org/var-erased-church")
    message = str(record[0].message)
    for fragment in ["'org/var-erased-church'", "'org/var-tiny'", metadata.base_model_fingerprint,
                     model_fingerprint(other), str(tmp_path / "other"), "its weights differ",
                     "VARPipeline.from_pretrained(\"org/var-tiny\")", "train_svare.py"]:
        assert fragment in message
    with pytest.raises(ValueError, match="its config differs"):
        check_adapter_compatibility(metadata, _tiny(num_layers=3), strict=True)


def test_adapter_without_fingerprint_is_not_checked():
    assert check_adapter_compatibility(None, _tiny(seed=3), strict=True)
    assert check_adapter_compatibility(AdapterMetadata("org/m", ["x"], "svare"), _tiny(seed=3), strict=True)


# -- model card ------------------------------------------------------------------------------------------------------
def test_card_renders_every_field_and_its_yaml_parses_back(tmp_path):
    metadata = _metadata(eval_results={"acc_e": 0.03, "acc_i": 0.97, "n_images": 64, "seed": 0,
                                       "prompts_file": "eval/prompts.csv"})
    path = save_model_card(render_model_card(metadata, "org/var-erased-church", {"Before / after": "grid.png"}),
                           tmp_path)
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "org/var-tiny" and data["base_model_relation"] == "adapter"
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-to-image"
    assert {"var-erase", "lora", "concept-erasure", "text-to-image", "s-vare"} <= set(data["tags"])
    assert data["erased_concepts"] == ["church"] and data["erasure_method"] == "svare"
    assert data["widget"] == [{"text": "Before / after", "output": {"url": "grid.png"}}]
    assert {(r.metric_type, r.metric_value) for r in card.data.eval_results} == {("acc_e", 0.03), ("acc_i", 0.97)}
    text = card.text
    for fragment in ["church", "S-VARE", "![Before / after](grid.png)", 'VARPipeline.from_pretrained("org/var-tiny")',
                     'pipe.load_lora_weights("org/var-erased-church"', metadata.base_model_fingerprint,
                     "| `learning_rate` | `0.0001` |", "| 4 | 8 | to_k, to_v |", "| `acc_e` | 0.03 |",
                     '"n_images": 64', "## Limitations", "Zhong, Xinhao", "International Conference on Learning"]:
        assert fragment in text
    assert "toy world" not in text


def test_card_for_the_toy_model_without_evaluation():
    card = render_model_card(_metadata(base_model=var_erase.DEFAULT_MODEL), "org/toy-erased")
    assert card.data.base_model is None  # not a Hub repo id: left out of the Hub metadata
    assert card.data.eval_results is None
    for fragment in ["VARPipeline.from_pretrained(var_erase.DEFAULT_MODEL)", "import var_erase", "toy world",
                     "Not evaluated yet", "examples/evaluate.py --lora org/toy-erased"]:
        assert fragment in card.text
    assert var_erase.DEFAULT_MODEL not in str(card)  # no local path leaks into a public card


def test_card_refuses_images_outside_the_folder():
    for bad in ["/tmp/grid.png", "../grid.png", "https://example.com/grid.png"]:
        with pytest.raises(ValueError, match="must be relative to the adapter folder"):
            render_model_card(_metadata(), "org/x", images={"grid": bad})


def test_custom_template_and_the_model_cards_folder(tmp_path):
    template = tmp_path / "card.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ repo_id }} erases {{ concepts | join(', ') }}\n")
    card = render_model_card(_metadata(), "org/x", template_path=template)
    assert card.text.strip() == "# org/x erases church"
    linked = REPO_ROOT / "model_cards" / "erasure_adapter.md"
    if not linked.exists():
        pytest.skip("not a source checkout")
    assert linked.read_text() == default_template_path().read_text()


def test_card_shows_the_effective_learning_rate_not_none():
    lora = render_model_card(_metadata(hyperparameters={"learning_rate": None}), "org/x").text
    assert "| `learning_rate` | `0.0001` |" in lora and "None" not in lora
    full = _metadata(hyperparameters={"learning_rate": None, "train_modules": ["attn2", "ff"]}, lora_config=None)
    assert "| `learning_rate` | `2.344e-05` |" in render_model_card(full, "org/x").text
    explicit = render_model_card(_metadata(hyperparameters={"learning_rate": 3e-4}), "org/x").text
    assert "| `learning_rate` | `0.0003` |" in explicit


def test_card_without_a_repo_id_loads_the_local_folder(tmp_path):
    folder = tmp_path / "var-erased-red"
    card = render_model_card(_metadata(), folder=folder)
    assert f"pipe.load_lora_weights({json.dumps(str(folder))}" in card.text
    assert 'load_lora_weights("var-erased-red"' not in card.text
    assert "is the folder this card was written to" in card.text and "HF_HUB_OFFLINE" not in card.text
    assert "# var-erased-red: church erased" in card.text
    hub = render_model_card(_metadata(), "org/var-erased-red", folder=folder)  # a repo id wins over the folder
    assert 'pipe.load_lora_weights("org/var-erased-red"' in hub.text and str(folder) not in hub.text
    with pytest.raises(ValueError, match=r"needs repo_id .* or, for an adapter that stays local, folder="):
        render_model_card(_metadata())


# -- secrets ---------------------------------------------------------------------------------------------------------
def test_redact_secrets_replaces_every_secret_in_a_deep_copy():
    args = {"hub_token": SECRET, "HF_TOKEN": "x", "hubToken": "y", "token": None, "output_dir": "out",
            "nested": {"client_secret": "s", "db-password": 1234, "OPENAI_API_KEY": "k",
                       "list": [{"access_token": "t"}, "plain", ("tuple", {"apiKey": "z"})]},
            "token_threshold": 0.25, "max_text_tokens": 512, "tokenizer_path": "t5/", "use_token": True,
            "argv": f"train_svare.py --hub_token {SECRET} --seed 0"}
    original = json.dumps(args, sort_keys=True)
    clean = redact_secrets(args)
    assert json.dumps(args, sort_keys=True) == original  # the input is untouched
    assert clean["hub_token"] == clean["HF_TOKEN"] == clean["hubToken"] == "<redacted>"
    assert clean["token"] is None  # "no token" is worth knowing and reveals nothing
    assert clean["nested"]["client_secret"] == clean["nested"]["db-password"] == "<redacted>"
    assert clean["nested"]["OPENAI_API_KEY"] == "<redacted>"
    assert clean["nested"]["list"] == [{"access_token": "<redacted>"}, "plain", ("tuple", {"apiKey": "<redacted>"})]
    # settings that merely mention tokens stay: numbers, flags, the tokenizer's path
    assert (clean["token_threshold"], clean["max_text_tokens"], clean["use_token"]) == (0.25, 512, True)
    assert clean["tokenizer_path"] == "t5/" and clean["output_dir"] == "out"
    assert clean["argv"] == "train_svare.py --hub_token <redacted> --seed 0"
    assert SECRET not in json.dumps(clean)


def test_metadata_and_card_never_hold_a_token(tmp_path):
    hyperparameters = {"learning_rate": 1e-4, "hub_token": SECRET, "token_threshold": 0.25,
                       "extra": {"wandb_api_key": SECRET}}
    metadata = _metadata(hyperparameters=hyperparameters, eval_results={"acc_e": 0.1, "settings": {"token": SECRET}})
    assert metadata.hyperparameters["hub_token"] == "<redacted>" and hyperparameters["hub_token"] == SECRET
    metadata.hyperparameters["hf_token"] = SECRET  # set after construction: to_json redacts it too
    folder = _adapter_folder(tmp_path / "adapter", metadata)
    header = (folder / LORA_WEIGHT_NAME).read_bytes()[:20000]
    card = (folder / "README.md").read_text()
    assert SECRET.encode() not in header and SECRET not in card
    assert "| `hub_token` | `<redacted>` |" in card and "| `token_threshold` | `0.25` |" in card
    assert read_adapter_metadata(folder).hyperparameters["hf_token"] == "<redacted>"


# -- the fake Hub: push, download, load ------------------------------------------------------------------------------
def test_push_then_download_byte_identical(tmp_path, hub_server, hub_repo_id):
    """The real client uploads the folder and downloads it back unchanged, into the real cache layout.

    Not proven here: LFS/xet transfers, authentication, and the Hub's own checks of the card (module docstring).
    """
    folder = _adapter_folder(tmp_path / "adapter", _metadata())
    url = push_adapter_to_hub(folder, hub_repo_id, token="hf_test_token")
    assert url.startswith(f"{hub_server.url}/{hub_repo_id}/commit/")
    expected = {"README.md", LORA_WEIGHT_NAME, "grid.png"}
    assert set(hub_server.files(hub_repo_id)) == expected | {".gitattributes"}  # no checkpoint-*/, no *.pt
    assert "Bearer hf_test_token" in {r.authorization for r in hub_server.requests if hub_repo_id in r.path}
    for name in expected:
        assert Path(hf_hub_download(hub_repo_id, name)).read_bytes() == (folder / name).read_bytes()
    snapshot = Path(snapshot_download(hub_repo_id))
    assert snapshot.name == url.rsplit("/", 1)[1]  # the cache holds the pushed commit
    assert {p.name for p in snapshot.iterdir()} == expected | {".gitattributes"}
    assert all((snapshot / n).read_bytes() == (folder / n).read_bytes() for n in expected)
    assert hub_server.unhandled == []


def test_card_and_metadata_read_back_from_the_hub(tmp_path, hub_server, hub_repo_id):
    metadata = _metadata()
    push_adapter_to_hub(_adapter_folder(tmp_path / "adapter", metadata), hub_repo_id)
    card = ModelCard.load(hub_repo_id)
    assert card.data.base_model == "org/var-tiny" and "concept-erasure" in card.data.tags
    assert read_adapter_metadata(hub_repo_id) == metadata
    info = HfApi().model_info(hub_repo_id)
    assert info.library_name == "diffusers" and info.card_data["erased_concepts"] == ["church"]


def test_pushing_again_updates_only_what_changed(tmp_path, hub_server, hub_repo_id):
    folder = _adapter_folder(tmp_path / "adapter", _metadata())
    api = HfApi(endpoint=hub_server.url)  # an explicit client works as well as HF_ENDPOINT
    first = push_adapter_to_hub(folder, hub_repo_id, api=api)
    assert push_adapter_to_hub(folder, hub_repo_id, api=api) == first  # nothing changed: no new commit
    write_adapter_metadata(folder, replace(_metadata(), eval_results={"acc_e": 0.01}))
    second = push_adapter_to_hub(folder, hub_repo_id, api=api, commit_message="Add evaluation")
    assert second != first
    commits = hub_server.commits(hub_repo_id)
    assert [c.message for c in commits] == ["initial commit", "Upload erasure adapter (var-erase)", "Add evaluation"]
    assert read_adapter_metadata(hub_repo_id).eval_results == {"acc_e": 0.01}
    old = first.rsplit("/", 1)[1]
    assert read_adapter_metadata(hub_repo_id, revision=old).eval_results is None


def _leftovers(folder: Path) -> None:
    """What train_svare.py leaves next to an adapter besides the checkpoints: the log, the anchor cache, eval files."""
    (folder / "training_log.json").write_text(json.dumps({"args": {"seed": 0}}))
    (folder / "anchors").mkdir()
    (folder / "anchors" / "anchors.safetensors").write_bytes(b"a" * 1000)
    (folder / "anchors" / "training_log.json").write_text("{}")
    (folder / "eval.json").write_text("{}")
    (folder / "notes.txt").write_text("private notes")


def test_push_uploads_the_adapter_card_and_its_images_and_more_only_on_request(tmp_path, hub_server, hub_repo_id):
    folder = _adapter_folder(tmp_path / "adapter", _metadata())
    _leftovers(folder)
    push_adapter_to_hub(folder, hub_repo_id)
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes", "README.md", LORA_WEIGHT_NAME, "grid.png"}
    push_adapter_to_hub(folder, hub_repo_id, include=["training_log.json", "*.json", "anchors/*", "checkpoint-*/*"])
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes", "README.md", LORA_WEIGHT_NAME, "grid.png",
                                                  "training_log.json", "eval.json"}  # never anchors/, checkpoints


def test_push_a_full_finetune(tmp_path, hub_server, hub_repo_id):
    """A ``train_modules`` run writes ``finetuned_modules.safetensors``: it is pushed, and its card loads it."""
    model = _tiny()
    metadata = _metadata(transformer=model, lora_config=None,
                         hyperparameters={"learning_rate": None, "train_modules": ["to_k"]})
    folder = tmp_path / "full"
    tensors = {n: p.detach() + 0.5 for n, p in model.named_parameters() if ".to_k." in n}
    folder.mkdir()
    save_file(tensors, folder / FULL_FINETUNE_WEIGHT_NAME, metadata=metadata.to_safetensors_metadata())
    save_model_card(render_model_card(metadata, hub_repo_id), folder)
    _leftovers(folder)
    push_adapter_to_hub(folder, hub_repo_id)
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes", "README.md", FULL_FINETUNE_WEIGHT_NAME}
    card = ModelCard.load(hub_repo_id).text
    assert f'hf_hub_download("{hub_repo_id}", "{FULL_FINETUNE_WEIGHT_NAME}")), strict=False)' in card
    assert "load_lora_weights" not in card and "set_adapters" not in card
    assert read_adapter_metadata(hub_repo_id, weight_name=FULL_FINETUNE_WEIGHT_NAME) == metadata
    fresh = _tiny()
    fresh.load_state_dict(load_file(hf_hub_download(hub_repo_id, FULL_FINETUNE_WEIGHT_NAME)), strict=False)
    assert all(torch.equal(fresh.get_parameter(n), t) for n, t in tensors.items())


def test_push_refuses_a_folder_whose_files_hold_the_token(tmp_path, hub_server, hub_repo_id):
    folder = _adapter_folder(tmp_path / "adapter", _metadata())
    (folder / "training_log.json").write_text(json.dumps({"args": {"hub_token": SECRET}}))
    push_adapter_to_hub(folder, hub_repo_id, token=SECRET)  # the log is not uploaded: nothing leaks
    with pytest.raises(ValueError, match="training_log.json contains the Hub token this upload uses"):
        push_adapter_to_hub(folder, hub_repo_id, token=SECRET, include=["training_log.json"])
    assert "training_log.json" not in hub_server.files(hub_repo_id)


def test_push_refuses_incomplete_folders(tmp_path, hub_server):
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        push_adapter_to_hub(tmp_path / "nothing", "org/x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no pytorch_lora_weights.safetensors: save the adapter"):
        push_adapter_to_hub(tmp_path / "empty", "org/x")
    folder = _adapter_folder(tmp_path / "nocard", _metadata(), card=False)
    with pytest.raises(FileNotFoundError, match=r"has no README.md model card: write one with save_model_card"):
        push_adapter_to_hub(folder, "org/x")
    folder = _adapter_folder(tmp_path / "noimage", _metadata())
    (folder / "grid.png").unlink()
    with pytest.raises(FileNotFoundError, match="shows 'grid.png', which is not in"):
        push_adapter_to_hub(folder, "org/x")
    folder = _adapter_folder(tmp_path / "badcard", _metadata())
    (folder / "README.md").write_text("---\ntags: [unclosed\n---\n# card\n")
    with pytest.raises(ValueError, match="YAML metadata is invalid"):
        push_adapter_to_hub(folder, "org/x")
    assert not hub_server.repo_exists("org/x")  # nothing was created on the way


def test_fake_hub_lists_deletes_and_resolves_revisions(hub_server, hub_repo_id):
    """The parts of the fake Hub the adapter tests lean on least: tree listings, deletions, old revisions."""
    first = hub_server.seed(hub_repo_id, {"a.txt": b"a", "sub/b.txt": b"b", "sub/deep/c.txt": b"c"})
    api = HfApi()
    assert sorted(f.path for f in api.list_repo_tree(hub_repo_id)) == [".gitattributes", "a.txt", "sub"]
    assert sorted(f.path for f in api.list_repo_tree(hub_repo_id, recursive=True)) == [
        ".gitattributes", "a.txt", "sub", "sub/b.txt", "sub/deep", "sub/deep/c.txt"]
    api.delete_folder("sub", repo_id=hub_repo_id)
    assert set(hub_server.files(hub_repo_id)) == {".gitattributes", "a.txt"}
    assert api.model_info(hub_repo_id, revision=first).sha == first
    assert Path(hf_hub_download(hub_repo_id, "sub/b.txt", revision=first)).read_bytes() == b"b"
    assert hub_server.unhandled == []


def test_missing_repo_raises_repository_not_found(hub_server):
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("var-erase-tests/does-not-exist", LORA_WEIGHT_NAME)
    with pytest.raises(RepositoryNotFoundError):
        read_adapter_metadata("var-erase-tests/does-not-exist")


# -- the pipeline: load_lora_weights("org/name") from the fake Hub, then from the offline cache ----------------------
@pytest.fixture(scope="module")
def tiny_parts():
    pipeline_var = pytest.importorskip("var_erase.pipelines.pipeline_var", exc_type=ImportError,
                                       reason="VARPipeline is not importable yet")
    try:
        from ._tiny import tiny_pipeline
    except ImportError as err:
        pytest.skip(f"tests/_tiny.py is not usable yet: {err}")
    return pipeline_var.VARPipeline, tiny_pipeline


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _loaded_lora(transformer, adapter_name: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}


def test_pipeline_loads_an_adapter_by_repo_id_online_then_offline(tmp_path, monkeypatch, hub_server, hub_repo_id,
                                                                  tiny_parts):
    from diffusers.training_utils import _collate_lora_metadata
    from peft.utils import get_peft_model_state_dict

    VARPipeline, tiny_pipeline = tiny_parts
    base = tmp_path / "base"
    tiny_pipeline().save_pretrained(base)

    # train_svare.py's output, minus the training: a LoRA with non-zero weights, metadata, a card
    pipe = VARPipeline.from_pretrained(base)
    transformer = pipe.transformer
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_k", "to_v"], init_lora_weights=False)
    transformer.add_adapter(config)
    adapter = tmp_path / "adapter"
    VARPipeline.save_lora_weights(adapter, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                  **_collate_lora_metadata({"transformer": transformer}))
    metadata = AdapterMetadata.from_training(str(base), transformer, ["church"], "svare", lora_config=config)
    write_adapter_metadata(adapter, metadata)
    save_model_card(render_model_card(metadata, hub_repo_id), adapter)
    push_adapter_to_hub(adapter, hub_repo_id)
    expected = _lora_tensors(adapter / LORA_WEIGHT_NAME)

    # online: from the fake Hub, by repo id, no weight_name
    fresh = VARPipeline.from_pretrained(base)
    fresh.load_lora_weights(hub_repo_id, adapter_name="erase")
    loaded = _loaded_lora(fresh.transformer, "erase")
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], v) for k, v in expected.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_adapter_compatibility(read_adapter_metadata(hub_repo_id), fresh.transformer, strict=True)
    with pytest.warns(AdapterMismatchWarning):
        check_adapter_compatibility(read_adapter_metadata(hub_repo_id), tiny_pipeline(seed=1).transformer)

    # offline: HF_HUB_OFFLINE as huggingface_hub reads it at call time (the env var sets it at import); every HTTP
    # request is then refused by the client, and the adapter must come from the cache filled above
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub_server.requests)
    offline = VARPipeline.from_pretrained(base)
    offline.load_lora_weights(hub_repo_id, adapter_name="erase")
    loaded = _loaded_lora(offline.transformer, "erase")
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert read_adapter_metadata(hub_repo_id) == metadata
    assert len(hub_server.requests) == requests_before  # nothing reached the Hub


def test_pipeline_fingerprint_names_every_sampling_component_and_follows_the_weights(tmp_path):
    """The anchor cache's key: equal for the same weights loaded from two places, different when the transformer, the
    VAE or the text encoder changes."""
    from var_erase.pipelines.pipeline_var import VARPipeline

    from ._tiny import tiny_pipeline

    pipe = tiny_pipeline()
    digest = pipeline_fingerprint(pipe)
    assert [part.split(":")[0] for part in digest.split("|")] == ["transformer", "vae", "text_encoder"]
    for where in ("a", "b"):
        pipe.save_pretrained(tmp_path / where)
    assert pipeline_fingerprint(VARPipeline.from_pretrained(tmp_path / "a")) == digest
    assert pipeline_fingerprint(VARPipeline.from_pretrained(tmp_path / "b")) == digest
    for name in ("transformer", "vae", "text_encoder"):
        changed = tiny_pipeline()
        with torch.no_grad():
            for p in getattr(changed, name).parameters():
                p.add_(1.0)
        assert pipeline_fingerprint(changed) != digest, name



def test_the_hub_package_re_exports_every_public_name_of_its_modules():
    """``var_erase.hub`` is split by job; ``from var_erase.hub import X`` works for every public name of every part."""
    import ast
    import importlib

    import var_erase.hub as hub

    for part in ("common", "fingerprint", "metadata", "card", "upload"):
        module = importlib.import_module(f"var_erase.hub.{part}")
        tree = ast.parse(Path(module.__file__).read_text())
        names = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        names |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                  if isinstance(target, ast.Name)}
        public = sorted(name for name in names if not name.startswith("_") and name != "logger")
        assert public, part
        for name in public:
            assert getattr(hub, name) is getattr(module, name), f"var_erase.hub.{part}.{name} is not re-exported"
            assert name in hub.__all__, name
