"""ACC_e, ACC_e on held-out paraphrases and ACC_i for the base model and several adapters, one model load.

    python examples/toy/evaluate_many.py --target_concept triangle --base --lora outputs/a --lora outputs/b

Held-out-template rows and seeds are exactly those of ``examples/evaluate.py --target_concept C
--prompts_per_concept N --seed S`` (so ``acc_e`` / ``acc_i`` / ``per_concept`` equal its numbers); the paraphrase
rows are ``N`` prompts per target worded with the target's held-out paraphrases (``split="heldout_paraphrase"``,
prompt seed ``S + 2``, image seed ``S``). Every adapter is evaluated on its own (loaded, measured, removed).
Prints one JSON line per model and writes them all to ``--output_json``.

``--adapter_branch cond`` (``uncond``) applies every adapter to the conditional (unconditional) guidance branch only,
the other branch running the base weights (``var_erase.evaluation.guidance_branches``): a diagnostic of which branch
carries the erasure and which the collateral damage.
"""

from __future__ import annotations

import argparse
import json
import os
from contextlib import nullcontext

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.guidance_branches import BRANCHES, adapter_on_branch
from var_erase.evaluation.toy_metrics import concept_accuracy, kind_evaluation_prompts
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.captions import evaluation_prompts
from var_erase.toy.concepts import get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--lora", action="append", default=[], help="adapter folder (repeatable; each measured alone)")
    p.add_argument("--base", action="store_true", help="also measure the base model (no adapter)")
    p.add_argument("--target_concept", action="append", required=True)
    p.add_argument("--prompts_per_concept", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_paraphrase", action="store_true")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of every adapter at inference")
    p.add_argument("--adapter_branch", choices=BRANCHES, default="both",
                   help="guidance branch(es) the adapters act on (diagnostic; default both, as in normal use)")
    p.add_argument("--device", default="cpu",
                   help="torch device of the model and the oracle, e.g. 'cuda' (default cpu: the documented numbers; "
                        "images are drawn from the same per-image CPU seeds on any device, equal up to float rounding)")
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    for c in args.target_concept:
        get_concept(c)
    rows = kind_evaluation_prompts(args.target_concept, args.prompts_per_concept, args.seed)
    para = evaluation_prompts(args.target_concept, args.prompts_per_concept, args.seed + 2,
                              split="heldout_paraphrase")
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH).to(args.device)
    kwargs = dict(seed=args.seed, batch_size=32, progress=False, guidance_scale=4.0, temperature=0.5)
    results = []
    for adapter in ([None] if args.base else []) + args.lora:
        if adapter is not None:
            pipe.load_lora_weights(adapter, adapter_name="evaluated")
            if args.lora_scale != 1.0:
                pipe.set_adapters(["evaluated"], adapter_weights=[args.lora_scale])
        with adapter_on_branch(pipe.transformer, "evaluated", args.adapter_branch) if adapter else nullcontext():
            out = _measure(pipe, oracle, rows, para, args, **kwargs)
        out = {"model": adapter or "base", "lora_scale": args.lora_scale if adapter else None,
               "adapter_branch": args.adapter_branch if adapter else None} | out
        if adapter is not None:
            pipe.delete_adapters("evaluated")
        print(json.dumps(out), flush=True)
        results.append(out)
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return results


def _measure(pipe, oracle, rows, para, args, **kwargs) -> dict:
    main_ = concept_accuracy(pipe, oracle, rows, args.target_concept, **kwargs)
    out = {"targets": args.target_concept, "acc_e": main_["acc_e"], "acc_i": main_["acc_i"],
           "per_concept": main_["per_concept"], "n_images": main_["n_images"]}
    if not args.no_paraphrase:
        para_ = concept_accuracy(pipe, oracle, para, args.target_concept, **kwargs)
        out["acc_e_para"] = para_["acc_e"]
        out["per_concept_para"] = para_["per_concept"]
        out["n_images"] += para_["n_images"]
    return out


if __name__ == "__main__":
    main()
