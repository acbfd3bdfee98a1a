"""Write the job list of a many-seed toy erasure sweep (for scripts/run_jobs.py): train, then evaluate twice.

    python scripts/toy_erasure_sweep.py --recipes tri-const900,tri-cos900 --seeds 0-7 --base > jobs.jsonl

Each job trains one recipe at one seed with ``examples/train_svare.py`` and evaluates the adapter with
``examples/toy/evaluate_many.py`` on the test prompts (evaluation seed 0) and on the validation prompts (seed 1).
``--base`` adds one job per concept set that evaluates the base model the same way. The recipes are those of
docs/results.md, "Many training seeds on the H200" (sixth round). ``--concepts`` runs the one-concept recipes on other
concepts of the toy world (the shape recipes on any shape, the style recipes on any style), to see which concepts a
recipe erases reliably rather than how one concept fares:

    python scripts/toy_erasure_sweep.py --recipes tri-cos900 --concepts star,heart --seeds 0-2 --base > jobs.jsonl
"""

from __future__ import annotations

import argparse
import json

from var_erase.toy.concepts import concept_names, get_concept

RETAIN = (" --retain_prompts_per_concept 48 --retain_batch_size 4 --retain_teacher guided --retain_student guided "
          "--retain_weight 0.25")
TRIANGLE = ("--concept triangle --num_pairs 50 --rank 8 --num_train_scales 5 --learning_rate 1e-3 "
            "--preservation_student guided" + RETAIN)
OUTLINED = "--concept outlined --num_pairs 50 --rank 8 --learning_rate 1e-3 --pair_wording balanced"
FIVE_SHAPES = ["triangle", "circle", "square", "star", "heart"]
# the five shapes that one-shape erasure left least of (seventh round), and a mixed set: the style it erased reliably
# with four of those shapes
FIVE_BEST = ["triangle", "star", "cross", "diamond", "square"]
FIVE_MIXED = ["dotted", "star", "cross", "diamond", "square"]


def _five(concepts: list[str], scales: str = " --num_train_scales 5") -> str:
    return (" ".join(f"--concept {c}" for c in concepts) + " --num_pairs 50 --rank 8 --learning_rate 1e-3"
            f"{scales} --pair_wording balanced --preservation_student guided")


