"""Checks on a model directory before ``from_pretrained`` touches it: caploc never runs code shipped with a model and
never unpickles weights unless asked to, and a missing, corrupt or truncated file is a one-line ``CaplocError``.

``check_model_dir(path, allow_pickle)`` returns the extra ``from_pretrained`` keyword arguments (``use_safetensors``)
and the weight files it found; ``safetensors_problem(file)`` says why a safetensors file is unreadable (or None).
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

from ..errors import CaplocError

logger = logging.getLogger(__name__)

# weight files that from_pretrained would read with torch.load (pickle), newest naming first
PICKLE_WEIGHT_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (truncated, garbage, wrong offsets), or None if it is fine.
    Reads only the header: the declared data must end exactly at the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    except (ValueError, UnicodeDecodeError):
        return "the header is not valid JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offs = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            return f"tensor {name!r} has no valid data_offsets"
        end = max(end, offs[1])
    if 8 + n + end != size:
        return f"{size} bytes but its header describes {8 + n + end} (truncated or padded)"
    return None


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CaplocError(f"cannot load a model from {path}: it has no config.json; pass a directory written by save_pretrained "
                          "(config.json + model.safetensors + tokenizer files), a .gguf file, or a cached model id")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CaplocError(f"{cfg_path} is corrupt ({str(e).splitlines()[0][:120]}): "
                          "re-save the model with save_pretrained or re-download it") from None
    except OSError as e:
        raise CaplocError(f"cannot read {cfg_path} ({e.strerror or e}): check its permissions") from None
    if not isinstance(cfg, dict):
        raise CaplocError(f"{cfg_path} is corrupt (a JSON {type(cfg).__name__}, not an object): "
                          "re-save the model with save_pretrained or re-download it")
    return cfg


def _check_native(path: Path, cfg: dict) -> None:
    """Refuse configs that only custom code shipped with the model could load (caploc never runs it)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    custom = "auto_map" in cfg
    if not isinstance(model_type, str) or not model_type:
        why = "needs custom code (auto_map) and has" if custom else "has"
        raise CaplocError(f"{path}/config.json {why} no model_type; caploc loads only architectures that "
                          f"transformers {transformers.__version__} implements natively (it never runs code shipped "
                          "with a model): use a transformers-native checkpoint of this model")
    if model_type not in CONFIG_MAPPING:
        what = "needs custom code (auto_map in config.json)" if custom else "is not an architecture that"
        tail = "" if custom else f" transformers {transformers.__version__} knows"
        raise CaplocError(f"{path}: model_type {model_type!r} {what}{tail}; caploc never runs code shipped with a "
                          "model (trust_remote_code=False): upgrade transformers if it added this architecture, "
                          "or use a transformers-native checkpoint")
    if custom:
        logger.warning("%s ships custom code (auto_map) that caploc ignores; using transformers' built-in %r "
                       "implementation", path, model_type)


def check_model_dir(path: Path, allow_pickle: bool = False) -> tuple[dict, list[Path]]:
    """Validate a ``save_pretrained`` directory -> (extra from_pretrained kwargs, files that define the model).

    Refuses (one line each): no/corrupt config.json, an architecture that needs the model's own code, no weights,
    pickle-based weights without ``allow_pickle``, a truncated or garbage safetensors file."""
    cfg = _read_config(path)
    _check_native(path, cfg)
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        for f in safetensors:
            problem = safetensors_problem(f)
            if problem is not None:
                raise CaplocError(f"{f} is truncated or corrupt ({problem}): re-save or re-download the model")
        return {"use_safetensors": True}, [path / "config.json", *safetensors]
    pickles = sorted({f for pat in PICKLE_WEIGHT_PATTERNS for f in path.glob(pat)})
    if pickles:
        if not allow_pickle:
            raise CaplocError(f"{path} has only pickle-based weights ({pickles[0].name}), which can run code when "
                              "loaded: convert them to safetensors, or pass allow_pickle=True (--allow-pickle) if "
                              "you trust their source")
        logger.warning("loading pickle-based weights from %s (allow_pickle=True)", path)
        return {"use_safetensors": False}, [path / "config.json", *pickles]
    raise CaplocError(f"{path} has a config.json but no weights (*.safetensors): "
                      "save the model with save_pretrained into this directory")


__all__ = ["check_model_dir", "safetensors_problem", "PICKLE_WEIGHT_PATTERNS"]
