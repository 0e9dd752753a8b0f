"""The training loop shared by every arm: teacher-forced AdamW steps on target tokens, same batches for every arm.

Choices that are ours (the paper does not state them): dropout off during training (``model.eval()``), so arms
differ only in which parameters move; loss = mean NLL over all target tokens of a batch (prompt and padding masked by
the attention mask); the data order depends only on the seed.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...data import collate, encode_dataset
from ...data import pad_id as token_pad_id
from ...errors import CaplocError
from ...hooks import frozen
from ...lmhead import batch_nll
from ...memory import ModelShape, micro_batches, model_budgets, train_sample_bytes
from ...progress import track
from .adapter import NeuronAdapter, unwrap
from .config import FinetuneConfig

log = logging.getLogger(__name__)


class DivergedError(CaplocError):
    """The training loss became non-finite (the learning rate is too high)."""


def collate_batch(encoded: Sequence, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded batch (:func:`caploc.data.collate`): ``input_ids``/``attention_mask`` [B, T] and ``target_mask``
    [B, T] (True on target tokens)."""
    ids, att = collate([e.input_ids for e in encoded], pad_id)
    tgt = torch.zeros(ids.shape, dtype=torch.bool)
    for b, e in enumerate(encoded):
        tgt[b, e.prompt_len:len(e.input_ids)] = True
    out = {"input_ids": ids, "attention_mask": att, "target_mask": tgt}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def target_nll(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain form of the training loss (the reference :func:`caploc.lmhead.batch_nll` is tested against):
    summed NLL over target tokens and their count. logits [B, T, V]; the token at t is predicted at t - 1; only
    positions that are target tokens and inside the attention mask count (so pad = eos is handled)."""
    labels = batch["input_ids"][:, 1:]  # [B, T-1]
    mask = (batch["target_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool())  # [B, T-1]
    lg = logits[:, :-1][mask]  # [n_tok, V]
    nll = F.cross_entropy(lg.float(), labels[mask], reduction="sum")
    return nll, mask.sum()


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Indices of every step's batch: seeded permutations of the training set, epoch after epoch."""
    gen = torch.Generator().manual_seed(int(seed))
    out, cur = [], []
    while len(out) < steps:
        for i in torch.randperm(n, generator=gen).tolist():
            cur.append(i)
            if len(cur) == batch_size:
                out.append(cur)
                cur = []
                if len(out) == steps:
                    break
    return out


def lr_lambda(cfg: FinetuneConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "linear":
            rest = max(1, cfg.steps - cfg.warmup_steps)
            return max(0.0, 1.0 - (step - cfg.warmup_steps) / rest)
        return 1.0
    return f


def optimizer_state_numel(opt: torch.optim.Optimizer) -> int:
    """Elements of AdamW moment buffers (exp_avg + exp_avg_sq) held by ``opt``."""
    n = 0
    for st in opt.state.values():
        for k in ("exp_avg", "exp_avg_sq"):
            if k in st:
                n += st[k].numel()
    return n


@dataclass
class TrainLog:
    losses: list[float]  # mean target NLL of each step's batch (before that step's update)
    seconds: float
    step_seconds: list[float]  # wall clock per step
    n_trainable: int
    n_optimizer_state: int
    lr: float
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time per step (all threads)


def train(model: nn.Module, params: Sequence[nn.Parameter], encoded: Sequence, cfg: FinetuneConfig, *,
          lr: float | None = None, weight_decay: float = 0.0, pad_id: int = 0, desc: str = "finetune",
          context=None, progress: bool | None = None, return_optimizer: bool = False):
    """Teacher-forced fine-tuning of ``params`` for ``cfg.steps`` AdamW steps on ``encoded`` samples.

    ``context``: a context manager factory wrapped around the whole loop (e.g. ``adapter.applied``). The data order
    depends only on ``cfg.seed``, so every arm sees the same batches.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise CaplocError("nothing to train: no parameter requires grad")
    lr = cfg.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    order = batch_order(len(encoded), cfg.steps, cfg.batch_size, cfg.seed)
    device = next(model.parameters()).device
    budgets = model_budgets(model, cfg.memory_mb)
    shape, dtype = ModelShape.from_model(model), next(model.parameters()).dtype
    attn = "eager" if getattr(model.config, "_attn_implementation", None) == "eager" else "sdpa"
    sample_bytes = lambda T: train_sample_bytes(shape, T, dtype, attn)  # noqa: E731
    losses, times, cpu, n_micro = [], [], [], 0
    was_training = model.training
    model.eval()  # dropout off: arms differ only in which parameters move
    t_all = time.perf_counter()
    ctx = context() if context is not None else contextlib.nullcontext()
    try:
        with ctx, torch.enable_grad():
            for step, idx in enumerate(track(order, desc=desc, unit="step", progress=progress)):
                t0, c0 = time.perf_counter(), time.process_time()
                # a batch that does not fit the budget runs as micro-batches: each one's summed NLL over the batch's
                # target-token count, so the gradients add up to the whole batch's (gradient accumulation)
                parts = [collate_batch([encoded[idx[j]] for j in mb], pad_id, device)
                         for mb in micro_batches([len(encoded[i]) for i in idx], budgets.rows, sample_bytes)]
                n_micro += len(parts)
                ntok = sum(int((b["target_mask"][:, 1:] & b["attention_mask"][:, 1:].bool()).sum()) for b in parts)
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros(())
                for batch in parts:
                    # the LM head runs on the target positions only, a chunk at a time (caploc.lmhead): the same loss
                    # as target_nll(model(...).logits, batch) without the [B, T, vocab] logits and their gradients
                    nll, _ = batch_nll(model, batch, budget_bytes=budgets.head)
                    part = nll / max(ntok, 1)
                    part.backward()
                    loss = loss + part.detach().float().cpu()
                if not torch.isfinite(loss):
                    raise DivergedError(f"{desc}: the loss became {loss.item()} at step {step}; lower --lr")
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                every = max(1, cfg.steps // 10)
                log.log(logging.INFO if (step + 1) % every == 0 or step == 0 else logging.DEBUG,
                        "%s step %d/%d loss %.4f (%.2f s)", desc, step + 1, cfg.steps, losses[-1], times[-1])
    finally:
        model.train(was_training)
    tl = TrainLog(losses, time.perf_counter() - t_all, times, int(sum(p.numel() for p in params)),
                  optimizer_state_numel(opt), float(lr), cpu)
    log.info("%s: %d steps (%d micro-batches), loss %.4f -> %.4f, %.1f s", desc, cfg.steps, n_micro, losses[0],
             losses[-1], tl.seconds)
    opt.zero_grad(set_to_none=True)
    if return_optimizer:
        return tl, opt
    del opt
    return tl


def train_adapter(lm, adapter: NeuronAdapter, train_ds, cfg: FinetuneConfig, *, desc: str = "neurons",
                  progress: bool | None = None, return_optimizer: bool = False):
    """Train ``adapter``'s deltas on ``train_ds`` (base weights frozen and never written)."""
    model, _, _ = unwrap(lm)
    encoded = encode_dataset(lm.tokenizer, train_ds, chat=cfg.chat, max_length=cfg.max_length)
    with frozen(model):
        return train(model, list(adapter.deltas.values()), encoded, cfg, lr=cfg.arm_lr("neurons"), weight_decay=0.0,
                     pad_id=token_pad_id(lm.tokenizer, getattr(model, "config", None)), desc=desc,
                     context=lambda: adapter.applied(model), progress=progress, return_optimizer=return_optimizer)


__all__ = ["DivergedError", "TrainLog", "batch_order", "collate_batch", "lr_lambda", "optimizer_state_numel",
           "target_nll", "train", "train_adapter"]
