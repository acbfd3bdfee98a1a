"""The default recipe on every concept of the toy world, judged on the frozen held-out phrasings (worst case first).

    python scripts/heldout_erasure_sweep.py jobs --seeds 3-5 > jobs.jsonl        # 20 concepts (--ten: + ten at once)
    python scripts/heldout_erasure_sweep.py base --phrasing_set unseen --images_per_prompt 2 --cache_dir outputs/base
    python scripts/run_jobs.py jobs.jsonl --parallel 16 --output_dir outputs/heldout   # on the GPU machine
    python scripts/heldout_erasure_sweep.py table outputs/heldout --report eval_unseen.json  # worst concept, seed

Each job runs ``examples/train_svare.py --concept C --seed S`` with no other training flag (the default recipe;
``jobs --recipe svare`` gives the published method's rows, ``jobs --recipe svare --method esd-x --tag=-esd-x`` a
baseline's), then ``evaluate`` once per phrasing set (``--sets``, default ``unseen``: the headline set is
``unseen`` since 2026-12-06, ``fresh`` and ``heldout`` were looked at while the recipe changed): every
prompt of the set drawn twice with and without the adapter on the same seeds, read by the toy oracle
(:mod:`var_erase.evaluation.heldout`). The base model's reads are the same for every job: ``base --cache_dir`` stores
them once, and ``evaluate --base_cache`` reads them instead of drawing them again.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os

import torch

from var_erase import DEFAULT_MODEL
from var_erase.toy.concepts import concept_names
from var_erase.toy.phrasings import PHRASING_SETS

TEN = ["red", "green", "blue", "pink", "triangle", "star", "heart", "crescent", "striped", "dotted"]
ACC_E_TARGET, ACC_I_DROP, ACC_I_DROP_TEN = 0.05, 0.02, 0.03


def _inference_sampling() -> dict:
    """The sampling every erasure is validated and judged with (ErasureConfig's inference defaults)."""
    from var_erase.erasure.config import ErasureConfig
    from var_erase.erasure.erase import sampling_settings

    return sampling_settings(ErasureConfig())


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def jobs(args) -> None:
    recipe = f" --recipe {args.recipe}" if args.recipe else ""
    recipe += f" --method {args.method}" if args.method else ""
    sets = [TEN] if args.ten else []  # the longest job first
    sets += [[c] for c in (args.concepts.split(",") if args.concepts else concept_names())]
    unknown = [name for name in args.sets.split(",") if name not in PHRASING_SETS]
    if unknown:
        raise SystemExit(f"unknown phrasing set(s) {unknown} in --sets; choose from {list(PHRASING_SETS)}")
    for seed in _seeds(args.seeds):
        for concepts in sets:
            name = f"{'ten' if len(concepts) > 1 else concepts[0]}{args.tag}-s{seed}"
            flags = " ".join(f"--concept {c}" for c in concepts)
            train = (f"python examples/train_svare.py {flags}{recipe} --seed {seed} --output_dir {{D}} "
                     f"--anchor_cache_dir {{D}}/anchors --num_validation_images 2")
            train += f" {args.train_args}" if args.train_args else ""
            cache = f" --base_cache {args.base_cache}" if args.base_cache else ""
            evaluate = [f"python scripts/heldout_erasure_sweep.py evaluate --lora {{D}} "
                        f"{' '.join(f'--target_concept {c}' for c in concepts)} --phrasing_set {phrasing_set}"
                        f"{cache} --output_json {{D}}/eval_{phrasing_set}.json"
                        for phrasing_set in args.sets.split(",")]
            print(json.dumps({"name": name, "cmds": [train, *evaluate], "estimate_s": args.estimate_s}))


@torch.no_grad()
def evaluate(args) -> dict:
    from var_erase.erasure.judges import OracleJudge
    from var_erase.evaluation.heldout import base_detections, erasure_report, phrasing_detections
    from var_erase.pipelines.pipeline_var import VARPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.lora, adapter_name="erase")
    judge = OracleJudge(device=device)
    sampling = _inference_sampling()
    kwargs = dict(phrasing_set=args.phrasing_set, images_per_prompt=args.images_per_prompt, seed=args.seed,
                  progress=True, **sampling)
    base = _cached_base(args.base_cache, kwargs, lambda: base_detections(pipe, judge, **kwargs))
    after = phrasing_detections(pipe, judge, **kwargs)
    report = erasure_report(args.target_concept, after, base, args.phrasing_set)
    log_path = os.path.join(args.lora, "training_log.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            log = json.load(f)
        report["training"] = {"steps": len(log.get("history", [])), "verified": log.get("verified"),
                              "message": log.get("message"), "replacements": log.get("replacements")}
    report["settings"] = {"seed": args.seed, "images_per_prompt": args.images_per_prompt, **sampling,
                          "judge": judge.settings, "lora": args.lora}
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("erased", "acc_e", "base_acc_e", "acc_i", "base_acc_i", "acc_i_drop")}))
    return report


