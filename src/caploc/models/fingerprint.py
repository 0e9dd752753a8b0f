"""Model fingerprints: a short hash of a model's config and of every byte of every parameter and buffer.

``model_fingerprint(model)`` hashes each tensor's raw bytes with xxh3-128 (tens of GB/s, so SmolLM2-135M's 540 MB of
float32 weights cost tens of milliseconds) and combines the config, the names, shapes, dtypes and per-tensor digests
with sha256. Any change of any weight (an in-place edit, a merged neuron-only fine-tune) changes the fingerprint;
identical weights give identical fingerprints across save/load round trips, devices and processes.

``cached_fingerprint`` memoizes the fingerprint of a model freshly loaded from files, keyed by those files' paths,
sizes and modification times (plus dtype and library versions), so loading the same files again does not rehash.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Iterable

import torch
import xxhash
from torch import nn

from ..results import atomic_write_json

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = 2  # 1: names/shapes + first/last 64 values of 2-D weights; 2: every byte of every tensor

# config keys that describe where/how a model was loaded rather than what it is (left out of the fingerprint)
VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "_model_name_or_path", "_commit_hash", "architectures", "transformers_version",
    "quantization_config", "dtype", "torch_dtype", "_attn_implementation", "_attn_implementation_autoset",
    "attn_implementation", "_experts_implementation", "auto_map",
}


def _tensor_digest(t: torch.Tensor) -> bytes:
    """xxh3-128 of the tensor's raw bytes (no copy for a contiguous CPU tensor); b"meta" for a tensor without data."""
    if t.device.type == "meta":
        return b"meta"
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b"empty"
    return xxhash.xxh3_128_digest(flat.view(torch.uint8).numpy())


def model_fingerprint(model: nn.Module) -> str:
    """sha256[:16] over the config (without load-time fields such as paths or dtype), and every parameter's and
    buffer's name, shape, dtype and raw bytes. Exact: any changed weight value changes it."""
    h = hashlib.sha256(f"caploc-fingerprint-{FINGERPRINT_FORMAT};".encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    else:
        h.update(type(model).__name__.encode())
    for kind, tensors in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in tensors:
            h.update(f"{kind}:{name}:{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}:".encode())
            h.update(_tensor_digest(t))
    return h.hexdigest()[:16]


def _files_key(files: Iterable[Path], dtype: torch.dtype) -> str | None:
    """A key for the model that ``files`` load into at ``dtype``; None if a file cannot be stat'ed."""
    import transformers

    stats = []
    for f in sorted({Path(f).resolve() for f in files}):
        try:
            st = f.stat()
        except OSError:
            return None
        stats.append([str(f), st.st_size, st.st_mtime_ns])
    if not stats:
        return None
    spec = {"format": FINGERPRINT_FORMAT, "dtype": str(dtype), "files": stats,
            "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def cached_fingerprint(model: nn.Module, files: Iterable[Path], dtype: torch.dtype, cache_dir: Path | None) -> str:
    """``model_fingerprint(model)`` for a model just loaded from ``files`` (config + weights) at ``dtype``, memoized
    under ``cache_dir/fingerprints/``. Without a cache dir, or if any tensor has no data (offloaded), it just hashes."""
    key = _files_key(files, dtype) if cache_dir is not None else None
    if key is None or any(p.device.type == "meta" for p in model.parameters()):
        return model_fingerprint(model)
    memo = Path(cache_dir) / "fingerprints" / f"{key}.json"
    try:
        d = json.loads(memo.read_text())
        fp = d.get("fingerprint") if isinstance(d, dict) and d.get("key") == key else None
        if isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{16}", fp):
            logger.debug("fingerprint %s from %s", fp, memo)
            return fp
    except (OSError, ValueError):
        pass
    fp = model_fingerprint(model)
    try:
        atomic_write_json(memo, {"key": key, "fingerprint": fp, "format": FINGERPRINT_FORMAT})
    except OSError as e:  # a read-only cache only costs the rehash next time
        logger.debug("cannot memoize the fingerprint in %s: %s", memo, e)
    return fp


__all__ = ["model_fingerprint", "cached_fingerprint", "FINGERPRINT_FORMAT", "VOLATILE_CONFIG_KEYS"]
