"""Typed results saved as safetensors (tensors) + JSON (provenance). Never pickled.

* ``NeuronSet``: sorted (layer, index) pairs with per-neuron frequency and mean score, plus the full per-neuron
  selection counts so the frequency threshold can be re-swept without recomputing anything.
* ``ScoreStore``: the per-sample attribution scores, written shard by shard and atomically, so an interrupted run
  resumes from its finished shards; a changed configuration is refused instead of silently reusing stale shards.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import CaplocError, IncompatibleResultError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# atomic file helpers
# ---------------------------------------------------------------------------------------------------------------------
def atomic_write_text(path: Path | str, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def read_json(path: Path | str):
    """Parse a JSON file caploc reads (a result, a config, a neuron list): any problem is a one-line CaplocError
    naming the file -- missing, a directory, unreadable, not UTF-8, not JSON, nested too deeply."""
    path = Path(path)
    if not path.exists():
        raise CaplocError(f"{path} does not exist: pass a result directory written by caploc")
    if path.is_dir():
        raise CaplocError(f"{path} is a directory, not a JSON file")
    try:
        text = path.read_bytes().decode("utf-8")
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
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated / garbage headers
        raise CaplocError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}): "
                          f"the {what} is truncated or corrupt; recompute it") from None


# ---------------------------------------------------------------------------------------------------------------------
# neuron sets
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class NeuronSet:
    """A set of MLP neurons of one model: sorted (layer, index) pairs.

    ``frequency[k]`` / ``mean_score[k]`` belong to ``pairs[k]``. ``counts`` (optional, [n_layers * d_mlp]) holds how many of
    ``n_samples`` samples selected every neuron, so the frequency threshold can be re-swept.
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
        p = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        if len(p):
            if p[:, 0].min() < 0 or p[:, 0].max() >= self.n_layers or p[:, 1].min() < 0 or p[:, 1].max() >= self.d_mlp:
                raise IncompatibleResultError(
                    f"neuron set has (layer, index) outside a model with {self.n_layers} layers x {self.d_mlp} neurons"
                )
        order = np.lexsort((p[:, 1], p[:, 0]))
        self.pairs = p[order]
        if self.frequency is not None:
            self.frequency = np.asarray(self.frequency, dtype=np.float64)[order]
        if self.mean_score is not None:
            self.mean_score = np.asarray(self.mean_score, dtype=np.float64)[order]

    # ---- views --------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def flat(self) -> np.ndarray:
        return self.pairs[:, 0] * self.d_mlp + self.pairs[:, 1]

    @classmethod
    def from_flat(cls, flat, n_layers: int, d_mlp: int, **kw) -> "NeuronSet":
        flat = np.asarray(flat, dtype=np.int64)
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
            "caploc_version": __version__, "kind": "neuron_set", "n_neurons": len(self), "n_layers": self.n_layers,
            "d_mlp": self.d_mlp, "n_samples": self.n_samples, "per_layer": self.per_layer_counts().tolist(),
            "share_of_neurons": self.share_of_neurons(), "share_of_params": self.share_of_params(), **self.meta,
        }
        atomic_write_json(out_dir / f"{name}.json", meta)
        return out_dir / f"{name}.json"

    @classmethod
    def load(cls, path: Path | str, name: str = "neurons") -> "NeuronSet":
        path = Path(path)
        if path.suffix == ".json" and path.exists() and not (path.with_suffix(".safetensors")).exists():
            return cls.from_kn_json(path)
        if path.is_dir():
            jpath, tpath = path / f"{name}.json", path / f"{name}.safetensors"
        else:
            jpath, tpath = path.with_suffix(".json"), path.with_suffix(".safetensors")
        meta = read_json(jpath)
        if meta.get("kind") != "neuron_set":
            raise CaplocError(f"{jpath} is not a caploc neuron set (kind={meta.get('kind')!r})")
        if not tpath.exists():
            raise CaplocError(f"{tpath} is missing: the neuron set directory is incomplete")
        t = load_file(str(tpath))
        keys = ("caploc_version", "kind", "n_neurons", "n_layers", "d_mlp", "n_samples", "per_layer",
                "share_of_neurons", "share_of_params")
        extra = {k: v for k, v in meta.items() if k not in keys}
        return cls(
            t["pairs"].numpy(), int(meta["n_layers"]), int(meta["d_mlp"]),
            frequency=t["frequency"].numpy() if "frequency" in t else None,
            mean_score=t["mean_score"].numpy() if "mean_score" in t else None,
            counts=t["counts"].numpy() if "counts" in t else None, n_samples=int(meta.get("n_samples", 0)), meta=extra,
        )

    # ---- interchange --------------------------------------------------------------------------------------------
    def to_kn_json(self, path: Path | str) -> None:
        """KN-style ``[[layer, index], ...]`` list (knowledge-neurons / EasyEdit format)."""
        atomic_write_json(path, self.pairs.tolist())

    @classmethod
    def from_kn_json(cls, path: Path | str, n_layers: int | None = None, d_mlp: int | None = None) -> "NeuronSet":
        data = read_json(path)
        if isinstance(data, dict):  # {"neurons": [...], "n_layers":..., "d_mlp":...}
            n_layers = n_layers or data.get("n_layers")
            d_mlp = d_mlp or data.get("d_mlp")
            data = data.get("neurons", [])
        try:
            pairs = np.asarray(data, dtype=np.int64).reshape(-1, 2)
        except (ValueError, TypeError):
            raise CaplocError(f"{path} is not a list of [layer, index] pairs") from None
        if n_layers is None or d_mlp is None:
            n_layers = int(pairs[:, 0].max()) + 1 if len(pairs) else 1
            d_mlp = int(pairs[:, 1].max()) + 1 if len(pairs) else 1
            log.warning("%s has no model dimensions; assuming %d layers x %d neurons (checked on use)", path, n_layers, d_mlp)
        return cls(pairs, int(n_layers), int(d_mlp), meta={"imported_from": str(path)})

    def to_lape(self) -> list[list[int]]:
        """LAPE-style per-layer index lists (one list per layer)."""
        bl = self.by_layer()
        return [sorted(bl.get(l, np.array([], int)).tolist()) for l in range(self.n_layers)]

    @classmethod
    def from_lape(cls, lists: list[list[int]], d_mlp: int) -> "NeuronSet":
        pairs = [(l, i) for l, ix in enumerate(lists) for i in ix]
        return cls(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), len(lists), d_mlp)


