#!/usr/bin/env python
"""Convert the official Infinity release (FoundationVision/Infinity) into a ``VARPipeline`` folder.

Example (Infinity-2B; the files from the Hub repo FoundationVision/Infinity and google/flan-t5-xl)::

    python scripts/convert_infinity_to_diffusers.py \\
        --transformer_path weights/infinity_2b_reg.pth --vae_path weights/infinity_vae_d32reg.pth \\
        --model_type infinity-2b --text_encoder_path google/flan-t5-xl --output_dir infinity-2b-diffusers

    pipe = VARPipeline.from_pretrained("infinity-2b-diffusers", dtype=torch.bfloat16)

The conversion is strict (a wrong file or ``--model_type`` stops with the list of mismatching keys) and the output
folder appears only when everything was written. The logic lives in :mod:`var_erase.conversion.infinity`.
"""

from __future__ import annotations

import argparse

from var_erase.conversion.infinity import (
    INFINITY_TRANSFORMER_CONFIGS,
    build_infinity_pipeline,
    parse_dtype,
    save_pretrained_atomic,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transformer_path", required=True,
                        help="official transformer weights: infinity_2b_reg.pth (or the 8B shard folder)")
    parser.add_argument("--vae_path", required=True, help="official VAE weights: infinity_vae_d32reg.pth")
    parser.add_argument("--model_type", default="infinity-2b", choices=sorted(INFINITY_TRANSFORMER_CONFIGS))
    parser.add_argument("--text_encoder_path", default="google/flan-t5-xl",
                        help="local Flan-T5-XL folder or Hub id (its tokenizer is read from the same place)")
    parser.add_argument("--tokenizer_path", default=None, help="tokenizer location if not with the text encoder")
    parser.add_argument("--output_dir", required=True, help="where to write the pipeline (must not exist)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the transformer blocks, VAE and text encoder; text modules, AdaLN and head of "
                             "the transformer stay float32 as in the reference")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"converting {args.model_type}: {args.transformer_path} + {args.vae_path} + {args.text_encoder_path}")
    pipe = build_infinity_pipeline(
        transformer_path=args.transformer_path,
        vae_path=args.vae_path,
        text_encoder_path=args.text_encoder_path,
        model_type=args.model_type,
        dtype=parse_dtype(args.dtype),
        tokenizer_path=args.tokenizer_path,
    )
    out = save_pretrained_atomic(pipe, args.output_dir, overwrite=args.overwrite)
    print(f"saved VARPipeline to {out}")


if __name__ == "__main__":
    main()
