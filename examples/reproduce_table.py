"""Reproduce the paper's comparison on the toy world: methods, the filter ratio alpha, and several concepts at once.

    python examples/reproduce_table.py --output_dir outputs/table   # writes outputs/table/results.md (~1 h, 1 CPU)

Rows (each an adapter trained by ``examples/train_svare.py`` from the same pairs, seeds and budget, then read by the
oracle on held-out prompts with the same seeds):

- per concept: original model, ``naive`` (Eq. 6), ``vare`` (VARE-basic, Eq. 7), ``fce`` (VARE + filtered CE), ``svare``
  (+ preservation KL), and the paper's baselines (``--baselines``: ESD-u, ESD-x, FMN, UCE, AC-N, AC-M, each with its
  own default modules; UCE is a closed-form edit);
- alpha ablation of S-VARE on the first concept: token threshold 0, 0.25 (default), 0.5, 0.75;
- multi-concept: for each count in ``--multi``, one adapter erasing that many concepts at once, taken from the first
  concept's kind and then the next kinds (at most all but three of a kind, so every kind keeps concepts for
  ``acc_i``); its step budget is ``--max_train_steps`` x ceil(count / 2), the same number of steps per concept as a
  one-concept run sees pairs.

Columns: ``acc_e`` (target still drawn, held-out templates), ``acc_e_para`` (held-out paraphrases of the target),
``acc_i`` (the other concepts of the target's kind still drawn). Finished runs are reused (delete a run's folder to
redo it), so the script can be interrupted and restarted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from var_erase import DEFAULT_MODEL, erase
from var_erase.evaluation.toy_metrics import concept_accuracy, kind_evaluation_prompts
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.captions import evaluation_prompts
from var_erase.toy.concepts import CONCEPT_KINDS, concept_names, get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier

METHODS = ("naive", "vare", "fce", "svare")
BASELINES = ("esd-u", "esd-x", "fmn", "uce", "ac-n", "ac-m")  # the paper's diffusion-era baselines in the VARE frame


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--concepts", default="triangle,outlined", help="comma-separated target concepts")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help="comma-separated baseline methods per concept besides S-VARE's variants (empty: none)")
    p.add_argument("--alphas", default="0,0.5,0.75", help="token thresholds besides the default 0.25")
    p.add_argument("--multi", default="5,10", help="comma-separated numbers of concepts erased together (empty: skip)")
    p.add_argument("--num_pairs", type=int, default=24)
    p.add_argument("--max_train_steps", type=int, default=150)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompts_per_concept", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/table")
    return p.parse_args(argv)


def train(args, name: str, concepts: list[str], config: dict | None = None) -> str:
    """One row's adapter: ``var_erase.erase`` with the reference recipe (``"svare"``), no judge, the table's budget and
    ``config`` (ErasureConfig fields, e.g. ``{"method": "fce"}``) on top; reused when its weights exist."""
    out = os.path.join(args.output_dir, name)
    if not os.path.exists(os.path.join(out, "pytorch_lora_weights.safetensors")):
        steps = args.max_train_steps * math.ceil(len(concepts) / 2) if len(concepts) > 1 else args.max_train_steps
        pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path)  # a fresh model per adapter
        pipe.set_progress_bar_config(disable=True)
        settings = {"max_train_steps": steps, "learning_rate": args.learning_rate, "lora_rank": args.rank,
                    "lora_alpha": float(args.rank), **(config or {})}
        erase(pipe, concepts, output_dir=out, recipe="svare", config=settings, seed=args.seed,
              num_pairs=args.num_pairs, judge=None, num_grid_images=2, base_model=args.pretrained_model_name_or_path)
    return out


def evaluate(pipe, oracle, adapter: str | None, targets: list[str], args) -> dict:
    """acc_e / acc_i on held-out templates and acc_e on held-out paraphrases, same seeds for every row."""
    rows = kind_evaluation_prompts(targets, args.prompts_per_concept, args.seed + 1)
    para = evaluation_prompts(targets, args.prompts_per_concept, args.seed + 2, split="heldout_paraphrase")
    if adapter is not None:
        pipe.load_lora_weights(adapter, adapter_name="row")
    kwargs = dict(seed=args.seed + 1, batch_size=32, progress=False, guidance_scale=4.0, temperature=0.5)
    main = concept_accuracy(pipe, oracle, rows, targets, **kwargs)
    paraphrased = concept_accuracy(pipe, oracle, para, targets, **kwargs)
    if adapter is not None:
        pipe.delete_adapters("row")
    return {"acc_e": main["acc_e"], "acc_e_para": paraphrased["acc_e"], "acc_i": main["acc_i"],
            "per_concept": main["per_concept"], "n_images": main["n_images"] + paraphrased["n_images"]}


def plan(args) -> list[tuple[str, str, list[str], dict]]:
    """(row label, run name, targets, ErasureConfig fields); run name '' = the original model."""
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    rows = []
    for c in concepts:
        rows.append((f"{c}: original", "", [c], {}))
        baselines = [m.strip() for m in args.baselines.split(",") if m.strip()]
        rows += [(f"{c}: {m}", f"{c}-{m}", [c], {"method": m}) for m in [*METHODS, *baselines]]
    first = concepts[0]
    for alpha in [a for a in args.alphas.split(",") if a.strip()]:
        rows.append((f"{first}: svare alpha={alpha}", f"{first}-svare-alpha{alpha}", [first],
                     {"token_threshold": float(alpha)}))
    for count in [int(n) for n in args.multi.split(",") if n.strip()]:
        group = concept_group(first, count)
        rows.append((f"{len(group)} concepts together ({', '.join(group)})", f"multi{len(group)}", group, {}))
    return rows


def concept_group(first: str, count: int) -> list[str]:
    """``count`` concepts starting with ``first``: its kind first, then the other kinds in order, each kind giving at
    most all but three of its concepts (so acc_i is still measured on every kind the group touches)."""
    first_kind = get_concept(first).kind
    kinds = [first_kind] + [k for k in CONCEPT_KINDS if k != first_kind]
    group = [first]
    for kind in kinds:
        names = [c for c in concept_names(kind) if c not in group]
        room = len(concept_names(kind)) - 3 - sum(get_concept(c).kind == kind for c in group)
        group += names[: max(0, min(room, count - len(group)))]
    if len(group) < count:
        raise ValueError(f"the toy world cannot erase {count} concepts together and keep three of each kind for "
                         f"acc_i; the most is {len(group)}")
    return group


def markdown(results: list[dict], args) -> str:
    lines = ["| row | acc_e ↓ | acc_e paraphrase ↓ | acc_i ↑ | images |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['row']} | {r['acc_e']:.2f} | {r['acc_e_para']:.2f} | {r['acc_i']:.2f} | "
                     f"{r['n_images']} |")
    settings = (f"{args.max_train_steps} steps, {args.num_pairs} pairs per concept, LoRA rank {args.rank}, learning "
                f"rate {args.learning_rate}, seed {args.seed}, {args.prompts_per_concept} held-out prompts per "
                f"concept, guidance 4, temperature 0.5")
    return "\n".join(lines) + f"\n\nSettings: {settings}.\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    results = []
    for label, name, targets, extra in plan(args):
        cached = os.path.join(args.output_dir, f"{name or 'original-' + targets[0]}.eval.json")
        if os.path.exists(cached):
            with open(cached) as f:
                results.append(json.load(f))
            continue
        start = time.perf_counter()
        adapter = train(args, name, targets, extra) if name else None
        row = {"row": label, "targets": targets, **evaluate(pipe, oracle, adapter, targets, args),
               "seconds": round(time.perf_counter() - start, 1)}
        with open(cached, "w") as f:
            json.dump(row, f, indent=2)
        results.append(row)
        print(json.dumps({k: row[k] for k in ("row", "acc_e", "acc_e_para", "acc_i", "seconds")}), flush=True)
    table = markdown(results, args)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return results


if __name__ == "__main__":
    main()
