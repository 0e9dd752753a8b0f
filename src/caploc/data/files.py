"""Datasets from files: JSON, JSONL, CSV/TSV, parquet, and HF ``datasets`` directories (``save_to_disk``).

Field mapping: ``prompt_field`` / ``target_field`` / ``group_field`` name the columns; when not given the first
existing column (exact name first, then case-insensitive) of these is used:

* prompt: prompt, question, input, text, instruction
* target: target, answer, output, completion, label
* group:  group, template, category, type, label (optional: no such column -> group None)

Targets that do not start with whitespace get a leading space (the separator after the prompt); numeric values
(labels) become strings. A ``paraphrases`` column (list, or a JSON list in a CSV cell) goes to ``meta['paraphrases']``;
other columns go to ``meta`` as JSON-safe values. An ``id`` column is used as sample id when its values are unique.
Files written by :meth:`Dataset.to_jsonl` are recognised by their header line and read back as they were.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from caploc.errors import DataError

from .core import _JSONL_HEADER_KEY, Dataset, Sample, add_few_shot, json_safe, subsample_indices

logger = logging.getLogger(__name__)

FILE_TYPES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
PROMPT_FIELDS = ("prompt", "question", "input", "text", "instruction")
TARGET_FIELDS = ("target", "answer", "output", "completion", "label")
GROUP_FIELDS = ("group", "template", "category", "type", "label")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _file_kind(path: Path) -> str | None:
    """'.json', '.jsonl', '.csv', '.tsv' or '.parquet' (a trailing .gz is allowed except for parquet), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] in (".json", ".jsonl", ".csv", ".tsv"):
            return suffixes[-1]
        return None
    if suffixes and suffixes[-1] in FILE_TYPES:
        return suffixes[-1]
    return None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in reversed(path.suffixes):
        if suffix.lower() in FILE_TYPES + (".gz",):
            name = name[: -len(suffix)]
        else:
            break
    return name or path.name


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in HF_MARKERS)


def is_data_path(path: Path) -> bool:
    """True when ``path`` should be read as data: a known file suffix (existing or not) or an existing directory."""
    return _file_kind(path) is not None or path.is_dir()


# ------------------------------------------------------------------------------------------------------------------
# readers: each returns a list of dict records
# ------------------------------------------------------------------------------------------------------------------
def _open_text(path: Path):
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _read_json(path: Path) -> list:
    with _open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"'{path.name}' is not valid JSON ({e.msg} at line {e.lineno}); fix the file "
                        f"(use .jsonl for one object per line)") from None
    if isinstance(obj, dict):
        if "data" in obj and isinstance(obj["data"], list):
            obj = obj["data"]
        else:
            raise DataError(f"'{path.name}' is a JSON object without a 'data' list; give a list of objects or "
                            f"{{\"data\": [...]}}")
    if not isinstance(obj, list):
        raise DataError(f"'{path.name}' holds a JSON {type(obj).__name__}; give a list of objects or {{\"data\": [...]}}")
    return obj


def _read_jsonl(path: Path) -> list:
    rows = []
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"line {lineno} of '{path.name}' is not valid JSON ({e.msg}); fix or remove it") from None
    return rows


def _read_csv(path: Path, delimiter: str) -> list:
    with _open_text(path) as fh:
        text = fh.read()
    if not text.strip():
        return []
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if reader.fieldnames is None:
        return []
    rows = []
    for row in reader:
        row.pop(None, None)  # cells beyond the header
        if any(v not in (None, "") for v in row.values()):
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list:
    try:
        import pandas as pd
    except ImportError:
        raise DataError(f"reading '{path.name}' needs pandas and pyarrow; pip install pandas pyarrow") from None
    try:
        frame = pd.read_parquet(path)
    except ImportError:
        raise DataError(f"reading '{path.name}' needs pyarrow; pip install pyarrow") from None
    except Exception as e:
        raise DataError(f"'{path.name}' could not be read as parquet ({type(e).__name__}: {_one_line(e)}); "
                        f"check the file") from None
    return frame.to_dict("records")


def _read_hf_dir(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the datasets directory '{path}' needs the datasets package; "
                        f"pip install datasets") from None
    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"'{path}' could not be loaded with datasets.load_from_disk ({type(e).__name__}: "
                        f"{_one_line(e)}); check the directory") from None
    return _hf_records(obj, str(path))


def _hf_records(obj, where: str) -> list:
    if isinstance(obj, dict):  # DatasetDict / IterableDatasetDict are dict subclasses
        splits = list(obj.keys())
        if "train" not in splits:
            raise DataError(f"'{where}' is a DatasetDict with splits {', '.join(splits)} and no 'train'; "
                            f"pass one split's directory, e.g. '{where}/{splits[0] if splits else '<split>'}'")
        logger.info("%s: using split 'train' of %s", where, ", ".join(splits))
        obj = obj["train"]
    return list(obj.to_list()) if hasattr(obj, "to_list") else [dict(r) for r in obj]