@torch.no_grad()
def base(args) -> dict:
    """How often the base model draws each concept of a phrasing set (one erasure can only be judged where it does)."""
    from var_erase.erasure.judges import OracleJudge
    from var_erase.evaluation.heldout import phrasing_detections
    from var_erase.pipelines.pipeline_var import VARPipeline
    from var_erase.toy.phrasings import phrasing_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(phrasing_set=args.phrasing_set, images_per_prompt=args.images_per_prompt, seed=args.seed,
                  progress=True, **_inference_sampling())
    seen = phrasing_detections(pipe, OracleJudge(device=device), **kwargs)
    if args.cache_dir:
        _cached_base(args.cache_dir, kwargs, lambda: seen)
    rows = phrasing_rows(args.phrasing_set)
    groups: dict[str, dict[str, list[bool]]] = {"per_concept": {}, "per_template": {}}
    for row, hits in zip(rows, seen):
        groups["per_concept"].setdefault(row.concept, []).extend(hits)
        groups["per_template"].setdefault(row.template, []).extend(hits)
    flat = [h for hits in seen for h in hits]
    report = {"phrasing_set": args.phrasing_set, "drawn": sum(flat) / len(flat), "n_images": len(flat),
              **{g: {k: sum(v) / len(v) for k, v in table.items()} for g, table in groups.items()}}
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("phrasing_set", "drawn", "n_images")}))
    return report


def _cached_base(folder: str | None, kwargs: dict, compute) -> list[list[bool]]:
    """The base model's reads for ``kwargs`` (phrasing set, images, seed, sampling), from ``folder`` when stored
    there, else ``compute()`` (stored in ``folder`` when given; written atomically, so parallel jobs may race)."""
    if not folder:
        return compute()
    key = json.dumps({k: v for k, v in sorted(kwargs.items()) if k != "progress"})
    path = os.path.join(folder, f"base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["detections"]
    detections = compute()
    os.makedirs(folder, exist_ok=True)
    with open(path + f".{os.getpid()}.tmp", "w") as f:
        json.dump({"settings": json.loads(key), "detections": detections}, f)
    os.replace(path + f".{os.getpid()}.tmp", path)
    return detections


def loop_verdict(report: dict, drop_bar: float) -> dict:
    """What the run's closed loop said (``"reached"``, ``"not"``, or ``"-"`` for a run without a judge) and whether
    the bar holds on this report's prompts (every erased concept within the target, the drop within ``drop_bar``)."""
    verified = (report.get("training") or {}).get("verified")
    said = "-" if not verified else ("reached" if verified.get("target_reached") else "not")
    holds = max(report["per_concept"].values()) <= ACC_E_TARGET and report["acc_i_drop"] <= drop_bar
    return {"said": said, "holds": bool(holds)}


def table(args) -> str:
    reports = []
    for path in sorted(glob.glob(os.path.join(args.folder, "*", args.report))):
        with open(path) as f:
            report = json.load(f)
        report["job"] = os.path.basename(os.path.dirname(path))
        reports.append(report)
    groups: dict[str, list[dict]] = {}
    for r in reports:
        groups.setdefault(r["job"].rsplit("-s", 1)[0], []).append(r)
    lines = ["| concept | seeds | acc_e mean | acc_e worst seed | acc_i drop mean | acc_i drop worst | base acc_e | "
             "met (seeds) | steps | loop said |", "|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for name, runs in groups.items():
        ten = len(runs[0]["erased"]) > 1
        drop_bar = ACC_I_DROP_TEN if ten else ACC_I_DROP
        worst_e = max(max(r["per_concept"].values()) for r in runs)
        met = sum(max(r["per_concept"].values()) <= ACC_E_TARGET and r["acc_i_drop"] <= drop_bar for r in runs)
        row = {"concept": name, "seeds": len(runs), "acc_e_mean": sum(r["acc_e"] for r in runs) / len(runs),
               "acc_e_worst": worst_e, "drop_mean": sum(r["acc_i_drop"] for r in runs) / len(runs),
               "drop_worst": max(r["acc_i_drop"] for r in runs), "base_acc_e": runs[0]["base_acc_e"], "met": met,
               "steps": [r.get("training", {}).get("steps") for r in runs],
               "loop": [loop_verdict(r, drop_bar) for r in runs]}
        summary.append(row)
        lines.append(f"| {name} | {len(runs)} | {row['acc_e_mean']:.3f} | {worst_e:.3f} | {row['drop_mean']:+.3f} | "
                     f"{row['drop_worst']:+.3f} | {row['base_acc_e']:.3f} | {met}/{len(runs)} | {row['steps']} | "
                     f"{', '.join(v['said'] for v in row['loop'])} |")
    for tag, singles in _one_concept_rows_by_tag(summary).items():
        lines.append(_summary_lines(singles, f" ({tag.lstrip('-')})" if tag else ""))
    text = "\n".join(lines)
    print(text)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"rows": summary, "reports": reports}, f, indent=1)
    return text



