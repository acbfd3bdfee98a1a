"""The short summary of ``run_fp8_suite.sh``: bf16 against FP8 from the JSON files in one folder.

Prints a few lines of text and writes ``fp8_summary.json`` next to the inputs. A missing or unreadable file (a step
that failed or ran out of time) is reported as missing, not guessed.

    python benchmarks/fp8_summary.py $OUT
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def _load(folder: str, name: str) -> dict | None:
    try:
        with open(os.path.join(folder, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ratio(bf16: float | None, fp8: float | None) -> float | None:
    return bf16 / fp8 if bf16 and fp8 else None


def sampling_rows(bf16: dict | None, fp8: dict | None) -> list[dict]:
    """Per batch size: total seconds per image, images/s and peak GiB of both runs, and the speed-up."""
    def by_batch(report):
        return {r["batch_size"]: r for r in (report or {}).get("results", []) if "error" not in r}

    a, b = by_batch(bf16), by_batch(fp8)
    rows = []
    for batch in sorted(set(a) | set(b)):
        ra, rb = a.get(batch, {}), b.get(batch, {})
        rows.append({"batch_size": batch,
                     "bf16_s_per_image": ra.get("total_s_per_image"), "fp8_s_per_image": rb.get("total_s_per_image"),
                     "bf16_transformer_s_per_image": ra.get("transformer_s_per_image"),
                     "fp8_transformer_s_per_image": rb.get("transformer_s_per_image"),
                     "bf16_images_per_s": ra.get("images_per_s"), "fp8_images_per_s": rb.get("images_per_s"),
                     "bf16_peak_gib": ra.get("peak_memory_gib"), "fp8_peak_gib": rb.get("peak_memory_gib"),
                     "speedup": _ratio(ra.get("total_s_per_image"), rb.get("total_s_per_image"))})
    return rows


def erasure_row(bf16: dict | None, fp8: dict | None) -> dict:
    keys = ("s_per_iteration", "peak_memory_gib", "anchor_s_per_prompt", "projected_run_min")
    row = {f"{tag}_{k}": (report or {}).get(k) for tag, report in (("bf16", bf16), ("fp8", fp8)) for k in keys}
    row["speedup"] = _ratio(row["bf16_s_per_iteration"], row["fp8_s_per_iteration"])
    row["fp8_checks"] = None if fp8 is None else {k: fp8.get(k) for k in ("trainable_all_changed",
                                                                           "trainable_all_received_grad")}
    return row


def quality_row(report: dict | None) -> dict | None:
    if report is None:
        return None
    toy = report.get("toy", {})
    drift = report.get("drift", {})
    toy_drift = toy.get("drift", {})
    return {"random_kl_mean": drift.get("kl_mean"), "random_kl_max": drift.get("kl_max"),
            "random_logit_rel_l2_max": drift.get("logit_rel_l2_max"),
            "toy_kl_mean": toy_drift.get("kl_mean"), "toy_kl_max": toy_drift.get("kl_max"),
            "toy_logit_rel_l2_max": toy_drift.get("logit_rel_l2_max"),
            "toy_adherence_all": {v: a.get("all") for v, a in toy.get("adherence", {}).items()},
            "toy_fp8_minus_bf16": toy.get("fp8_minus_bf16"), "grid": report.get("grid")}


def summarize(folder: str) -> dict:
    reports = {name: _load(folder, name) for name in ("sampling_bf16", "sampling_fp8", "erasure_bf16", "erasure_fp8",
                                                      "fp8_quality")}
    device = next((r["environment"].get("gpu") or r["environment"]["device"] for r in reports.values()
                   if r and "environment" in r), None)
    return {"device": device, "missing": [name for name, r in reports.items() if r is None],
            "sampling": sampling_rows(reports["sampling_bf16"], reports["sampling_fp8"]),
            "erasure": erasure_row(reports["erasure_bf16"], reports["erasure_fp8"]),
            "quality": quality_row(reports["fp8_quality"])}


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def text(summary: dict) -> str:
    lines = [f"device: {summary['device']}; missing: {', '.join(summary['missing']) or 'none'}"]
    for r in summary["sampling"]:
        lines.append(f"sampling B={r['batch_size']}: bf16 {_fmt(r['bf16_s_per_image'])} s/img, fp8 "
                     f"{_fmt(r['fp8_s_per_image'])} s/img (x{_fmt(r['speedup'], 2)}); images/s "
                     f"{_fmt(r['bf16_images_per_s'], 2)} -> {_fmt(r['fp8_images_per_s'], 2)}; peak GiB "
                     f"{_fmt(r['bf16_peak_gib'], 1)} -> {_fmt(r['fp8_peak_gib'], 1)}")
    e = summary["erasure"]
    lines.append(f"erasure iteration: bf16 {_fmt(e['bf16_s_per_iteration'])} s at {_fmt(e['bf16_peak_memory_gib'], 1)}"
                 f" GiB, fp8 {_fmt(e['fp8_s_per_iteration'])} s at {_fmt(e['fp8_peak_memory_gib'], 1)} GiB "
                 f"(x{_fmt(e['speedup'], 2)}); projected run {_fmt(e['bf16_projected_run_min'], 1)} -> "
                 f"{_fmt(e['fp8_projected_run_min'], 1)} min; fp8 checks {e['fp8_checks']}")
    q = summary["quality"]
    if q:
        lines.append(f"drift KL per bit (mean/max): random {_fmt(q['random_kl_mean'], 6)}/{_fmt(q['random_kl_max'], 4)}"
                     f" (logit rel. L2 <= {_fmt(q['random_logit_rel_l2_max'], 4)}), toy {_fmt(q['toy_kl_mean'], 5)}/"
                     f"{_fmt(q['toy_kl_max'], 4)} (<= {_fmt(q['toy_logit_rel_l2_max'], 4)}); toy adherence (all) "
                     f"{q['toy_adherence_all']}")
    return "\n".join(lines)


def write_json(summary: dict, path: str) -> None:
    """Atomically (temporary file, then rename)."""
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        raise SystemExit("usage: python benchmarks/fp8_summary.py FOLDER (the $OUT of run_fp8_suite.sh)")
    summary = summarize(argv[0])
    write_json(summary, os.path.join(argv[0], "fp8_summary.json"))
    print(text(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
