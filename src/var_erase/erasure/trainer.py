"""The erasure loop: one trainer for every method of :class:`~var_erase.erasure.config.ErasureConfig`.

S-VARE as the reference runs it (research/paper.md §1.5, §1.8): per iteration a batch of prompt pairs ``(c*, c)``,
each with its auxiliary visual tokens ``r^ori`` (sampled from the frozen model for ``c``);

1. erase step: logits of the model under ``c*`` teacher-forced along ``r^ori``; filtered cross-entropy against the
   anchor's bits; backward, clip, optimizer step;
2. preserve step: logits under ``c`` along the same ``r^ori``; ``0.5 * KL(guided teacher || student)``; backward,
   clip, optimizer step.

``update="joint"`` sums the two losses into one step instead. Optionally (``retain_prompts``, an extension beyond the
paper, which preserves only the pairs' own neutral prompts) the preserve step also distils the frozen model on a batch
of retain prompts, each along its own anchor trajectory (see ``ErasureConfig.retain_weight``). Both forwards run in
training mode with 10% condition dropout, as the reference's. Baselines use the same frame: ``vare`` (paper Eq. 7:
probability MSE against the frozen model's conditional prediction under ``c`` on ``r^ori``), ``naive`` (Eq. 6: each
branch on its own history; the student's history is a fresh rollout under ``c*``), ``esd`` / ``esd-u`` / ``esd-x``
(negative guidance on per-scale logits, on ``r^ori``; :mod:`.esd`), ``fmn`` (cross-attention mass on the concept's
tokens along ``r^ori``; :mod:`.fmn`), ``ac-n`` / ``ac-m`` (ablating concepts; :mod:`.ablating_concepts`). ``uce`` is a
closed-form edit without this loop (:func:`var_erase.erasure.uce.edit`).

The trained parameters are a PEFT LoRA adapter added from ``config.lora_config`` (a ``peft.LoraConfig``; cross-attention
+ FFN by default) kept in float32, or, with ``train_modules``, the named modules fully fine-tuned (the reference's
``ca`` + ``ffn``).
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, DistributedType
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params
from peft.helpers import disable_input_dtype_casting
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from ..loaders.lora import adapters_disabled
from ..pipelines.sampling import guide_logits
from ..utils import to_device_async
from . import ablating_concepts, esd, fmn
from . import losses as L
from .anchors import AnchorSet
from .config import ErasureConfig
from .prompts import PromptPair
from .rank_padding import paddable_lora_layers, padded_lora_ranks


@dataclass
class TrainState:
    step: int = 0
    history: list[dict] = field(default_factory=list)


class ErasureTrainer:
    """Erase concepts from ``pipe.transformer`` with the method of ``config``.

    Args:
        pipe: a ``VARPipeline`` (its text encoder and tokenizer encode the prompts once; its transformer is trained).
        config: the method and its hyper-parameters.
        pairs: unsafe -> safe prompt pairs.
        anchors: auxiliary visual tokens of the safe prompts (:func:`~var_erase.erasure.anchors.sample_anchors`).
        accelerator: an ``accelerate.Accelerator`` (mixed precision, devices, distributed); a default one if None.
        seed: seeds the batch order, the anchor choice and the condition dropout (resumable, and the same for any
            split of the global batch over processes and accumulation steps: they depend only on ``(seed, step)``
            and the global sample index).
        gradient_accumulation_steps: micro-batches per optimizer step.
        gradient_checkpointing: False, True / ``"full"`` (recompute whole blocks in the backward, the reference's) or
            ``"selective"`` (recompute them except the attention kernels; see :func:`checkpoint_function`).
        retain_prompts: optional prompts to preserve besides the pairs' safe prompts (not in the paper: an explicit
            extension); ``anchors`` must hold their trajectories too. Only for methods with a preservation loss.
        compile_blocks: ``torch.compile`` each transformer block (regional compilation through diffusers'
            ``compile_repeated_blocks``: one graph shared by all blocks, so it compiles in seconds to minutes where a
            whole-model compile takes far longer). Worth it on a GPU; the first steps pay the compilation.
        activation_memory_budget: with ``compile_blocks`` and no ``gradient_checkpointing``: the share (0-1] of a
            compiled block's activations kept for the backward (``torch._functorch.config.activation_memory_budget``,
            set during the training steps); the compiler's partitioner recomputes the rest, choosing the cheapest
            recomputation, where ``gradient_checkpointing`` recomputes whole blocks. At Infinity-2B, batch 2, LoRA
            rank 4, on an H200: 0.05 gives 1.51 s per iteration at 18.2 GiB (with ``pad_lora_rank``; 1.58 s
            without), against 1.79 s at 17.9 GiB with selective checkpointing (an earlier round); more memory buys
            speed: 0.4 gave 1.46 s at 37 GiB and 0.7 1.40 s at 54 GiB, both without the rank padding
            (docs/performance.md).
        pad_lora_rank: compute the LoRA products as if the rank were rounded up to a multiple of 8, with zeros
            (:func:`~var_erase.erasure.rank_padding.padded_lora_ranks`): the same adapter, its parameters and what is
            saved unchanged, on faster kernels. None (default): on when training on a CUDA device. Only inside
            :meth:`training_step` (:meth:`lora_ranks_padded`): outside it, after training and after an exception, the
            LoRA layers are PEFT's own modules computing at the adapter's rank.
    """

    def __init__(self, pipe, config: ErasureConfig, pairs: list[PromptPair], anchors: AnchorSet,
                 accelerator: Accelerator | None = None, seed: int = 0, gradient_accumulation_steps: int = 1,
                 gradient_checkpointing: bool | str = False, retain_prompts: list[str] | None = None,
                 compile_blocks: bool = False, activation_memory_budget: float | None = None,
                 pad_lora_rank: bool | None = None) -> None:
        config.validate()
        if not config.losses:
            raise ValueError(f"method {config.method!r} is a closed-form edit with no training loop: use "
                             "var_erase.erase(pipe, ..., config={'method': 'uce'}) (train_svare.py --method uce) or "
                             "var_erase.erasure.uce.edit(pipe, concepts, replacements, preserve)")
        check_activation_memory_budget(activation_memory_budget, compile_blocks, gradient_checkpointing)
        self.activation_memory_budget = activation_memory_budget
        self.retain_prompts = list(dict.fromkeys(retain_prompts or []))
        if self.retain_prompts and "preservation_kl" not in config.losses:
            raise ValueError(f"retain_prompts need a method with a preservation loss (svare), not {config.method!r}")
        missing = sorted(({p.safe for p in pairs} | set(self.retain_prompts)) - set(anchors.prompts))
        if missing:
            raise ValueError(f"no auxiliary visual tokens for {len(missing)} safe or retain prompts, e.g. "
                             f"{missing[:2]}; sample anchors for every pair's safe prompt and every retain prompt")
        self.pipe, self.config, self.pairs, self.anchors, self.seed = pipe, config, pairs, anchors, seed
        self.accelerator = accelerator or Accelerator()
        _check_launch(self.accelerator)
        self.accumulation = gradient_accumulation_steps
        self.state = TrainState()
        self.schedule = anchors.schedule
        if config.num_train_scales is not None:
            self.schedule = anchors.schedule.truncated(min(config.num_train_scales, anchors.schedule.num_scales))
        self.erase_token_weight = None  # extension: erase only scales >= first_erase_scale (weights 1/L, else 0)
        if config.first_erase_scale > 1:
            sizes = [h * w for h, w in self.schedule.grids]
            skipped = sum(sizes[: config.first_erase_scale - 1])
            weight = torch.full((sum(sizes),), 1.0 / sum(sizes))
            weight[:skipped] = 0.0
            self.erase_token_weight = weight
        self.text = self._encode_prompts()
        self.concept_tokens = {p.unsafe: fmn.concept_token_positions(pipe.tokenizer, p.unsafe, p.concept, p.safe,
                                                                     pipe.transformer.config.max_text_len)
                               for p in pairs} if config.method == "fmn" else {}
        self.pad_lora_rank = self.accelerator.device.type == "cuda" if pad_lora_rank is None else pad_lora_rank
        self.transformer = self._prepare_trainable(pipe.transformer, gradient_checkpointing)
        self._padded_layers = paddable_lora_layers(self.transformer) if self.pad_lora_rank else []
        if compile_blocks:
            self.transformer.compile_repeated_blocks()
        self.optimizer = self._optimizer()
        self.lr_scheduler = self._lr_scheduler()
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.transformer, self.optimizer,
                                                                                 self.lr_scheduler)
        self.ema = EMAModel(self.trainable_parameters(), decay=config.ema_decay) if config.ema_decay else None
        self._register_checkpoint_hooks()

    # ----------------------------------------------------------------------------------------------------------------
    # set-up
    @torch.no_grad()
    def _encode_prompts(self) -> dict[str, tuple[torch.Tensor, int]]:
        """Text features of every prompt, computed once: ``{prompt: (states_TC on the device, T)}`` (T5 pads on the
        right, so the first T tokens are the prompt's)."""
        prompts = sorted({p for pair in self.pairs for p in (pair.unsafe, pair.safe)} | set(self.retain_prompts))
        device = self.accelerator.device
        self.pipe.text_encoder.to(device)
        out = {}
        for start in range(0, len(prompts), 64):
            chunk = prompts[start: start + 64]
            states, mask = self.pipe.encode_prompt(chunk, device)
            for i, prompt in enumerate(chunk):
                length = int(mask[i].sum())
                out[prompt] = (states[i, :length].float(), length)
        return out

    def _prepare_trainable(self, transformer, gradient_checkpointing: bool | str):
        cfg = self.config
        transformer.requires_grad_(False)
        if cfg.finetune_mode == "lora":
            transformer.add_adapter(copy.deepcopy(cfg.lora_config))  # PEFT keeps and edits the config it is given
            cast_training_params(transformer, dtype=torch.float32)
        else:
            for name, module in transformer.named_modules():
                if any(name.endswith(f".{m}") for m in cfg.train_modules):
                    module.requires_grad_(True)
            for p in transformer.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 master weights (bf16 would round small Adam updates away)
        if not any(p.requires_grad for p in transformer.parameters()):
            raise ValueError(f"nothing to train: no module matches {cfg.lora_target_modules or cfg.train_modules}")
        if self._fsdp:
            # FSDP flattens each wrapped block into one tensor of one dtype: keep everything float32 (sharded master
            # weights); FSDP's own mixed precision (accelerate's --mixed_precision) computes in half precision
            transformer.float()
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing(checkpoint_function(gradient_checkpointing))
        transformer.to(self.accelerator.device).train()
        return transformer

    @property
    def _fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def _optimizer(self) -> torch.optim.Optimizer:
        """AdamW as the reference: weight decay on matrices only. On CUDA (without FSDP) the fused kernel: the same
        update in one launch per step instead of many per tensor (a LoRA of 2B has hundreds of small tensors)."""
        cfg = self.config
        params = self.trainable_parameters()
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.adam_weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = bool(params) and all(p.is_cuda for p in params) and not self._fsdp
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.effective_learning_rate,
                                 betas=(cfg.adam_beta1, cfg.adam_beta2), fused=fused or None)

    def _lr_scheduler(self):
        """diffusers' schedule by name, counted in optimizer steps: one per iteration per loss of the alternating
        update, times the processes (accelerate steps a prepared scheduler once per process, as diffusers' scripts
        count)."""
        cfg = self.config
        two_steps = "preservation_kl" in cfg.losses and cfg.update == "alternating"
        per_iteration = (2 if two_steps else 1) * self.accelerator.num_processes
        return get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps * per_iteration,
                             num_training_steps=cfg.max_train_steps * per_iteration)

    # ----------------------------------------------------------------------------------------------------------------
    # batches
    def batch_indices(self, step: int) -> tuple[list[int], list[int]]:
        """Pair indices and anchor rows of iteration ``step``: epochs of shuffled pairs (drop_last), as the
        reference's DataLoader; a function of ``(seed, step)`` only, so a resumed run sees the same batches."""
        pair_ids = _shuffled_batch(len(self.pairs), self.config.train_batch_size, step, self.seed * 1_000_003)
        return pair_ids, self._anchor_rows([self.pairs[i].safe for i in pair_ids], self.seed * 7_919 + step)

    def retain_batch(self, step: int) -> tuple[list[str], list[int]]:
        """Retain prompts and anchor rows of iteration ``step`` (empty without retain prompts): epochs of shuffled
        retain prompts, a function of ``(seed, step)`` only, like :meth:`batch_indices`."""
        if not self.retain_prompts:
            return [], []
        ids = _shuffled_batch(len(self.retain_prompts), self.config.effective_retain_batch_size, step,
                              self.seed * 1_000_033 + 17)
        prompts = [self.retain_prompts[i] for i in ids]
        return prompts, self._anchor_rows(prompts, self.seed * 7_927 + step + 29)

    def _anchor_rows(self, prompts: list[str], seed: int) -> list[int]:
        """One of each prompt's anchor rows, drawn with ``seed``."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for prompt in prompts:
            candidates = self.anchors.rows_for(prompt)
            rows.append(candidates[int(torch.randint(len(candidates), (1,), generator=g))])
        return rows

    def _text_batch(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the cached features of ``prompts`` to one (B, T, C) batch on the device with its (B, T) mask, built
        on the host (the transformer checks a host mask without waiting for the GPU, then copies it)."""
        feats = [self.text[p] for p in prompts]
        length = max(f[0].shape[0] for f in feats)
        states = torch.zeros(len(feats), length, feats[0][0].shape[-1], device=self.accelerator.device)
        mask = torch.zeros(len(feats), length, dtype=torch.bool)
        for i, (s, n) in enumerate(feats):
            states[i, :n], mask[i, :n] = s, True
        return states, mask

    def _text_and_uncond(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts' (B, T, C) features, the learned unconditional embedding in the same shape (as the sampler's
        guidance branch uses it, with the prompts' mask) and the (B, T) mask."""
        states_BTC, mask_BT = self._text_batch(prompts)
        uncond_BTC = self.transformer.unconditional_states(len(prompts), states_BTC.shape[1]).to(states_BTC)
        return states_BTC, uncond_BTC, mask_BT

    def _anchor_batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The anchor rows on the device (copies that do not make the host wait for the GPU)."""
        device, n = self.accelerator.device, self.schedule.total_tokens
        return {"bits": to_device_async(self.anchors.bits[rows, :n], device).long(),
                "inputs": to_device_async(self.anchors.inputs[rows, : n - 1], device),
                "logits": to_device_async(self.anchors.logits[rows, :n], device),
                "cond_logits": to_device_async(self.anchors.cond_logits[rows, :n], device)}

    # ----------------------------------------------------------------------------------------------------------------
    # losses
    def _logits(self, inputs: torch.Tensor, prompts: list[str] | None, states=None, mask=None,
                sample_ids: list[int] | None = None, salt: int = 0) -> torch.Tensor:
        if prompts is not None:
            states, mask = self._text_batch(prompts)
        drop = None if sample_ids is None else self.cond_drop_mask(sample_ids, salt)
        return self.model(inputs, states, mask, schedule=self.schedule, cond_drop_prob=self.config.cond_drop_rate,
                          cond_drop_mask=drop).sample.float()

    def cond_drop_mask(self, sample_ids: list[int], salt: int = 0) -> torch.Tensor:
        """(B,) bool: which samples see the unconditional text instead of theirs (probability ``cond_drop_rate``,
        as the reference's training forward). Each flag is a function of ``(seed, global sample index, salt)``
        only, so the draws do not depend on how the global batch is split over processes and accumulation steps:
        with the device's random stream, every DDP process (seeded alike) would drop the same positions."""
        rate = self.config.cond_drop_rate
        flags = [bool(torch.rand((), generator=torch.Generator().manual_seed(
            (self.seed * 1_000_003 + 4 * i + salt) % 2**63)) < rate) for i in sample_ids]
        return to_device_async(torch.tensor(flags, dtype=torch.bool), self.accelerator.device)

    def _guided_logits(self, inputs: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The student's guided logits along ``inputs``, as the sampler mixes them (``g * cond + (1 - g) * uncond``
        at the anchors' guidance, divided by their temperature, as stored with the anchors): one forward of the
        batch ``[prompts; unconditional]`` without condition dropout (the unconditional half is the dropped text)."""
        cfg = self.config
        states_BTC, uncond_BTC, mask_BT = self._text_and_uncond(prompts)
        logits_2BLV = self.model(torch.cat([inputs, inputs]), torch.cat([states_BTC, uncond_BTC]),
                                 torch.cat([mask_BT, mask_BT]), schedule=self.schedule, cond_drop_prob=0.0
                                 ).sample.float()
        return guide_logits(*logits_2BLV.chunk(2), cfg.anchor_guidance_scale) / cfg.anchor_temperature

    @torch.no_grad()
    def _frozen_logits(self, inputs, states, mask) -> torch.Tensor:
        with adapters_disabled(self.transformer):
            return self.transformer(inputs, states, mask, schedule=self.schedule, cond_drop_prob=0.0).sample.float()

    def erase_loss(self, pairs: list[PromptPair], anchor: dict, sample_ids: list[int] | None = None
                   ) -> tuple[torch.Tensor, dict]:
        """The method's erasure term (the only term, except for S-VARE's preservation step) and what it logs, as
        detached scalar tensors (reading one waits for the GPU, so the caller reads them late). ``sample_ids``: the
        pairs' global sample indices, which fix their condition dropout (:meth:`cond_drop_mask`); None draws it from
        the device's random stream."""
        cfg, unsafe = self.config, [p.unsafe for p in pairs]
        ids = {"sample_ids": sample_ids, "salt": 1}
        if cfg.method in ("svare", "fce"):
            out = L.filtered_cross_entropy(self._logits(anchor["inputs"], unsafe, **ids), anchor["bits"],
                                           cfg.bit_threshold, cfg.token_threshold, cfg.comparison, cfg.normalize,
                                           token_weight_L=self.erase_token_weight)
            return out.loss, {"kept": out.kept_ratio, "bit_err": out.bit_error_rate}
        if cfg.method == "vare":
            return L.vare_basic_loss(self._logits(anchor["inputs"], unsafe, **ids), anchor["cond_logits"]), {}
        if cfg.method == "naive":
            own = self._rollout_inputs(unsafe)
            return L.naive_loss(self._logits(own, unsafe, **ids), anchor["cond_logits"]), {}
        if cfg.method in ("esd", "esd-u", "esd-x"):
            states, uncond, mask = self._text_and_uncond(unsafe)
            return esd.negative_guidance_loss(self._logits(anchor["inputs"], None, states, mask, **ids),
                                              self._frozen_logits(anchor["inputs"], states, mask),
                                              self._frozen_logits(anchor["inputs"], uncond, mask),
                                              cfg.negative_guidance), {}
        if cfg.method == "fmn":  # the text is never dropped: a dropped text has no concept tokens to re-steer
            states, mask = self._text_batch(unsafe)
            concept_BT = to_device_async(fmn.concept_token_mask([self.concept_tokens[p] for p in unsafe],
                                                                states.shape[1]), self.accelerator.device)
            with fmn.record_cross_attention(self.transformer, concept_BT) as attention:
                self.model(anchor["inputs"], states, mask, schedule=self.schedule, cond_drop_prob=0.0)
            return fmn.attention_resteering_loss(attention), {"concept_attn": attention.concept_mass}
        if cfg.method == "ac-n":
            return ablating_concepts.noise_based_loss(self._logits(anchor["inputs"], unsafe, **ids), anchor["bits"]), {}
        if cfg.method == "ac-m":
            return ablating_concepts.model_based_loss(self._logits(anchor["inputs"], unsafe, **ids),
                                                      anchor["cond_logits"]), {}
        raise ValueError(f"unknown method {cfg.method!r}")

    def preserve_loss(self, pairs: list[PromptPair], anchor: dict, retain: tuple[list[str], dict] | None = None,
                      sample_ids: list[int] | None = None, retain_ids: list[int] | None = None) -> torch.Tensor:
        """S-VARE's L_Pre, weighted: ``w * KL(guided teacher || student under c)`` along ``r^ori`` (the conditional
        teacher with ``preservation_teacher="conditional"``, the student's guided logits with
        ``preservation_student="guided"``); plus, with a retain batch ``(prompts, anchor batch)``,
        ``retain_weight * KL`` on the retain prompts (an extension; teacher ``retain_teacher``, student
        ``retain_student``)."""
        cfg = self.config
        code = cfg.kl_reduction == "code"
        teacher = {"guided": "logits", "conditional": "cond_logits"}
        safe = [p.safe for p in pairs]
        if cfg.preservation_student == "guided":
            student = self._guided_logits(anchor["inputs"], safe)
        else:
            student = self._logits(anchor["inputs"], safe, sample_ids=sample_ids, salt=2)
        loss = cfg.preservation_weight * L.preservation_kl(student, anchor[teacher[cfg.preservation_teacher]],
                                                           reduction_code=code)
        if cfg.uncond_preservation_weight > 0:  # extension: keep the unconditional branch (see ErasureConfig)
            _, uncond, mask = self._text_and_uncond(safe)
            teacher_u = self._frozen_logits(anchor["inputs"], uncond, mask)
            student_u = self.model(anchor["inputs"], uncond, mask, schedule=self.schedule,
                                   cond_drop_prob=0.0).sample.float()
            loss = loss + cfg.uncond_preservation_weight * L.preservation_kl(student_u, teacher_u,
                                                                              reduction_code=code)
        if retain is not None and retain[0]:
            prompts, retain_anchor = retain
            if cfg.retain_student == "guided":  # extension: the retain prompts' guided output (see ErasureConfig)
                student = self._guided_logits(retain_anchor["inputs"], prompts)
            else:
                student = self._logits(retain_anchor["inputs"], prompts, sample_ids=retain_ids, salt=3)
            kl = L.preservation_kl(student, retain_anchor[teacher[cfg.retain_teacher]], reduction_code=code)
            loss = loss + self.config.effective_retain_weight * kl
        return loss

    @torch.no_grad()
    def _rollout_inputs(self, prompts: list[str]) -> torch.Tensor:
        """Eq. 6's student history: a trajectory sampled by the current model under the unsafe prompts."""
        cfg, pipe = self.config, self.pipe
        was_training = self.transformer.training
        self.transformer.eval()
        generators = [torch.Generator().manual_seed(self.seed * 31 + self.state.step * 97 + i) for i in
                      range(len(prompts))]
        traj = pipe(prompts, height=self.anchors.schedule.height, width=self.anchors.schedule.width,
                    guidance_scale=cfg.anchor_guidance_scale, temperature=cfg.anchor_temperature,
                    top_k=cfg.anchor_top_k, top_p=cfg.anchor_top_p, generator=generators, output_type="latent",
                    return_trajectory=True).trajectory
        self.transformer.train(was_training)
        return traj.inputs[:, : self.schedule.total_tokens - 1].to(self.accelerator.device)

    # ----------------------------------------------------------------------------------------------------------------
    # optimisation
    def _update(self, loss_fn) -> torch.Tensor:
        """Accumulate ``loss_fn(micro)`` over the micro-batches, clip, step. Returns the mean loss (detached, on the
        device: nothing here waits for the GPU)."""
        total = 0.0
        for micro in range(self.accumulation):
            sync = micro == self.accumulation - 1
            ctx = self.accelerator.no_sync(self.model) if not sync else nullcontext()
            with ctx:
                loss = loss_fn(micro) / self.accumulation
                self.accelerator.backward(loss)
            total = total + loss.detach()
        # under FSDP accelerate clips through the wrapped model only when given all its parameters (global norm);
        # frozen ones have no gradient and do not count
        params = self.model.parameters() if self._fsdp else self.trainable_parameters()
        self.accelerator.clip_grad_norm_(params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())
        return total

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside, the trainable weights are their moving average (``config.ema_decay``); the trained weights come
        back on exit. Without an average, nothing changes."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def training_step(self, step: int, read_logs: bool = True) -> dict:
        """One iteration (both steps of the alternating update, or one joint step) and its logs.

        The iteration itself never waits for the GPU. With ``read_logs`` (default) the logs are floats, read once
        the iteration's work is done; ``read_logs=False`` returns them as detached scalar device tensors, so the
        host can queue the next iteration first (``float()`` them later, as :meth:`train` does one step late)."""
        micro_batches, retain_batches, ids = [], [], []
        processes, rank = self.accelerator.num_processes, self.accelerator.process_index
        b, rb = self.config.train_batch_size, self.config.effective_retain_batch_size
        for micro in range(self.accumulation):  # each process takes its own batches: global batch = B x P x accum
            index = (step * self.accumulation + micro) * processes + rank
            pair_ids, rows = self.batch_indices(index)
            micro_batches.append(([self.pairs[i] for i in pair_ids], self._anchor_batch(rows)))
            retain_prompts, retain_rows = self.retain_batch(index)
            retain_batches.append((retain_prompts, self._anchor_batch(retain_rows)) if retain_prompts else None)
            ids.append((list(range(index * b, index * b + b)), list(range(index * rb, index * rb + rb))))
        logs: dict = {"lr": self.lr_scheduler.get_last_lr()[0]}  # the rate of this iteration's first step

        def erase(micro):
            loss, extra = self.erase_loss(*micro_batches[micro], sample_ids=ids[micro][0])
            logs.update(extra)
            return loss

        def preserve(micro):
            return self.preserve_loss(*micro_batches[micro], retain_batches[micro], sample_ids=ids[micro][0],
                                      retain_ids=ids[micro][1])

        uses_pre = "preservation_kl" in self.config.losses
        # under autocast the LoRA matmuls run in half precision anyway: PEFT's cast of every adapted layer's input to
        # the float32 adapter dtype would only add a full-size copy per layer (forward and backward)
        autocast = self.accelerator.mixed_precision in ("bf16", "fp16") and self.config.finetune_mode == "lora"
        with disable_input_dtype_casting(self.transformer, active=autocast), self._memory_budget(), \
                self.lora_ranks_padded():
            if uses_pre and self.config.update == "joint":
                logs["loss"] = self._update(lambda m: erase(m) + preserve(m))
            else:
                logs["loss"] = self._update(erase)
                if uses_pre:
                    logs["pre"] = self._update(preserve)
        return read(logs) if read_logs else logs

    def lora_ranks_padded(self):
        """A context in which the LoRA products compute at the padded rank when ``pad_lora_rank`` is on (else
        nothing changes); :meth:`training_step` runs inside one, and every module gets its class back on exit."""
        return padded_lora_ranks(self._padded_layers)

    def _memory_budget(self):
        """The compiler's activation memory budget while (re)compiling the blocks for the backward, or nothing."""
        if self.activation_memory_budget is None:
            return nullcontext()
        import torch._functorch.config

        return torch._functorch.config.patch(activation_memory_budget=self.activation_memory_budget)

    def train(self, max_train_steps: int | None = None, checkpointing_steps: int | None = None,
              output_dir: str | None = None, progress: bool = True,
              checkpoints_total_limit: int | None = None) -> TrainState:
        """Run to ``max_train_steps`` (default ``config.max_train_steps``) from the current state, with the models
        that training does not run in CPU memory meanwhile (:meth:`unused_models_offloaded`).

        Every ``checkpointing_steps`` iterations a checkpoint is written to ``output_dir/checkpoint-<step>``; with
        ``checkpoints_total_limit`` N, the oldest are removed first so that at most N remain (diffusers' rule)."""
        if checkpoints_total_limit is not None and (isinstance(checkpoints_total_limit, bool) or not isinstance(
                checkpoints_total_limit, int) or checkpoints_total_limit < 1):
            raise ValueError(f"checkpoints_total_limit must be None (keep every checkpoint) or an integer >= 1, got "
                             f"{checkpoints_total_limit!r}")
        total = max_train_steps or self.config.max_train_steps
        with self.unused_models_offloaded():
            self._train(total, checkpointing_steps, output_dir, progress, checkpoints_total_limit)
        return self.state

    def _train(self, total: int, checkpointing_steps: int | None, output_dir: str | None, progress: bool,
               checkpoints_total_limit: int | None = None) -> None:
        bar = tqdm(total=total, initial=self.state.step, desc=f"erasing ({self.config.method})",
                   disable=not (progress and self.accelerator.is_main_process))
        pending: list[dict] = []  # the last iteration's logs, read after the next one is queued

        def record() -> None:
            while pending:
                logs = read(pending.pop(0))
                self.state.history.append(logs)
                bar.update()
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k != "step"})

        while self.state.step < total:
            logs = self.training_step(self.state.step, read_logs=False)
            self.state.step += 1
            record()
            pending.append({"step": self.state.step, **logs})
            if checkpointing_steps and output_dir and self.state.step % checkpointing_steps == 0:
                record()
                self.save_checkpoint(os.path.join(output_dir, f"checkpoint-{self.state.step}"),
                                     total_limit=checkpoints_total_limit)
        record()
        bar.close()

    @contextmanager
    def unused_models_offloaded(self) -> Iterator[None]:
        """While inside (all of :meth:`train`), the pipeline's models that training does not run wait in CPU memory:
        the VAE (anchors are tokens) and the text encoder (every prompt is encoded once at set-up; Flan-T5-XL, the
        text encoder of Infinity, is 2.4 GB in bf16), except for ``naive``, whose rollouts encode the unsafe prompts.
        They go back to their devices on exit. On a CPU run nothing moves."""
        names = ["vae"] + ([] if self.config.method == "naive" else ["text_encoder"])
        moved = []
        try:
            for name in names:
                model = getattr(self.pipe, name, None)
                weight = next(model.parameters(), None) if model is not None else None
                device = weight.device if weight is not None else None
                if device is not None and device.type != "cpu":
                    model.to("cpu")
                    moved.append((model, device))
            yield
        finally:
            for model, device in moved:
                model.to(device)

    # ----------------------------------------------------------------------------------------------------------------
    # checkpoints (accelerate state; the model part is only the trainable weights)
    def _register_checkpoint_hooks(self) -> None:
        trainer = self

        def save_hook(models, weights, output_dir):
            if trainer.accelerator.is_main_process:
                ema_step = trainer.ema.optimization_step if trainer.ema is not None else None
                torch.save({"step": trainer.state.step, "history": trainer.state.history, "ema_step": ema_step},
                           os.path.join(output_dir, "trainer_state.pt"))
                from safetensors.torch import save_file

                save_file(trainer.trainable_state_dict(), os.path.join(output_dir, "trainable.safetensors"))
                if trainer.ema is not None:
                    save_file({str(i): t.detach().contiguous() for i, t in enumerate(trainer.ema.shadow_params)},
                              os.path.join(output_dir, "ema.safetensors"))
            weights.clear()

        def load_hook(models, input_dir):
            from safetensors.torch import load_file

            models.clear()
            trainer.load_trainable_state_dict(load_file(os.path.join(input_dir, "trainable.safetensors")))
            state = torch.load(os.path.join(input_dir, "trainer_state.pt"), weights_only=True)
            trainer.state = TrainState(state["step"], state["history"])
            if trainer.ema is not None:
                trainer.load_ema(input_dir, state.get("ema_step"))

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def load_ema(self, input_dir: str, ema_step: int | None) -> None:
        """The moving average of a checkpoint written with ``ema_decay`` (a clear error for one written without)."""
        from safetensors.torch import load_file

        path = os.path.join(input_dir, "ema.safetensors")
        if not os.path.exists(path) or ema_step is None:
            raise ValueError(f"{input_dir} holds no weight average: it was written without ema_decay; resume it "
                             f"with ema_decay=None, or start a new run")
        shadow = load_file(path)
        self.ema.shadow_params = [shadow[str(i)].to(p.device) for i, p in enumerate(self.ema.shadow_params)]
        self.ema.optimization_step = ema_step

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        if self.config.finetune_mode == "lora":
            return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}
        return {n: p.detach().contiguous() for n, p in self.transformer.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.config.finetune_mode == "lora":
            set_peft_model_state_dict(self.transformer, state_dict)
        else:
            self.transformer.load_state_dict(state_dict, strict=False)

    def save_checkpoint(self, path: str, total_limit: int | None = None) -> None:
        """Write an accelerate checkpoint (optimizer, RNG states, trainable weights, step) to ``path``, atomically:
        into ``.<name>.tmp`` next to it first, renamed to ``path`` once complete (a run killed while saving leaves
        only the temporary folder, which :func:`latest_checkpoint` skips). With ``total_limit`` N, the oldest
        ``checkpoint-<step>`` folders beside ``path`` are removed first so that at most N remain after saving."""
        path = os.path.normpath(path)
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f".{name}.tmp")  # the same name on every process: each writes its own files
        if self.accelerator.is_main_process:
            if total_limit is not None:
                prune_checkpoints(parent, total_limit - 1)
            if os.path.exists(tmp):
                shutil.rmtree(tmp)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(tmp)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: str) -> None:
        self.accelerator.load_state(path)


