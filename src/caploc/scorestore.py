"""The per-sample score store: attribution scores ``[n_samples, n_layers, d_mlp]`` written shard by shard.

Each shard is written atomically and carries its store key and a sha256 of its tensors in its safetensors metadata;
both are verified when it is read, so a corrupted shard or one from another store is recomputed, never used. An
interrupted run resumes from its finished shards; a changed configuration is refused instead of reusing stale ones.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from . import __version__
from .errors import CaplocError
from .results import _diff, atomic_save_tensors, atomic_write_json, config_key, read_json, read_tensors, tensors_digest

log = logging.getLogger(__name__)


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


def _shard_problem(path: Path, key: str | None) -> str | None:
    """Why a shard file cannot be used (None if it is complete, belongs to the store ``key`` and is intact)."""

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


__all__ = ["ScoreStore"]
