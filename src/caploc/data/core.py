"""Core data types: :class:`Sample`, :class:`Dataset`, content fingerprints and seeded splits.

Everything here is torch-free and deterministic: the same inputs and seed give the same samples, the same
fingerprint and the same splits in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from caploc.errors import DataError

logger = logging.getLogger(__name__)

_JSONL_HEADER_KEY = "__caploc_dataset__"
_JSONL_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One scored example.

    ``target`` is teacher-forced after ``prompt`` and starts with the separator it needs (e.g. ``" "`` or ``"\\n"``).
    ``group`` is the commonality group (template id, relation id, label, task name). ``meta`` holds JSON-serialisable
    extras (answer, variables, subject, paraphrases, ...). ``id`` is stable within the dataset.
    """

    prompt: str
    target: str
    group: str | None = None
    meta: dict = field(default_factory=dict)
    id: str = ""


def json_safe(value: Any) -> Any:
    """Return ``value`` converted to plain JSON types (dict/list/str/int/float/bool/None).

    Tuples and sets become lists, numpy scalars/arrays their Python equivalents, non-string dict keys strings, and
    anything else (``Fraction``, ``Decimal``, dates, objects) its ``str``. Non-finite floats become strings too.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Fraction):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((json_safe(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True, default=str))
    # numpy / pandas scalars and arrays, without importing numpy here
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__.startswith(("numpy", "pandas", "pyarrow")):
        try:
            return json_safe(tolist())
        except Exception:  # pragma: no cover - defensive
            pass
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__.startswith("numpy"):
        try:
            return json_safe(item())
        except Exception:  # pragma: no cover - defensive
            pass
    return str(value)


def fingerprint(samples: Iterable[Sample]) -> str:
    """sha256 (first 16 hex chars) of the canonical JSON of ``[prompt, target, group]`` of every sample, in order."""
    payload = [[s.prompt, s.target, s.group] for s in samples]
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class Dataset:
    """A named, ordered, immutable list of :class:`Sample` with provenance.

    ``source`` is a JSON-serialisable description of how the data was made (loader, args, seed). Samples without an
    ``id`` get their position as id.
    """

    __slots__ = ("_name", "_samples", "_source", "_fingerprint")

    def __init__(self, name: str, samples: Iterable[Sample], source: dict | None = None):
        items = []
        for i, s in enumerate(samples):
            if not isinstance(s, Sample):
                raise DataError(f"dataset '{name}' item {i} is a {type(s).__name__}, not a caploc Sample")
            if not isinstance(s.prompt, str) or not isinstance(s.target, str):
                raise DataError(f"dataset '{name}' sample {i} has a non-string prompt or target; convert them to str")
            if not s.id:
                s = dataclasses.replace(s, id=str(i))
            items.append(s)
        self._name = str(name)
        self._samples: tuple[Sample, ...] = tuple(items)
        self._source: dict = json_safe(dict(source or {}))
        self._fingerprint: str | None = None

    # --- read-only attributes -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def samples(self) -> list[Sample]:
        """A (new) list of the samples; the dataset itself cannot be changed through it."""
        return list(self._samples)

    @property
    def source(self) -> dict:
        return json.loads(json.dumps(self._source))

    # --- sequence protocol ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        return self._samples[index]

    def __repr__(self) -> str:
        return f"Dataset(name={self._name!r}, n={len(self)}, fingerprint={self.fingerprint()})"

    # --- content --------------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 hex (first 16 chars) of the canonical JSON of (prompt, target, group) of all samples."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self._samples)
        return self._fingerprint

    def groups(self) -> list[str | None]:
        """The group of every sample, aligned with the samples (use :meth:`unique_groups` for the distinct ones)."""
        return [s.group for s in self._samples]

    def unique_groups(self) -> list[str | None]:
        """Distinct groups in order of first appearance."""
        return list(dict.fromkeys(s.group for s in self._samples))

    def ids(self) -> list[str]:
        return [s.id for s in self._samples]

    def subset(self, indices: Iterable[int], name: str | None = None) -> "Dataset":
        """The samples at ``indices`` (in that order; ids are kept) as a new dataset."""
        idx = [int(i) for i in indices]
        n = len(self._samples)
        for i in idx:
            if not -n <= i < n:
                raise DataError(f"subset index {i} is out of range for dataset '{self._name}' of {n} samples")
        source = {
            "loader": "subset",
            "parent": self._name,
            "parent_fingerprint": self.fingerprint(),
            "parent_source": self._source,
            "indices": idx,
        }
        return Dataset(name or f"{self._name}[subset{len(idx)}]", [self._samples[i] for i in idx], source)

    # --- persistence ----------------------------------------------------------------------------------------------
    def to_jsonl(self, path) -> Path:
        """Write a header line (name, source, fingerprint) and one JSON object per sample; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {
            _JSONL_HEADER_KEY: _JSONL_FORMAT_VERSION,
            "name": self._name,
            "source": self._source,
            "fingerprint": self.fingerprint(),
            "n": len(self),
        }
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(header, ensure_ascii=False) + "\n")
            for s in self._samples:
                row = {"id": s.id, "prompt": s.prompt, "target": s.target, "group": s.group, "meta": json_safe(s.meta)}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        logger.debug("wrote %d samples of %s to %s", len(self), self._name, path)
        return path

    @classmethod
    def from_jsonl(cls, path) -> "Dataset":
        """Read a file written by :meth:`to_jsonl` (a file without the header line also works)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"dataset file '{path}' not found; check the path")
        header: dict | None = None
        samples: list[Sample] = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"line {lineno} of '{path.name}' is not valid JSON ({e.msg}); fix or remove it") from None
                if not isinstance(row, dict):
                    raise DataError(f"line {lineno} of '{path.name}' is not a JSON object; each line must be an object")
                if _JSONL_HEADER_KEY in row:
                    header = row
                    continue
                for key in ("prompt", "target"):
                    if not isinstance(row.get(key), str):
                        raise DataError(f"line {lineno} of '{path.name}' has no string '{key}'; it is not a caploc dataset file")
                group = row.get("group")
                samples.append(
                    Sample(
                        prompt=row["prompt"],
                        target=row["target"],
                        group=None if group is None else str(group),
                        meta=row.get("meta") or {},
                        id=str(row.get("id") or ""),
                    )
                )
        if not samples:
            raise DataError(f"dataset '{path.name}' is empty: it has no rows")
        if header is not None:
            ds = cls(header.get("name") or path.stem, samples, header.get("source") or {})
            want = header.get("fingerprint")
            if want and want != ds.fingerprint():
                logger.warning("%s: content fingerprint %s differs from the one recorded in its header (%s); "
                               "the file was edited after it was written", path, ds.fingerprint(), want)
            return ds
        return cls(path.stem, samples, {"loader": "jsonl", "path": str(path)})


# ------------------------------------------------------------------------------------------------------------------
# sampling helpers shared by the loaders
# ------------------------------------------------------------------------------------------------------------------
def check_n(n: int | None, what: str) -> None:
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise DataError(f"n={n!r} is not a positive integer for {what}; pass --n 1 or more (or omit it for all)")


def subsample_indices(total: int, n: int | None, seed: int, what: str) -> list[int]:
    """Seeded subsample without replacement of ``n`` out of ``total`` indices, in their original order."""
    check_n(n, what)
    if n is None or n == total:
        return list(range(total))
    if n > total:
        raise DataError(f"n={n} is more than the {total} samples available in {what}; pass --n {total} or less")
    return sorted(random.Random(seed).sample(range(total), n))


def add_few_shot(samples: Sequence[Sample], pool: Sequence[Sample], k: int, seed: int, what: str) -> list[Sample]:
    """Prepend ``k`` solved examples (``prompt + target``) drawn from ``pool`` to each sample's prompt.

    Shots are drawn with ``random.Random(seed + 10_000)``, never have the sample's own prompt, and are separated from
    each other and from the question by a blank line. Paraphrases in ``meta`` get the same prefix; the shot ids are
    recorded in ``meta['few_shot_ids']``.
    """
    if k <= 0:
        return list(samples)
    rng = random.Random(seed + 10_000)
    out = []
    for s in samples:
        candidates = [j for j, p in enumerate(pool) if p.prompt != s.prompt]
        if len(candidates) < k:
            raise DataError(f"few_shot={k} needs {k} other examples but {what} has only {len(candidates)}; "
                            f"lower --few-shot")
        shots = [pool[j] for j in rng.sample(candidates, k)]
        prefix = "\n\n".join(p.prompt + p.target for p in shots) + "\n\n"
        meta = dict(s.meta)
        meta["few_shot_ids"] = [p.id for p in shots]
        if isinstance(meta.get("paraphrases"), list):
            meta["paraphrases"] = [prefix + q for q in meta["paraphrases"]]
        out.append(dataclasses.replace(s, prompt=prefix + s.prompt, meta=meta))
    return out


# ------------------------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------------------------
def _split_source(ds: Dataset, kind: str, **kw) -> dict:
    return {"loader": "split", "kind": kind, "parent": ds.name, "parent_fingerprint": ds.fingerprint(),
            "parent_source": ds.source, **kw}


def random_splits(ds: Dataset, k: int, seed: int) -> list[Dataset]:
    """``k`` disjoint, near-equal parts of a seeded permutation (sample order kept inside each part)."""
    if not isinstance(k, int) or k < 1:
        raise DataError(f"k={k!r} splits is invalid; pass k >= 1")
    if len(ds) < k:
        raise DataError(f"dataset '{ds.name}' has {len(ds)} samples, fewer than k={k} splits; lower k or load more samples")
    perm = list(range(len(ds)))
    random.Random(seed).shuffle(perm)
    base, extra = divmod(len(ds), k)
    parts, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        idx = sorted(perm[start:start + size])
        start += size
        parts.append(Dataset(f"{ds.name}[split{i}of{k},seed{seed}]", [ds[j] for j in idx],
                             _split_source(ds, "random", k=k, part=i, seed=seed, indices=idx)))
    return parts


def _group_index(ds: Dataset) -> dict[str | None, list[int]]:
    by_group: dict[str | None, list[int]] = {}
    for i, s in enumerate(ds):
        by_group.setdefault(s.group, []).append(i)
    return by_group


def _shuffled_groups(by_group: dict, seed: int) -> list:
    keys = sorted(by_group, key=lambda g: (g is None, str(g)))  # canonical order, independent of sample order
    random.Random(seed).shuffle(keys)
    return keys


def group_disjoint_splits(ds: Dataset, k: int, seed: int) -> list[Dataset]:
    """``k`` parts that never share a group (a ``None`` group counts as one group).

    Groups are shuffled with ``seed``, then (stable-)sorted by size, largest first, and each is given to the part
    with the fewest samples so far (lowest index on ties), which balances parts by sample count.
    """
    if not isinstance(k, int) or k < 1:
        raise DataError(f"k={k!r} splits is invalid; pass k >= 1")
    by_group = _group_index(ds)
    if len(by_group) < k:
        raise DataError(f"dataset '{ds.name}' has {len(by_group)} distinct groups, fewer than k={k} group-disjoint "
                        f"splits; lower k or load more samples")
    if len(by_group) == k:
        logger.warning("dataset '%s' has exactly %d groups: every seed gives the same %d group-disjoint parts, so seeds "
                       "cannot vary this split (its spread across seeds is zero)", ds.name, k, k)
    order = sorted(_shuffled_groups(by_group, seed), key=lambda g: -len(by_group[g]))
    assigned: list[list[int]] = [[] for _ in range(k)]
    part_groups: list[list] = [[] for _ in range(k)]
    for g in order:
        target = min(range(k), key=lambda p: (len(assigned[p]), p))
        assigned[target].extend(by_group[g])
        part_groups[target].append(g)
    parts = []
    for i in range(k):
        idx = sorted(assigned[i])
        parts.append(Dataset(f"{ds.name}[gsplit{i}of{k},seed{seed}]", [ds[j] for j in idx],
                             _split_source(ds, "group_disjoint", k=k, part=i, seed=seed, indices=idx,
                                           groups=part_groups[i])))
    return parts


def train_test_split(ds: Dataset, test_fraction: float, seed: int, by_group: bool = False) -> tuple[Dataset, Dataset]:
    """Seeded train/test split with about ``test_fraction`` of the samples in test (at least one in each part).

    ``by_group=True`` keeps every group on one side: groups are taken in seeded order into the test part while that
    brings its size closer to the target.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction={test_fraction!r} must be strictly between 0 and 1")
    n = len(ds)
    if n < 2:
        raise DataError(f"dataset '{ds.name}' has {n} samples; a train/test split needs at least 2")
    want = test_fraction * n
    if by_group:
        groups = _group_index(ds)
        if len(groups) < 2:
            raise DataError(f"dataset '{ds.name}' has {len(groups)} distinct group; a group-disjoint train/test split "
                            f"needs at least 2 (or pass by_group=False)")
        keys = _shuffled_groups(groups, seed)
        test_idx: list[int] = []
        used = 0
        for j, g in enumerate(keys):
            if j == len(keys) - 1 and used == len(keys) - 1:
                break  # keep at least one group for training
            size = len(groups[g])
            if not test_idx or abs(len(test_idx) + size - want) < abs(len(test_idx) - want):
                test_idx.extend(groups[g])
                used += 1
        test_set = set(test_idx)
    else:
        n_test = min(max(int(round(want)), 1), n - 1)
        perm = list(range(n))
        random.Random(seed).shuffle(perm)
        test_set = set(perm[:n_test])
    train_idx = [i for i in range(n) if i not in test_set]
    test_idx = sorted(test_set)
    kind = "train_test_by_group" if by_group else "train_test"
    train = Dataset(f"{ds.name}[train,seed{seed}]", [ds[i] for i in train_idx],
                    _split_source(ds, kind, part="train", seed=seed, test_fraction=test_fraction, indices=train_idx))
    test = Dataset(f"{ds.name}[test,seed{seed}]", [ds[i] for i in test_idx],
                   _split_source(ds, kind, part="test", seed=seed, test_fraction=test_fraction, indices=test_idx))
    return train, test
