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


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_intervene_on_rows_matches_the_stage_and_leaves_weights(lm):
    from caploc.stages.intervene import InterveneConfig, run_intervention

    loc = caploc.locate(lm, ROWS, **SETTINGS)
    off = [{"prompt": f"The colour {c} is", "target": " nice"} for c in ("red", "blue", "green", "grey")]
    before = _state(lm.model)
    res = caploc.intervene(lm.model, loc, ROWS, tokenizer=lm.tokenizer, off_target=[off], ks=(0.0, 2.0), n_random=3,
                           min_controls=3, act_matched=False, n_boot=50)
    assert _same_state(lm.model, before)
    ref = run_intervention(lm, loc.neurons, [("on-target", as_dataset(ROWS, name="on-target"), "on"),
                                             ("off-target-1", as_dataset(off, name="off-target-1"), "off")],
                           InterveneConfig(ks=(0.0, 2.0), n_random=3, min_controls=3, act_matched=False, n_boot=50))
    df = res.to_pandas()
    assert set(df["dataset"]) == {"on-target", "off-target-1"} and len(df) == 4
    np.testing.assert_allclose(df["d_nll"].to_numpy(), [r["d_nll"] for r in ref.summary_rows()], rtol=1e-9)
    assert "erase_beats_random" in res.claims and "Interventions(2 datasets, 3 random sets" in repr(res)
    assert list(res.to_pandas("claims")["claim"])[:1] == ["erase_beats_random"]
    with pytest.raises(CaplocError, match="effects or claims"):
        res.to_pandas("everything")


def test_stability_from_a_notebook_localization(lm):
    loc = caploc.locate(lm, ROWS, **SETTINGS)
    st = caploc.stability(loc, k=2, seeds=[0, 1], kinds=["random"], n_boot=20, null_draws=0)
    assert len(st.pairs) == 2 and all(0.0 <= p["iou"] <= 1.0 for p in st.pairs)
    np.testing.assert_array_equal(st.full_set.pairs, loc.neurons.pairs)


def test_finetune_leaves_the_model_unchanged(lm):
    loc = caploc.locate(lm, load_dataset("facts", n=8, seed=0), **SETTINGS)
    before = _state(lm.model)
    res = caploc.finetune(lm, loc, "facts", n_train=4, n_eval=4, arms=("neurons", "random"), steps=2, n_random=1,
                          save_adapters=False)
    assert _same_state(lm.model, before)
    assert {a.name for a in res.arms} >= {"neurons"}
