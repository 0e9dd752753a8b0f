"""Issue 19 item 7: a learning-rate sweep per arm. Each arm is reported at the rate with the lowest NLL on a validation
split of the training data (held out of training; the evaluation sets never choose), checked here against an
independent re-run of every rate."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from caploc.data import Dataset, Sample
from caploc.errors import CaplocError
from caploc.measure import nll
from caploc.models.loading import load_model
from caploc.results import NeuronSet
from caploc.stages.finetune import FinetuneConfig, NeuronAdapter, finetune, train_adapter, validation_split

LRS = (1e-4, 3e-2, 3.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _toy_ds(n, name="toy", offset=0):
    letters = "abcdefghijklmnop"
    return Dataset(name, [Sample(prompt=f"{letters[i % 16]}{letters[(3 * i + offset) % 16]} ->",
                                 target=f" {letters[i % 16] * 4}", group=f"g{i % 4}") for i in range(n)])


def test_default_is_one_rate_without_validation():
    cfg = FinetuneConfig()
    assert not cfg.sweep and cfg.arm_lrs("neurons") == cfg.arm_lrs("full") == [cfg.lr]
    assert "lrs" not in cfg.key_dict()  # resume keys of runs made before the sweep are unchanged
    cfg = FinetuneConfig(lrs=[1e-3, 1e-2], full_lrs=[1e-5])
    assert cfg.sweep and cfg.arm_lrs("neurons") == cfg.arm_lrs("random") == [1e-3, 1e-2]
    assert cfg.arm_lrs("full") == [1e-5]


def test_sweep_picks_the_rate_with_the_lowest_validation_nll(tmp_path):
    lm = load_model("tiny:llama")
    ns = NeuronSet(np.array([[0, 1], [0, 5], [1, 2], [2, 7]]), lm.site.n_layers, lm.site.d_mlp)
    train = _toy_ds(12)
    evals = {"toy:heldout": _toy_ds(6, offset=1), "other": Dataset("other", [Sample("xyz", " qq")])}
    cfg = FinetuneConfig(arms=("neurons", "random", "full"), steps=4, batch_size=4, n_random=1, lrs=LRS,
                         val_fraction=0.25)
    res = finetune(lm, ns, train, cfg, tmp_path / "ft", eval_sets=evals, progress=False)

    fit, val = validation_split(train, 0.25, cfg.seed)
    assert res.meta["validation"]["n"] == len(val) == 3 and res.meta["validation"]["n_fit"] == len(fit) == 9
    assert not {s.prompt for s in val} & {s.prompt for s in fit}
    # independent reference for the neurons arm: train each rate on the fit part, score the validation part
    ref = {}
    for lr in LRS:
        ad = NeuronAdapter(lm, ns)
        one = FinetuneConfig(arms=("neurons",), steps=4, batch_size=4, lr=lr)
        train_adapter(lm, ad, fit, one, progress=False)
        with ad.applied(lm.model):
            v = nll(lm, val, batch_size=cfg.eval_batch_size).nll_per_token
        ref[lr] = float(v) if math.isfinite(v) else math.inf
    neu = res.arm("neurons")
    assert [r["lr"] for r in neu.sweep] == list(LRS)
    for r in neu.sweep:
        assert r["val_nll"] == pytest.approx(ref[r["lr"]], rel=1e-5, abs=1e-6)
    best = min(LRS, key=ref.get)
    assert neu.lr == best and neu.val_nll == pytest.approx(ref[best], rel=1e-5)
    assert len({round(v, 3) for v in ref.values()}) == len(LRS), "rates must differ for the test to mean anything"
    # every arm (each random set on its own) reports the argmin of its own validation NLL, marked once
    for a in res.arms:
        rows = [r for r in a.sweep if math.isfinite(r["val_nll"])]
        pick = min(rows, key=lambda r: r["val_nll"])
        assert a.lr == pick["lr"] and a.val_nll == pick["val_nll"]
        assert [r["selected"] for r in a.sweep].count(True) == 1
    # the saved adapter is the selected rate's: it reproduces the reported evaluation
    ad = NeuronAdapter.load(tmp_path / "ft" / "adapter", lm)
    with ad.applied(lm.model):
        r = nll(lm, evals["toy:heldout"], batch_size=8)
    assert r.nll_per_token == pytest.approx(neu.eval["toy:heldout"]["nll"], abs=1e-6)
    # the report shows each arm's selected rate and the sweep
    rep = json.loads((tmp_path / "ft" / "report.json").read_text())
    main = rep["tables"][0]
    assert [row[2] for row in main["rows"][:3]] == [a.lr for a in res.arms]
    sweep = next(t for t in rep["tables"] if t["title"].startswith("Learning-rate sweep"))
    assert len(sweep["rows"]) == 3 * len(LRS)
    assert sorted((row[0], row[1]) for row in sweep["rows"] if row[-1] == "yes") == sorted(
        (a.name, a.lr) for a in res.arms)


def test_sweep_rule_uses_validation_only_and_skips_diverged_rates():
    """The selection rule on scripted runs: argmin of validation NLL; a diverged rate is listed, never chosen; the
    evaluation sets are scored only for a new best, so they cannot influence the choice."""
    from caploc.stages.finetune import DivergedError, FinetuneExperiment, TrainLog

    lm = load_model("tiny:llama")
    cfg = FinetuneConfig(arms=("full",), steps=1, lrs=(0.1, 0.2, 0.3, 0.4))
    exp = FinetuneExperiment(lm, None, _toy_ds(8), cfg, progress=False)
    val = {0.1: 3.0, 0.2: 2.5, 0.3: None, 0.4: 2.7}  # None: diverges
    evaluated = []

    def attempt(lr):
        if val[lr] is None:
            raise DivergedError("loss nan")
        tl = TrainLog([5.0, 4.0], 0.0, [0.0], 1, 2, lr)

        def evaluate():
            evaluated.append(lr)
            return {"set": {"nll": -lr}}  # lower for higher rates: must not matter
        return tl, val[lr], evaluate

    tl, ev, v, rows = exp._sweep("full", "full", attempt)
    assert tl.lr == 0.2 and v == 2.5 and ev == {"set": {"nll": -0.2}}
    assert evaluated == [0.1, 0.2]
    assert [(r["lr"], r["selected"]) for r in rows] == [(0.1, False), (0.2, True), (0.3, False), (0.4, False)]
    assert rows[2]["val_nll"] == math.inf
    val.update({0.1: None, 0.2: None, 0.4: None})
    with pytest.raises(CaplocError, match="every learning rate"):
        exp._sweep("full", "full", attempt)
