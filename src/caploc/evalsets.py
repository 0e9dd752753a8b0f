"""Evaluation sets: the one builder of the held-out and off-target data that ``eval``, ``intervene``, ``finetune`` and
``reproduce`` evaluate on, so a study and the single verbs measure on the same rows.

The rule for held-out data: when the neurons' localization data can be rebuilt from its recorded source, its rows are
removed from a fresh pool of the same data and the rest is split into rows of groups the localization saw and rows of
unseen groups (counts logged); a file whose every row was localized on is an error, not a silent reuse.
"""
from __future__ import annotations

import logging
from typing import Sequence

from .data import Dataset, load_dataset, train_test_split
from .errors import CaplocError, DataError
from .runs import Provenance, same_spec, try_rebuild_dataset

log = logging.getLogger(__name__)

DEFAULT_OFF_TARGET = ("facts", "rg:letter_counting", "gsm_symbolic")


def default_off_target(on_spec: str, n: int = 2) -> list[str]:
    """Off-target datasets used when none are given: facts and rg:letter_counting (gsm_symbolic when one of them
    is the on-target data)."""
    return [s for s in DEFAULT_OFF_TARGET if not same_spec(s, on_spec)][:n]


def heldout_splits(dataset: Dataset, exclude: Dataset | None = None, *, test_fraction: float = 0.5, seed: int = 0):
    """Two in-domain held-out sets of ``dataset``: ``(samples, templates)``.

    With ``exclude`` (the dataset the neurons were localized on): samples whose prompt is in ``exclude`` are dropped;
    ``samples`` = the rest whose group (template) occurs in ``exclude`` (new problems, seen templates);
    ``templates`` = those whose group does not (unseen templates). Without ``exclude`` the groups of ``dataset`` are
    split with ``train_test_split(by_group=True)``: the test part is the held-out-template set and the train part is
    returned as "samples" (its templates are NOT guaranteed to be the localization's). Either part may be None.
    """
    if exclude is not None:
        seen_prompts = {s.prompt for s in exclude}
        seen_groups = {s.group for s in exclude}
        fresh = [i for i, s in enumerate(dataset) if s.prompt not in seen_prompts]
        a = [i for i in fresh if dataset[i].group in seen_groups]
        b = [i for i in fresh if dataset[i].group not in seen_groups]
        sa = dataset.subset(a, name=f"{dataset.name}[heldout-samples]") if a else None
        sb = dataset.subset(b, name=f"{dataset.name}[heldout-templates]") if b else None
        return sa, sb
    train, test = train_test_split(dataset, test_fraction, seed, by_group=True)
    return (Dataset(f"{dataset.name}[split-train-groups]", train.samples, train.source),
            Dataset(f"{dataset.name}[split-test-groups]", test.samples, test.source))


