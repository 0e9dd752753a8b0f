"""Exportable enhancement: fold a neuron gain into the weights, or ship it as an IA3-style gain vector / peft adapter.

Scaling neuron i of a layer by g_i (the input of the MLP output projection) is the same function as scaling column i of
the output projection's weight: ``W (g * x) + b = (W diag(g)) x + b``. So an enhanced model can be saved as an ordinary
checkpoint that plain ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads without caploc:

* ``nn.Linear`` (``down_proj``, ``fc_out``, ``dense_4h_to_h``): ``weight[:, i] *= g_i`` (weight is [out, in]);
* HF ``Conv1D`` (GPT-2 ``c_proj``): ``weight[i, :] *= g_i`` (weight is [in, out]).

Biases are untouched. The folded model equals the hooked model up to float rounding (tested <= 1e-5 on logits).

:func:`export_enhanced` writes into ``out_dir`` (built in a temp dir beside it and renamed into place):

* the folded model + tokenizer (``save_pretrained``) and ``caploc_export.json`` (provenance);
* ``gains.safetensors`` ``{"layer_<l>": gain [d_mlp] float32}`` for every layer with a changed neuron, and
  ``gains.json`` (k, neurons, the output-projection module names, how to apply it);
* ``ia3_adapter/`` — a peft IA3 adapter (``target_modules`` = ``feedforward_modules`` = those output projections, so
  the learned vector multiplies the projection's INPUT, i.e. the neurons) when peft is importable;
* ``report.json`` with the measured max |Δlogit| of the reloaded checkpoint (and adapter) vs the hooked model.

The in-place folding used for saving restores the original weights bit-identically (from a clone) in ``finally``.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import __version__
from .errors import CaplocError
from .hooks import scale_neurons
from .neurons import by_layer
from .results import NeuronSet, atomic_save_tensors, atomic_write_json

log = logging.getLogger(__name__)

GAINS_FILE = "gains.safetensors"
ADAPTER_DIR = "ia3_adapter"


def gain_vectors(neurons, k: float, n_layers: int, d_mlp: int) -> dict[int, torch.Tensor]:
    """{layer: gain [d_mlp] float32}: 1 everywhere, ``k`` at the set's neurons; only layers with set neurons."""

    out = {}
    for l, ix in sorted(by_layer(neurons, d_mlp).items()):
        if not len(ix):
            continue
        if not 0 <= l < n_layers or ix.min() < 0 or ix.max() >= d_mlp:
            raise CaplocError(f"neuron ({l}, {int(ix.max())}) is outside a model with {n_layers} layers x {d_mlp} neurons")
        g = torch.ones(d_mlp, dtype=torch.float32)
        g[torch.as_tensor(ix)] = float(k)
        out[int(l)] = g
    return out


def _check_gains(site, gains: dict[int, torch.Tensor]) -> None:
    for l, g in gains.items():
        if not 0 <= int(l) < site.n_layers:
            raise CaplocError(f"gain for layer {l}, but the model has layers 0..{site.n_layers - 1}")
        if tuple(g.shape) != (site.d_mlp,):
            raise CaplocError(f"gain of layer {l} has shape {tuple(g.shape)}, the model needs ({site.d_mlp},)")


@contextlib.contextmanager
def folded_gains(site, gains: dict[int, torch.Tensor]) -> Iterator[None]:
    """Multiply the output-projection weights by the gains IN PLACE for the duration; the original weights are
    restored bit-identically (from clones) on exit, also after an exception."""
    _check_gains(site, gains)
    backups = {}
    try:
        with torch.no_grad():
            for l, g in gains.items():
                w = site.out_projs[l].weight
                backups[l] = w.detach().clone()
                gg = g.to(device=w.device, dtype=w.dtype)
                if site.layout.conv1d:
                    w.mul_(gg[:, None])  # Conv1D weight [in, out]: row i belongs to neuron i
                else:
                    w.mul_(gg[None, :])  # Linear weight [out, in]: column i belongs to neuron i
        yield
    finally:
        with torch.no_grad():
            for l, b in backups.items():
                site.out_projs[l].weight.copy_(b)


