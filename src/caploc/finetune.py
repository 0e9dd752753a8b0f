"""Neuron-only fine-tuning: train only the parameter slices that belong to selected MLP neurons.

A neuron ``(layer, i)`` owns (``Site.neuron_slices``) column ``i`` of the output projection (row ``i`` for GPT-2's
transposed ``Conv1D``), row ``i`` of every input projection (rows ``i`` and ``d_mlp + i`` of Phi-3's fused
``gate_up_proj``) and the matching bias entries. :class:`NeuronAdapter` holds one trainable *delta* tensor per slice,
of exactly the sliced shape, so trainable parameters, gradients and optimizer state exist for those slices only
(not a masked gradient over whole matrices). The base weights are never written during training: the deltas are added
in the forward pass by hooks (``applied``), using the low-rank form of the update

* output projection, input-feature slice ``c``:   ``y += x[..., c] @ Δᵀ``          (Δ: ``[d_model, k]``)
* input projection, output-feature slice ``r``:   ``y[..., r] += x @ Δᵀ + Δb``     (Δ: ``[k, d_model]``)

which costs ``O(k)`` per token instead of a dense ``W + scatter(Δ)``. ``merge`` writes ``W[slice] += Δ`` into the
weights and keeps the original slice values, so ``unmerge`` restores them bit for bit.

:func:`finetune` compares arms trained with the same data order, steps, learning-rate schedule and clipping:
``neurons`` (a located set), ``random`` (layer-matched random sets, several seeds), ``full`` (all parameters) and
``lora`` (PEFT LoRA on the MLP projections), each evaluated before/after on held-out data. Choices that are ours
(the paper does not state them): dropout off during training (``model.eval()``), so arms differ only in which
parameters move; loss = mean NLL over all target tokens of a batch (prompt and padding masked by the attention mask);
AdamW with weight decay 0 for neuron slices (decay would also shrink the frozen rest in a masked implementation, and
for deltas it would pull the update to zero); random controls exclude the located neurons by default.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .errors import CaplocError, IncompatibleResultError
from .results import NeuronSet, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

ARMS = ("neurons", "random", "full", "lora")
ADAPTER_FORMAT = 1


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------
def _unwrap(lm_or_model) -> tuple[nn.Module, Any, dict]:
    """(model, site, info) from a LoadedModel or a bare HF model."""
    from .models.layouts import Site

    if hasattr(lm_or_model, "model") and hasattr(lm_or_model, "site"):
        return lm_or_model.model, lm_or_model.site, dict(getattr(lm_or_model, "info", {}) or {})
    if isinstance(lm_or_model, nn.Module):
        return lm_or_model, Site(lm_or_model), {}
    raise CaplocError(f"expected a LoadedModel or a torch model, got {type(lm_or_model).__name__}")


def _fingerprint(model: nn.Module, info: dict) -> str:
    from .models.loading import model_fingerprint

    return info.get("fingerprint") or model_fingerprint(model)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def _out_axis(module: nn.Module, conv1d_default: bool) -> int:
    """Axis of ``module.weight`` that indexes output features: 0 for nn.Linear ([out, in]), 1 for HF Conv1D."""
    if isinstance(module, nn.Linear):
        return 0
    if type(module).__name__ == "Conv1D":
        return 1
    return 1 if conv1d_default else 0


def _as_layer_indices(neurons, d_mlp: int, n_layers: int) -> dict[int, torch.Tensor]:
    if isinstance(neurons, NeuronSet):
        items = neurons.by_layer().items()
    elif isinstance(neurons, Mapping):
        items = neurons.items()
    else:
        pairs = np.asarray(neurons, dtype=np.int64).reshape(-1, 2)
        items = {int(l): pairs[pairs[:, 0] == l, 1] for l in np.unique(pairs[:, 0])}.items()
    out: dict[int, torch.Tensor] = {}
    for l, ix in items:
        l = int(l)
        t = torch.as_tensor(np.asarray(ix, dtype=np.int64).reshape(-1))
        if not len(t):
            continue
        if not 0 <= l < n_layers:
            raise IncompatibleResultError(f"neuron layer {l} is outside this model's 0..{n_layers - 1}; "
                                          "use a neuron set located on this model")
        if int(t.min()) < 0 or int(t.max()) >= d_mlp:
            raise IncompatibleResultError(f"neuron index outside 0..{d_mlp - 1} in layer {l}; "
                                          "use a neuron set located on this model")
        t = torch.unique(t)  # sorted, distinct
        out[l] = t
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class SliceSpec:
    """One trainable slice: ``param[..., offset + idx, ...]`` along ``dim``; ``out_feature`` says whether ``dim``
    indexes the module's output features (input-projection rows, biases) or its input features (output projection)."""

    key: str
    layer: int
    param: str  # parameter name in the model, e.g. model.layers.3.mlp.down_proj.weight
    module: str
    attr: str  # weight | bias
    dim: int
    offset: int
    out_feature: bool
    transposed: bool  # module stores weight as [in, out] (HF Conv1D)
    shape: tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------------------------------
