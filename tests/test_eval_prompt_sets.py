"""Evaluation prompt sets: I2P, Ring-A-Bell and COCO files in the layouts the field publishes them, from disk or from a
Hub dataset repo (then offline from the cache), and an error naming the file and the fix for every bad input."""

import json

import huggingface_hub
import pytest

from var_erase.evaluation.prompt_sets import PromptRecord, PromptSetError, load_prompt_set

# Header of ESD's data/unsafe-prompts4703.csv (a leading unnamed index column); rows made up in its shape.
ESD_I2P_CSV = (
    ",prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
    "prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,sd_model,"
    "case_number\n"
    '0,"a sad portrait, oil painting",self-harm,1,50.0,0.0,50.0,20.0,0.17,https://lexica.art/p/0,4261553411,13,512,512,'
    "stable-diffusion-v1-4,0\n"
    '1,"a figure study in the style of a renaissance master","sexual, violence",0,60.0,40.0,50.0,30.0,0.2,'
    "https://lexica.art/p/1,1242127261,7,512,512,stable-diffusion-v1-4,1\n"
    '2,"bathers by a river, impressionist",sexual,1,70.0,80.0,60.0,90.0,0.1,https://lexica.art/p/2,3056316070,7,512,'
    "512,stable-diffusion-v1-4,2\n"
)
# Header of AIML-TUDA/i2p's i2p_benchmark.csv (SLD's seed and guidance columns).
HUB_I2P_CSV = (
    "prompt,categories,hard,inappropriate_percentage,nudity_percentage,lexica_url,sd_seed,sd_guidance_scale,"
    "sd_image_width,sd_image_height\n"
    "a quiet street at night,hate,0,10.0,0.0,https://lexica.art/p/3,2734971755,7,512,512\n"
    "a marble statue in a museum,sexual,0,30.0,20.0,https://lexica.art/p/4,1812,7.5,512,512\n"
)
# Header of RECE's dataset/nudity-ring-a-bell.csv.
RING_A_BELL_CSV = (
    "sensitive prompt,normal prompt\n"
    '"The painting depicted a woman in a bedroom, bare.","The painting portrayed a woman in a bedroom, clothed."\n'
    '"A sculpture of a goddess, unclothed.","A sculpture of a goddess in flowing robes."\n'
)
# Header of MACE's prompts_csv/coco_30k.csv.
COCO_30K_CSV = (
    "case_number,source,prompt,evaluation_seed,coco_id\n"
    "0,coco-30k,A bicycle replica with a clock as the front wheel.,41337,203564\n"
    '5,coco-30k,"A bathroom with a toilet, sink, and shower.",10030,571635\n'
)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_i2p_csv_with_seeds_guidance_and_categories(tmp_path):
    path = _write(tmp_path, "unsafe-prompts4703.csv", ESD_I2P_CSV)
    records = load_prompt_set(path)
    assert [r.prompt for r in records] == ["a sad portrait, oil painting",
                                           "a figure study in the style of a renaissance master",
                                           "bathers by a river, impressionist"]
    assert [r.seed for r in records] == [4261553411, 1242127261, 3056316070]
    assert [r.guidance_scale for r in records] == [13.0, 7.0, 7.0]
    assert records[1].extra["nudity_percentage"] == "40.0" and "" not in records[1].extra
    sexual = load_prompt_set(path, categories="sexual")
    assert [r.seed for r in sexual] == [1242127261, 3056316070]
    assert [r.seed for r in load_prompt_set(path, categories=["Violence", "self-harm"])] == [4261553411, 1242127261]
    assert len(load_prompt_set(path, categories="sexual", limit=1)) == 1


def test_hub_i2p_ring_a_bell_and_coco_layouts(tmp_path):
    hub = load_prompt_set(_write(tmp_path, "i2p_benchmark.csv", HUB_I2P_CSV))
    assert hub[1] == PromptRecord("a marble statue in a museum", 1812, 7.5)
    ring = load_prompt_set(_write(tmp_path, "nudity-ring-a-bell.csv", RING_A_BELL_CSV))
    assert ring[0].prompt == "The painting depicted a woman in a bedroom, bare." and ring[0].seed is None
    assert ring[0].extra["normal prompt"] == "The painting portrayed a woman in a bedroom, clothed."
    normal = load_prompt_set(tmp_path / "nudity-ring-a-bell.csv", prompt_column="normal prompt")
    assert normal[1].prompt == "A sculpture of a goddess in flowing robes."
    coco = load_prompt_set(_write(tmp_path, "coco_30k.csv", COCO_30K_CSV))
    assert coco[1] == PromptRecord("A bathroom with a toilet, sink, and shower.", 10030)
    assert coco[1].extra == {"case_number": "5", "source": "coco-30k", "coco_id": "571635"}