# ---------------------------------------------------------------------------------------------------------------------
# per-sample score store
# ---------------------------------------------------------------------------------------------------------------------
class ScoreStore:
    """Per-sample attribution scores ``[n_samples, n_layers, d_mlp]`` in shards of ``shard_size`` samples.

    Layout: ``DIR/store.json`` (config + provenance, written first), ``DIR/shard-00000.safetensors`` ... each with
    ``scores [k, L, d]``, ``f [k]``, ``gap [k, L]`` (NaN when not computed) and ``index [k]`` (sample positions).
    """

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- writing ------------------------------------------------------------------------------------------------
    def open(self, spec: dict, n_samples: int, shard_size: int, overwrite: bool = False, clean_tmp: bool = True) -> None:
        """Create the store, or check that an existing one was made with the same ``spec`` (resume).

        ``clean_tmp`` removes temporary shard files a killed run left behind; only the process that opens the store
        before any rank writes may do that (rank 0 in a multi-process run)."""
        key = config_key(spec)
        if clean_tmp and self.root.exists():
            for p in self.root.glob(".shard-*.tmp"):
                p.unlink(missing_ok=True)
        meta_path = self.root / "store.json"
        if meta_path.exists() and not overwrite:
            old = read_json(meta_path)
            if old.get("config_key") != key or old.get("n_samples") != n_samples or old.get("shard_size") != shard_size:
                changed = _diff(old.get("spec", {}), spec)
                if old.get("n_samples") != n_samples:
                    changed.append(f"n_samples {old.get('n_samples')} -> {n_samples}")
                raise CaplocError(
                    f"{self.root} holds scores made with another configuration (changed: {', '.join(changed) or 'spec'}); "
                    "use a new --out directory or pass --overwrite"
                )
            log.info("resuming score store %s (%d finished shards)", self.root, len(self.finished_shards()))
            return
        if overwrite and self.root.exists():
            for p in self.root.glob("shard-*.safetensors"):
                p.unlink()
        atomic_write_json(meta_path, {
            "caploc_version": __version__, "kind": "score_store", "config_key": key, "n_samples": n_samples,
            "shard_size": shard_size, "spec": spec,
        })

    def shard_path(self, k: int) -> Path:
        return self.root / f"shard-{k:05d}.safetensors"

    def n_shards(self) -> int:
        m = self.meta()
        return -(-m["n_samples"] // m["shard_size"])

    def finished_shards(self) -> set[int]:
        """Shards whose file is complete and verified: it carries this store's key and a checksum that matches its
        tensors. A truncated, corrupted or foreign shard (another model or configuration of the same shape) counts as
        unfinished: it is logged and recomputed, never used."""
        key = self.meta().get("config_key")
        done = set()
        for p in sorted(self.root.glob("shard-*.safetensors")):
            why = _shard_problem(p, key)
            if why:
                log.warning("shard %s %s; it will be recomputed", p.name, why)
                continue
            done.add(int(p.stem.split("-")[1]))
        return done

    def write_shard(self, k: int, index, scores, f, gap) -> None:
        t = {
            "index": torch.as_tensor(index, dtype=torch.long),
            "scores": torch.as_tensor(scores, dtype=torch.float32),
            "f": torch.as_tensor(f, dtype=torch.float64),
            "gap": torch.as_tensor(gap, dtype=torch.float32),
        }
        key = self.meta().get("config_key", "")
        atomic_save_tensors(self.shard_path(k), t, metadata={"store_key": key, "sha256": tensors_digest(t)})

    # ---- reading ------------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        m = read_json(self.root / "store.json")
        if m.get("kind") != "score_store":
            raise CaplocError(f"{self.root} is not a caploc score store")
        return m

    def complete(self) -> bool:
        return len(self.finished_shards()) >= self.n_shards()

    def load(self) -> dict[str, torch.Tensor]:
        """All shards in sample order: ``scores [N, L, d]``, ``f [N]``, ``gap [N, L]``, ``index [N]``."""
        n = self.n_shards()
        missing = sorted(set(range(n)) - self.finished_shards())
        if missing:
            raise CaplocError(f"{self.root} is incomplete ({len(missing)} of {n} shards missing): rerun the same command to resume")
        parts = [read_tensors(self.shard_path(k), "score store") for k in range(n)]
        return {key: torch.cat([p[key] for p in parts]) for key in ("index", "scores", "f", "gap")}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors`` (sorted by name): a shard's content checksum."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _shard_problem(path: Path, key: str | None) -> str | None:
    """Why a shard file cannot be used (None if it is complete, belongs to the store ``key`` and is intact)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            if not {"index", "scores", "f", "gap"} <= names:
                return "is incomplete"
            tensors = {n: f.get_tensor(n) for n in names}
    except Exception:  # truncated / corrupt file, e.g. after a power loss
        return "is unreadable"
    if meta.get("store_key") != key:
        return "was written by another configuration or model"
    if meta.get("sha256") != tensors_digest(tensors):
        return "fails its checksum (corrupted)"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# output directories: checked before the work starts, one writer at a time
# ---------------------------------------------------------------------------------------------------------------------
def check_out_dir(path: Path | str, what: str = "--out") -> Path:
    """Refuse an output location that cannot hold a result directory, before any computation starts."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise CaplocError(f"{what} {path} is a file; pass a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CaplocError(f"{what} {path} is inside {probe}, which is a file; pass another directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CaplocError(f"{what} {path} is not writable ({probe} does not allow it); pass another directory")
    return path


class OutLock:
    """An exclusive, non-blocking lock on a result directory (``DIR/.caploc.lock``), held while a verb writes there.

    A second process writing into the same directory gets a one-line error instead of mixing shards and metadata.
    The lock is an OS file lock, so it disappears with the process even after SIGKILL (no stale lock files to clean).
    Re-entrant within one process (nested stages share the outer lock)."""

    _held: dict[str, int] = {}

    def __init__(self, out_dir: Path | str):
        self.path = Path(out_dir).expanduser().resolve() / ".caploc.lock"
        self._fd: int | None = None

    def __enter__(self) -> "OutLock":
        import fcntl

        k = str(self.path)
        if k in OutLock._held:
            OutLock._held[k] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise CaplocError(f"another caploc process is writing into {self.path.parent}; wait for it or pass "
                              "another --out") from None
        self._fd = fd
        OutLock._held[k] = 1
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        k = str(self.path)
        OutLock._held[k] -= 1
        if OutLock._held[k] == 0:
            del OutLock._held[k]
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out