FIVE = _five(FIVE_SHAPES)
# name: (training arguments, evaluated targets, prompts per concept)
RECIPES = {
    "tri-const900": (TRIANGLE + " --max_train_steps 900", ["triangle"], 48),
    "tri-cos900": (TRIANGLE + " --max_train_steps 900 --lr_scheduler cosine", ["triangle"], 48),
    "out-const900": (OUTLINED + " --max_train_steps 900", ["outlined"], 48),
    "out-cos1500": (OUTLINED + " --max_train_steps 1500 --lr_scheduler cosine", ["outlined"], 48),
    "out-cos3000": (OUTLINED + " --max_train_steps 3000 --lr_scheduler cosine", ["outlined"], 48),
    "out-a4-const900": (OUTLINED + " --max_train_steps 900 --anchors_per_prompt 4", ["outlined"], 48),
    "five-const1500": (FIVE + " --max_train_steps 1500", FIVE_SHAPES, 32),
    "five-cos3000": (FIVE + " --max_train_steps 3000 --lr_scheduler cosine", FIVE_SHAPES, 32),
    "five-best-const1500": (_five(FIVE_BEST) + " --max_train_steps 1500", FIVE_BEST, 32),
    "five-mixed-const1500": (_five(FIVE_MIXED) + " --max_train_steps 1500", FIVE_MIXED, 32),
    # every scale: a fill style is drawn at the fine scales, which the first five (up to 8x8) leave out
    "five-mixed-all-const1500": (_five(FIVE_MIXED, "") + " --max_train_steps 1500", FIVE_MIXED, 32),
    # one replacement per kind instead of a random other value in each pair (eighth round): the erased concept maps
    # to one clean substitute rather than to a blend of several, which the oracle may read as anything
    "tri-cos900-to-circle": (TRIANGLE + " --max_train_steps 900 --lr_scheduler cosine --replacement circle",
                             ["triangle"], 48),
    "tri-cos900-to-square": (TRIANGLE + " --max_train_steps 900 --lr_scheduler cosine --replacement square",
                             ["triangle"], 48),
    "out-cos1500-to-solid": (OUTLINED + " --max_train_steps 1500 --lr_scheduler cosine --replacement solid",
                             ["outlined"], 48),
    "five-best-to-circle-const1500": (_five(FIVE_BEST) + " --max_train_steps 1500 --replacement circle", FIVE_BEST,
                                      32),
    # with one replacement the safe prompts hold only that value, so the other kept values need a retain set
    "five-best-to-circle-retain-const1500": (_five(FIVE_BEST) + " --max_train_steps 1500 --replacement circle"
                                             + RETAIN, FIVE_BEST, 32),
    "five-mixed-all-to-one-const1500": (_five(FIVE_MIXED, "") + " --max_train_steps 1500 --replacement circle "
                                        "--replacement solid", FIVE_MIXED, 32),
    # ninth round: the leftovers of the two recipes above, one or two images over the bar. More steps for the shapes
    # with a retain set; the diamond (which the oracle reads in 3 of 48 base circles) to a triangle instead
    "five-best-to-circle-retain-const2500": (_five(FIVE_BEST) + " --max_train_steps 2500 --replacement circle"
                                             + RETAIN, FIVE_BEST, 32),
    "five-mixed-all-to-one-diamond-to-triangle-const1500": (
        _five(FIVE_MIXED, "") + " --max_train_steps 1500 --replacement circle --replacement solid "
        "--replacement diamond=triangle", FIVE_MIXED, 32),
}
BASES = {"tri": (["triangle"], 48), "out": (["outlined"], 48), "five": (FIVE_SHAPES, 32)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", required=True, help=f"comma-separated, of {list(RECIPES)}")
    p.add_argument("--seeds", default="0-7", help="training seeds: '0-7' or '0,3,5'")
    p.add_argument("--base", action="store_true", help="also evaluate the base model for each recipe's targets")
    p.add_argument("--concepts", default=None,
                   help="comma-separated concepts, each run with every given one-concept recipe of its kind (a shape "
                        "with tri-*, a style with out-*) instead of the recipe's own; job names gain the concept")
    p.add_argument("--pretrained_model_name_or_path", default=None)
    p.add_argument("--device", default="cuda", help="evaluation device (training uses accelerate's choice)")
    p.add_argument("--anchor_cache_dir", default="outputs/anchors")
    p.add_argument("--estimate_s", type=float, default=60, help="do not start a job with less time than this left")
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {unknown}; choose from {list(RECIPES)}")
    runs = _runs(recipes, args.concepts)
    model = f" --pretrained_model_name_or_path {args.pretrained_model_name_or_path}" \
        if args.pretrained_model_name_or_path else ""
    evaluate = f"python examples/toy/evaluate_many.py --device {args.device}{model}"

    def evaluations(targets, p_per_concept, what):
        t = " ".join(f"--target_concept {c}" for c in targets)
        return [f"{evaluate} {t} {what} --seed {s} --prompts_per_concept {p_per_concept} "
                f"--output_json {{D}}/eval_s{s}.json" for s in (0, 1)]

    jobs = []
    if args.base:
        bases = {_base_name(targets): (targets, n) for _, (_, targets, n) in runs}
        for base_name, (targets, n) in bases.items():
            jobs.append({"name": base_name, "cmds": evaluations(targets, n, "--base")})
    for seed in _seeds(args.seeds):
        for name, (train_args, targets, n) in runs:
            train = (f"python examples/train_svare.py{model} --recipe svare --judge none {train_args} --seed {seed} "
                     f"--num_validation_images 0 "
                     f"--anchor_cache_dir {args.anchor_cache_dir} --output_dir {{D}}")
            jobs.append({"name": f"{name}-s{seed}", "cmds": [train] + evaluations(targets, n, "--lora {D}"),
                         "estimate_s": args.estimate_s})
    for job in jobs:
        print(json.dumps(job))
    return jobs


def _runs(recipes: list[str], concepts: str | None) -> list[tuple[str, tuple[str, list[str], int]]]:
    """(job name stem, (training arguments, targets, prompts per concept)) for each recipe, or recipe x concept."""
    if concepts is None:
        return [(recipe, RECIPES[recipe]) for recipe in recipes]
    names = [c.strip() for c in concepts.split(",") if c.strip()]
    unknown = [c for c in names if c not in concept_names()]
    if unknown:
        raise SystemExit(f"unknown concept(s) {unknown}; the toy world's are {sorted(concept_names())}")
    kind_of = {c: get_concept(c).kind for c in names}
    kinds = {}
    for recipe in recipes:
        targets = RECIPES[recipe][1]
        if len(targets) != 1:
            raise SystemExit(f"--concepts needs one-concept recipes; {recipe} erases {targets}")
        kinds[recipe] = get_concept(targets[0]).kind
    for concept in names:
        if kind_of[concept] not in kinds.values():
            raise SystemExit(f"{concept!r} is a {kind_of[concept]} and no recipe given is a {kind_of[concept]} "
                             f"recipe (the recipes given erase a {sorted(set(kinds.values()))})")
    runs = []
    for recipe, kind in kinds.items():
        train_args, (own,), n = RECIPES[recipe]
        mine = [c for c in names if kind_of[c] == kind]
        if not mine:
            raise SystemExit(f"{recipe} is a {kind} recipe and --concepts names no {kind}")
        for concept in mine:
            if f"--replacement {concept} " in train_args + " ":
                raise SystemExit(f"{recipe} replaces every {kind} with {concept!r}, so it cannot erase {concept!r}; "
                                 f"use a recipe with another --replacement for it")
            args = train_args.replace(f"--concept {own} ", f"--concept {concept} ")
            runs.append((f"{recipe}-{concept}", (args, [concept], n)))
    return runs


def _base_name(targets: list[str]) -> str:
    """The name of the base-model evaluation a run is compared with: one per target set."""
    known = {tuple(t): prefix for prefix, (t, _) in BASES.items()}
    return f"base-{known.get(tuple(targets), '-'.join(targets))}"


def _seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(s) for s in text.split(",")]


if __name__ == "__main__":
    main()
