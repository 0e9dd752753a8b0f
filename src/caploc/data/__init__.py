"""caploc.data: samples, datasets, loaders, splits and tokenization.

>>> from caploc.data import load_dataset, group_disjoint_splits, encode
>>> ds = load_dataset("gsm_symbolic", n=32, seed=0)          # doctest: +SKIP
>>> parts = group_disjoint_splits(ds, k=2, seed=0)            # doctest: +SKIP
"""

from .builtin import (
    BUILTINS,
    load_dataset,
    load_facts,
    load_gsm_symbolic,
    load_humaneval,
    load_reasoning_gym,
    paraphrase_table,
)
from .core import (
    Dataset,
    Sample,
    add_few_shot,
    fingerprint,
    group_disjoint_splits,
    json_safe,
    random_splits,
    train_test_split,
)
from .encode import Encoded, collate, encode, encode_dataset, encode_prompt, pad_id
from .files import FILE_TYPES, load_hf, load_path, records_to_samples

__all__ = [
    "BUILTINS",
    "FILE_TYPES",
    "Dataset",
    "Encoded",
    "Sample",
    "add_few_shot",
    "collate",
    "encode",
    "encode_dataset",
    "encode_prompt",
    "fingerprint",
    "group_disjoint_splits",
    "json_safe",
    "load_dataset",
    "load_facts",
    "load_gsm_symbolic",
    "load_hf",
    "load_humaneval",
    "load_path",
    "load_reasoning_gym",
    "pad_id",
    "paraphrase_table",
    "random_splits",
    "records_to_samples",
    "train_test_split",
]