class NeuronAdapter(nn.Module):
    """Trainable deltas for the parameter slices of selected neurons (see module docstring).

    >>> ad = NeuronAdapter(lm, neuron_set)                 # doctest: +SKIP
    >>> with ad.applied(lm.model): out = lm.model(ids)     # doctest: +SKIP
    """

    def __init__(self, lm_or_model, neurons, *, dtype: torch.dtype = torch.float32, init_std: float = 0.0,
                 seed: int = 0):
        super().__init__()
        model, site, info = _unwrap(lm_or_model)
        self.n_layers, self.d_mlp, self.d_model = site.n_layers, site.d_mlp, site.d_model
        self.model_type = site.model_type
        self.layout = json.loads(site.layout.to_json())
        self.model_id = info.get("model_id") or getattr(getattr(model, "config", None), "_name_or_path", None)
        self.fingerprint = _fingerprint(model, info)
        self.base_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.indices = _as_layer_indices(neurons, self.d_mlp, self.n_layers)  # {layer: LongTensor [k]} (cpu)
        names = _param_names(model)
        self.specs: list[SliceSpec] = []
        self.deltas = nn.ParameterDict()
        gen = torch.Generator().manual_seed(seed)
        for layer, idx in self.indices.items():
            for j, (p, dim, off) in enumerate(site.neuron_slices(layer)):
                pname = names[id(p)]
                mname, attr = pname.rsplit(".", 1)
                module = model.get_submodule(mname)
                ax = _out_axis(module, site.layout.conv1d)
                out_feature = attr == "bias" or dim == ax
                shape = list(p.shape)
                shape[dim] = len(idx)
                key = f"L{layer}_s{j}"
                spec = SliceSpec(key, layer, pname, mname, attr, dim, off, out_feature, ax == 1 and attr == "weight",
                                 tuple(shape))
                self.specs.append(spec)
                d = torch.zeros(shape, dtype=dtype)
                if init_std:
                    d.normal_(0.0, init_std, generator=gen)
                self.deltas[key] = nn.Parameter(d.to(p.device))
        object.__setattr__(self, "_model", model)  # a plain reference, not a registered submodule
        self._merged: dict[int, tuple[nn.Module, dict[str, torch.Tensor]]] = {}
        self._applied: set[int] = set()

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return int(sum(len(ix) for ix in self.indices.values()))

    def n_trainable(self) -> int:
        return int(sum(p.numel() for p in self.deltas.values()))

    def per_layer_counts(self) -> list[int]:
        c = [0] * self.n_layers
        for l, ix in self.indices.items():
            c[l] = len(ix)
        return c

    def pairs(self) -> np.ndarray:
        rows = [(l, int(i)) for l, ix in self.indices.items() for i in ix.tolist()]
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def _positions(self, spec: SliceSpec, device) -> torch.Tensor:
        return (self.indices[spec.layer] + spec.offset).to(device)

    # ---- compatibility ------------------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model whose parameters do not have the slices this adapter was made for."""
        params = dict(model.named_parameters(remove_duplicate=False))
        for s in self.specs:
            p = params.get(s.param)
            want = list(s.shape)
            if p is None:
                raise IncompatibleResultError(f"this model has no parameter {s.param}: the adapter was made for a "
                                              f"{self.model_type} model ({self.model_id}); load that model")
            have = list(p.shape)
            have[s.dim] = want[s.dim]
            if have != want or p.shape[s.dim] < s.offset + self.d_mlp:
                raise IncompatibleResultError(
                    f"parameter {s.param} has shape {tuple(p.shape)}, but the adapter was made for a model with "
                    f"{self.n_layers} layers x {self.d_mlp} neurons, d_model {self.d_model} ({self.model_id}); load that model")

    # ---- functional application (hooks) ------------------------------------------------------------------------
    def _module_plan(self) -> dict[str, dict]:
        plan: dict[str, dict] = {}
        for s in self.specs:
            entry = plan.setdefault(s.module, {"in": [], "out": {}})
            if s.out_feature:
                grp = entry["out"].setdefault(s.offset, {"layer": s.layer, "weight": None, "bias": None,
                                                         "transposed": False})
                grp[s.attr] = s.key
                if s.attr == "weight":
                    grp["transposed"] = s.transposed
            else:
                entry["in"].append((s.key, s.layer, s.offset, s.transposed))
        return plan

    def _make_hook(self, entry: dict, device_cache: dict):
        deltas = self.deltas

        def pos(layer: int, offset: int, device) -> torch.Tensor:
            k = (layer, offset, str(device))
            if k not in device_cache:
                device_cache[k] = (self.indices[layer] + offset).to(device)
            return device_cache[k]

        def hook(module, args, out):
            x = args[0]  # [..., in_features]
            y = out  # [..., out_features]
            for key, layer, offset, transposed in entry["in"]:
                d = deltas[key].to(x.dtype)  # Linear: [out, k]; Conv1D: [k, out]
                w = d.t() if transposed else d  # [out, k]
                y = y + F.linear(x.index_select(-1, pos(layer, offset, x.device)), w)
            for offset, grp in entry["out"].items():
                w = deltas[grp["weight"]].to(x.dtype) if grp["weight"] is not None else None  # [k, in] / [in, k]
                b = deltas[grp["bias"]].to(x.dtype) if grp["bias"] is not None else None  # [k]
                if w is not None:
                    corr = F.linear(x, w.t() if grp["transposed"] else w, b)  # [..., k]
                else:
                    corr = b.expand(*y.shape[:-1], b.shape[0])
                y = y.index_add(-1, pos(grp["layer"], offset, y.device), corr.to(y.dtype))
            return y

        return hook

    @contextlib.contextmanager
    def applied(self, model: nn.Module | None = None) -> Iterator["NeuronAdapter"]:
        """Add the deltas in the forward pass of ``model`` (default: the model the adapter was made on) for the
        duration; the weights are not touched. Hooks are removed on exit, also after an exception."""
        model = self._model if model is None else _unwrap(model)[0]
        if id(model) in self._merged:
            raise CaplocError("this adapter is merged into the model already; unmerge it before applying it with hooks")
        if id(model) in self._applied:
            raise CaplocError("this adapter is already applied to the model; do not nest applied() contexts")
        self.check_model(model)
        handles = []
        cache: dict = {}
        self._applied.add(id(model))
        try:
            for mname, entry in self._module_plan().items():
                handles.append(model.get_submodule(mname).register_forward_hook(self._make_hook(entry, cache)))
            yield self
        finally:
            for h in handles:
                h.remove()
            self._applied.discard(id(model))

    # ---- merge / unmerge ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, model: nn.Module | None = None) -> nn.Module:
        """``W[slice] += Δ`` in place (the original slice values are kept, so :meth:`unmerge` is bit-exact)."""
        model = self._model if model is None else _unwrap(model)[0]
        if id(model) in self._merged:
            raise CaplocError("this adapter is already merged into this model; unmerge it first")
        if id(model) in self._applied:
            raise CaplocError("cannot merge while the adapter is applied with hooks (it would count twice)")
        self.check_model(model)
        originals: dict[str, torch.Tensor] = {}
        for s in self.specs:
            p = model.get_parameter(s.param)
            ix = self._positions(s, p.device)
            originals[s.key] = p.index_select(s.dim, ix).clone()
            p.index_add_(s.dim, ix, self.deltas[s.key].detach().to(device=p.device, dtype=p.dtype))
        self._merged[id(model)] = (model, originals)
        return model

    @torch.no_grad()
    def unmerge(self, model: nn.Module | None = None) -> nn.Module:
        """Restore the slice values saved by :meth:`merge` (bit-exact)."""
        model = self._model if model is None else _unwrap(model)[0]
        if id(model) not in self._merged:
            raise CaplocError("this adapter is not merged into this model; nothing to unmerge")
        _, originals = self._merged.pop(id(model))
        for s in self.specs:
            p = model.get_parameter(s.param)
            p.index_copy_(s.dim, self._positions(s, p.device), originals[s.key].to(p.device))
        return model

    @contextlib.contextmanager
    def merged(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Merge for the duration of the block, then unmerge (also after an exception)."""
        m = self.merge(model)
        try:
            yield m
        finally:
            self.unmerge(m)

    # ---- save / load --------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return {
            "kind": "neuron_adapter", "format": ADAPTER_FORMAT, "caploc_version": __version__,
            "model_id": self.model_id, "model_fingerprint": self.fingerprint, "model_type": self.model_type,
            "layout": self.layout, "n_layers": self.n_layers, "d_mlp": self.d_mlp, "d_model": self.d_model,
            "base_dtype": self.base_dtype, "delta_dtype": str(next(iter(self.deltas.values())).dtype).removeprefix("torch.")
            if len(self.deltas) else None,
            "n_neurons": self.n_neurons, "n_trainable": self.n_trainable(), "per_layer": self.per_layer_counts(),
            "layers": {str(l): ix.tolist() for l, ix in self.indices.items()},
            "slices": [dict(asdict(s), shape=list(s.shape)) for s in self.specs],
        }

    def save(self, out_dir: Path | str, extra: dict | None = None) -> Path:
        """Write ``adapter.safetensors`` (the deltas) and ``adapter.json`` (indices, slice specs, model provenance)."""
        out_dir = Path(out_dir)
        tensors = {k: v.detach() for k, v in self.deltas.items()}
        for l, ix in self.indices.items():
            tensors[f"idx_L{l}"] = ix
        atomic_save_tensors(out_dir / "adapter.safetensors", tensors)
        atomic_write_json(out_dir / "adapter.json", {**self.meta(), **(extra or {})})
        return out_dir

    @staticmethod
    def read_meta(path: Path | str) -> dict:
        path = Path(path)
        meta = read_json(path / "adapter.json" if path.is_dir() or not path.suffix else path)
        if meta.get("kind") != "neuron_adapter":
            raise CaplocError(f"{path} is not a caploc neuron adapter (kind={meta.get('kind')!r}); "
                              "pass a directory written by caploc finetune")
        return meta

    @classmethod
    def load(cls, path: Path | str, lm, *, check_fingerprint: bool = True) -> "NeuronAdapter":
        """Load an adapter for ``lm``; refuses a model with other dimensions, architecture or weights."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = cls.read_meta(path)
        model, site, info = _unwrap(lm)
        if (site.n_layers, site.d_mlp, site.d_model) != (meta["n_layers"], meta["d_mlp"], meta["d_model"]):
            raise IncompatibleResultError(
                f"adapter {path} was made for a model with {meta['n_layers']} layers x {meta['d_mlp']} neurons, "
                f"d_model {meta['d_model']} ({meta.get('model_id')}), but this model has {site.n_layers} x "
                f"{site.d_mlp}, d_model {site.d_model}: load {meta.get('model_id')}")
        if site.model_type != meta["model_type"]:
            raise IncompatibleResultError(f"adapter {path} was made for a {meta['model_type']} model "
                                          f"({meta.get('model_id')}), not {site.model_type}: load that model")
        fp = _fingerprint(model, info)
        if check_fingerprint and meta.get("model_fingerprint") and fp != meta["model_fingerprint"]:
            raise IncompatibleResultError(
                f"adapter {path} was trained on model {meta.get('model_id')} (fingerprint {meta['model_fingerprint']}) "
                f"but this model's fingerprint is {fp}: load the same base model (or pass check_fingerprint=False)")
        tpath = path / "adapter.safetensors" if path.is_dir() else path.with_suffix(".safetensors")
        if not tpath.exists():
            raise CaplocError(f"{tpath} is missing: the adapter directory is incomplete")
        t = load_file(str(tpath))
        layers = {int(l): t.get(f"idx_L{l}", torch.tensor(ix, dtype=torch.long)) for l, ix in meta["layers"].items()}
        dtype = getattr(torch, meta.get("delta_dtype") or "float32")
        ad = cls(lm, layers, dtype=dtype)
        if [s.key for s in ad.specs] != [s["key"] for s in meta["slices"]]:
            raise IncompatibleResultError(f"adapter {path} has other slices than this model's neuron site "
                                          f"({site.describe()['neuron_site']}); load it with the layout it was made with")
        with torch.no_grad():
            for s in ad.specs:
                if s.key not in t:
                    raise CaplocError(f"{tpath} has no tensor {s.key}: the adapter file is incomplete")
                if tuple(t[s.key].shape) != s.shape:
                    raise IncompatibleResultError(f"adapter tensor {s.key} has shape {tuple(t[s.key].shape)}, "
                                                  f"this model needs {s.shape}: load the model it was made for")
                ad.deltas[s.key].copy_(t[s.key])
        return ad

    # ---- dense view (for inspection / tests) --------------------------------------------------------------------
    def dense_delta(self, param_name: str, like: torch.Tensor) -> torch.Tensor:
        """The full-size update this adapter adds to parameter ``param_name`` (zeros outside its slices)."""
        out = torch.zeros_like(like)
        for s in self.specs:
            if s.param == param_name:
                out.index_add_(s.dim, self._positions(s, out.device), self.deltas[s.key].detach().to(out.dtype))
        return out


# ---------------------------------------------------------------------------------------------------------------------
# configuration and data
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Training and evaluation settings shared by all arms (only ``lr`` can differ per arm, and only on request)."""

    arms: tuple[str, ...] = ("neurons", "random", "full")
    steps: int = 20
    lr: float = 1e-3
    full_lr: float | None = None  # default: lr (same schedule for every arm)
    lora_lr: float | None = None  # default: lr
    batch_size: int = 4
    max_grad_norm: float = 1.0  # 0 = no clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear (decay to 0 at the last step), after warm-up
    weight_decay: float = 0.0  # full / lora arms only; neuron slices always use 0
    betas: tuple[float, float] = (0.9, 0.999)
    n_random: int = 3
    random_exclude: bool = True  # random control sets avoid the located neurons
    seed: int = 0
    lora_r: int = 8
    lora_alpha: float = 16.0
    chat: bool = False
    max_length: int | None = None
    eval_batch_size: int = 8
    metrics: tuple[str, ...] = ("nll",)
    save_adapters: bool = True

    def __post_init__(self):
        if isinstance(self.arms, str):
            self.arms = tuple(a.strip() for a in self.arms.split(",") if a.strip())
        self.arms = tuple(self.arms)
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise CaplocError(f"unknown arm(s) {', '.join(bad) or '(none)'}; use a comma list of {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise CaplocError(f"arms {','.join(self.arms)} list an arm twice; name each once")
        for name in ("steps", "batch_size", "eval_batch_size", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise CaplocError(f"{name}={v!r} must be a positive integer")
        if "random" in self.arms and (not isinstance(self.n_random, int) or self.n_random < 1):
            raise CaplocError(f"n_random={self.n_random!r}: the random arm needs at least 1 seed (--n-random 3)")
        for name in ("lr", "full_lr", "lora_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CaplocError(f"{name}={v!r} must be a positive number")
        if self.max_grad_norm < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise CaplocError("max_grad_norm, weight_decay and warmup_steps must be >= 0")
        if self.schedule not in ("constant", "linear"):
            raise CaplocError(f"schedule={self.schedule!r}; use constant or linear")
        self.metrics = tuple(self.metrics) if not isinstance(self.metrics, str) else (self.metrics,)

    def arm_lr(self, arm: str) -> float:
        if arm == "full" and self.full_lr is not None:
            return float(self.full_lr)
        if arm == "lora" and self.lora_lr is not None:
            return float(self.lora_lr)
        return float(self.lr)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["arms"], d["metrics"], d["betas"] = list(self.arms), list(self.metrics), list(self.betas)
        return d


def split_for_finetune(ds, n_train: int, n_eval: int, seed: int = 0, template_fraction: float = 0.3,
                       exclude=None) -> dict:
    """Train / held-out splits of one dataset: ``{"train", "heldout", "heldout_templates"}``.

    Groups (templates) are shuffled with ``seed`` and taken into the held-out-template pool until it holds about
    ``template_fraction`` of the samples (at least ``n_eval``); ``train`` (n_train) and ``heldout`` (n_eval) are
    disjoint random samples of the remaining (seen) templates, and ``heldout_templates`` (n_eval) a random sample of
    the pool. ``exclude`` (e.g. the dataset the neurons were localized on): its templates never go to the pool and its
    prompts never appear in the held-out parts (they may be trained on). Without 2 usable groups there is no
    ``heldout_templates`` part.
    """
    from .data.core import Dataset

    for name, v in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CaplocError(f"{name}={v!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    items = list(ds)
    ex_prompts = {s.prompt for s in exclude} if exclude is not None else set()
    ex_groups = {s.group for s in exclude} if exclude is not None else set()
    by_group: dict = {}
    for i, s in enumerate(items):
        by_group.setdefault(s.group, []).append(i)
    keys = sorted(by_group, key=lambda g: (g is None, str(g)))
    keys = [keys[j] for j in rng.permutation(len(keys))]
    pool_groups: list = []
    if len(keys) >= 2:
        want = max(n_eval, template_fraction * len(items))
        count = 0
        for g in keys:
            if count >= want or len(pool_groups) == len(keys) - 1:
                break
            if g in ex_groups:
                continue
            fresh = [i for i in by_group[g] if items[i].prompt not in ex_prompts]
            if fresh:
                pool_groups.append(g)
                count += len(fresh)
    out: dict = {}
    pool_set = set(pool_groups)
    if pool_groups:
        pool = [i for g in pool_groups for i in by_group[g] if items[i].prompt not in ex_prompts]
        if len(pool) < n_eval:
            raise CaplocError(f"only {len(pool)} samples of held-out templates in {ds.name} for n_eval={n_eval}; "
                              "load more samples or lower --n-eval")
        pick = sorted(rng.choice(pool, size=n_eval, replace=False).tolist())
        out["heldout_templates"] = Dataset(f"{ds.name}:heldout_templates", [items[i] for i in pick],
                                           {**ds.source, "split": "heldout_templates", "seed": seed,
                                            "groups": [str(g) for g in pool_groups]})
    else:
        log.info("%s has fewer than 2 usable groups: no held-out-template split", ds.name)
    seen = [i for i, s in enumerate(items) if s.group not in pool_set]
    perm = [seen[j] for j in rng.permutation(len(seen))]
    train_idx = perm[:n_train]
    rest = [i for i in perm[n_train:] if items[i].prompt not in ex_prompts]
    if len(train_idx) < n_train or len(rest) < n_eval:
        raise CaplocError(f"{ds.name} has {len(seen)} samples of the training templates, fewer than n_train + n_eval = "
                          f"{n_train + n_eval} (after excluding localization prompts); load more samples or lower "
                          "--n-train/--n-eval")
    train_prompts = {items[i].prompt for i in train_idx}
    held = [i for i in rest if items[i].prompt not in train_prompts][:n_eval]
    out["train"] = Dataset(f"{ds.name}:train", [items[i] for i in sorted(train_idx)],
                           {**ds.source, "split": "train", "seed": seed})
    out["heldout"] = Dataset(f"{ds.name}:heldout", [items[i] for i in sorted(held)],
                             {**ds.source, "split": "heldout", "seed": seed})
    return {k: out[k] for k in ("train", "heldout", "heldout_templates") if k in out}


def collate(encoded: Sequence, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``/``attention_mask`` [B, T] and ``target_mask`` [B, T] (True on target tokens)."""
    T = max(len(e.input_ids) for e in encoded)
    B = len(encoded)
    ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    tgt = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        att[b, :n] = 1
        tgt[b, e.prompt_len:n] = True
    out = {"input_ids": ids, "attention_mask": att, "target_mask": tgt}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def target_nll(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL over target tokens and their count. logits [B, T, V]; the token at t is predicted at t - 1; only
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


def _lr_lambda(cfg: FinetuneConfig):
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
    from tqdm.auto import tqdm

    params = [p for p in params if p.requires_grad]
    if not params:
        raise CaplocError("nothing to train: no parameter requires grad")
    lr = cfg.lr if lr is None else lr
    opt = torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    order = batch_order(len(encoded), cfg.steps, cfg.batch_size, cfg.seed)
    device = next(model.parameters()).device
    losses, times, cpu = [], [], []
    was_training = model.training
    model.eval()  # dropout off: arms differ only in which parameters move
    t_all = time.perf_counter()
    ctx = context() if context is not None else contextlib.nullcontext()
    try:
        with ctx, torch.enable_grad():
            for step, idx in enumerate(tqdm(order, desc=desc, unit="step", leave=False, disable=progress is False
                                            if progress is not None else None)):
                t0, c0 = time.perf_counter(), time.process_time()
                batch = collate([encoded[i] for i in idx], pad_id, device)
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                nll, ntok = target_nll(out.logits, batch)
                loss = nll / ntok.clamp(min=1)
                if not torch.isfinite(loss):
                    raise CaplocError(f"{desc}: the loss became {loss.item()} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
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
    log.info("%s: %d steps, loss %.4f -> %.4f, %.1f s", desc, cfg.steps, losses[0], losses[-1], tl.seconds)
    opt.zero_grad(set_to_none=True)
    if return_optimizer:
        return tl, opt
    del opt
    return tl


def train_adapter(lm, adapter: NeuronAdapter, train_ds, cfg: FinetuneConfig, *, desc: str = "neurons",
                  progress: bool | None = None, return_optimizer: bool = False):
    """Train ``adapter``'s deltas on ``train_ds`` (base weights frozen and never written)."""
    from .data import encode_dataset
    from .hooks import frozen

    model, _, _ = _unwrap(lm)
    encoded = encode_dataset(lm.tokenizer, train_ds, chat=cfg.chat, max_length=cfg.max_length)
    with frozen(model):
        return train(model, list(adapter.deltas.values()), encoded, cfg, lr=cfg.arm_lr("neurons"), weight_decay=0.0,
                     pad_id=_pad_id(lm.tokenizer), desc=desc, context=lambda: adapter.applied(model),
                     progress=progress, return_optimizer=return_optimizer)


def _pad_id(tok) -> int:
    pid = getattr(tok, "pad_token_id", None)
    if pid is None:
        pid = getattr(tok, "eos_token_id", None)
    return int(pid or 0)


# ---------------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ArmResult:
    name: str  # neurons | random-s<seed> | full | lora
    kind: str  # neurons | random | full | lora
    seed: int | None
    lr: float
    n_trainable: int
    n_optimizer_state: int
    losses: list[float]
    seconds: float
    step_seconds_median: float
    eval: dict  # dataset -> {"nll": per-token NLL after, "delta": after - before, "accuracy": ..., ...}
    adapter_dir: str | None = None
    n_neurons: int | None = None


@dataclass
class FinetuneResult:
    config: dict
    arms: list[ArmResult]
    untuned: dict  # dataset -> {"nll": ..., "accuracy": ...}
    datasets: dict  # dataset -> {"role": on|off|train, "n": .., "fingerprint": ..}
    comparisons: dict  # dataset -> compare_to_null(...) of the neuron arm vs random arms, + paired CI
    specificity: dict
    claims: dict
    meta: dict
    per_sample: dict = field(default_factory=dict, repr=False)  # "arm|dataset" -> np.ndarray [n] per-sample NLL
    out_dir: str | None = None

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("config", "untuned", "datasets", "comparisons", "specificity", "claims",
                                            "meta")}
        d["arms"] = [asdict(a) for a in self.arms]
        d["kind"] = "finetune_result"
        d["caploc_version"] = __version__
        return d

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "results.json", self.to_json())
        tensors = {f"loss|{a.name}": torch.tensor(a.losses, dtype=torch.float64) for a in self.arms}
        tensors.update({f"nll|{k}": torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in self.per_sample.items()})
        atomic_save_tensors(out_dir / "curves.safetensors", tensors)
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "FinetuneResult":
        from .results import read_result

        out_dir = Path(out_dir)
        d, t = read_result(out_dir, "results.json", "finetune_result", "finetune result", "curves.safetensors",
                           tensors_required=False)
        per = {k[4:]: v.numpy() for k, v in t.items() if k.startswith("nll|")}
        return cls(config=d["config"], arms=[ArmResult(**a) for a in d["arms"]], untuned=d["untuned"],
                   datasets=d["datasets"], comparisons=d["comparisons"], specificity=d["specificity"],
                   claims=d["claims"], meta=d["meta"], per_sample=per, out_dir=str(out_dir))


# ---------------------------------------------------------------------------------------------------------------------
# evaluation glue
# ---------------------------------------------------------------------------------------------------------------------
def _evaluate_sets(lm, eval_sets: Mapping[str, Any], cfg: FinetuneConfig, progress) -> dict[str, dict]:
    from . import evaluate as ev

    out = {}
    for name, ds in eval_sets.items():
        r = ev.evaluate(lm, ds, metrics=cfg.metrics, chat=cfg.chat, batch_size=cfg.eval_batch_size,
                        max_length=cfg.max_length, progress=progress)
        row = {"nll": float(r.nll_per_token)}
        per = getattr(r, "nll_per_sample", None)
        if per is not None:
            row["_per_sample"] = np.asarray(torch.as_tensor(per).double().cpu().numpy() if torch.is_tensor(per) else per,
                                            dtype=np.float64)
        acc = getattr(r, "accuracy", None)
        if acc is not None and "accuracy" in cfg.metrics:
            row["accuracy"] = float(acc)
        out[name] = row
    return out


def _replica(lm, model: nn.Module):
    """A LoadedModel-like view of ``lm`` with another model object (same tokenizer, layout, provenance)."""
    from .models.layouts import Site

    return dataclasses.replace(lm, model=model, site=Site(model, lm.site.layout),
                               info={**lm.info, "fingerprint": None, "variant": "finetuned"})


def _lora_targets(site) -> list[str]:
    model = site.model
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for l in range(site.n_layers):
        out.append(names[id(site.out_projs[l])])
        out += [names[id(m)] for m in site.in_projs[l]]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------------------------------
class _Checkpoints:
    """Finished arms as ``<name>.json`` (written last: the commit marker) + ``<name>.safetensors`` (per-sample NLL)."""

    def __init__(self, root: Path | None, key: str, overwrite: bool):
        self.root, self.key, self.overwrite = root, key, overwrite

    def get(self, name: str):
        if self.root is None:
            return None
        j = self.root / f"{name}.json"
        if not j.exists():
            return None
        d = read_json(j)
        if d.get("key") != self.key:
            if self.overwrite:
                return None
            raise CaplocError(f"{self.root.parent} holds fine-tuning results of another configuration (model, data, "
                              "neurons or settings); use a new --out directory or pass --overwrite")
        from safetensors.torch import load_file

        t = self.root / f"{name}.safetensors"
        ps = {k: v.numpy() for k, v in load_file(str(t)).items()} if t.exists() else {}
        return d["value"], ps

    def put(self, name: str, value, per_sample: dict) -> None:
        if self.root is None:
            return
        if per_sample:
            atomic_save_tensors(self.root / f"{name}.safetensors",
                                {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in per_sample.items()})
        atomic_write_json(self.root / f"{name}.json", {"key": self.key, "value": value})


def finetune(lm, neurons: NeuronSet | None, train_ds, cfg: FinetuneConfig | None = None,
             out_dir: Path | str | None = None, *, eval_sets: Mapping[str, Any] | None = None,
             on_target: Sequence[str] | None = None, progress: bool | None = None,
             overwrite: bool = False) -> FinetuneResult:
    """Fine-tune the arms of ``cfg`` and evaluate each before/after on ``eval_sets``.

    ``eval_sets``: {name: Dataset}; ``on_target``: names of the in-domain sets (default: names containing the
    training set's base name, or all if none do); the others are off-target (specificity, issue 9.1). ``neurons``
    is required by the ``neurons`` and ``random`` arms. The model ``lm`` is left bit-identical (adapters use hooks,
    ``full``/``lora`` train a copy). Writes ``out_dir`` (adapter/, results.json, curves.safetensors, report.json and
    figures) when given; every finished arm is checkpointed in ``out_dir/arms/``, so rerunning the same command
    resumes (a different configuration in the same directory is refused unless ``overwrite``).
    """
    from .data import encode_dataset
    from .hooks import frozen
    from .stats import random_layer_matched_set

    cfg = cfg or FinetuneConfig()
    model, site, info = _unwrap(lm)
    if any(a in cfg.arms for a in ("neurons", "random")):
        if neurons is None:
            raise CaplocError("the neurons and random arms need a neuron set: pass --neurons DIR "
                              "(or use --arms full,lora)")
        neurons.check_compatible(site)
        if len(neurons) == 0:
            raise CaplocError("the neuron set is empty: relocalize with a lower threshold (e.g. --min-freq)")
    if len(train_ds) == 0:
        raise CaplocError("the training set is empty; pass --n-train 1 or more")
    eval_sets = dict(eval_sets or {})
    base_name = str(train_ds.name).split(":")[0].split("[")[0]
    if on_target is None:
        on_target = [n for n in eval_sets if n.split(":")[0].split("[")[0] == base_name] or list(eval_sets)
    roles = {n: ("on" if n in on_target else "off") for n in eval_sets}
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    encoded = encode_dataset(lm.tokenizer, train_ds, chat=cfg.chat, max_length=cfg.max_length)
    pad_id = _pad_id(lm.tokenizer)
    n_total = sum(p.numel() for p in model.parameters())
    t_start = time.time()

    # per-arm checkpoints: an interrupted run resumes with its finished arms (same configuration only)
    from .results import config_key

    run_key = config_key({
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("save_adapters", "eval_batch_size")},
        "model": _fingerprint(model, info), "train": train_ds.fingerprint(),
        "eval": {n: ds.fingerprint() for n, ds in eval_sets.items()}, "on_target": sorted(on_target),
        "neurons": None if neurons is None else neurons.flat.tolist(),
    })
    ckpt = _Checkpoints(out_path / "arms" if out_path is not None else None, run_key, overwrite)
    per_sample: dict[str, np.ndarray] = {}

    def split_per_sample(name: str, ev: dict) -> dict:
        out = {}
        for dname, row in ev.items():
            row = dict(row)
            if "_per_sample" in row:
                per_sample[f"{name}|{dname}"] = row.pop("_per_sample")
            out[dname] = row
        return out

    got = ckpt.get("untuned")
    if got is not None:
        untuned, ps = got
        per_sample.update(ps)
        log.info("reusing the untuned evaluation from %s", ckpt.root)
    else:
        log.info("evaluating the untuned model on %d sets", len(eval_sets))
        untuned = split_per_sample("untuned", _evaluate_sets(lm, eval_sets, cfg, progress))
        ckpt.put("untuned", untuned, {k: v for k, v in per_sample.items() if k.startswith("untuned|")})

    arms: list[ArmResult] = []
    skipped: dict[str, str] = {}

    def resume(name: str) -> bool:
        got = ckpt.get(name)
        if got is None:
            return False
        d, ps = got
        arms.append(ArmResult(**d))
        per_sample.update(ps)
        log.info("reusing finished arm %s from %s", name, ckpt.root)
        return True

    def record(name, kind, seed, tl: TrainLog, ev: dict, adapter_dir=None, n_neurons=None):
        evr = {}
        for dname, r in split_per_sample(name, ev).items():
            r["delta"] = r["nll"] - untuned[dname]["nll"]
            if "accuracy" in r and "accuracy" in untuned[dname]:
                r["delta_accuracy"] = r["accuracy"] - untuned[dname]["accuracy"]
            evr[dname] = r
        arm = ArmResult(name, kind, seed, tl.lr, tl.n_trainable, tl.n_optimizer_state, tl.losses, tl.seconds,
                        float(np.median(tl.step_seconds)), evr, adapter_dir, n_neurons)
        arms.append(arm)
        ckpt.put(name, asdict(arm), {k: v for k, v in per_sample.items() if k.startswith(f"{name}|")})

    def adapter_arm(name, kind, seed, nset):
        if resume(name):
            return
        ad = NeuronAdapter(lm, nset)
        with frozen(model):
            tl = train(model, list(ad.deltas.values()), encoded, cfg, lr=cfg.arm_lr(kind), weight_decay=0.0,
                       pad_id=pad_id, desc=name, context=lambda: ad.applied(model), progress=progress)
            with ad.applied(model):
                ev = _evaluate_sets(lm, eval_sets, cfg, progress)
        adir = None
        if out_path is not None and cfg.save_adapters:
            adir = str(out_path / ("adapter" if kind == "neurons" else f"adapters/{name}"))
            ad.save(adir, extra={"arm": name, "train_dataset": train_ds.name,
                                 "train_fingerprint": train_ds.fingerprint(), "finetune_config": cfg.to_dict()})
        record(name, kind, seed, tl, ev, adir, ad.n_neurons)

    def copy_arm(name: str, run) -> None:
        """full / lora: train a copy of the model; out of memory skips the arm (recorded) instead of failing."""
        if resume(name):
            return
        try:
            run()
        except (torch.OutOfMemoryError, RuntimeError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, torch.OutOfMemoryError) and "memory" not in text.lower():
                raise
            skipped[name] = f"out of memory: {text[:200]}"
            log.warning("arm %s skipped: %s", name, skipped[name])

    if "neurons" in cfg.arms:
        adapter_arm("neurons", "neurons", None, neurons)
    random_seeds = []
    if "random" in cfg.arms:
        sizes = neurons.per_layer_counts()
        for j in range(cfg.n_random):
            seed = cfg.seed + 1000 + j
            random_seeds.append(seed)
            flat = random_layer_matched_set(sizes, site.d_mlp, seed,
                                            exclude=neurons.flat if cfg.random_exclude else None)
            rset = NeuronSet.from_flat(flat, site.n_layers, site.d_mlp)
            adapter_arm(f"random-s{seed}", "random", seed, rset)

    def run_full():
        replica = copy.deepcopy(model)
        try:
            for p in replica.parameters():
                p.requires_grad_(True)
            tl = train(replica, list(replica.parameters()), encoded, cfg, lr=cfg.arm_lr("full"),
                       weight_decay=cfg.weight_decay, pad_id=pad_id, desc="full", progress=progress)
            with torch.no_grad():
                ev = _evaluate_sets(_replica(lm, replica), eval_sets, cfg, progress)
        finally:
            del replica
        record("full", "full", None, tl, ev)

    def run_lora():
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise CaplocError("the lora arm needs peft: pip install 'caploc[peft]' (or drop lora from --arms)") from None
        torch.manual_seed(cfg.seed)
        replica = copy.deepcopy(model)
        try:
            targets = _lora_targets(_replica(lm, replica).site)
            lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                              target_modules=targets, fan_in_fan_out=bool(site.layout.conv1d))
            peft_model = get_peft_model(replica, lcfg)
            tl = train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], encoded, cfg,
                       lr=cfg.arm_lr("lora"), weight_decay=cfg.weight_decay, pad_id=pad_id, desc="lora",
                       progress=progress)
            merged = peft_model.merge_and_unload()
            with torch.no_grad():
                ev = _evaluate_sets(_replica(lm, merged), eval_sets, cfg, progress)
        finally:
            del replica
        record("lora", "lora", None, tl, ev)

    if "full" in cfg.arms:
        copy_arm("full", run_full)
    if "lora" in cfg.arms:
        copy_arm("lora", run_lora)

    comparisons, specificity, claims = _compare(arms, untuned, roles, per_sample)
    meta = {
        "model_id": info.get("model_id"), "model_type": site.model_type, "model_fingerprint": info.get("fingerprint"),
        "n_params": int(n_total), "n_layers": site.n_layers, "d_mlp": site.d_mlp,
        "params_per_neuron": site.params_per_neuron(),
        "neurons": None if neurons is None else {"n": len(neurons), "per_layer": neurons.per_layer_counts().tolist(),
                                                 "source": neurons.meta.get("dataset"), "method": neurons.meta.get("method"),
                                                 "model_fingerprint": neurons.meta.get("model_fingerprint")},
        "train": {"name": train_ds.name, "n": len(train_ds), "fingerprint": train_ds.fingerprint(),
                  "source": train_ds.source},
        "random_seeds": random_seeds, "seconds": round(time.time() - t_start, 1), "caploc_version": __version__,
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
        "torch_threads": torch.get_num_threads(), "skipped_arms": skipped,
    }
    datasets = {n: {"role": roles[n], "n": len(ds), "fingerprint": ds.fingerprint()} for n, ds in eval_sets.items()}
    res = FinetuneResult(cfg.to_dict(), arms, untuned, datasets, comparisons, specificity, claims, meta, per_sample,
                         str(out_path) if out_path is not None else None)
    if out_path is not None:
        res.save(out_path)
        write_report(res, out_path)
    return res