def read_records(path: Path) -> list:
    """The raw rows of a data file or HF datasets directory, as a list (of dicts, normally)."""
    if path.is_dir():
        if not is_hf_dir(path):
            raise DataError(f"directory '{path}' is not a datasets save_to_disk directory (none of "
                            f"{', '.join(HF_MARKERS)}); pass a data file or a saved dataset")
        return _read_hf_dir(path)
    if not path.is_file():
        raise DataError(f"dataset file '{path}' not found; check the path")
    kind = _file_kind(path)
    if kind == ".json":
        return _read_json(path)
    if kind == ".jsonl":
        return _read_jsonl(path)
    if kind == ".csv":
        return _read_csv(path, ",")
    if kind == ".tsv":
        return _read_csv(path, "\t")
    if kind == ".parquet":
        return _read_parquet(path)
    raise DataError(f"'{path.name}' has an unsupported type; use one of {', '.join(FILE_TYPES)}")


# ------------------------------------------------------------------------------------------------------------------
# records -> samples
# ------------------------------------------------------------------------------------------------------------------
def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    return False


def _scalar_text(v: Any) -> str:
    v = json_safe(v)
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r))


def _resolve(kind: str, given: str | None, defaults: Iterable[str], columns: list[str], where: str,
             required: bool) -> str | None:
    flag = f"--{kind}-field"
    shown = ", ".join(columns) if columns else "(none)"
    if given is not None:
        if given in columns:
            return given
        raise DataError(f"field '{given}' not found in {where}; columns are: {shown}; pass {flag}")
    lower = {c.lower(): c for c in reversed(columns)}
    for name in defaults:
        if name in columns:
            return name
    for name in defaults:
        if name in lower:
            return lower[name]
    if required:
        raise DataError(f"no {kind} field found in {where} (tried {', '.join(defaults)}); columns are: {shown}; "
                        f"pass {flag}")
    return None


