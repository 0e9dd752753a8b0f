"""Typed results saved as safetensors (tensors) + JSON (provenance). Never pickled.

* ``NeuronSet``: sorted (layer, index) pairs with per-neuron frequency and mean score, plus the full per-neuron
  selection counts so the frequency threshold can be re-swept without recomputing anything.
* the atomic writers, checked readers, checksums, output-directory checks and the writer lock every result uses
  (the per-sample score store built on them is :mod:`caploc.scorestore`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CaplocError, IncompatibleResultError
from .outdir import OutLock, check_out_dir  # noqa: F401  (re-exported: where results are written)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# atomic file helpers
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place: readers see the old file or the
    new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if torch.is_tensor(o):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_result(out_dir: Path | str, json_name: str, kind: str, what: str, tensors_name: str | None = None,
                *, tensors_required: bool = True) -> tuple[dict, dict]:
    """Read a result directory written by caploc: its JSON file (whose ``kind`` must be ``kind``) and, if named, its
    safetensors file -> (json, {name: tensor}). Wrong or missing files raise one-line errors naming ``what``."""
    out_dir = Path(out_dir)
    jp = out_dir / json_name
    if not jp.exists():
        raise CaplocError(f"{jp} is missing: {out_dir} is not a caploc {what} directory")
    js = read_json(jp)
    if js.get("kind") != kind:
        raise CaplocError(f"{out_dir} is not a caploc {what} directory ({json_name} has kind={js.get('kind')!r})")
    tensors: dict = {}
    if tensors_name:
        tp = out_dir / tensors_name
        if tp.exists():
            tensors = read_tensors(tp, what)
        elif tensors_required:
            raise CaplocError(f"{tp} is missing: the {what} directory is incomplete")
    return js, tensors


def config_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# result manifests: a directory committed as a whole
# ---------------------------------------------------------------------------------------------------------------------
MANIFEST = ".caploc-manifest.json"


def write_manifest(out_dir: Path | str, files) -> Path:
    """Record the sha256 of ``files`` (paths inside ``out_dir``) in ``out_dir/.caploc-manifest.json``, written last:
    a result is committed when its manifest is. Readers verify every listed file against it (``verify_file``), so a
    directory left half-rewritten by a killed run, or a file changed afterwards, is refused instead of read."""
    out_dir = Path(out_dir)
    entries = {}
    for f in sorted({Path(f) for f in files}):
        if f.is_file() and f.name != MANIFEST:
            entries[f.relative_to(out_dir).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    atomic_write_json(out_dir / MANIFEST, {"kind": "result_manifest", "caploc_version": __version__,
                                           "files": entries})
    return out_dir / MANIFEST


_MANIFESTS: dict[Path, tuple[tuple, dict]] = {}  # manifest -> ((inode, mtime_ns, size), its "files")


def _manifest_files(m: Path, root: Path) -> dict:
    """The ``files`` table of manifest ``m``, parsed once per version of the file (a result with many files, such as
    an audit's per-fact records, is verified file by file)."""
    st = m.stat()
    key = (st.st_ino, st.st_mtime_ns, st.st_size)  # an atomic rewrite is a new inode
    hit = _MANIFESTS.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        data = json.loads(m.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CaplocError(f"{m} is unreadable: the result directory {root} is damaged; rerun the command that "
                          "wrote it") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise CaplocError(f"{m} is not a caploc result manifest; rerun the command that wrote {root}")
    _MANIFESTS[m] = (key, files)
    return files


def _manifest_entry(path: Path) -> tuple[Path, str] | None:
    """The sha256 a manifest records for ``path`` (the manifest of its directory or of the one above)."""
    for root in (path.parent, path.parent.parent):
        m = root / MANIFEST
        if not m.is_file():
            continue
        files = _manifest_files(m, root)
        rel = path.relative_to(root).as_posix()
        if rel in files:
            return m, str(files[rel])
    return None


def verify_file(path: Path, data: bytes | None = None) -> None:
    """Refuse a file whose bytes differ from what its result manifest recorded when the result was committed."""
    entry = _manifest_entry(Path(path))
    if entry is None:
        return
    m, want = entry
    got = hashlib.sha256(Path(path).read_bytes() if data is None else data).hexdigest()
    if got != want:
        raise CaplocError(f"{path} does not match the checksum {m.name} recorded when the result was written "
                          "(changed, truncated, or left from an interrupted rewrite); rerun the command that wrote it")


def read_json(path: Path | str):
    """Parse a JSON file caploc reads (a result, a config, a neuron list): any problem is a one-line CaplocError
    naming the file -- missing, a directory, unreadable, not UTF-8, not JSON, nested too deeply."""
    path = Path(path)
    if not path.exists():
        raise CaplocError(f"{path} does not exist: pass a result directory written by caploc")
    if path.is_dir():
        raise CaplocError(f"{path} is a directory, not a JSON file")
    try:
        data = path.read_bytes()
        verify_file(path, data)
        text = data.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise CaplocError(f"{path} is not UTF-8 text (byte {e.start}): pass a JSON file") from None
    except json.JSONDecodeError as e:
        raise CaplocError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise CaplocError(f"{path} is nested too deeply to be a caploc file") from None
    except OSError as e:
        raise CaplocError(f"cannot read {path}: {e.strerror or e}") from None


def read_tensors(path: Path | str, what: str = "result") -> dict[str, torch.Tensor]:
    """Load a safetensors file (never pickle); a missing, truncated or garbage file is a one-line CaplocError."""
    path = Path(path)
    if not path.is_file():
        raise CaplocError(f"{path} is missing: the {what} directory is incomplete")
    verify_file(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage headers
        raise CaplocError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): "
                          f"the {what} is truncated or corrupt; recompute it") from None


# ---------------------------------------------------------------------------------------------------------------------
# neuron sets
# ---------------------------------------------------------------------------------------------------------------------
def _leaves(obj):
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _leaves(x)
    else:
        yield obj


def _index_array(obj, what: str, pairs: bool = True) -> np.ndarray:
    """An array, tensor or nested list of integers -> int64 ``[n, 2]`` (``pairs``) or ``[n]``. Floats (even 3.0),
    bools, strings and ragged lists are refused with one line: an index is never silently truncated or cast."""
    if torch.is_tensor(obj):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        a = obj
        if a.size and (a.dtype == np.bool_ or a.dtype.kind not in "iu"):
            raise CaplocError(f"{what} must be integers, not {a.dtype} values")
    elif isinstance(obj, (list, tuple)):
        bads = [x for x in _leaves(obj) if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))]
        if bads:
            bad = bads[0]
            raise CaplocError(f"{what} must be integers, found {bad!r} ({type(bad).__name__})")
        try:
            a = np.array(obj, dtype=np.int64)
        except (ValueError, OverflowError):
            raise CaplocError(f"{what} is not a rectangular list of integers") from None
    else:
        raise CaplocError(f"{what} must be a list or array of integers, not {type(obj).__name__}")
    if a.size and a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise CaplocError(f"{what} has an index too large for int64")
    a = a.astype(np.int64)
    if a.size == 0:
        return a.reshape(0, 2) if pairs else a.reshape(0)
    if pairs and (a.ndim != 2 or a.shape[1] != 2):
        raise CaplocError(f"{what} must be [layer, index] pairs (shape [n, 2]), got shape {list(a.shape)}")
    if not pairs and a.ndim != 1:
        raise CaplocError(f"{what} must be a flat list of integers, got shape {list(a.shape)}")
    return a


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _count(value, what: str, minimum: int = 1) -> int:
    """A model dimension or sample count: an int (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CaplocError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def _float_array(values, n: int, what: str) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    try:
        a = np.asarray(values, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise CaplocError(f"{what} must be numbers") from None
    if len(a) != n:
        raise CaplocError(f"{what} has {len(a)} values for {n} neurons")
    return a


@dataclass
class NeuronSet:
    """A set of MLP neurons of one model: sorted, distinct (layer, index) pairs.

    ``frequency[k]`` / ``mean_score[k]`` belong to ``pairs[k]``. ``counts`` (optional, [n_layers * d_mlp]) holds how many of
    ``n_samples`` samples selected every neuron, so the frequency threshold can be re-swept. Indices must be integers
    inside the model's ``n_layers`` x ``d_mlp``; anything else is refused with a one-line error.
    """

    pairs: np.ndarray  # [n, 2] int64 (layer, index), sorted
    n_layers: int
    d_mlp: int
    frequency: np.ndarray | None = None  # [n] fraction of samples
    mean_score: np.ndarray | None = None  # [n]
    counts: np.ndarray | None = None  # [n_layers * d_mlp] int
    n_samples: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.n_layers = _count(self.n_layers, "n_layers")
        self.d_mlp = _count(self.d_mlp, "d_mlp")
        self.n_samples = _count(self.n_samples, "n_samples", minimum=0)
        p = _index_array(self.pairs, "neuron (layer, index) pairs")
        if len(p):
            neg = np.flatnonzero((p < 0).any(1))
            if len(neg):
                raise CaplocError(f"neuron set has a negative (layer, index) pair {tuple(p[neg[0]].tolist())}")
            out = np.flatnonzero((p[:, 0] >= self.n_layers) | (p[:, 1] >= self.d_mlp))
            if len(out):
                raise IncompatibleResultError(
                    f"neuron set has (layer, index) {tuple(p[out[0]].tolist())} outside a model with {self.n_layers} "
                    f"layers x {self.d_mlp} neurons"
                )
        order = np.lexsort((p[:, 1], p[:, 0]))
        self.pairs = p[order]
        if len(p) > 1:
            dup = np.flatnonzero((np.diff(self.pairs, axis=0) == 0).all(1))
            if len(dup):
                raise CaplocError(f"neuron set lists (layer, index) {tuple(self.pairs[dup[0]].tolist())} twice")
        if self.frequency is not None:
            self.frequency = _float_array(self.frequency, len(p), "frequency")[order]
        if self.mean_score is not None:
            self.mean_score = _float_array(self.mean_score, len(p), "mean_score")[order]
        if self.counts is not None:
            c = _index_array(self.counts, "counts", pairs=False)
            if len(c) != self.n_layers * self.d_mlp:
                raise CaplocError(f"counts has {len(c)} entries for {self.n_layers} x {self.d_mlp} neurons")
            self.counts = c
        if not isinstance(self.meta, dict):
            raise CaplocError(f"meta must be a dict, not {type(self.meta).__name__}")

    # ---- views --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    def __repr__(self) -> str:
        n = len(self)
        text = (f"NeuronSet({n} neurons of {self.n_layers} layers x {self.d_mlp} "
                f"({100 * self.share_of_neurons():.2f}%)")
        if n:
            per = self.per_layer_counts()
            top = [int(l) for l in np.argsort(-per, kind="stable")[:3] if per[l]]
            text += ", top layers " + ", ".join(f"L{l}: {int(per[l])}" for l in top)
            text += ", pairs [" + ", ".join(f"({l}, {i})" for l, i in self.pairs[:4].tolist())
            text += ", ...]" if n > 4 else "]"
        if self.n_samples:
            text += f", {self.n_samples} samples"
        if self.meta.get("model_id"):
            text += f", model {self.meta['model_id']}"
        return text + ")"

    __str__ = __repr__

    @property
    def flat(self) -> np.ndarray:
        return self.pairs[:, 0] * self.d_mlp + self.pairs[:, 1]

    @classmethod
    def from_flat(cls, flat, n_layers: int, d_mlp: int, **kw) -> "NeuronSet":
        d_mlp = _count(d_mlp, "d_mlp")
        flat = _index_array(flat, "flat neuron indices", pairs=False)
        return cls(np.stack([flat // d_mlp, flat % d_mlp], 1), n_layers, d_mlp, **kw)

    def by_layer(self) -> dict[int, np.ndarray]:
        return {int(l): self.pairs[self.pairs[:, 0] == l, 1] for l in np.unique(self.pairs[:, 0])}

    def per_layer_counts(self) -> np.ndarray:
        return np.bincount(self.pairs[:, 0], minlength=self.n_layers) if len(self) else np.zeros(self.n_layers, int)

    def share_of_neurons(self) -> float:
        return len(self) / (self.n_layers * self.d_mlp)

    def share_of_params(self) -> float | None:
        ppn, tot = self.meta.get("params_per_neuron"), self.meta.get("total_params")
        return len(self) * ppn / tot if ppn and tot else None

    def to_pandas(self):
        """A ``pandas.DataFrame`` with one row per neuron: layer, index, frequency, mean_score (NaN when unknown)."""
        try:
            import pandas as pd
        except ImportError:
            raise CaplocError("NeuronSet.to_pandas needs pandas: pip install pandas") from None
        nan = np.full(len(self), np.nan)
        return pd.DataFrame({
            "layer": self.pairs[:, 0], "index": self.pairs[:, 1],
            "frequency": self.frequency if self.frequency is not None else nan,
            "mean_score": self.mean_score if self.mean_score is not None else nan,
        })

    def check_compatible(self, site) -> None:
        """Refuse to apply this set to a model with other dimensions."""
        if (site.n_layers, site.d_mlp) != (self.n_layers, self.d_mlp):
            raise IncompatibleResultError(
                f"this neuron set was made for a model with {self.n_layers} layers x {self.d_mlp} MLP neurons "
                f"({self.meta.get('model_id', '?')}), but this model has {site.n_layers} x {site.d_mlp}: "
                "localize on this model first"
            )

    # ---- save / load --------------------------------------------------------------------------------------------
    def save(self, out_dir: Path | str, name: str = "neurons") -> Path:
        out_dir = Path(out_dir)
        t = {"pairs": torch.from_numpy(self.pairs.copy())}
        if self.frequency is not None:
            t["frequency"] = torch.from_numpy(self.frequency.astype(np.float64))
        if self.mean_score is not None:
            t["mean_score"] = torch.from_numpy(self.mean_score.astype(np.float64))
        if self.counts is not None:
            t["counts"] = torch.from_numpy(np.asarray(self.counts, dtype=np.int64))
        atomic_save_tensors(out_dir / f"{name}.safetensors", t)
        meta = {
            **self.meta,  # first: the keys below describe THIS set and win over stale copies in meta
            "caploc_version": __version__, "kind": "neuron_set", "n_neurons": len(self), "n_layers": self.n_layers,
            "d_mlp": self.d_mlp, "n_samples": self.n_samples, "per_layer": self.per_layer_counts().tolist(),
            "share_of_neurons": self.share_of_neurons(), "share_of_params": self.share_of_params(),
            # binds the JSON to the tensors it describes: the tensors are written first, the JSON last, and a reader
            # refuses a pair whose digests disagree (a kill between the two writes leaves a detectable mix).
            "tensors_sha256": tensors_digest(t),
            # every neuron, readable without tools (the tensors stay the source of truth)
            "neurons": [
                {"layer": int(l), "index": int(i),
                 "frequency": None if self.frequency is None else _finite_or_none(self.frequency[k]),
                 "mean_score": None if self.mean_score is None else _finite_or_none(self.mean_score[k])}
                for k, (l, i) in enumerate(self.pairs.tolist())
            ],
        }
        atomic_write_json(out_dir / f"{name}.json", meta)
        return out_dir / f"{name}.json"

    @classmethod
    def load(cls, path: Path | str, name: str = "neurons") -> "NeuronSet":
        """A set written by ``save`` (its directory, or its .json / .safetensors path), or a KN JSON file."""
        path = Path(path)
        if path.suffix == ".json" and path.exists() and not (path.with_suffix(".safetensors")).exists():
            return cls.from_kn_json(path)
        if path.is_dir():
            jpath, tpath = path / f"{name}.json", path / f"{name}.safetensors"
        else:
            jpath, tpath = path.with_suffix(".json"), path.with_suffix(".safetensors")
        meta = read_json(jpath)
        if not isinstance(meta, dict) or meta.get("kind") != "neuron_set":
            kind = meta.get("kind") if isinstance(meta, dict) else type(meta).__name__
            raise CaplocError(f"{jpath} is not a caploc neuron set (kind={kind!r})")
        if not tpath.exists():
            raise CaplocError(f"{tpath} is missing: the neuron set directory is incomplete")
        try:
            t = load_file(str(tpath))
        except (SafetensorError, OSError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            raise CaplocError(f"{tpath} is truncated or corrupt ({first}): rerun the command that wrote it") from None
        if "pairs" not in t:
            raise CaplocError(f"{tpath} has no 'pairs' tensor: it is not a caploc neuron set")
        keys = ("caploc_version", "kind", "n_neurons", "n_layers", "d_mlp", "n_samples", "per_layer",
                "share_of_neurons", "share_of_params", "tensors_sha256", "neurons")
        extra = {k: v for k, v in meta.items() if k not in keys}
        try:
            ns = cls(
                t["pairs"], _count(meta.get("n_layers"), "n_layers"), _count(meta.get("d_mlp"), "d_mlp"),
                frequency=t.get("frequency"), mean_score=t.get("mean_score"), counts=t.get("counts"),
                n_samples=_count(meta.get("n_samples", 0), "n_samples", minimum=0), meta=extra,
            )
        except CaplocError as e:
            raise type(e)(f"{jpath.parent / jpath.stem}.{{json,safetensors}}: {e}") from None
        digest = meta.get("tensors_sha256")
        if digest is not None and digest != tensors_digest(t):
            raise CaplocError(f"{jpath} does not describe {tpath.name} (checksum mismatch): the two files come from "
                              "different runs or one was cut short; rerun the command that wrote them")
        if "n_neurons" in meta and meta["n_neurons"] != len(ns):
            raise CaplocError(f"{jpath} says {meta['n_neurons']!r} neurons but {tpath.name} holds {len(ns)}: "
                              "the two files come from different runs; rerun the command that wrote them")
        return ns

    # ---- interchange --------------------------------------------------------------------------------------------
    def to_kn_json(self, path: Path | str, *, plain: bool = False) -> None:
        """KN-style ``[[layer, index], ...]`` pairs (knowledge-neurons / EasyEdit format), written with the model's
        dimensions as ``{"n_layers": L, "d_mlp": d, "neurons": [[layer, index], ...]}`` so ``from_kn_json`` reads it
        back identically; ``plain=True`` writes the bare list for tools that expect only that."""
        neurons = self.pairs.tolist()
        atomic_write_json(path, neurons if plain else {"n_layers": self.n_layers, "d_mlp": self.d_mlp,
                                                       "neurons": neurons})

    @classmethod
    def from_kn_json(cls, path: Path | str, n_layers: int | None = None, d_mlp: int | None = None) -> "NeuronSet":
        """Read ``to_kn_json``'s output, or a bare ``[[layer, index], ...]`` list. A bare list does not say the model's
        dimensions: pass ``n_layers`` and ``d_mlp``, else they are guessed from the largest indices (with a warning)."""
        data = read_json(Path(path))
        if isinstance(data, dict):
            if "neurons" not in data:
                raise CaplocError(f"{path} has no 'neurons' list: expected {{\"n_layers\", \"d_mlp\", \"neurons\"}} "
                                  "or a list of [layer, index] pairs")
            for given, key in ((n_layers, "n_layers"), (d_mlp, "d_mlp")):
                stored = data.get(key)
                if given is not None and stored is not None and given != stored:
                    raise IncompatibleResultError(f"{path} was written for {key}={stored!r}, not {given!r}")
            n_layers = n_layers if n_layers is not None else data.get("n_layers")
            d_mlp = d_mlp if d_mlp is not None else data.get("d_mlp")
            data = data["neurons"]
        if not isinstance(data, list):
            raise CaplocError(f"{path} is not a list of [layer, index] pairs (it holds a JSON {type(data).__name__})")
        try:
            pairs = _index_array(data, "neurons")
            if n_layers is None or d_mlp is None:
                guess_l = int(pairs[:, 0].max()) + 1 if len(pairs) else 1
                guess_d = int(pairs[:, 1].max()) + 1 if len(pairs) else 1
                n_layers = guess_l if n_layers is None else n_layers
                d_mlp = guess_d if d_mlp is None else d_mlp
                log.warning("%s has no model dimensions; assuming %s layers x %s neurons (checked on use)",
                            path, n_layers, d_mlp)
            return cls(pairs, n_layers, d_mlp, meta={"imported_from": str(path)})
        except CaplocError as e:
            raise type(e)(f"{path}: {e}") from None

    def to_lape(self) -> list[list[int]]:
        """LAPE-style per-layer index lists (one list per layer)."""
        bl = self.by_layer()
        return [sorted(bl.get(l, np.array([], int)).tolist()) for l in range(self.n_layers)]

    @classmethod
    def from_lape(cls, lists: list[list[int]], d_mlp: int) -> "NeuronSet":
        """Inverse of ``to_lape``: ``lists[layer]`` holds that layer's neuron indices (one list per layer)."""
        if not isinstance(lists, (list, tuple)) or not lists:
            raise CaplocError("LAPE neurons must be a non-empty list with one list of indices per layer")
        per = [_index_array(ix, f"LAPE layer {l}", pairs=False) for l, ix in enumerate(lists)]
        pairs = np.concatenate([np.stack([np.full(len(ix), l), ix], 1) for l, ix in enumerate(per)]).astype(np.int64)
        return cls(pairs, len(lists), d_mlp)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name): a shard's content checksum."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out