def apply_gains(site, gains: dict[int, torch.Tensor]):
    """Apply saved gain vectors through hooks (no weight change): a context manager."""

    _check_gains(site, gains)
    neurons = {int(l): torch.arange(site.d_mlp) for l in gains}
    return scale_neurons(site, neurons, {int(l): g for l, g in gains.items()})


def save_gains(path: Path | str, gains: dict[int, torch.Tensor], meta: dict) -> None:

    path = Path(path)
    atomic_save_tensors(path, {f"layer_{l}": g.float() for l, g in gains.items()},
                        metadata={"format": "caploc-gains-1"})
    atomic_write_json(path.with_suffix(".json"), {"kind": "neuron_gains", "caploc_version": __version__, **meta})


def load_gains(path: Path | str) -> dict[int, torch.Tensor]:
    """{layer: gain} from a ``gains.safetensors`` file (or the export directory holding one)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / GAINS_FILE
    if not path.is_file():
        raise CaplocError(f"{path} does not exist: pass an export directory or its {GAINS_FILE}")
    t = load_file(str(path))
    try:
        return {int(k.split("_", 1)[1]): v for k, v in t.items()}
    except (IndexError, ValueError):
        raise CaplocError(f"{path} is not a caploc gains file (keys must be layer_<l>)") from None


def out_proj_names(model, site, layers) -> list[str]:
    """Fully qualified module names of the output projections of ``layers``."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(site.out_projs[l])] for l in layers]


# ---------------------------------------------------------------------------------------------------------------------
# peft IA3 adapter
# ---------------------------------------------------------------------------------------------------------------------
def peft_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None


def build_ia3_adapter(model, site, gains: dict[int, torch.Tensor], out_dir: Path | str,
                      base_name: str | None = None) -> Path:
    """Write a peft IA3 adapter whose feed-forward vectors are the gains (on a deep copy; ``model`` is untouched)."""
    from peft import IA3Config, get_peft_model
    from peft.tuners.ia3.layer import IA3Layer

    targets = out_proj_names(model, site, sorted(gains))
    base = copy.deepcopy(model)
    try:
        cfg = IA3Config(target_modules=targets, feedforward_modules=targets, init_ia3_weights=True,
                        fan_in_fan_out=bool(site.layout.conv1d), task_type="CAUSAL_LM")
        pm = get_peft_model(base, cfg)
        by_name = dict(zip(targets, sorted(gains)))
        found = 0
        with torch.no_grad():
            for name, mod in pm.named_modules():
                if isinstance(mod, IA3Layer):
                    key = next((t for t in targets if name == t or name.endswith("." + t)), None)
                    if key is None:
                        continue
                    p = mod.ia3_l["default"]
                    g = gains[by_name[key]].to(dtype=p.dtype, device=p.device)
                    if p.numel() != g.numel():
                        raise CaplocError(f"IA3 vector of {name} has {p.numel()} entries, the gain {g.numel()}")
                    p.copy_(g.reshape(p.shape))
                    found += 1
        if found != len(targets):
            raise CaplocError(f"peft wrapped {found} of {len(targets)} output projections; cannot build the IA3 adapter")
        if base_name:
            pm.peft_config["default"].base_model_name_or_path = base_name
        out_dir = Path(out_dir)
        pm.save_pretrained(str(out_dir), save_embedding_layers=False)
        return out_dir
    finally:
        del base


