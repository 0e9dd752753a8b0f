"""The neuron-only adapter: trainable deltas for the parameter slices that belong to selected MLP neurons.

A neuron ``(layer, i)`` owns (``Site.neuron_slices``) column ``i`` of the output projection (row ``i`` for GPT-2's
transposed ``Conv1D``), row ``i`` of every input projection (rows ``i`` and ``d_mlp + i`` of Phi-3's fused
``gate_up_proj``) and the matching bias entries. :class:`NeuronAdapter` holds one trainable *delta* tensor per slice,
of exactly the sliced shape, so trainable parameters, gradients and optimizer state exist for those slices only
(not a masked gradient over whole matrices). The base weights are never written during training: the deltas are added
in the forward pass by hooks (``applied``), using the low-rank form of the update

* output projection, input-feature slice ``c``:   ``y += x[..., c] @ Δᵀ``          (Δ: ``[d_model, k]``)
* input projection, output-feature slice ``r``:   ``y[..., r] += x @ Δᵀ + Δb``     (Δ: ``[k, d_model]``)

which costs ``O(k)`` per token instead of a dense ``W + scatter(Δ)``. ``merge`` writes ``W[slice] += Δ`` into the
weights and keeps the original slice values, so ``unmerge`` restores them bit for bit. A merge is recorded in the
model's config (:data:`MERGED_ATTR`: the content ids of the merged adapters, saved with ``save_pretrained``) and in
``lm.info["merged_adapters"]``, and refreshes ``lm.info["fingerprint"]`` (:func:`caploc.models.model_fingerprint`
of the merged weights and config): a merged model gets a new fingerprint, the same one after a save/load round trip,
and the record alone tells a merge apart even where the weights did not move (an all-zero adapter). Merging the same
adapter twice into the same weights is refused; unmerging follows the reverse order of merging.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ... import __version__
from ...errors import CaplocError, IncompatibleResultError
from ...models.fingerprint import model_fingerprint
from ...models.layouts import Site
from ...models.loading import load_model
from ...results import NeuronSet, atomic_save_tensors, atomic_write_json, read_json

log = logging.getLogger(__name__)

ADAPTER_FORMAT = 1
#: attribute of a model holding the content ids of the adapters merged into its weights (in merge order)
MERGED_ATTR = "caploc_merged_adapters"


def unwrap(lm_or_model) -> tuple[nn.Module, Any, dict]:
    """(model, site, info) from a LoadedModel or a bare HF model (``info`` is a copy)."""
    if hasattr(lm_or_model, "model") and hasattr(lm_or_model, "site"):
        return lm_or_model.model, lm_or_model.site, dict(getattr(lm_or_model, "info", {}) or {})
    if isinstance(lm_or_model, nn.Module):
        return lm_or_model, Site(lm_or_model), {}
    raise CaplocError(f"expected a LoadedModel or a torch model, got {type(lm_or_model).__name__}")


def fingerprint_of(model: nn.Module, info: dict) -> str:
    """The recorded fingerprint of a loaded model, else the fingerprint of its weights."""
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


def layer_indices(neurons, d_mlp: int, n_layers: int) -> dict[int, torch.Tensor]:
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


def _merge_record_holder(model: nn.Module):
    """Where merges are recorded: the HF config (saved with the model, part of its fingerprint), else the module."""
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "to_dict") else model


def merged_ids(model: nn.Module) -> list[str]:
    """Content ids of the adapters merged into ``model``'s weights, in merge order (a copy)."""
    return list(getattr(_merge_record_holder(model), MERGED_ATTR, None) or [])


def _set_merged_ids(model: nn.Module, ids: list[str]) -> None:
    holder = _merge_record_holder(model)
    if ids:
        setattr(holder, MERGED_ATTR, list(ids))
    elif hasattr(holder, MERGED_ATTR):
        delattr(holder, MERGED_ATTR)  # no record at all: the config (and fingerprint) are the unmerged model's


