"""Average several erasure adapters of one recipe (training seeds) into one adapter, with its model card.

    python examples/soup_adapters.py --lora outputs/erase-s0 --lora outputs/erase-s1 --lora outputs/erase-s2 \
        --lora outputs/erase-s3 --scale 1.5 --output_dir outputs/erase-soup
    python examples/toy/evaluate_many.py --target_concept triangle --lora outputs/erase-soup --seed 1   # validation

The soup is one LoRA of rank sum(r_i) whose weight change is ``scale * mean_i(dW_i)``
(:mod:`var_erase.erasure.soup`, an extension beyond the paper). Choose ``--scale`` on validation prompts and report
the held-out ones once. Writes ``pytorch_lora_weights.safetensors`` and ``README.md`` to ``--output_dir``;
``--push_to_hub`` uploads both.
"""

from __future__ import annotations

import argparse

from var_erase.erasure.soup import save_adapter_soup
from var_erase.hub import push_adapter_to_hub, read_adapter_metadata, render_model_card, save_model_card


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lora", action="append", required=True,
                   help="an adapter folder, file or Hub repo id (repeat: two or more, runs of one erasure)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one weight per --lora (default: equal, 1/K each)")
    p.add_argument("--scale", type=float, default=1.0, help="strength of the averaged change (choose on validation)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    save_adapter_soup(args.lora, args.output_dir, weights=args.weights, scale=args.scale)
    metadata = read_adapter_metadata(args.output_dir)
    if metadata is not None:
        repo_id = args.hub_model_id or f"var-erased-{'-'.join(metadata.concepts)}-soup"
        save_model_card(render_model_card(metadata, repo_id), args.output_dir)
    if args.push_to_hub:
        if metadata is None:
            raise SystemExit("the adapters carry no var-erase metadata, so there is no model card to push; "
                             "average adapters written by train_svare.py")
        print(f"pushed to {push_adapter_to_hub(args.output_dir, repo_id, token=args.hub_token)}")
    print(f"wrote the soup of {len(args.lora)} adapters (scale {args.scale}) to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
