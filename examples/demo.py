"""The main job on the embedded default model: erase a concept with S-VARE, then measure what changed.

    python examples/demo.py --output_dir outputs/demo            # `make demo`

1. ``var_erase.erase`` erases ``--concept`` with S-VARE as the reference runs it (``recipe="svare"``, a short run
   that fits a laptop: 200 iterations, rank 8, 1e-3), writing a LoRA adapter, its model card and a before/after grid;
2. the oracle reads images of held-out prompts for the concept and for the other concepts of its kind, with the base
   model and with the adapter (same seeds): ``eval.json`` holds ``acc_e`` / ``acc_i`` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from var_erase import DEFAULT_MODEL, erase
from var_erase.evaluation.toy_metrics import concept_accuracy
from var_erase.loaders.lora import adapters_disabled
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.captions import evaluation_prompts
from var_erase.toy.concepts import concept_names, get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="red", help="a concept of the toy world (default: a colour, which the "
                                                    "shipped checkpoint draws reliably)")
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--num_pairs", type=int, default=32)
    p.add_argument("--max_train_steps", type=int, default=200)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval_prompts_per_concept", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def evaluate(pipe, oracle, concept: str, n: int, seed: int) -> dict:
    """acc_e on held-out prompts for ``concept``, acc_i on those of the other concepts of its kind."""
    kind = get_concept(concept).kind
    rows = evaluation_prompts(concept_names(kind), n, seed)
    kwargs = dict(num_images_per_prompt=1, seed=seed, batch_size=32, progress=False, guidance_scale=4.0,
                  temperature=0.5)
    with adapters_disabled(pipe.transformer):
        before = concept_accuracy(pipe, oracle, rows, [concept], **kwargs)
    after = concept_accuracy(pipe, oracle, rows, [concept], **kwargs)
    return {"target_concept": concept, "acc_e": after["acc_e"], "acc_i": after["acc_i"],
            "acc_e_before": before["acc_e"], "acc_i_before": before["acc_i"],
            "per_concept_before": before["per_concept"], "per_concept_after": after["per_concept"],
            "n_images": after["n_images"], "prompts": "evaluation_prompts(heldout_template)",
            "settings": {"seed": seed, "prompts_per_concept": n, **{k: v for k, v in kwargs.items()
                                                                     if k != "progress"}}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    config = {"lora_rank": args.rank, "lora_alpha": float(args.rank), "learning_rate": args.learning_rate,
              "max_train_steps": args.max_train_steps}
    trained = VARPipeline.from_pretrained(DEFAULT_MODEL)
    trained.set_progress_bar_config(disable=True)
    erase(trained, args.concept, output_dir=args.output_dir, recipe="svare", config=config, num_pairs=args.num_pairs,
          seed=args.seed, judge=None, base_model=DEFAULT_MODEL)
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.output_dir, adapter_name="erase")
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    report = evaluate(pipe, oracle, args.concept, args.eval_prompts_per_concept, args.seed + 1)
    report["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps({k: report[k] for k in ("acc_e_before", "acc_e", "acc_i_before", "acc_i", "n_images",
                                             "seconds")}, indent=2))
    print(f"adapter, README.md (model card), grid.png and eval.json are in {args.output_dir}")
    return report


if __name__ == "__main__":
    main()