def load_ia3_model(model, adapter_dir: Path | str):
    """``PeftModel.from_pretrained`` of a deep copy of ``model`` with the adapter (for checks)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()


# ---------------------------------------------------------------------------------------------------------------------
# verification + export
# ---------------------------------------------------------------------------------------------------------------------
_PROBES = ("Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
           "The Eiffel Tower is located in the city of")


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    dev = model.get_input_embeddings().weight.device
    return model(input_ids=ids.to(dev), use_cache=False).logits.float().cpu()


def _probe_ids(tokenizer, texts=_PROBES) -> list[torch.Tensor]:
    out = []
    for t in texts:
        ids = tokenizer.encode(t, add_special_tokens=True)
        out.append(torch.tensor([ids], dtype=torch.long))
    return out


def max_logit_diff(model_a, model_b_or_ctx, probes, site=None, gains=None) -> float:
    """max |logits(model_a) - logits(reference)| over probe inputs, where the reference is ``model_b`` or, when
    ``gains`` is given, ``model_b_or_ctx`` run under :func:`apply_gains` (the hooked model)."""
    worst = 0.0
    for ids in probes:
        a = _logits(model_a, ids)
        if gains is not None:
            with apply_gains(site, gains):
                b = _logits(model_b_or_ctx, ids)
        else:
            b = _logits(model_b_or_ctx, ids)
        worst = max(worst, float((a - b).abs().max()))
    return worst


def export_enhanced(lm, neurons, k: float, out_dir: Path | str, *, peft: bool | None = None, verify: bool = True,
                    overwrite: bool = False, probes=None) -> dict:
    """Save ``lm`` with gain ``k`` folded into the set's output-projection columns, the gain vectors, and (when peft is
    importable and ``peft`` is not False) an IA3 adapter; see the module docstring. Returns the export summary."""
    from transformers import AutoModelForCausalLM


    site, model = lm.site, lm.model
    if isinstance(neurons, NeuronSet):
        neurons.check_compatible(site)
    if not (isinstance(k, (int, float)) and np.isfinite(k) and k >= 0):
        raise CaplocError(f"gain k must be a finite number >= 0, got {k!r}")
    gains = gain_vectors(neurons, float(k), site.n_layers, site.d_mlp)
    if not gains:
        raise CaplocError("the neuron set is empty: nothing to export")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CaplocError(f"{out_dir} exists and is not empty; pass --overwrite or choose another --out")
    want_peft = peft_available() if peft is None else bool(peft)
    if want_peft and not peft_available():
        raise CaplocError("peft is not installed: pip install peft, or pass --no-peft")

    t0 = time.time()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    layers = sorted(gains)
    names = out_proj_names(model, site, layers)
    n_changed = int(sum(int((g != 1).sum()) for g in gains.values()))
    summary: dict = {
        "kind": "enhanced_export", "caploc_version": __version__, "k": float(k), "n_neurons": n_changed,
        "layers": layers, "out_proj_modules": names, "conv1d": bool(site.layout.conv1d),
        "model_id": lm.info.get("model_id"), "model_type": site.model_type,
        "source_fingerprint": lm.info.get("fingerprint"),
        "neuron_set": (neurons.meta.get("dataset") if isinstance(neurons, NeuronSet) else None),
        "fold_rule": "Conv1D: weight[i, :] *= k" if site.layout.conv1d else "Linear: weight[:, i] *= k",
    }
    try:
        with folded_gains(site, gains), _savable(model):
            model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        save_gains(tmp / GAINS_FILE, gains, {
            "k": float(k), "layers": layers, "out_proj_modules": names, "d_mlp": site.d_mlp,
            "apply": "multiply the INPUT of each listed output projection by gain (elementwise, every position); "
                     "caploc.export.apply_gains(site, load_gains(path)) does it with hooks",
            "model_id": lm.info.get("model_id"), "model_fingerprint": lm.info.get("fingerprint"),
        })
        if want_peft:
            build_ia3_adapter(model, site, gains, tmp / ADAPTER_DIR, base_name=lm.info.get("path") or lm.info.get("model_id"))
            summary["ia3_adapter"] = ADAPTER_DIR
        if verify:
            pr = probes if probes is not None else _probe_ids(lm.tokenizer)
            reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=next(model.parameters()).dtype,
                                                            local_files_only=True).eval()
            reloaded.to(site.input_device())
            summary["max_abs_logit_diff_folded"] = max_logit_diff(reloaded, model, pr, site, gains)
            del reloaded
            if want_peft:
                pm = load_ia3_model(model, tmp / ADAPTER_DIR)
                summary["max_abs_logit_diff_ia3"] = max_logit_diff(pm, model, pr, site, gains)
                del pm
            # the enhancement must actually change something (a no-op export is a bug or k == 1)
            summary["max_abs_logit_change_vs_untouched"] = max(float((_logits(model, ids) - _with_gains(model, site, gains, ids)).abs().max()) for ids in pr)
        summary["seconds"] = round(time.time() - t0, 2)
        atomic_write_json(tmp / "caploc_export.json", summary)
        _write_report(tmp, summary)
        for f in tmp.rglob("*"):  # some writers create 0600 files; an export is an ordinary readable model dir
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s with %d neurons x%g to %s (%.1f s)", lm.info.get("model_id"), n_changed, k, out_dir,
             summary["seconds"])
    return summary


@contextlib.contextmanager
def _savable(model) -> Iterator[None]:
    """Let ``save_pretrained`` write a model loaded from a GGUF file (transformers refuses "quantized" models, but GGUF
    weights are already dequantized to the load dtype; docs/ASSETS.md): the quantizer marker is removed for the save
    and put back afterwards."""
    q = getattr(model, "hf_quantizer", None)
    cfg = getattr(model, "config", None)
    qc = getattr(cfg, "quantization_config", None) if cfg is not None else None
    method = str(getattr(qc, "quant_method", None) if not isinstance(qc, dict) else qc.get("quant_method")).lower()
    is_gguf = q is not None and ("gguf" in type(q).__name__.lower() or "gguf" in method)
    if not is_gguf:
        yield
        return
    try:
        model.hf_quantizer = None
        if qc is not None:
            del cfg.quantization_config
        yield
    finally:
        model.hf_quantizer = q
        if qc is not None:
            cfg.quantization_config = qc


def _with_gains(model, site, gains, ids):
    with apply_gains(site, gains):
        return _logits(model, ids)


def _write_report(out_dir: Path, s: dict) -> None:

    rows = [["folded checkpoint (AutoModelForCausalLM.from_pretrained)", s.get("max_abs_logit_diff_folded")]]
    if "ia3_adapter" in s:
        rows.append(["peft IA3 adapter (PeftModel.from_pretrained)", s.get("max_abs_logit_diff_ia3")])
    rows.append(["hooked model vs untouched (size of the enhancement itself)", s.get("max_abs_logit_change_vs_untouched")])
    claims = {}
    if s.get("max_abs_logit_diff_folded") is not None:
        claims["export_reproduces_hooks"] = {"value": s["max_abs_logit_diff_folded"], "tolerance": 1e-4,
                                             "holds": bool(s["max_abs_logit_diff_folded"] <= 1e-4)}
    if s.get("max_abs_logit_diff_ia3") is not None:
        claims["ia3_reproduces_hooks"] = {"value": s["max_abs_logit_diff_ia3"], "tolerance": 1e-4,
                                          "holds": bool(s["max_abs_logit_diff_ia3"] <= 1e-4)}
    atomic_write_json(out_dir / "report.json", {
        "kind": "export", "title": f"Enhanced export of {s.get('model_id')} (x{s.get('k'):g} on {s.get('n_neurons')} neurons)",
        "text": [f"Gain k={s.get('k'):g} folded into the output projection ({s.get('fold_rule')}) of layers "
                 f"{s.get('layers')}; loadable with plain transformers.AutoModelForCausalLM.from_pretrained. "
                 f"Gain vectors in {GAINS_FILE}" + (f", peft IA3 adapter in {ADAPTER_DIR}/." if "ia3_adapter" in s else ".")],
        "tables": [{"title": "Max |Δlogit| vs the hooked model on probe prompts", "columns": ["artifact", "max |Δlogit|"],
                    "rows": rows}],
        "figures": [], "claims": claims,
    })


__all__ = ["gain_vectors", "folded_gains", "apply_gains", "save_gains", "load_gains", "build_ia3_adapter",
           "load_ia3_model", "export_enhanced", "out_proj_names", "peft_available"]
