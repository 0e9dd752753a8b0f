"""A learned-mask localizer: a continuous mask over all MLP neurons, trained to remove a capability.

Every neuron ``(l, i)`` gets a logit ``theta[l, i]``; its keep factor is ``m = sigmoid(theta)`` and its removal
``r = 1 - m``. Under the mask the neuron's activation ``x`` becomes ``m * x + r * fill`` (``fill`` = 0: zero
ablation, or the neuron's mean activation: mean ablation), installed with :func:`caploc.hooks.neuron_hooks` (no
weight is touched; all parameters are frozen with :func:`caploc.hooks.frozen` and are bit-identical afterwards).

Objective (minimised over ``theta`` with Adam; ours, in the spirit of differentiable-mask localizers such as
Csordás et al. 2021 and Bayazit et al. 2024)::

    L(theta) = mean_t relu(log V - nll_t(on))          # suppression: push on-target tokens towards uniform (log V)
             + beta * mean_t nll_t(off)                # sparing: keep the reference (off-target) data predicted
             + lam * sum_i r_i                         # sparsity: every removed neuron costs lam

``nll_t`` is the teacher-forced NLL of one gold target token; ``V`` the vocabulary size (the suppression term is
bounded: it is 0 once a token is no better than uniform). The learned set is ``{r > 0.5}``; the full ranking (most
removed first) is ``argsort(theta)``, so the mask also yields a threshold-free ranking for the faithfulness curves.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import check, setting
from ..data import collate, pad_id
from ..errors import CaplocError
from ..hooks import frozen, neuron_hooks
from ..lmhead import target_logprobs
from ..progress import track
from ..results import NeuronSet, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

FILLS = ("zero", "mean")


# ---------------------------------------------------------------------------------------------------------------------
# batches of encoded samples (right padding) and teacher-forced token NLLs
# ---------------------------------------------------------------------------------------------------------------------
def batch(encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids``, ``attention`` and ``target`` masks ``[B, T]`` (True on gold target tokens)."""
    if not encoded:
        raise CaplocError("no samples to batch")
    ids, att = collate([e.input_ids for e in encoded], 0)
    tgt = torch.zeros_like(att, dtype=torch.bool)
    for r, e in enumerate(encoded):
        tgt[r, e.prompt_len:len(e)] = True
    return ids, att, tgt


def token_nll(lm, encoded) -> torch.Tensor:
    """NLL of every gold target token of ``encoded`` (one batch, differentiable under the caller's hooks): [n_tok].
    The LM head runs on the target positions only (:mod:`caploc.lmhead`)."""
    dev = lm.site.input_device()
    ids, att, tgt = batch(encoded)
    ids = ids.masked_fill(att == 0, pad_id(lm.tokenizer))
    lp = target_logprobs(lm.model, ids.to(dev), tgt.to(dev), att.to(dev), use_cache=False)  # [B, T-1]
    return -lp[tgt[:, 1:].to(lp.device)]


@torch.no_grad()
def mean_activations(lm, encoded, *, batch_size: int = 4) -> torch.Tensor:
    """Signed mean activation of every neuron over all real (non-padding) tokens: float32 ``[n_layers, d_mlp]``."""
    from ..hooks import capture

    site = lm.site
    total = torch.zeros(site.n_layers, site.d_mlp, dtype=torch.float64)
    count = 0
    dev = site.input_device()
    for start in range(0, len(encoded), batch_size):
        ids, att, _ = batch(encoded[start:start + batch_size])
        ids = ids.masked_fill(att == 0, pad_id(lm.tokenizer))
        with capture(site) as store:
            lm.model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False)
        w = att[:, :, None].double()
        for l in range(site.n_layers):
            total[l] += (store[l].double().cpu() * w).sum((0, 1))
        count += int(att.sum())
    return (total / max(count, 1)).float()


@contextlib.contextmanager
def soft_mask(site, keep: torch.Tensor, fill: torch.Tensor | None = None):
    """Replace every neuron's activation x by ``keep * x + (1 - keep) * fill`` (``keep``/``fill``: [L, d]; fill None =
    0). Differentiable in ``keep``; hooks only."""
    if keep.shape != (site.n_layers, site.d_mlp):
        raise CaplocError(f"mask shape {tuple(keep.shape)} does not match the model's {site.n_layers} x {site.d_mlp}")

    def fn(layer, x):
        k = keep[layer].to(x.device, x.dtype)
        if fill is None:
            return x * k
        return x * k + (1 - k) * fill[layer].to(x.device, x.dtype)

    with neuron_hooks(site, {l: fn for l in range(site.n_layers)}):
        yield


