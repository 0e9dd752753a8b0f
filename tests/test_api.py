"""The notebook API: a model already loaded, data already in memory, settings by name; the model is borrowed, not
changed; results agree with the CLI/library path on the same rows."""
from __future__ import annotations

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

import caploc
from caploc.api import as_dataset, split_settings
from caploc.attribution.engine import AttributionConfig
from caploc.data import load_dataset
from caploc.errors import CaplocError
from caploc.localize import LocateConfig
from caploc.localize import locate as library_locate
from caploc.models import load_model
from caploc.results import NeuronSet

ROWS = [{"prompt": f"{a} plus {b} is", "target": f" {a + b}", "group": "add"} for a in range(4) for b in range(3)]
SETTINGS = dict(method="grad_x_act", sigma=1.5, min_freq=0.25)


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama")


def test_loaded_model_is_borrowed_not_changed(lm):
    model, tok = lm.model, lm.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    tok.padding_side = "left"
    res = caploc.locate(model, ROWS, tokenizer=tok, **SETTINGS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and tok.padding_side == "left"
    model.eval()
    tok.padding_side = "right"
    assert len(res) == len(res.pairs) > 0
    assert res.out_dir is None


def test_same_neurons_as_the_library_on_a_file(lm, tmp_path):
    """Rows in memory (list, DataFrame, datasets.Dataset) == the same rows read from a JSONL file by the loader."""
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ref = library_locate(lm, load_dataset(str(f)), LocateConfig(attribution=AttributionConfig(method="grad_x_act"),
                                                                  sigma=1.5, min_freq=0.25), tmp_path / "ref")
    for data in (ROWS, pd.DataFrame(ROWS), datasets.Dataset.from_list(ROWS), str(f)):
        got = caploc.locate(lm, data, **SETTINGS)
        np.testing.assert_array_equal(got.neurons.pairs, ref.neurons.pairs)
        np.testing.assert_allclose(got.neurons.mean_score, ref.neurons.mean_score, rtol=1e-6)
    df = got.to_pandas()
    assert list(df.columns) == ["layer", "index", "frequency", "mean_score"]
    assert df[["layer", "index"]].values.tolist() == got.pairs


def test_out_dir_is_a_normal_run(lm, tmp_path):
    res = caploc.locate(lm, ROWS, out=tmp_path / "run", **SETTINGS)
    assert res.out_dir == tmp_path / "run"
    back = NeuronSet.load(tmp_path / "run")
    np.testing.assert_array_equal(back.pairs, res.neurons.pairs)
    assert repr(res).startswith("Localization(") and "neurons of 3 layers" in repr(res)


def test_bad_settings_and_inputs_are_one_line(lm):
    with pytest.raises(CaplocError, match="unknown setting 'sigm'.*sigma"):
        caploc.locate(lm, ROWS, sigm=1.0)
    with pytest.raises(CaplocError, match="sigma"):
        caploc.locate(lm, ROWS, sigma=-1.0)
    with pytest.raises(CaplocError, match="method"):
        caploc.locate(lm, ROWS, method="magic")
    with pytest.raises(CaplocError, match="tokenizer="):
        caploc.locate(lm.model, ROWS)
    with pytest.raises(CaplocError, match="data must be"):
        caploc.locate(lm, 42)
    with pytest.raises(CaplocError, match="model must be"):
        caploc.locate(object(), ROWS)
    with pytest.raises(CaplocError, match="empty"):
        caploc.locate(lm, [])


def test_as_dataset_keeps_fields_and_subsamples():
    ds = as_dataset([{"question": "q1", "answer": "a"}, {"question": "q2", "answer": "b"}, {"question": "q3",
                     "answer": "c"}], n=2, seed=1)
    assert len(ds) == 2 and all(s.target.startswith(" ") for s in ds)
    assert ds.source["prompt_field"] == "question" and ds.source["target_field"] == "answer"
    with pytest.raises(CaplocError, match="n=5"):
        as_dataset(ROWS[:3], n=5)


def test_split_settings_routes_each_name_once():
    a, b = split_settings({"method": "ig", "sigma": 2.0}, AttributionConfig, LocateConfig)
    assert a == {"method": "ig"} and b == {"sigma": 2.0}
