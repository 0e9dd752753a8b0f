"""Issue 16: merging a neuron adapter gives the model a new fingerprint, the same after a save/load round trip;
unmerging restores the old one; merging the same adapter twice (same object, a reloaded copy, or into a merged model
read back from disk) is refused with a one-line CaplocError."""
from __future__ import annotations

import json

import pytest
import torch

from caploc.errors import CaplocError, IncompatibleResultError
from caploc.models.loading import load_model, model_fingerprint
from caploc.stages.finetune import NeuronAdapter, merge_to_dir, merged_ids

SEL = {0: [1, 5, 7], 2: [0, 3, 40]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _one_line_refusal(fn, match: str) -> str:
    with pytest.raises(CaplocError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_merge_gives_a_new_fingerprint_and_unmerge_restores_it():
    lm = load_model("tiny:llama")
    fp0 = lm.info["fingerprint"]
    assert fp0 == model_fingerprint(lm.model)
    ad = NeuronAdapter(lm, SEL, init_std=0.05, seed=1)
    ad.merge(lm)
    fp1 = lm.info["fingerprint"]
    assert fp1 != fp0 and fp1 == model_fingerprint(lm.model)  # recomputed from the merged model, not copied
    assert lm.info["merged_adapters"] == merged_ids(lm.model) == [ad.adapter_id()]
    ad.unmerge(lm)
    assert lm.info["fingerprint"] == fp0 == model_fingerprint(lm.model) and merged_ids(lm.model) == []


def test_fingerprint_changes_even_when_the_hashed_weight_samples_do_not():
    """The merge record in the config tells a merged model apart even where no weight moved: an all-zero adapter
    leaves every weight bit-identical, yet the model now carries a merge (and refuses it a second time)."""
    lm = load_model("tiny:gpt2")
    before, fp0 = _weights(lm.model), lm.info["fingerprint"]
    ad = NeuronAdapter(lm, SEL)  # zero deltas
    ad.merge(lm)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert lm.info["fingerprint"] != fp0
    _one_line_refusal(lambda: ad.merge(lm), "already merged")
    ad.unmerge(lm)
    assert lm.info["fingerprint"] == fp0 == model_fingerprint(lm.model)


def test_merging_the_same_adapter_twice_is_refused(tmp_path):
    lm = load_model("tiny:phi3")
    ad = NeuronAdapter(lm, SEL, init_std=0.05, seed=2)
    ad.save(tmp_path / "ad")
    before = _weights(lm.model)
    ad.merge(lm)
    merged = _weights(lm.model)
    _one_line_refusal(lambda: ad.merge(lm), "already merged")
    # the same adapter read back from disk (another object, same content) is refused too; the weights do not move
    copy = NeuronAdapter.load(tmp_path / "ad", lm, check_fingerprint=False)
    assert copy.adapter_id() == ad.adapter_id()
    _one_line_refusal(lambda: copy.merge(lm), "already merged")
    assert all(torch.equal(p, merged[n]) for n, p in lm.model.named_parameters())
    # another adapter stacks on top; unmerging must go in reverse order
    other = NeuronAdapter(lm, {1: [2, 9]}, init_std=0.05, seed=3)
    other.merge(lm)
    assert merged_ids(lm.model) == [ad.adapter_id(), other.adapter_id()]
    _one_line_refusal(lambda: ad.unmerge(lm), "reverse order")
    other.unmerge(lm)
    ad.unmerge(lm)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    ad.merge(lm)  # after an unmerge it may be merged again
    ad.unmerge(lm)


def test_merged_model_on_disk_keeps_its_fingerprint_and_refuses_the_adapter_again(tmp_path):
    lm = load_model("tiny:llama")
    ad = NeuronAdapter(lm, SEL, init_std=0.05, seed=4)
    ad.save(tmp_path / "ad")
    out = merge_to_dir(tmp_path / "ad", tmp_path / "merged", model="tiny:llama")
    rec = json.loads((out / "caploc_merge.json").read_text())
    assert rec["adapter_id"] == ad.adapter_id() and rec["base_fingerprint"] == lm.info["fingerprint"]
    back = load_model(str(out))
    assert back.info["fingerprint"] == rec["merged_fingerprint"] != lm.info["fingerprint"]
    assert merged_ids(back.model) == [ad.adapter_id()]
    # the adapter was trained on the base model: the merged one is refused by fingerprint ...
    with pytest.raises(IncompatibleResultError, match="fingerprint"):
        NeuronAdapter.load(tmp_path / "ad", back)
    # ... and, with the check off, by the merge record
    again = NeuronAdapter.load(tmp_path / "ad", back, check_fingerprint=False)
    _one_line_refusal(lambda: again.merge(back), "already merged")