@dataclass
class _Merge:
    """What :meth:`NeuronAdapter.merge` needs to undo itself."""

    model: nn.Module
    originals: dict[str, torch.Tensor]
    adapter_id: str
    lm: Any
    prior_fingerprint: str | None


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
        model, site, info = unwrap(lm_or_model)
        self.n_layers, self.d_mlp, self.d_model = site.n_layers, site.d_mlp, site.d_model
        self.model_type = site.model_type
        self.layout = json.loads(site.layout.to_json())
        self.model_id = info.get("model_id") or getattr(getattr(model, "config", None), "_name_or_path", None)
        self.fingerprint = fingerprint_of(model, info)
        self.base_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        self.indices = layer_indices(neurons, self.d_mlp, self.n_layers)  # {layer: LongTensor [k]} (cpu)
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
        object.__setattr__(self, "_lm", None if lm_or_model is model else lm_or_model)  # its info gets refreshed
        self._merged: dict[int, _Merge] = {}
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
        model = self._model if model is None else unwrap(model)[0]
        if id(model) in self._merged or (merged_ids(model) and self.adapter_id() in merged_ids(model)):
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
    def adapter_id(self) -> str:
        """sha256[:16] of the neuron indices and delta values: the same for the same adapter however it was loaded."""
        h = hashlib.sha256()
        for l, ix in self.indices.items():
            h.update(f"L{l}:{ix.tolist()};".encode())
        for k, d in self.deltas.items():
            h.update(f"{k}:{tuple(d.shape)};".encode())
            h.update(d.detach().to(device="cpu", dtype=torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _target(self, model) -> tuple[nn.Module, Any]:
        """(model, the LoadedModel whose ``info`` describes it, or None)."""
        if model is None:
            return self._model, self._lm
        m = unwrap(model)[0]
        if m is not model:  # a LoadedModel was passed
            return m, model
        return m, (self._lm if self._lm is not None and self._lm.model is m else None)

    @torch.no_grad()
    def merge(self, model: nn.Module | None = None) -> nn.Module:
        """``W[slice] += Δ`` in place (the original slice values are kept, so :meth:`unmerge` is bit-exact).

        Refused when this adapter (same content id, however loaded) is merged into these weights already. The
        model's ``lm.info["fingerprint"]`` is recomputed (the weights changed) and ``lm.info["merged_adapters"]``
        lists the merged adapters' ids."""
        model, lm = self._target(model)
        if id(model) in self._merged:
            raise CaplocError("this adapter is already merged into this model; unmerge it first")
        if id(model) in self._applied:
            raise CaplocError("cannot merge while the adapter is applied with hooks (it would count twice)")
        self.check_model(model)
        aid = self.adapter_id()
        stack = merged_ids(model)
        if aid in stack:
            raise CaplocError(f"adapter {aid} is already merged into this model's weights; merging it again would add "
                              "its deltas twice (unmerge it first or load a fresh model)")
        originals: dict[str, torch.Tensor] = {}
        for s in self.specs:
            p = model.get_parameter(s.param)
            ix = self._positions(s, p.device)
            originals[s.key] = p.index_select(s.dim, ix).clone()
            p.index_add_(s.dim, ix, self.deltas[s.key].detach().to(device=p.device, dtype=p.dtype))
        _set_merged_ids(model, [*stack, aid])
        prior = lm.info.get("fingerprint") if lm is not None else None
        self._merged[id(model)] = _Merge(model, originals, aid, lm, prior)
        if lm is not None:
            lm.info["fingerprint"] = model_fingerprint(model)
            lm.info["merged_adapters"] = merged_ids(model)
        log.debug("merged adapter %s (%d neurons) into the weights", aid, self.n_neurons)
        return model

    @torch.no_grad()
    def unmerge(self, model: nn.Module | None = None) -> nn.Module:
        """Restore the slice values saved by :meth:`merge` (bit-exact) and the fingerprint recorded before it.
        Adapters merged into the same weights are unmerged in the reverse order of merging."""
        model, lm = self._target(model)
        if id(model) not in self._merged:
            raise CaplocError("this adapter is not merged into this model; nothing to unmerge")
        rec = self._merged[id(model)]
        stack = merged_ids(model)
        if stack and stack[-1] != rec.adapter_id:
            raise CaplocError(f"adapter {stack[-1]} was merged after adapter {rec.adapter_id}; unmerge it first "
                              "(unmerge in the reverse order of merging)")
        del self._merged[id(model)]
        for s in self.specs:
            p = model.get_parameter(s.param)
            p.index_copy_(s.dim, self._positions(s, p.device), rec.originals[s.key].to(p.device))
        _set_merged_ids(model, stack[:-1])
        lm = lm if lm is not None else rec.lm
        if lm is not None:
            lm.info["fingerprint"] = rec.prior_fingerprint  # the weights are bit-identical to before the merge
            lm.info["merged_adapters"] = merged_ids(model)
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
        path = Path(path)
        meta = cls.read_meta(path)
        model, site, info = unwrap(lm)
        if (site.n_layers, site.d_mlp, site.d_model) != (meta["n_layers"], meta["d_mlp"], meta["d_model"]):
            raise IncompatibleResultError(
                f"adapter {path} was made for a model with {meta['n_layers']} layers x {meta['d_mlp']} neurons, "
                f"d_model {meta['d_model']} ({meta.get('model_id')}), but this model has {site.n_layers} x "
                f"{site.d_mlp}, d_model {site.d_model}: load {meta.get('model_id')}")
        if site.model_type != meta["model_type"]:
            raise IncompatibleResultError(f"adapter {path} was made for a {meta['model_type']} model "
                                          f"({meta.get('model_id')}), not {site.model_type}: load that model")
        fp = fingerprint_of(model, info)
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


def merge_to_dir(adapter_dir: Path | str, out_dir: Path | str, *, model: str | None = None, dtype: str = "float32",
                 device: str = "cpu", layout: str | None = None) -> Path:
    """Load the adapter's base model, merge the adapter into its weights and ``save_pretrained`` model + tokenizer to
    ``out_dir`` (atomically), so plain ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it."""
    meta = NeuronAdapter.read_meta(adapter_dir)
    name = model or meta.get("model_id")
    if not name:
        raise CaplocError(f"{adapter_dir} does not record its base model; pass --model")
    lm = load_model(name, dtype=dtype, device=device, layout=layout)
    ad = NeuronAdapter.load(adapter_dir, lm)
    ad.merge(lm)
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
                                                      "adapter_id": ad.adapter_id(),
                                                      "merged_fingerprint": lm.info.get("fingerprint"),
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


__all__ = ["ADAPTER_FORMAT", "MERGED_ATTR", "NeuronAdapter", "SliceSpec", "fingerprint_of", "layer_indices",
           "merge_to_dir", "merged_ids", "unwrap"]
