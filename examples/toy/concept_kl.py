"""How far an adapter moves each concept's guided output, as the preservation loss sees it: per-concept KL.

    python examples/toy/concept_kl.py --kind shape --lora outputs/erase-s0 --lora outputs/erase-s1

For ``--prompts_per_concept`` held-out prompts of every value of ``--kind`` (prompt seed ``--seed``), the frozen
model samples one trajectory each (guidance 4, temperature 1, as S-VARE's auxiliary visual tokens). Along it, teacher
forced, the adapter's guided logits are compared with the frozen model's by S-VARE's L_Pre
(:func:`var_erase.erasure.losses.preservation_kl`, the code's reduction). Prints one JSON line per adapter: the mean KL
per concept. A concept the adapter damages at sampling time but not in this KL is invisible to a preservation or
retain loss along such trajectories.
"""

from __future__ import annotations

import argparse
import json

import torch

from var_erase import DEFAULT_MODEL
from var_erase.erasure.anchors import sample_anchors
from var_erase.erasure.losses import preservation_kl
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.pipelines.sampling import guide_logits
from var_erase.toy.captions import evaluation_prompts
from var_erase.toy.concepts import CONCEPT_KINDS, concept_names


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--lora", action="append", required=True, help="adapter folder (repeatable; each measured alone)")
    p.add_argument("--kind", default="shape", help="concept kind of the toy world: shape, colour or style")
    p.add_argument("--prompts_per_concept", type=int, default=8)
    p.add_argument("--seed", type=int, default=11, help="prompt seed (held-out templates)")
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    if args.kind not in CONCEPT_KINDS:
        raise SystemExit(f"--kind must be one of {', '.join(CONCEPT_KINDS)}, not {args.kind!r}")
    concepts = list(concept_names(args.kind))
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt for c in concepts
               for prompt, _ in evaluation_prompts([c], args.prompts_per_concept, args.seed,
                                                   split="heldout_template")[: args.prompts_per_concept]]
    anchors = sample_anchors(pipe, prompts, guidance_scale=args.guidance_scale, progress=True)
    states_BTC, mask_BT = pipe.encode_prompt(prompts)
    results = []
    for adapter in args.lora:
        pipe.load_lora_weights(adapter, adapter_name="measured")
        kl_N = _guided_kl(pipe, anchors, states_BTC, mask_BT, args.guidance_scale)
        pipe.delete_adapters("measured")
        n = args.prompts_per_concept
        per = {c: float(kl_N[k * n: (k + 1) * n].mean()) for k, c in enumerate(concepts)}
        out = {"model": adapter, "kind": args.kind, "kl_per_concept": per, "prompts_per_concept": n}
        print(json.dumps(out), flush=True)
        results.append(out)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return results


@torch.no_grad()
def _guided_kl(pipe, anchors, states_BTC, mask_BT, guidance_scale: float, batch_size: int = 16) -> torch.Tensor:
    """(N,) L_Pre of each trajectory: KL(frozen guided || adapter guided), teacher forced."""
    tf = pipe.transformer.eval()
    uncond_BTC = tf.unconditional_states(states_BTC.shape[0], states_BTC.shape[1]).to(states_BTC)
    out = []
    for i in range(0, states_BTC.shape[0], batch_size):
        inputs = anchors.inputs[i: i + batch_size]
        cond = tf(inputs, states_BTC[i: i + batch_size], mask_BT[i: i + batch_size], schedule=anchors.schedule)
        uncond = tf(inputs, uncond_BTC[i: i + batch_size], mask_BT[i: i + batch_size], schedule=anchors.schedule)
        guided_BL2d = guide_logits(cond.sample.float(), uncond.sample.float(), guidance_scale)
        teacher_BL2d = anchors.logits[i: i + batch_size].float()
        out += [preservation_kl(guided_BL2d[b: b + 1], teacher_BL2d[b: b + 1]) for b in range(inputs.shape[0])]
    return torch.stack(out)


if __name__ == "__main__":
    main()