def _one_concept_rows_by_tag(summary: list[dict]) -> dict[str, list[dict]]:
    """The one-concept rows grouped by the tag after the concept's name (``red`` -> ``""``, ``red-svare`` ->
    ``"-svare"``), so that each recipe of a sweep gets its own summary."""
    names = concept_names()
    groups: dict[str, list[dict]] = {}
    for row in summary:
        concept = row["concept"].split("-", 1)[0]
        if concept in names:
            groups.setdefault(row["concept"][len(concept):], []).append(row)
    return groups


def _summary_lines(singles: list[dict], label: str) -> str:
    """The worst concept, the largest drop, how many concepts meet on every seed, and the loop's honesty counts."""
    worst = max(singles, key=lambda s: s["acc_e_worst"])
    worst_drop = max(singles, key=lambda s: s["drop_worst"])
    lines = [f"\nWorst concept{label} (acc_e, worst seed): {worst['concept']} {worst['acc_e_worst']:.3f}; largest "
             f"acc_i drop: {worst_drop['concept']} {worst_drop['drop_worst']:+.3f}; met on all seeds: "
             f"{sum(s['met'] == s['seeds'] for s in singles)} of {len(singles)} concepts."]
    verdicts = [v for row in singles for v in row["loop"] if v["said"] != "-"]
    if verdicts:
        said = [v for v in verdicts if v["said"] == "reached"]
        lines.append(f"The loop's verdicts{label}: {len(said)} of {len(verdicts)} runs said \"Target reached\", "
                     f"{sum(v['holds'] for v in said)} of them hold here; of the {len(verdicts) - len(said)} that said "
                     f"\"NOT reached\", {sum(v['holds'] for v in verdicts if v['said'] != 'reached')} meet the bar "
                     "here anyway.")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("jobs", help="JSON-lines jobs for scripts/run_jobs.py")
    j.add_argument("--seeds", default="0-2")
    j.add_argument("--concepts", default=None, help="comma-separated (default: all 20)")
    j.add_argument("--ten", action="store_true", help="also the ten-concept adapter")
    j.add_argument("--recipe", default=None, help="default: the script's default recipe")
    j.add_argument("--tag", default="", help="appended to job names (e.g. -svare; write --tag=-svare)")
    j.add_argument("--method", default=None, help="train_svare.py --method (baselines: esd-u, esd-x, fmn, uce, ...)")
    j.add_argument("--train_args", default="",
                   help='more train_svare.py flags for every job, e.g. --train_args="--validation_steps 250"')
    j.add_argument("--estimate_s", type=float, default=120)
    j.add_argument("--sets", default="unseen",
                   help=f"phrasing sets to evaluate on, comma-separated, from {', '.join(PHRASING_SETS)}")
    j.add_argument("--base_cache", default=None, help="folder of the base model's stored reads (see base)")
    e = sub.add_parser("evaluate", help="one adapter on the held-out phrasings")
    e.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    e.add_argument("--lora", required=True)
    e.add_argument("--target_concept", action="append", required=True)
    e.add_argument("--phrasing_set", default="unseen", choices=PHRASING_SETS)
    e.add_argument("--images_per_prompt", type=int, default=2)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--base_cache", default=None, help="folder of stored base reads (read, or written if missing)")
    e.add_argument("--output_json", required=True)
    b = sub.add_parser("base", help="how often the base model draws each concept of a phrasing set")
    b.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    b.add_argument("--phrasing_set", default="unseen", choices=PHRASING_SETS)
    b.add_argument("--images_per_prompt", type=int, default=1)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cache_dir", default=None, help="also store the reads for evaluate --base_cache")
    b.add_argument("--output_json", required=True)
    t = sub.add_parser("table", help="aggregate a sweep folder")
    t.add_argument("folder")
    t.add_argument("--report", default="eval_unseen.json", help="the per-job report file to aggregate")
    t.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    return {"jobs": jobs, "evaluate": evaluate, "base": base, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