def _compare(arms: list[ArmResult], untuned: dict, roles: dict, per_sample: dict) -> tuple[dict, dict, dict]:
    """Neuron arm vs the random arms' distribution per dataset, paired per-sample CI, specificity, claims."""
    from .stats import bootstrap_ci, compare_to_null

    by = {a.name: a for a in arms}
    rnd = [a for a in arms if a.kind == "random"]
    comparisons: dict = {}
    specificity: dict = {}
    claims: dict = {}
    neu = by.get("neurons")
    if neu is None:
        return comparisons, specificity, claims
    for d in untuned:
        c: dict = {"role": roles.get(d), "delta_neurons": neu.eval[d]["delta"]}
        if rnd:
            c.update(compare_to_null(neu.eval[d]["delta"], [a.eval[d]["delta"] for a in rnd]))
            c["random_deltas"] = [a.eval[d]["delta"] for a in rnd]
            c["better_than_all_random"] = bool(neu.eval[d]["delta"] < min(c["random_deltas"]))
        a, b = per_sample.get(f"neurons|{d}"), per_sample.get(f"untuned|{d}")
        if a is not None and b is not None and len(a) == len(b):
            est, lo, hi = bootstrap_ci(np.asarray(a) - np.asarray(b), seed=0)
            c["paired_delta_per_sample_mean"] = {"value": est, "ci": [lo, hi]}
        comparisons[d] = c
    on = [d for d in untuned if roles.get(d) == "on"]
    off = [d for d in untuned if roles.get(d) == "off"]

    def spec_index(arm: ArmResult) -> float | None:
        if not on or not off:
            return None
        return float(np.mean([arm.eval[d]["delta"] for d in on]) - np.mean([arm.eval[d]["delta"] for d in off]))

    if on:
        main = on[0]
        c = comparisons[main]
        claims["finetune_beats_random"] = {
            "value": c["delta_neurons"], "dataset": main, "metric": "delta NLL/token (after - before; < 0 = better)",
            "null_mean": c.get("null_mean"), "null_sd": c.get("null_sd"), "z": c.get("z"),
            "p": c.get("p_two_sided"), "n_null": c.get("n_null"),
            "beats": c.get("better_than_all_random") if rnd else None,
        }
        if "full" in by:
            f = by["full"].eval[main]["delta"]
            claims["neurons_share_of_full_gain"] = {
                "value": (c["delta_neurons"] / f) if f else None, "dataset": main,
                "params_share": neu.n_trainable / max(1, by["full"].n_trainable)}
    si = spec_index(neu)
    if si is not None:
        specificity = {"on_target": on, "off_target": off, "index_neurons": si,
                       "definition": "mean ΔNLL on on-target sets − mean ΔNLL on off-target sets (more negative = "
                                     "more specific improvement)",
                       "per_arm": {a.name: spec_index(a) for a in arms}}
        if rnd:
            specificity["vs_random"] = compare_to_null(si, [spec_index(a) for a in rnd])
        claims["finetune_specific"] = {"value": si, **({"null_mean": specificity["vs_random"]["null_mean"],
                                                       "z": specificity["vs_random"]["z"],
                                                       "p": specificity["vs_random"]["p_two_sided"]} if rnd else {})}
        off_d = [neu.eval[d]["delta"] for d in off]
        claims["finetune_off_target_delta"] = {"value": float(np.mean(off_d)), "datasets": off}
    return comparisons, specificity, claims


