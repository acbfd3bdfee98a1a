"""``erasure_report``: acc_e / acc_i on the held-out phrasings and the breakdowns, from known detections."""

import pytest

from var_erase.evaluation.heldout import erasure_report
from var_erase.toy.phrasings import phrasing_rows


def test_report_counts_targets_kept_prompts_and_breakdowns():
    rows = phrasing_rows("heldout")
    base = [[True, True] for _ in rows]
    # after: blue still drawn only with stripes; one kept prompt (a red star) lost on both images
    after = [[r.values["style"] == "striped"] * 2 if r.concept == "blue" else [True, True] for r in rows]
    lost = next(i for i, r in enumerate(rows) if r.concept == "star" and r.values["colour"] == "red")
    after[lost] = [False, False]
    report = erasure_report(["blue"], after, base)
    assert report["n_target_images"] == 64 and report["acc_e"] == pytest.approx(0.25) and report["base_acc_e"] == 1.0
    assert report["acc_e_by_value"]["blue x striped"] == 1.0 and report["acc_e_by_value"]["blue x solid"] == 0.0
    kept = [r for r in rows if r.concept != "blue" and not r.mentions("blue")]
    assert report["n_kept_images"] == 2 * len(kept)
    assert report["acc_i_drop"] == pytest.approx(2 / (2 * len(kept)))
    assert report["acc_i_per_concept"]["star"]["acc_i"] < 1.0 == report["acc_i_per_concept"]["star"]["base"]
    assert all("blue" not in c for c in report["acc_i_per_concept"])