def eval_sets(specs: Sequence[str], *, n: int = 32, seed: int = 1, neuron_meta: dict | None = None,
              heldout: bool = True, target: str = "cot", n_off: int | None = None,
              load_kw: dict | None = None) -> list[tuple[str, Dataset, str]]:
    """``[(label, Dataset, role)]``: the first spec is on-target, the others off-target (``n_off`` samples each,
    default ``n``). The one builder of evaluation sets for ``eval``, ``intervene``, ``finetune`` and ``reproduce``.

    With ``heldout`` and a neuron set whose localization data can be rebuilt from its recorded source (same spec as the
    first one), the on-target spec becomes two datasets of up to ``n`` samples each, drawn from a pool of ``4 n``
    samples (seed ``seed``) minus the localization prompts: ``<spec>:heldout-samples`` (groups seen during
    localization) and ``<spec>:heldout-templates`` (unseen groups). When the localization data is of the same kind but
    cannot be rebuilt, the pool is split by group (labels ``:split-groups-a`` / ``:split-groups-b``) and a warning says
    the samples may overlap the localization data. A first spec other than the localization data's is used as is.
    ``load_kw`` (field mapping of user files) goes to every ``load_dataset`` call of the first spec.
    """
    if not specs:
        raise CaplocError("no datasets given: pass --data at least once")
    load_kw = dict(load_kw or {})
    out: list[tuple[str, Dataset, str]] = []
    first = specs[0]
    prov = Provenance.from_meta(neuron_meta) if neuron_meta is not None else None
    loc_spec = prov.data.spec if prov is not None and prov.data is not None else None
    same = loc_spec is None or same_spec(loc_spec, first)
    if heldout and prov is not None and same:
        loc, why = (None, "no recorded source")
        if loc_spec is not None:
            loc, why = try_rebuild_dataset(prov.data.source, prov.data.fingerprint, allow_paths=[first])
        try:
            pool = load_dataset(first, n=4 * n, seed=seed, target=target, **load_kw)
        except DataError:  # a file with fewer rows than 4 n: its rows are the pool (a bad file fails again below)
            pool = load_dataset(first, n=None, seed=seed, target=target, **load_kw)
        if loc is None and len(pool.unique_groups()) < 2:
            raise CaplocError(f"{first} has no groups to hold out and its localization data cannot be rebuilt "
                              f"({why}); pass --no-heldout")
        if loc is not None:
            a, b = heldout_splits(pool, exclude=loc)
            names = ("heldout-samples", "heldout-templates")
            used = len(pool) - (len(a) if a else 0) - (len(b) if b else 0)
            log.warning("held-out evaluation data of %s: a pool of %d rows (seed %d) minus %d used to localize -> %d "
                        "rows of seen groups, %d of unseen groups", first, len(pool), seed, used,
                        len(a) if a else 0, len(b) if b else 0)
            if not a and not b:
                raise CaplocError(f"all {len(pool)} rows of {first} drawn for evaluation were used to localize the "
                                  f"neurons, none is held out: localize on fewer rows (--n below {len(pool)}), "
                                  "evaluate on another file, or pass --no-heldout to evaluate on the localization "
                                  "rows themselves")
        else:
            log.warning("the neurons' localization data cannot be rebuilt (%s): splitting %s by group instead; these "
                        "samples may overlap the localization data", why, first)
            a, b = heldout_splits(pool, None, seed=seed)
            names = ("split-groups-a", "split-groups-b")
        for part, name in zip((a, b), names):
            if part is None or len(part) == 0:
                log.warning("no %s samples of %s in a pool of %d; skipped", name, first, len(pool))
                continue
            if len(part) < n:
                log.warning("only %d %s samples of %s (wanted %d)", len(part), name, first, n)
            out.append((f"{first}:{name}", part.subset(range(min(n, len(part))), name=f"{part.name}"), "on"))
        if not out:
            raise CaplocError(f"no held-out samples of {first} in a pool of {len(pool)}: load more (--n) or pass "
                              "--no-heldout")
    else:
        ds = load_dataset(first, n=n, seed=seed, target=target, **load_kw)
        if prov is not None and same and prov.data is not None:
            loc, _ = try_rebuild_dataset(prov.data.source, prov.data.fingerprint, allow_paths=[first])
            if loc is not None:
                seen = {x.prompt for x in loc}
                k = sum(x.prompt in seen for x in ds)
                if k:
                    log.warning("%d of the %d evaluation rows of %s were used to localize the neurons: effects on "
                                "them are not held-out results", k, len(ds), first)
        out.append((first, ds, "on"))
    for spec in specs[1:]:
        if any(lab == spec for lab, _, _ in out):
            raise CaplocError(f"dataset {spec!r} is given twice; pass each --data once")
        out.append((spec, load_dataset(spec, n=n_off or n, seed=seed, target=target), "off"))
    return out


__all__ = ["DEFAULT_OFF_TARGET", "default_off_target", "heldout_splits", "eval_sets"]