# ---------------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class MaskConfig:
    steps: int = setting(150, min=0, help="Optimizer steps of the mask.")
    lr: float = setting(0.1, min=0, min_exclusive=True, help="Adam learning rate of the mask logits.")
    init: float = setting(4.0, help="Initial logit (keep = sigmoid(4) = 0.982).")
    beta: float = setting(1.0, min=0, help="Weight of the off-target (sparing) loss.")
    lam: float = setting(1e-3, min=0, help="Cost of one removed neuron (nats per target token).")
    fill: str = setting("zero", choices=FILLS, help="What a removed neuron is set to: zero | mean activation.")
    batch_size: int = setting(4, min=1, help="Samples per step and dataset.")
    seed: int = setting(0, help="Seed of the batch order.")

    def __post_init__(self):
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MaskResult:
    logits: torch.Tensor  # [L, d] float32, the learned theta
    history: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def removal(self) -> torch.Tensor:
        """r = 1 - sigmoid(theta): [L, d]."""
        return torch.sigmoid(-self.logits.double())

    def ranking(self) -> np.ndarray:
        """All flat neuron indices, most removed (lowest logit) first; ties by index."""
        flat = self.logits.reshape(-1).double().numpy()
        return np.lexsort((np.arange(flat.size), flat)).astype(np.int64)

    def neuron_set(self, threshold: float = 0.5) -> NeuronSet:
        L, d = self.logits.shape
        r = self.removal.reshape(-1).numpy()
        sel = np.nonzero(r > threshold)[0]
        return NeuronSet.from_flat(sel, L, d, mean_score=r[sel],
                                   meta={**self.meta, "method": "learned_mask", "removal_threshold": threshold})

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        atomic_save_tensors(out_dir / "mask.safetensors", {"logits": self.logits.float()})
        atomic_write_json(out_dir / "mask.json", {"kind": "learned_mask", "history": self.history, "meta": self.meta})
        self.neuron_set().save(out_dir)
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "MaskResult":
        from safetensors.torch import load_file

        out_dir = Path(out_dir)
        js = read_json(out_dir / "mask.json")
        if js.get("kind") != "learned_mask":
            raise CaplocError(f"{out_dir} is not a caploc learned-mask directory")
        if not (out_dir / "mask.safetensors").exists():
            raise CaplocError(f"{out_dir}/mask.safetensors is missing: the mask directory is incomplete")
        return cls(load_file(str(out_dir / "mask.safetensors"))["logits"], js.get("history", []), js.get("meta", {}))


def mask_loss(lm, keep: torch.Tensor, on_batch, off_batch, cfg: MaskConfig, fill: torch.Tensor | None) -> tuple:
    """The objective (see the module docstring) for one on- and one off-target batch: (loss, parts dict)."""
    logV = math.log(lm.model.get_output_embeddings().weight.shape[0])
    with soft_mask(lm.site, keep, fill):
        on = token_nll(lm, on_batch)
        off = token_nll(lm, off_batch) if off_batch else on.new_zeros(1)
    sup = torch.relu(logV - on).mean()
    spare = off.mean()
    sparsity = (1 - keep).sum()
    loss = sup + cfg.beta * spare + cfg.lam * sparsity
    return loss, {"suppression": float(sup.detach()), "nll_on": float(on.detach().mean()), "nll_off": float(spare.detach()),
                  "removed_mass": float(sparsity.detach())}


def learn_mask(lm, on_encoded, off_encoded, cfg: MaskConfig | None = None, *, fill: torch.Tensor | None = None,
               progress: bool | None = None, meta: dict | None = None) -> MaskResult:
    """Train the mask (model weights frozen; they are bit-identical afterwards). ``fill``: [L, d] mean activations for
    ``cfg.fill == 'mean'`` (computed from ``off_encoded`` + ``on_encoded`` when None)."""
    cfg = cfg or MaskConfig()
    site = lm.site
    if not on_encoded:
        raise CaplocError("the learned mask needs on-target samples")
    if cfg.fill == "mean" and fill is None:
        fill = mean_activations(lm, list(on_encoded) + list(off_encoded))
    if cfg.fill == "zero":
        fill = None
    theta = torch.full((site.n_layers, site.d_mlp), float(cfg.init), dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    hist = []
    was_training = lm.model.training
    lm.model.eval()
    try:
        with frozen(lm.model), torch.enable_grad():
            for step in track(range(cfg.steps), desc="learned mask", unit="step", progress=progress):
                on_b = [on_encoded[i] for i in rng.choice(len(on_encoded), min(cfg.batch_size, len(on_encoded)),
                                                          replace=False)]
                off_b = ([off_encoded[i] for i in rng.choice(len(off_encoded), min(cfg.batch_size, len(off_encoded)),
                                                             replace=False)] if len(off_encoded) else [])
                opt.zero_grad(set_to_none=True)
                loss, parts = mask_loss(lm, torch.sigmoid(theta), on_b, off_b, cfg, fill)
                loss.backward()
                opt.step()
                parts.update(step=step, loss=float(loss.detach()), n_removed=int((theta.detach() < 0).sum()))
                hist.append(parts)
                if step % 10 == 0 or step == cfg.steps - 1:
                    log.info("mask step %d: %s", step, {k: round(v, 4) for k, v in parts.items()})
    finally:
        lm.model.train(was_training)
    info = {"config": cfg.to_dict(), "n_on": len(on_encoded), "n_off": len(off_encoded),
            "objective": "relu(log V - nll_on) + beta * nll_off + lam * sum(1 - sigmoid(theta))", **(meta or {})}
    return MaskResult(theta.detach().clone(), hist, info)