def read(logs: dict) -> dict:
    """``logs`` with every tensor read as a float (this waits for the GPU work that computes them)."""
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


def _shuffled_batch(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of batch ``step`` over epochs of a shuffled ``range(n)`` (drop_last; epoch e shuffled with
    ``seed + e``)."""
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return [int(order[(position * batch_size + i) % n]) for i in range(batch_size)]


def _check_launch(accelerator: Accelerator) -> None:
    """Refuse a multi-process launch that accelerate does not see (each process would train alone on its share of
    the batches and all would write the same output folder)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"this process was launched as one of {world} (WORLD_SIZE={world}) but accelerate sees a single process, "
            "so every process would train alone and overwrite the others' output. On CPUs set ACCELERATE_USE_CPU=1 "
            "(what `accelerate launch --cpu` does) for torchrun; on GPUs use `accelerate launch --multi_gpu "
            "--num_processes N` (or pass an Accelerator created inside the launched processes)")


CHECKPOINTING_MODES = ("full", "selective")


def _attention_ops() -> set:
    names = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name)}


def check_activation_memory_budget(budget: float | None, compile_blocks: bool,
                                   gradient_checkpointing: bool | str) -> None:
    """ValueError unless ``budget`` is None or in (0, 1] with compiled blocks and no gradient checkpointing (the
    trainer's rule, also called by the scripts while they parse their flags)."""
    if budget is None:
        return
    if not compile_blocks:
        raise ValueError("activation_memory_budget is a setting of the compiler: it needs compile_blocks=True")
    if gradient_checkpointing:
        raise ValueError("activation_memory_budget replaces gradient checkpointing (the compiler chooses what to "
                         f"recompute); pass gradient_checkpointing=False, not {gradient_checkpointing!r}")
    if not 0 < budget <= 1:
        raise ValueError(f"activation_memory_budget must be in (0, 1], got {budget}")