def _paraphrases(value: Any, where: str, row: int) -> list[str]:
    if _is_missing(value):
        return []
    value = json_safe(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise DataError(f"row {row} of {where}: 'paraphrases' is not a valid JSON list; "
                                f"write it as [\"...\", \"...\"]") from None
        else:
            value = [text]
    if not isinstance(value, list):
        raise DataError(f"row {row} of {where}: 'paraphrases' must be a list of strings")
    return [str(p) for p in value if not _is_missing(p)]


def records_to_samples(rows: list, where: str, *, prompt_field: str | None = None, target_field: str | None = None,
                       group_field: str | None = None) -> tuple[list[Sample], dict]:
    """Map raw rows to samples; returns the samples and the resolved field names."""
    if not rows:
        raise DataError(f"dataset {where} is empty: it has no rows")
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise DataError(f"row {i} of {where} is a {type(r).__name__}, not an object with named fields; "
                            f"give one object per row")
    columns = _columns(rows)
    pf = _resolve("prompt", prompt_field, PROMPT_FIELDS, columns, where, required=True)
    tf = _resolve("target", target_field, TARGET_FIELDS, columns, where, required=True)
    gf = _resolve("group", group_field, GROUP_FIELDS, columns, where, required=False)
    if pf == tf:
        raise DataError(f"prompt and target fields are both '{pf}' in {where}; pass --prompt-field and --target-field")

    ids = [r.get("id") for r in rows] if "id" in columns and pf != "id" and tf != "id" else None
    if ids is not None and (any(_is_missing(v) for v in ids) or len({_scalar_text(v) for v in ids}) != len(rows)):
        logger.info("%s: column 'id' is missing or not unique; using row numbers as ids", where)
        ids = None

    samples = []
    for i, r in enumerate(rows):
        row_no = i + 1
        prompt = r.get(pf)
        if _is_missing(prompt):
            raise DataError(f"row {row_no} of {where} has an empty '{pf}' (the prompt); remove the row or fill it")
        target = r.get(tf)
        if _is_missing(target):
            raise DataError(f"row {row_no} of {where} has an empty '{tf}' (the target); remove the row or fill it")
        if isinstance(json_safe(target), (list, dict)) or isinstance(json_safe(prompt), (list, dict)):
            raise DataError(f"row {row_no} of {where}: '{pf}' and '{tf}' must be text or numbers, not lists/objects; "
                            f"pass --prompt-field/--target-field naming text columns")
        prompt = _scalar_text(prompt)
        target = _scalar_text(target)
        if not target[:1].isspace():
            target = " " + target
        group = None
        if gf is not None and not _is_missing(r.get(gf)):
            group = _scalar_text(r.get(gf))
        meta = {}
        for k, v in r.items():
            if k in (pf, tf, gf, "paraphrases"):
                continue
            meta[str(k)] = json_safe(v)
        if "paraphrases" in r:
            meta["paraphrases"] = _paraphrases(r.get("paraphrases"), where, row_no)
        sid = _scalar_text(ids[i]) if ids is not None else str(i)
        samples.append(Sample(prompt=prompt, target=target, group=group, meta=meta, id=sid))
    if gf is not None and group_field is None:
        sizes = Counter(s.group for s in samples)
        shown = ", ".join(f"{g}: {c}" for g, c in sizes.most_common(6)) + (", ..." if len(sizes) > 6 else "")
        logger.warning("%s: column '%s' is used as the group (commonality) field: %d groups (%s); pass "
                       "--group-field to choose another", where, gf, len(sizes), shown)
    return samples, {"prompt_field": pf, "target_field": tf, "group_field": gf}


def _finish(name: str, pool: list[Sample], n: int | None, seed: int, few_shot: int, source: dict) -> Dataset:
    idx = subsample_indices(len(pool), n, seed, f"'{name}'")
    samples = [pool[i] for i in idx]
    if few_shot > 0:
        samples = add_few_shot(samples, pool, few_shot, seed, f"'{name}'")
    source.update({"n": n, "seed": seed, "few_shot": few_shot, "available": len(pool)})
    logger.info("loaded %s: %d of %d rows", name, len(samples), len(pool))
    return Dataset(name, samples, source)


def _is_caploc_jsonl(path: Path) -> bool:
    if _file_kind(path) != ".jsonl" or path.suffix.lower() == ".gz":
        return False
    with open(path, encoding="utf-8-sig") as fh:
        for line in fh:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(first, dict) and _JSONL_HEADER_KEY in first
    return False


def load_path(path, n: int | None = None, seed: int = 0, *, prompt_field: str | None = None,
              target_field: str | None = None, group_field: str | None = None, few_shot: int = 0) -> Dataset:
    """Load a JSON/JSONL/CSV/TSV/parquet file or a datasets ``save_to_disk`` directory (name = file stem)."""
    path = Path(path).expanduser()
    if path.is_file() and _is_caploc_jsonl(path):
        saved = Dataset.from_jsonl(path)
        if any(f is not None for f in (prompt_field, target_field, group_field)):
            logger.warning("%s was written by caploc; field mapping arguments are ignored", path)
        return _finish(saved.name, saved.samples, n, seed, few_shot,
                       {"loader": "caploc_jsonl", "path": str(path), "saved_source": saved.source})
    if path.is_dir() and not is_hf_dir(path):
        raise DataError(f"directory '{path}' is not a datasets save_to_disk directory (none of "
                        f"{', '.join(HF_MARKERS)}); pass a data file or a saved dataset")
    rows = read_records(path)
    where = f"'{path.name}'"
    samples, fields = records_to_samples(rows, where, prompt_field=prompt_field, target_field=target_field,
                                         group_field=group_field)
    kind = "hf_disk" if path.is_dir() else (_file_kind(path) or "").lstrip(".")
    return _finish(_stem(path) if path.is_file() else path.name, samples, n, seed, few_shot,
                   {"loader": kind, "path": str(path.resolve()), **fields})


def load_hf(name: str, n: int | None = None, seed: int = 0, *, prompt_field: str | None = None,
            target_field: str | None = None, group_field: str | None = None, few_shot: int = 0) -> Dataset:
    """``hf:<path>``: a ``save_to_disk`` directory, or else a dataset already in the local HF cache (split train).

    Nothing is downloaded when ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` is set (as caploc's tools do).
    """
    if not name:
        raise DataError("spec 'hf:' names no dataset; use hf:<save_to_disk directory>")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return load_path(path, n, seed, prompt_field=prompt_field, target_field=target_field,
                             group_field=group_field, few_shot=few_shot)
        if not is_hf_dir(path):
            raise DataError(f"directory '{path}' is not a datasets save_to_disk directory (none of "
                            f"{', '.join(HF_MARKERS)}); save it with Dataset.save_to_disk")
        return load_path(path, n, seed, prompt_field=prompt_field, target_field=target_field,
                         group_field=group_field, few_shot=few_shot)
    try:
        import datasets
    except ImportError:
        raise DataError(f"'hf:{name}' needs the datasets package; pip install datasets") from None
    try:
        obj = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(f"'hf:{name}' is neither a directory nor a dataset in the local HF cache "
                        f"({type(e).__name__}); save it with save_to_disk and pass its directory") from None
    rows = _hf_records(obj, f"hf:{name}")
    samples, fields = records_to_samples(rows, f"'hf:{name}'", prompt_field=prompt_field, target_field=target_field,
                                         group_field=group_field)
    return _finish(name.replace("/", "_"), samples, n, seed, few_shot, {"loader": "hf_cache", "name": name, **fields})
