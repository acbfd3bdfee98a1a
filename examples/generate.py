"""Generate images with a VAR pipeline (default: the embedded toy model), optionally with LoRA adapters.

    python examples/generate.py --prompt "a red striped circle" --prompt "a blue star" \
        --num_images_per_prompt 4 --seed 0 --output_dir outputs/generate

Writes one PNG per image (``{prompt index}_{image index}.png``) and ``grid.png`` (a row per prompt).
"""

from __future__ import annotations

import argparse
import os
import re

import torch
from diffusers.utils import make_image_grid

from var_erase import DEFAULT_MODEL
from var_erase.pipelines.pipeline_var import VARPipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--lora", action="append", default=[], help="adapter folder, file or Hub repo id (repeatable)")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--top_p", type=float, default=0.97)
    p.add_argument("--output_dir", default="outputs/generate")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load_pipeline(path: str, loras: list[str], lora_scale: float, device: str) -> VARPipeline:
    pipe = VARPipeline.from_pretrained(path).to(device)
    names = [f"adapter_{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        pipe.load_lora_weights(lora, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=[lora_scale] * len(names))
    return pipe


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def main(argv=None) -> None:
    args = parse_args(argv)
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.lora, args.lora_scale, args.device)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                  num_images_per_prompt=args.num_images_per_prompt, guidance_scale=args.guidance_scale,
                  temperature=args.temperature, top_p=args.top_p, generator=generator).images
    os.makedirs(args.output_dir, exist_ok=True)
    n = args.num_images_per_prompt
    for i, image in enumerate(images):
        image.save(os.path.join(args.output_dir, f"{i // n:02d}_{slug(args.prompt[i // n])}_{i % n}.png"))
    grid = make_image_grid(images, rows=len(args.prompt), cols=n)
    grid.save(os.path.join(args.output_dir, "grid.png"))
    print(f"wrote {len(images)} images and grid.png to {args.output_dir}")


if __name__ == "__main__":
    main()