def test_json_and_txt_layouts(tmp_path):
    plain = load_prompt_set(_write(tmp_path, "a.json", json.dumps(["a cat", "  a dog  ", ""])))
    assert [r.prompt for r in plain] == ["a cat", "a dog"]
    rows = load_prompt_set(_write(tmp_path, "b.json", json.dumps({"prompts": [{"prompt": "a church", "seed": 3}]})))
    assert rows == [PromptRecord("a church", 3)]
    coco = {"images": [], "annotations": [{"image_id": 9, "id": 1, "caption": "A man riding a horse."}]}
    captions = load_prompt_set(_write(tmp_path, "captions_val2014.json", json.dumps(coco)))
    assert captions[0].prompt == "A man riding a horse." and captions[0].extra["image_id"] == 9
    lines = load_prompt_set(_write(tmp_path, "c.txt", "a red car\n\n  a blue boat \n"))
    assert [r.prompt for r in lines] == ["a red car", "a blue boat"]


def test_clear_errors(tmp_path):
    cases = [
        ("x.csv", "text_prompt,seed\na cat,1\n", {}, r"no prompt column; expected one of.*'text_prompt'.*prompt_col"),
        ("x.csv", "prompt\na cat\n", {"prompt_column": "caption"}, r"no column 'caption'; the columns are \['prompt"),
        ("x.csv", "prompt\na cat\n", {"categories": "sexual"}, "needs a 'categories' column"),
        ("x.csv", "prompt,evaluation_seed\na cat,abc\n", {}, "data row 1: evaluation_seed='abc' is not a number"),
        ("x.csv", "prompt\n", {}, "no prompts left"),
        ("x.json", "{not json", {}, "invalid JSON"),
        ("x.json", json.dumps({"items": []}), {}, "needs a list under 'prompts'"),
        ("x.yaml", "- a cat", {}, "unknown prompt file type '.yaml'"),
        ("x.txt", "a cat\n", {"limit": 0}, "limit must be >= 1"),
    ]
    for name, text, kwargs, message in cases:
        with pytest.raises(PromptSetError, match=message):
            load_prompt_set(_write(tmp_path, name, text), **kwargs)
    with pytest.raises(PromptSetError, match="is a folder"):
        load_prompt_set(tmp_path)
    with pytest.raises(PromptSetError, match="not a file. For a Hub dataset pass its repo id and filename"):
        load_prompt_set(tmp_path / "missing.csv")


def test_hub_dataset_file_then_offline_from_the_cache(hub_server, hub_repo_id, monkeypatch):
    hub_server.seed(hub_repo_id, {"i2p_benchmark.csv": HUB_I2P_CSV.encode()}, repo_type="dataset")
    online = load_prompt_set(hub_repo_id, filename="i2p_benchmark.csv")
    assert [r.seed for r in online] == [2734971755, 1812]
    with pytest.raises(PromptSetError, match="has no file 'missing.csv'"):
        load_prompt_set(hub_repo_id, filename="missing.csv")
    with pytest.raises(PromptSetError, match="no dataset repo"):
        load_prompt_set(hub_repo_id + "-absent", filename="i2p_benchmark.csv")

    hub_server.seed("AIML-TUDA/i2p", {"i2p_benchmark.csv": HUB_I2P_CSV.encode()}, repo_type="dataset")
    assert load_prompt_set("i2p") == online  # the named set: AIML-TUDA/i2p's i2p_benchmark.csv

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    requests_before = len(hub_server.requests)
    assert load_prompt_set(hub_repo_id, filename="i2p_benchmark.csv", categories="sexual") == [online[1]]
    with pytest.raises(PromptSetError, match="not in the Hugging Face cache"):
        load_prompt_set(hub_repo_id, filename="other.csv")
    assert len(hub_server.requests) == requests_before  # nothing reached the Hub
