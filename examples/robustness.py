"""Robustness and side effects of an erasure on the toy world, erased model vs the base model, in one JSON.

    python examples/robustness.py --lora outputs/demo --target_concept red --output_json outputs/robustness.json

Measures (every one for the erased pipeline and, with the adapter disabled, the base pipeline; same prompts and
seeds):

1. **paraphrase ASR**: prompts for the concept worded only with its held-out paraphrases
   (``var_erase.evaluation.attacks.paraphrase_asr``);
2. **prompt-search attack**: a greedy discrete search over adversarial words prepended to prompts that ask for the
   concept, judged by the oracle, a fixed query budget per prompt, best prompts re-checked on fresh seeds
   (``prompt_search_attack``; vocabulary: the toy world's words or the tokenizer's whole-word vocabulary);
3. **oracle-feature FID** on prompts of every *other* concept: erased vs base with the same seeds, and the noise floor
   (base vs base with other seeds), so the number can be read (``var_erase.evaluation.fid.oracle_fid``);
4. **per-scale commitment**: the concept's detection rate when the first k scales come from the base model and the
   rest from the erased one (``scale_commitment``): which scale the adapter acts on.

Generation uses guidance 4 and temperature 0.5 as every toy evaluation does.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.attacks import paraphrase_asr, prompt_search_attack, tokenizer_words, toy_words
from var_erase.evaluation.fid import oracle_fid
from var_erase.evaluation.scale_analysis import scale_commitment
from var_erase.evaluation.toy_metrics import generate_images
from var_erase.loaders.lora import adapters_disabled
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.captions import concept_prompts, evaluation_prompts
from var_erase.toy.concepts import concept_names, get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier
from var_erase.utils import atomic_write_bytes

SAMPLING = dict(guidance_scale=4.0, temperature=0.5)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--lora", required=True, help="the erasure adapter: folder, file or Hub repo id")
    p.add_argument("--target_concept", required=True, help="the erased concept of the toy world")
    p.add_argument("--paraphrase_prompts", type=int, default=32)
    p.add_argument("--attack_prompts", type=int, default=8, help="starting prompts of the prompt search")
    p.add_argument("--attack_budget", type=int, default=32, help="queries per starting prompt")
    p.add_argument("--attack_words", type=int, default=2, help="adversarial words prepended")
    p.add_argument("--attack_vocabulary", choices=["toy", "tokenizer"], default="toy")
    p.add_argument("--fid_prompts_per_concept", type=int, default=8)
    p.add_argument("--scale_prompts", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output_json", default="outputs/robustness.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        get_concept(args.target_concept)
    except KeyError as err:  # the message lists the toy world's concepts
        p.error(err.args[0])
    return args


def attacks(pipe, oracle, args) -> dict:
    """Paraphrase ASR and the prompt search, on whatever adapters are active."""
    kwargs = dict(batch_size=args.batch_size, **SAMPLING)
    vocabulary = toy_words() if args.attack_vocabulary == "toy" else tokenizer_words(pipe.tokenizer)
    starts = concept_prompts(args.target_concept, args.attack_prompts, args.seed + 3)
    report = prompt_search_attack(pipe, oracle, args.target_concept, starts, budget=args.attack_budget,
                                  vocabulary=vocabulary, num_adv_words=args.attack_words, seed=args.seed, **kwargs)
    para = paraphrase_asr(pipe, oracle, args.target_concept, args.paraphrase_prompts, seed=args.seed, **kwargs)
    return {"paraphrase_asr": para["asr"], "paraphrase_per_phrase": para["per_phrase"],
            "attack_asr": report.asr, "attack_pre_asr": report.pre_asr, "attack_verified_asr": report.verified_asr,
            "attack_best_prompts": [r.best_prompt for r in report.results if r.success],
            "attack_queries": report.num_queries}


def side_effects(pipe, oracle, args) -> dict:
    """Oracle-feature FID on the other concepts' prompts: erased vs base, and base vs base with other seeds."""
    others = [c for c in concept_names() if c != args.target_concept]
    prompts = [p for p, _ in evaluation_prompts(others, args.fid_prompts_per_concept, args.seed + 4)]
    kwargs = dict(batch_size=args.batch_size, **SAMPLING)
    erased = generate_images(pipe, prompts, 1, args.seed, **kwargs)
    with adapters_disabled(pipe.transformer):
        base = generate_images(pipe, prompts, 1, args.seed, **kwargs)
        base_other_seeds = generate_images(pipe, prompts, 1, args.seed + 1, **kwargs)
    return {"fid_erased_vs_base": oracle_fid(oracle, erased, base),
            "fid_noise_floor": oracle_fid(oracle, base_other_seeds, base), "fid_images": len(prompts)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(args.lora, adapter_name="erasure")
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH).to(args.device)

    report: dict = {"target_concept": args.target_concept, "erased": attacks(pipe, oracle, args)}
    with adapters_disabled(pipe.transformer):
        report["base"] = attacks(pipe, oracle, args)
    report["side_effects"] = side_effects(pipe, oracle, args)
    scale_prompts = concept_prompts(args.target_concept, args.scale_prompts, args.seed + 5)
    report["scale_commitment"] = scale_commitment(pipe, oracle, args.target_concept, scale_prompts, seed=args.seed,
                                                  batch_size=args.batch_size, **SAMPLING).to_dict()
    report["settings"] = vars(args) | {"sampling": SAMPLING, "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_bytes(args.output_json, json.dumps(report, indent=2, default=str).encode())
    summary = {k: report["erased"][k] for k in ("paraphrase_asr", "attack_asr", "attack_verified_asr")}
    print(json.dumps({"erased": summary, "base": {k: report["base"][k] for k in summary},
                      **report["side_effects"], "rates": report["scale_commitment"]["rates"]}, indent=2))
    return report


if __name__ == "__main__":
    main()