def checkpoint_function(mode: bool | str):
    """The function that checkpoints a transformer block for ``transformer.enable_gradient_checkpointing``.

    ``True`` or ``"full"``: the whole block is recomputed in the backward (the reference's ``full-block``; diffusers'
    default, returned as None). ``"selective"``: the block is recomputed except the fused attention kernels, whose
    outputs are kept (PyTorch's selective activation checkpointing): at Infinity-2B, batch 2, 1024x1024 that is
    about 2.8 GB more memory for one attention forward less per block and step.
    """
    if mode is True or mode == "full":
        return None
    if mode != "selective":
        raise ValueError(f"gradient_checkpointing must be a bool or one of {CHECKPOINTING_MODES}, got {mode!r}")
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    attention_ops = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in attention_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(checkpoint, use_reentrant=False,
                             context_fn=functools.partial(create_selective_checkpoint_contexts, policy))


CHECKPOINT_FILES = ("trainable.safetensors", "trainer_state.pt")
"""What every complete checkpoint holds (written by the trainer's accelerate save hook)."""


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``checkpoint-<step>`` folders in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(d.split("-", 1)[1]), os.path.join(output_dir, d)) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()]
    return sorted(p for p in found if os.path.isdir(p[1]))


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete ``checkpoint-<step>`` folder with the highest step in ``output_dir``, or None.

    Incomplete ones (missing ``trainable.safetensors`` or ``trainer_state.pt``: a run killed while saving with an
    older var-erase) and temporary ``.checkpoint-<step>.tmp`` folders (killed while saving) are skipped with a
    warning."""
    if not os.path.isdir(output_dir):
        return None
    for name in sorted(os.listdir(output_dir)):
        if name.startswith(".checkpoint-") and name.endswith(".tmp"):
            warnings.warn(f"skipping {os.path.join(output_dir, name)}: a checkpoint whose saving was interrupted "
                          "(delete it)", stacklevel=2)
    for _, path in reversed(_checkpoints(output_dir)):
        missing = [f for f in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, f))]
        if not missing:
            return path
        warnings.warn(f"skipping the incomplete checkpoint {path}: it lacks {', '.join(missing)} (its saving was "
                      "interrupted); resuming from an earlier one. Delete it to silence this warning", stacklevel=2)
    return None


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Remove the oldest ``checkpoint-<step>`` folders of ``output_dir`` so that at most ``keep`` remain; returns the
    removed paths."""
    found = _checkpoints(output_dir)
    removed = [path for _, path in found[: max(0, len(found) - keep)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


__all__ = ["ErasureTrainer", "TrainState", "latest_checkpoint", "prune_checkpoints"]