# ---------------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------------
def _fmt(x, nd=4):
    if x is None:
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return round(float(x), nd)


def _save_fig(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_report(res: FinetuneResult, out_dir: Path | str) -> dict:
    """``report.json`` (+ ``fig_loss.png``, ``fig_delta.png``) per docs/DEVELOPING.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    dsets = list(res.untuned)
    rnd = [a for a in res.arms if a.kind == "random"]
    rows = [["untuned", 0, "-", *[_fmt(res.untuned[d]["nll"]) for d in dsets], None]]
    delta_rows = []
    for a in res.arms:
        rows.append([a.name, a.n_trainable, a.lr, *[_fmt(a.eval[d]["nll"]) for d in dsets], _fmt(a.losses[-1])])
        delta_rows.append([a.name, a.n_trainable, a.lr, *[_fmt(a.eval[d]["delta"]) for d in dsets],
                           _fmt(a.losses[0]), _fmt(a.losses[-1]), _fmt(a.step_seconds_median, 3)])
    if rnd:
        m = [float(np.mean([a.eval[d]["delta"] for a in rnd])) for d in dsets]
        s = [float(np.std([a.eval[d]["delta"] for a in rnd], ddof=1)) if len(rnd) > 1 else 0.0 for d in dsets]
        delta_rows.append([f"random mean ± sd (n={len(rnd)})", rnd[0].n_trainable, rnd[0].lr,
                           *[f"{mm:+.4f} ± {ss:.4f}" for mm, ss in zip(m, s)], None, None, None])
    role = {d: res.datasets.get(d, {}).get("role", "?") for d in dsets}
    cols = [f"{d} ({role[d]})" for d in dsets]
    tables = [
        {"title": "ΔNLL per target token after fine-tuning (after − untuned; negative = better)",
         "columns": ["arm", "trainable params", "lr", *cols, "train loss first", "train loss last", "s/step"],
         "rows": delta_rows,
         "note": f"{res.config['steps']} steps, batch {res.config['batch_size']}, same data order (seed "
                 f"{res.config['seed']}), grad clip {res.config['max_grad_norm']}, schedule {res.config['schedule']}; "
                 "random arms = layer-matched random neuron sets (seeds in meta)."},
        {"title": "NLL per target token (absolute)", "columns": ["arm", "trainable params", "lr", *cols,
                                                                 "train loss last"], "rows": rows},
    ]
    if res.comparisons:
        crow = []
        for d, c in res.comparisons.items():
            ci = c.get("paired_delta_per_sample_mean")
            crow.append([d, c.get("role"), _fmt(c["delta_neurons"]), _fmt(c.get("null_mean")), _fmt(c.get("null_sd")),
                         _fmt(c.get("z"), 2), _fmt(c.get("percentile"), 3), _fmt(c.get("p_two_sided"), 3),
                         c.get("n_null"), None if ci is None else f"[{ci['ci'][0]:+.4f}, {ci['ci'][1]:+.4f}]"])
        tables.append({"title": "Neuron arm vs random-neuron arms (per dataset)",
                       "columns": ["dataset", "role", "ΔNLL neurons", "random mean", "random sd", "z", "percentile",
                                   "p (two-sided, empirical)", "n random", "95% CI of per-sample ΔNLL (neurons)"],
                       "rows": crow,
                       "note": "p has a floor of 1/(n_random+1); the per-sample CI is a paired bootstrap vs untuned "
                               "(per-sample NLL as defined by caploc.evaluate)."})
    if res.specificity:
        sp = res.specificity
        srow = [[k, _fmt(v)] for k, v in sp["per_arm"].items()]
        tables.append({"title": "Specificity: mean ΔNLL on-target − mean ΔNLL off-target",
                       "columns": ["arm", "specificity index"], "rows": srow,
                       "note": f"on-target: {', '.join(sp['on_target'])}; off-target: {', '.join(sp['off_target'])}. "
                               + (f"neurons vs random: z = {_fmt(sp['vs_random']['z'], 2)}, "
                                  f"p = {_fmt(sp['vs_random']['p_two_sided'], 3)}" if 'vs_random' in sp else "")})

    figures = []
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for a in res.arms:
        style = dict(color="0.6", lw=0.8, alpha=0.8) if a.kind == "random" else dict(lw=1.8)
        lab = a.name if a.kind != "random" or a is rnd[0] else None
        if a.kind == "random" and lab:
            lab = f"random (n={len(rnd)})"
        ax.plot(range(1, len(a.losses) + 1), a.losses, label=lab, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (NLL/target token, before the step)")
    ax.legend(fontsize=8)
    ax.set_title("Training loss per arm")
    _save_fig(fig, out_dir / "fig_loss.png")
    plt.close(fig)
    figures.append({"title": "Training loss", "file": "fig_loss.png",
                    "caption": "Mean NLL per target token of each step's batch (same batches for every arm)."})

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(dsets)), 4))
    names = [a.name for a in res.arms if a.kind != "random"] + (["random"] if rnd else [])
    width = 0.8 / max(1, len(names))
    for j, nm in enumerate(names):
        if nm == "random":
            vals = [float(np.mean([a.eval[d]["delta"] for a in rnd])) for d in dsets]
            err = [float(np.std([a.eval[d]["delta"] for a in rnd], ddof=1)) if len(rnd) > 1 else 0.0 for d in dsets]
        else:
            vals, err = [res.arm(nm).eval[d]["delta"] for d in dsets], None
        ax.bar(np.arange(len(dsets)) + j * width, vals, width, yerr=err, label=nm, capsize=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(np.arange(len(dsets)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels([f"{d.replace(':', ':' + chr(10))}\n({role[d]})" for d in dsets], fontsize=7)
    ax.set_ylabel("ΔNLL / token (after − untuned)")
    ax.legend(fontsize=8)
    _save_fig(fig, out_dir / "fig_delta.png")
    plt.close(fig)
    figures.append({"title": "ΔNLL per arm and dataset", "file": "fig_delta.png",
                    "caption": "Negative = fine-tuning lowered the NLL of gold targets; random bars = mean ± sd."})

    text = [
        f"Fine-tuned {res.meta.get('model_id')} on {res.meta['train']['name']} ({res.meta['train']['n']} samples) for "
        f"{res.config['steps']} AdamW steps (batch {res.config['batch_size']}, lr {res.config['lr']}) per arm: "
        + ", ".join(f"{a.name} ({a.n_trainable:,} trainable)" for a in res.arms) + ".",
        "Neuron arms train deltas for the selected neurons' parameter slices only (weights untouched; weight decay 0). "
        "The untouched model is the baseline (ΔNLL = 0); random arms give the chance level for the same number of "
        "neurons per layer.",
    ]
    if "finetune_beats_random" in res.claims:
        c = res.claims["finetune_beats_random"]
        text.append(f"On {c['dataset']}: ΔNLL neurons = {c['value']:+.4f} vs random mean "
                    f"{c['null_mean'] if c['null_mean'] is None else format(c['null_mean'], '+.4f')} "
                    f"(z = {c['z'] if c['z'] is None else format(c['z'], '.2f')}, p = {c['p']}, n = {c['n_null']}); "
                    f"better than every random set: {c['beats']}.")
    report = {"kind": "finetune", "title": f"Neuron-only fine-tuning on {res.meta['train']['name']}",
              "text": text, "tables": tables, "figures": figures, "claims": res.claims}
    atomic_write_json(out_dir / "report.json", report)
    return report


__all__ = [
    "ARMS", "ArmResult", "FinetuneConfig", "FinetuneResult", "NeuronAdapter", "SliceSpec", "TrainLog", "batch_order",
    "collate", "finetune", "optimizer_state_numel", "split_for_finetune", "target_nll", "train", "train_adapter",
    "write_report", "merge_to_dir",
]


def merge_to_dir(adapter_dir: Path | str, out_dir: Path | str, *, model: str | None = None, dtype: str = "float32",
                 device: str = "cpu", layout: str | None = None) -> Path:
    """Load the adapter's base model, merge the adapter into its weights and ``save_pretrained`` model + tokenizer to
    ``out_dir`` (atomically), so plain ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    import shutil

    from .models.loading import load_model

    meta = NeuronAdapter.read_meta(adapter_dir)
    name = model or meta.get("model_id")
    if not name:
        raise CaplocError(f"{adapter_dir} does not record its base model; pass --model")
    lm = load_model(name, dtype=dtype, device=device, layout=layout)
    ad = NeuronAdapter.load(adapter_dir, lm)
    ad.merge(lm.model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        m = lm.model
        if getattr(m, "hf_quantizer", None) is not None:
            m.hf_quantizer = None
            if hasattr(m.config, "quantization_config"):
                del m.config.quantization_config
        m.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "caploc_merge.json", {"adapter": str(Path(adapter_dir).resolve()), "base_model": name,
                                                      "base_fingerprint": meta.get("model_fingerprint"),
                                                      "n_neurons": meta.get("n_neurons"),
                                                      "caploc_version": __version__})
        if out_dir.exists():
            if any(out_dir.iterdir()):
                raise CaplocError(f"{out_dir} exists and is not empty; choose a new --out directory")
            out_dir.rmdir()
        os.chmod(tmp, 0o755)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged %d-neuron adapter into %s -> %s", ad.n_neurons, name, out_dir)
    return out_dir
