"""``caploc finetune``: train only the parameter slices of selected neurons and compare with random neurons, full
fine-tuning and LoRA.

* :mod:`.adapter` — :class:`NeuronAdapter` (trainable deltas of neuron slices, hooks, exact merge / unmerge, save /
  load) and :func:`merge_to_dir`;
* :mod:`.train` — the training loop shared by every arm;
* :mod:`.experiment` — :func:`finetune` / :class:`FinetuneExperiment` (the arms comparison, resume, learning-rate
  sweep), :mod:`.compare` (neurons vs random, specificity, claims), :mod:`.result` (the typed result);
* :mod:`.splits` — training / held-out / validation data; :mod:`.config` — :class:`FinetuneConfig`.
"""
from .adapter import ADAPTER_FORMAT, MERGED_ATTR, NeuronAdapter, SliceSpec, merge_to_dir, merged_ids
from .compare import compare_arms
from .config import ARMS, FinetuneConfig
from .experiment import FinetuneExperiment, finetune
from .result import ArmResult, FinetuneResult
from .splits import finetune_data, split_for_finetune, validation_split
from .train import (
                    DivergedError,
                    TrainLog,
                    batch_order,
                    collate_batch,
                    optimizer_state_numel,
                    target_nll,
                    train,
                    train_adapter,
)

__all__ = [
    "ADAPTER_FORMAT", "ARMS", "ArmResult", "DivergedError", "FinetuneConfig", "FinetuneExperiment", "FinetuneResult",
    "MERGED_ATTR", "NeuronAdapter", "SliceSpec", "TrainLog", "batch_order", "collate_batch", "compare_arms",
    "finetune", "finetune_data", "merge_to_dir", "merged_ids", "optimizer_state_numel", "split_for_finetune",
    "target_nll", "train", "train_adapter", "validation_split",
]
