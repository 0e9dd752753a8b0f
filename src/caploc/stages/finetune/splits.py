"""Data for the fine-tuning comparison: the training set, its held-out evaluation sets and the validation split.

:func:`finetune_data` is what ``caploc finetune`` uses: the evaluation sets come from :func:`caploc.evalsets.eval_sets`
(the one eval-set builder: held-out samples / held-out templates of the localization data, off-target sets) and the
training set is drawn from the rest of the data, disjoint from every evaluation prompt and from the held-out
templates. :func:`split_for_finetune` splits one given dataset into train / held-out / held-out-template parts.
:func:`validation_split` holds part of the training data out to pick learning rates (never the evaluation sets).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from ...data import Dataset, load_dataset, train_test_split
from ...errors import CaplocError
from ...evalsets import eval_sets

log = logging.getLogger(__name__)

#: label suffixes (``caploc.evalsets.eval_sets``) of the on-target sets whose groups (templates) training must not see
UNSEEN_SUFFIXES = (":heldout-templates", ":split-groups-b")


def split_for_finetune(ds, n_train: int, n_eval: int, seed: int = 0, template_fraction: float = 0.3,
                       exclude=None) -> dict:
    """Train / held-out splits of one dataset: ``{"train", "heldout", "heldout_templates"}``.

    Groups (templates) are shuffled with ``seed`` and taken into the held-out-template pool until it holds about
    ``template_fraction`` of the samples (at least ``n_eval``); ``train`` (n_train) and ``heldout`` (n_eval) are
    disjoint random samples of the remaining (seen) templates, and ``heldout_templates`` (n_eval) a random sample of
    the pool. ``exclude`` (e.g. the dataset the neurons were localized on): its templates never go to the pool and its
    prompts never appear in the held-out parts (they may be trained on). Without 2 usable groups there is no
    ``heldout_templates`` part.
    """
    for name, v in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CaplocError(f"{name}={v!r} must be a positive integer")
    rng = np.random.default_rng(seed)
    items = list(ds)
    ex_prompts = {s.prompt for s in exclude} if exclude is not None else set()
    ex_groups = {s.group for s in exclude} if exclude is not None else set()
    by_group: dict = {}
    for i, s in enumerate(items):
        by_group.setdefault(s.group, []).append(i)
    keys = sorted(by_group, key=lambda g: (g is None, str(g)))
    keys = [keys[j] for j in rng.permutation(len(keys))]
    pool_groups: list = []
    if len(keys) >= 2:
        want = max(n_eval, template_fraction * len(items))
        count = 0
        for g in keys:
            if count >= want or len(pool_groups) == len(keys) - 1:
                break
            if g in ex_groups:
                continue
            fresh = [i for i in by_group[g] if items[i].prompt not in ex_prompts]
            if fresh:
                pool_groups.append(g)
                count += len(fresh)
    out: dict = {}
    pool_set = set(pool_groups)
    if pool_groups:
        pool = [i for g in pool_groups for i in by_group[g] if items[i].prompt not in ex_prompts]
        if len(pool) < n_eval:
            raise CaplocError(f"only {len(pool)} samples of held-out templates in {ds.name} for n_eval={n_eval}; "
                              "load more samples or lower --n-eval")
        pick = sorted(rng.choice(pool, size=n_eval, replace=False).tolist())
        out["heldout_templates"] = Dataset(f"{ds.name}:heldout_templates", [items[i] for i in pick],
                                           {**ds.source, "split": "heldout_templates", "seed": seed,
                                            "groups": [str(g) for g in pool_groups]})
    else:
        log.info("%s has fewer than 2 usable groups: no held-out-template split", ds.name)
    seen = [i for i, s in enumerate(items) if s.group not in pool_set]
    perm = [seen[j] for j in rng.permutation(len(seen))]
    train_idx = perm[:n_train]
    rest = [i for i in perm[n_train:] if items[i].prompt not in ex_prompts]
    if len(train_idx) < n_train or len(rest) < n_eval:
        raise CaplocError(f"{ds.name} has {len(seen)} samples of the training templates, fewer than n_train + n_eval = "
                          f"{n_train + n_eval} (after excluding localization prompts); load more samples or lower "
                          "--n-train/--n-eval")
    train_prompts = {items[i].prompt for i in train_idx}
    held = [i for i in rest if items[i].prompt not in train_prompts][:n_eval]
    out["train"] = Dataset(f"{ds.name}:train", [items[i] for i in sorted(train_idx)],
                           {**ds.source, "split": "train", "seed": seed})
    out["heldout"] = Dataset(f"{ds.name}:heldout", [items[i] for i in sorted(held)],
                             {**ds.source, "split": "heldout", "seed": seed})
    return {k: out[k] for k in ("train", "heldout", "heldout_templates") if k in out}


def finetune_data(data: str, n_train: int, n_eval: int, *, eval_data: Sequence[str] = (), seed: int = 0,
                  data_seed: int = 1, target: str = "cot", neuron_meta: dict | None = None,
                  ) -> tuple[Dataset, dict[str, Dataset], list[str]]:
    """``(train, {label: eval set}, on-target labels)`` for fine-tuning on ``data``.

    Evaluation sets: :func:`caploc.evalsets.eval_sets` of ``[data, *eval_data]`` (``n_eval`` samples each, seed
    ``data_seed``). With a neuron set (``neuron_meta``) the on-target sets are ``<data>:heldout-samples`` (templates
    the localization saw) and ``<data>:heldout-templates`` (unseen templates), both without localization prompts;
    without one, ``<data>`` itself. Training set: ``n_train`` samples of a pool of ``data`` (seed ``data_seed``),
    drawn with ``seed``, that share no prompt with any evaluation set and no group with the held-out-template set
    (localization prompts may be trained on).
    """
    for name, v in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CaplocError(f"{name}={v!r} must be a positive integer")
    built = eval_sets([data, *eval_data], n=n_eval, seed=data_seed, neuron_meta=neuron_meta,
                      heldout=neuron_meta is not None, target=target)
    sets = {label: ds for label, ds, _ in built}
    on = [label for label, _, role in built if role == "on"]
    taken = {s.prompt for label in on for s in sets[label]}
    unseen = {s.group for label in on if label.endswith(UNSEEN_SUFFIXES) for s in sets[label]}
    generated = data == "gsm_symbolic" or data.startswith("rg:")
    pool = load_dataset(data, n=3 * (n_train + 2 * n_eval) + 4 * n_eval if generated else None, seed=data_seed,
                        target=target)
    free = [i for i, s in enumerate(pool) if s.prompt not in taken and s.group not in unseen]
    if len(free) < n_train:
        raise CaplocError(f"{pool.name} has {len(free)} samples outside the evaluation sets and held-out templates, "
                          f"fewer than n_train = {n_train}; lower --n-train or --n-eval")
    pick = sorted(np.random.default_rng(seed).choice(free, size=n_train, replace=False).tolist())
    train = Dataset(f"{pool.name}:train", [pool[i] for i in pick], {**pool.source, "split": "train", "seed": seed})
    log.info("fine-tuning data: %d training samples of %s; evaluation sets %s (on-target: %s)", len(train), data,
             ", ".join(f"{k} ({len(v)})" for k, v in sets.items()), ", ".join(on))
    return train, sets, on


def validation_split(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(fit, validation)``: a seeded split of the training data (about ``fraction`` in validation, at least one
    sample in each part). The validation part picks each arm's learning rate; the arms then train on ``fit``."""
    if len(train) < 2:
        raise CaplocError(f"a learning-rate sweep needs a validation split of the training data, but it has "
                          f"{len(train)} sample(s); pass --n-train 2 or more")
    fit, val = train_test_split(train, fraction, seed)
    return (Dataset(f"{train.name}[fit]", fit.samples, fit.source),
            Dataset(f"{train.name}[validation]", val.samples, val.source))


__all__ = ["finetune_data", "split_for_finetune", "validation_split", "UNSEEN_SUFFIXES"]
