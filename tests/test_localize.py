"""Selection rules, commonality, neuron-set / score-store round trips, and the locate CLI end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caploc.cli import main
from caploc.errors import CaplocError, IncompatibleResultError
from caploc.localize import (
    LocateConfig,
    commonality,
    min_count,
    neuron_set_from_scores,
    select_kn,
    select_sigma,
    select_topk,
)
from caploc.models.layouts import Site
from caploc.models.tiny import tiny_model
from caploc.results import NeuronSet
from caploc.scorestore import ScoreStore


def test_sigma_rule_by_hand():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    # row 0: mean 2, population sd 4 -> threshold at sigma=1 is 6: only index 4
    # row 1: mean 3, sd sqrt(2) -> threshold 3 + 1.414 = 4.41: only index 4
    m = select_sigma(s, 1.0)
    assert m.tolist() == [[False] * 4 + [True], [False] * 4 + [True]]
    assert not select_sigma(s, 2.0)[1].any()


def test_topk_and_kn_rules():
    s = torch.tensor([[0.1, 0.9, 0.5, -2.0], [3.0, 0.0, 1.0, 0.7]])
    assert select_topk(s, 2).tolist() == [[False, True, True, False], [True, False, True, False]]
    # kn: > 0.5 * max
    assert select_kn(s, 0.5).tolist() == [[False, True, True, False], [True, False, False, False]]


def test_min_count_and_commonality():
    assert min_count(0.5, 20) == 10
    assert min_count(0.95, 20) == 19  # the paper: 19 of 20
    assert min_count(19, 20) == 19
    with pytest.raises(CaplocError):
        min_count(25, 20)
    with pytest.raises(CaplocError):
        min_count(2.5, 20)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    sel, counts = commonality(mask, 2)
    assert sel.tolist() == [0, 1] and counts.tolist() == [3, 2, 1]


def test_neuron_set_from_scores_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3, 8, generator=g)
    scores[:, 1, 5] += 50  # planted: always selected
    scores[:4, 2, 0] += 50  # selected in 4 of 6
    ns = neuron_set_from_scores(scores, LocateConfig(rule="sigma", sigma=2.0, min_freq=0.6), {"model_id": "x"})
    assert ns.pairs.tolist() == [[1, 5], [2, 0]]
    assert np.allclose(ns.frequency, [1.0, 4 / 6])
    assert ns.counts.shape == (24,)
    ns.save(tmp_path / "set")
    back = NeuronSet.load(tmp_path / "set")
    assert back.pairs.tolist() == ns.pairs.tolist() and np.array_equal(back.counts, ns.counts)
    assert back.meta["model_id"] == "x" and np.allclose(back.frequency, ns.frequency)
    ns.to_kn_json(tmp_path / "kn.json")
    assert json.loads((tmp_path / "kn.json").read_text()) == {"n_layers": 3, "d_mlp": 8, "neurons": [[1, 5], [2, 0]]}
    kn = NeuronSet.from_kn_json(tmp_path / "kn.json", 3, 8)
    assert kn.pairs.tolist() == ns.pairs.tolist()
    assert NeuronSet.from_lape(ns.to_lape(), 8).pairs.tolist() == ns.pairs.tolist()


def test_neuron_set_refuses_other_model(tmp_path):
    ns = NeuronSet(np.array([[0, 3]]), 3, 48)
    ns.check_compatible(Site(tiny_model("llama")))
    with pytest.raises(IncompatibleResultError, match="localize on this model first"):
        NeuronSet(np.array([[0, 3]]), 3, 64).check_compatible(Site(tiny_model("llama")))
    with pytest.raises(IncompatibleResultError):
        NeuronSet(np.array([[5, 3]]), 3, 48)


def test_score_store_refuses_changed_config(tmp_path):
    st = ScoreStore(tmp_path / "s")
    st.open({"steps": 2}, n_samples=3, shard_size=2)
    st.write_shard(0, [0, 1], torch.zeros(2, 1, 4), [0.0, 0.0], torch.zeros(2, 1))
    st.open({"steps": 2}, n_samples=3, shard_size=2)  # same config: resume
    assert st.finished_shards() == {0}
    with pytest.raises(CaplocError, match="steps 2 -> 4"):
        st.open({"steps": 4}, n_samples=3, shard_size=2)
    with pytest.raises(CaplocError, match="incomplete"):
        st.load()
    assert not list((tmp_path / "s").glob(".*tmp"))  # no temp files left
    # a temporary shard file left by a killed run is removed when the store is opened again
    (tmp_path / "s" / ".shard-00001.safetensors.1234.tmp").write_bytes(b"partial")
    st.open({"steps": 2}, n_samples=3, shard_size=2)
    assert not list((tmp_path / "s").glob(".*tmp")) and st.finished_shards() == {0}
    # memory-only attribution knobs are not part of the resume key; what decides the scores is
    from caploc.attribution.engine import AttributionConfig

    a, b = AttributionConfig(method="ig", steps=3), AttributionConfig(method="ig", steps=3, memory_mb=64, max_rows=2, batch_size=1)
    assert a.identity() == b.identity() and a.to_dict() != b.to_dict()
    assert AttributionConfig(method="ig", steps=4).identity() != a.identity()


def test_locate_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["locate", "--model", "tiny:gpt2", "--data", "rg:basic_arithmetic", "--n", "5", "--method", "ig", "--steps", "2",
               "--min-freq", "0.4", "--sigma", "3", "--shard-size", "2", "--out", str(out), "--kn-json", str(tmp_path / "kn.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "neurons" in printed and "% of MLP neurons" in printed
    ns = NeuronSet.load(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_neurons"] == len(ns) and summary["n_samples"] == 5
    assert ns.meta["model_type"] == "gpt2" and ns.meta["dataset_fingerprint"]
    # the stored scores reproduce the set
    from caploc.localize import load_scores
    data = load_scores(out)
    assert data["scores"].shape == (5, 3, 64)
    again = neuron_set_from_scores(data["scores"], LocateConfig(sigma=3, min_freq=0.4), {})
    assert again.pairs.tolist() == ns.pairs.tolist()
    # IG completeness gap is reported and small relative to f(a) - f(0)
    assert summary["completeness_rel_gap_mean"] is not None and summary["completeness_rel_gap_mean"] < 0.5


@pytest.mark.parametrize("args,msg", [
    (["--data", "no_such_dataset"], "no_such_dataset"),
    (["--method", "shap"], "method must be one of"),
    (["--min-freq", "0"], "min_freq"),
    (["--layers", "x-y"], "cannot parse --layers"),
])
def test_locate_cli_bad_input_one_line(tmp_path, capsys, args, msg):
    rc = main(["locate", "--model", "tiny:llama", "--n", "2", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err
    assert not (tmp_path / "o" / "neurons.json").exists()


def test_unknown_architecture_message():
    from caploc.errors import ArchitectureError

    class Weird(torch.nn.Module):
        class config:
            model_type = "weird"

    with pytest.raises(ArchitectureError, match="--layout"):
        Site(Weird())


def test_cli_usage_error_is_one_line(capsys):
    assert main(["locate", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


def test_truncated_shard_counts_as_unfinished(tmp_path):
    st = ScoreStore(tmp_path / "s")
    st.open({"steps": 2}, n_samples=4, shard_size=2)
    st.write_shard(0, [0, 1], torch.zeros(2, 1, 4), [0.0, 0.0], torch.zeros(2, 1))
    st.shard_path(1).write_bytes(b"")  # e.g. left empty by a power loss
    assert st.finished_shards() == {0}
