"""What an (erased) toy model draws for every concept of the target's kind: acc per concept, per caption word, and
the shape / colour / style sets the oracle reads, on the same held-out prompts and seeds as ``examples/evaluate.py``.

    python examples/toy/concept_confusions.py --lora outputs/erase-triangle --target_concept triangle

Diagnostic for docs/results.md (which other concept an erasure damages, and whether one wording of it is worse).
"""

from __future__ import annotations

import argparse
import collections

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.toy_metrics import generate_images, kind_evaluation_prompts
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.concepts import get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--lora", default=None, help="adapter folder (default: the base model)")
    p.add_argument("--target_concept", required=True)
    p.add_argument("--prompts_per_concept", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora, adapter_name="erase")
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    rows = kind_evaluation_prompts([args.target_concept], args.prompts_per_concept, args.seed)
    kind = get_concept(args.target_concept).kind
    images = generate_images(pipe, [p for p, _ in rows], 1, args.seed, 32, progress=False, guidance_scale=4.0,
                             temperature=0.5)
    seen = oracle.predict(images).values(kind)
    by_word: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    drawn: dict = collections.defaultdict(collections.Counter)
    for (prompt, concept), found in zip(rows, seen):
        words = sorted(get_concept(concept).training_words, key=len, reverse=True)
        word = next((w for w in words if w in prompt), "?")
        by_word[concept][word].append(concept in found)
        drawn[concept][",".join(sorted(found)) or "-"] += 1
    report = {}
    for concept, words in by_word.items():
        hits = [h for v in words.values() for h in v]
        report[concept] = {"acc": sum(hits) / len(hits), "by_word": {w: [sum(v), len(v)] for w, v in words.items()},
                           "drawn": dict(drawn[concept].most_common())}
        print(f"{concept:9s} {report[concept]['acc']:.2f}  by word: "
              + "; ".join(f"{w}: {a}/{n}" for w, (a, n) in report[concept]["by_word"].items())
              + f"  drawn: {report[concept]['drawn']}")
    return report


if __name__ == "__main__":
    main()
