"""NeuronSet: readable repr, pandas view, round trips (save/load, KN JSON, LAPE lists), and one-line refusals of bad
indices and damaged files."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from caploc.errors import CaplocError, IncompatibleResultError
from caploc.results import NeuronSet


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _random_set(n_layers=30, d_mlp=1536, n=500, seed=0, with_stats=True) -> NeuronSet:
    rng = np.random.default_rng(seed)
    flat = rng.choice(n_layers * d_mlp, size=n, replace=False)
    kw = {}
    if with_stats:
        counts = rng.integers(0, 49, size=n_layers * d_mlp)
        kw = dict(frequency=rng.random(n), mean_score=rng.normal(size=n), counts=counts, n_samples=48,
                  meta={"model_id": "smollm2-135m", "rule": "sigma"})
    return NeuronSet.from_flat(flat, n_layers, d_mlp, **kw)


def _same(a: NeuronSet, b: NeuronSet, stats: bool = True) -> None:
    assert (a.n_layers, a.d_mlp) == (b.n_layers, b.d_mlp)
    assert a.pairs.dtype == b.pairs.dtype == np.int64 and np.array_equal(a.pairs, b.pairs)
    if stats:
        assert np.array_equal(a.frequency, b.frequency) and np.array_equal(a.mean_score, b.mean_score)
        assert np.array_equal(a.counts, b.counts) and a.n_samples == b.n_samples


# ----- repr and pandas ----------------------------------------------------------------------------------------------
def test_repr_is_short_and_says_what_matters():
    pairs = [[3, 7], [3, 1], [0, 9], [3, 4], [1, 2], [1, 0]] + [[5, i] for i in range(40_000)]
    ns = NeuronSet(np.array(pairs), 6, 46_080, n_samples=12, meta={"model_id": "m"})
    text = repr(ns)
    assert len(text) < 300 and "\n" not in text and str(ns) == text
    assert text.startswith(f"NeuronSet({len(pairs)} neurons of 6 layers x 46080 (")
    assert "top layers L5: 40000, L3: 3, L1: 2" in text  # by count, ties by layer
    assert "pairs [(0, 9), (1, 0), (1, 2), (3, 1), ...]" in text and "12 samples" in text and "model m" in text
    empty = repr(NeuronSet(np.zeros((0, 2), int), 2, 8))
    assert empty == "NeuronSet(0 neurons of 2 layers x 8 (0.00%))"
    assert repr(NeuronSet(np.array([[1, 2]]), 2, 8)).endswith("top layers L1: 1, pairs [(1, 2)])")


def test_to_pandas_rows_match_the_set():
    pd = pytest.importorskip("pandas")
    ns = _random_set(n_layers=4, d_mlp=16, n=10)
    df = ns.to_pandas()
    assert list(df.columns) == ["layer", "index", "frequency", "mean_score"] and len(df) == 10
    for k, row in enumerate(df.itertuples(index=False)):
        assert (row.layer, row.index) == tuple(ns.pairs[k].tolist())
        assert row.frequency == ns.frequency[k] and row.mean_score == ns.mean_score[k]
    bare = NeuronSet(np.array([[0, 1]]), 2, 4).to_pandas()
    assert bare["layer"].tolist() == [0] and pd.isna(bare["frequency"]).all() and pd.isna(bare["mean_score"]).all()


def test_to_pandas_without_pandas(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(CaplocError) as e:
        NeuronSet(np.array([[0, 1]]), 2, 4).to_pandas()
    assert "pip install pandas" in _one_line(e)


# ----- round trips --------------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    ns = _random_set()
    ns.save(tmp_path / "run")
    back = NeuronSet.load(tmp_path / "run")
    _same(ns, back)
    assert back.meta == ns.meta
    _same(ns, NeuronSet.load(tmp_path / "run" / "neurons.safetensors"))


def test_kn_json_round_trip_reads_caploc_own_export(tmp_path):
    ns = _random_set(n=300)
    ns.to_kn_json(tmp_path / "kn.json")
    data = json.loads((tmp_path / "kn.json").read_text())
    assert data["n_layers"] == 30 and data["d_mlp"] == 1536 and data["neurons"] == ns.pairs.tolist()
    for back in (NeuronSet.from_kn_json(tmp_path / "kn.json"), NeuronSet.load(tmp_path / "kn.json"),
                 NeuronSet.from_kn_json(tmp_path / "kn.json", 30, 1536)):
        _same(ns, back, stats=False)
    with pytest.raises(IncompatibleResultError) as e:
        NeuronSet.from_kn_json(tmp_path / "kn.json", 30, 2048)
    assert "d_mlp=1536" in _one_line(e)


def test_kn_json_plain_list(tmp_path):
    ns = NeuronSet(np.array([[2, 5], [0, 3]]), 4, 8)
    ns.to_kn_json(tmp_path / "kn.json", plain=True)
    assert json.loads((tmp_path / "kn.json").read_text()) == [[0, 3], [2, 5]]
    _same(ns, NeuronSet.from_kn_json(tmp_path / "kn.json", 4, 8), stats=False)
    guessed = NeuronSet.from_kn_json(tmp_path / "kn.json")  # no dimensions: guessed from the largest indices
    assert (guessed.n_layers, guessed.d_mlp) == (3, 6) and np.array_equal(guessed.pairs, ns.pairs)
    with pytest.raises(IncompatibleResultError):
        NeuronSet.from_kn_json(tmp_path / "kn.json", 2, 8)  # layer 2 does not exist in a 2-layer model


@pytest.mark.parametrize("n_layers,d_mlp,pairs", [(30, 1536, None), (3, 8, [[2, 7]]), (4, 5, [])])
def test_lape_round_trip(n_layers, d_mlp, pairs):
    ns = _random_set(with_stats=False) if pairs is None else NeuronSet(np.array(pairs).reshape(-1, 2), n_layers, d_mlp)
    lists = ns.to_lape()
    assert len(lists) == n_layers and all(isinstance(i, int) for ix in lists for i in ix)
    assert sum(map(len, lists)) == len(ns) and all(ix == sorted(ix) for ix in lists)
    _same(ns, NeuronSet.from_lape(lists, d_mlp), stats=False)
    _same(ns, NeuronSet.from_lape(json.loads(json.dumps(lists)), d_mlp), stats=False)


def test_from_flat_matches_pairs():
    flat = np.array([17, 3, 40])
    ns = NeuronSet.from_flat(flat, 3, 16)
    assert ns.pairs.tolist() == [[0, 3], [1, 1], [2, 8]] and sorted(ns.flat.tolist()) == sorted(flat.tolist())
    assert NeuronSet.from_flat(torch.tensor([5]), 2, 4).pairs.tolist() == [[1, 1]]
    assert len(NeuronSet.from_flat([], 2, 4)) == 0


# ----- bad indices: refused, never truncated ------------------------------------------------------------------------
@pytest.mark.parametrize("pairs,words", [
    (np.array([[0, 1.5]]), "integers"),
    (np.array([[0.0, 1.0]]), "integers"),  # even integral floats: a float index means something went wrong upstream
    ([[0, 1.0]], "integers"),
    ([[True, 1]], "integers"),
    (np.array([[True, False]]), "integers"),
    ([[0, "3"]], "integers"),
    ([[0, None]], "integers"),
    ([[0, 1], [2]], "integers"),  # ragged
    ([[0, 1, 2]], "shape"),
    ([[-1, 0]], "negative"),
    ([[0, -3]], "negative"),
    ([[0, 0], [0, 0]], "twice"),
])
def test_bad_pairs_refused(pairs, words):
    with pytest.raises(CaplocError) as e:
        NeuronSet(pairs, 3, 8)
    assert words in _one_line(e)


@pytest.mark.parametrize("pairs", [[[3, 0]], [[0, 8]], [[99, 99]]])
def test_out_of_range_pairs_refused(pairs):
    with pytest.raises(IncompatibleResultError) as e:
        NeuronSet(pairs, 3, 8)
    assert "3 layers x 8 neurons" in _one_line(e)


@pytest.mark.parametrize("n_layers,d_mlp", [(0, 8), (3, 0), (3.0, 8), (3, "8"), (True, 8), (-1, 8), (None, 8)])
def test_bad_dimensions_refused(n_layers, d_mlp):
    with pytest.raises(CaplocError) as e:
        NeuronSet([[0, 0]], n_layers, d_mlp)
    _one_line(e)


def test_bad_stats_refused():
    with pytest.raises(CaplocError, match="frequency has 1 values for 2 neurons"):
        NeuronSet([[0, 0], [0, 1]], 3, 8, frequency=[0.5])
    with pytest.raises(CaplocError, match="mean_score must be numbers"):
        NeuronSet([[0, 0]], 3, 8, mean_score=["x"])
    with pytest.raises(CaplocError, match="counts has 5 entries for 3 x 8"):
        NeuronSet([[0, 0]], 3, 8, counts=np.zeros(5, int))
    with pytest.raises(CaplocError, match="counts must be integers"):
        NeuronSet([[0, 0]], 3, 8, counts=np.zeros(24))
    with pytest.raises(CaplocError, match="n_samples"):
        NeuronSet([[0, 0]], 3, 8, n_samples=-2)


def test_from_flat_and_lape_refuse_bad_indices():
    with pytest.raises(CaplocError, match="integers"):
        NeuronSet.from_flat(np.array([1.7]), 3, 8)
    with pytest.raises(IncompatibleResultError):
        NeuronSet.from_flat([24], 3, 8)
    with pytest.raises(CaplocError, match="LAPE layer 1"):
        NeuronSet.from_lape([[0], [1.0]], 8)
    with pytest.raises(IncompatibleResultError):
        NeuronSet.from_lape([[0], [8]], 8)
    with pytest.raises(CaplocError, match="twice"):
        NeuronSet.from_lape([[3, 3]], 8)
    with pytest.raises(CaplocError, match="non-empty"):
        NeuronSet.from_lape([], 8)


@pytest.mark.parametrize("content", [
    [[0, 1.5]], [[0, True]], [[0, -1]], [[0, "1"]], {"neurons": [[0, 1]], "n_layers": "3", "d_mlp": 8},
    {"n_layers": 3, "d_mlp": 8}, {"neurons": {"0": 1}, "n_layers": 3, "d_mlp": 8}, "neurons", 7, [[0, 1], [0, 1]],
])
def test_kn_json_with_wrong_types_refused(tmp_path, content):
    f = tmp_path / "kn.json"
    f.write_text(json.dumps(content))
    with pytest.raises(CaplocError) as e:
        NeuronSet.from_kn_json(f)
    assert str(f) in _one_line(e)


# ----- damaged files ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    ns = _random_set(n_layers=4, d_mlp=16, n=12)
    ns.save(tmp_path / "run")
    return tmp_path / "run", ns


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_safetensors(saved, damage):
    d, _ = saved
    f = d / "neurons.safetensors"
    blob = f.read_bytes()
    f.write_bytes({"truncate": blob[: len(blob) - 7], "garbage": b"\x93\x01" * 500, "empty": b""}[damage])
    with pytest.raises(CaplocError) as e:
        NeuronSet.load(d)
    assert "neurons.safetensors is truncated or corrupt" in _one_line(e)


def test_safetensors_with_wrong_contents(saved):
    from safetensors.torch import save_file

    d, _ = saved
    save_file({"frequency": torch.zeros(12, dtype=torch.float64)}, str(d / "neurons.safetensors"))
    with pytest.raises(CaplocError, match="no 'pairs' tensor"):
        NeuronSet.load(d)
    save_file({"pairs": torch.zeros(12, 2, dtype=torch.float32)}, str(d / "neurons.safetensors"))
    with pytest.raises(CaplocError) as e:
        NeuronSet.load(d)
    assert "integers" in _one_line(e)
    save_file({"pairs": torch.tensor([[0, 1]])}, str(d / "neurons.safetensors"))  # another run's file
    with pytest.raises(CaplocError) as e:
        NeuronSet.load(d)
    assert "different runs" in _one_line(e)


@pytest.mark.parametrize("text,words", [
    ('{"kind": "neuron_set", "n_layers": 4,', "not valid JSON"),
    ("\udcff garbage", "not UTF-8 text"),
    ("[1, 2]", "not a caploc neuron set"),
    ('{"kind": "score_store"}', "not a caploc neuron set"),
    ('{"kind": "neuron_set", "n_layers": "4", "d_mlp": 16}', "n_layers must be an integer"),
    ('{"kind": "neuron_set", "n_layers": 4, "d_mlp": 16.0}', "d_mlp must be an integer"),
    ('{"kind": "neuron_set", "n_layers": 4, "d_mlp": 16, "n_samples": null}', "n_samples must be an integer"),
    ('{"kind": "neuron_set", "n_layers": 2, "d_mlp": 16}', "outside a model with 2 layers"),
])
def test_damaged_json(saved, text, words):
    d, _ = saved
    (d / "neurons.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CaplocError) as e:
        NeuronSet.load(d)
    assert words in _one_line(e)


def test_torn_write_between_tensors_and_json_is_refused(tmp_path):
    """A kill after the new tensors were written but before the new JSON: the old JSON no longer describes them."""
    a = _random_set(n_layers=4, d_mlp=16, n=12)
    b = NeuronSet(a.pairs[:5], 4, 16, frequency=a.frequency[:5], n_samples=3)
    a.save(tmp_path / "run")
    old_json = (tmp_path / "run" / "neurons.json").read_bytes()
    b.save(tmp_path / "run")
    (tmp_path / "run" / "neurons.json").write_bytes(old_json)  # b's tensors, a's JSON
    with pytest.raises(CaplocError) as e:
        NeuronSet.load(tmp_path / "run")
    assert "checksum mismatch" in _one_line(e)
    c = NeuronSet(a.pairs[:5], 4, 16, frequency=a.frequency[:5] + 0.5, n_samples=3)  # same count, other values
    c.save(tmp_path / "c")
    b.save(tmp_path / "b")
    (tmp_path / "b" / "neurons.json").write_bytes((tmp_path / "c" / "neurons.json").read_bytes())
    with pytest.raises(CaplocError, match="checksum mismatch"):
        NeuronSet.load(tmp_path / "b")
