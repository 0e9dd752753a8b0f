"""Neuron cards against a brute-force reference: every sample alone, every position, every neuron."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caploc.cards import neuron_cards, top_neurons
from caploc.data import Dataset, Sample, encode_dataset
from caploc.errors import CaplocError
from caploc.hooks import capture
from caploc.models import load_model
from caploc.results import NeuronSet


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama")


def _data(n=7):
    return Dataset("toy", [Sample(prompt=f"item {i} costs {3 * i + 1} coins and", target=f" {i}" * (1 + i % 3))
                           for i in range(n)])


def test_top_neurons_order():
    ns = NeuronSet([[0, 1], [0, 2], [1, 0], [2, 5]], 3, 8, frequency=[0.5, 0.9, 0.9, 0.1],
                   mean_score=[1.0, 0.2, 0.7, 9.0], n_samples=10)
    assert ns.pairs[top_neurons(ns, 3)].tolist() == [[1, 0], [0, 2], [0, 1]]


def test_cards_match_brute_force(lm):
    ds = _data()
    pairs = [[0, 3], [1, 7], [2, 11], [2, 40]]
    ns = NeuronSet(pairs, lm.site.n_layers, lm.site.d_mlp, frequency=[0.9, 0.8, 0.7, 0.6], mean_score=[1, 1, 1, 1],
                   n_samples=7)
    cards = neuron_cards(lm, ns, ds, top=4, contexts=3, window=2, batch_size=3)
    enc = encode_dataset(lm.tokenizer, ds)
    ref = {tuple(p): [] for p in pairs}
    with torch.no_grad():
        for s, e in enumerate(enc):
            with capture(lm.site) as acts:
                lm.model(input_ids=torch.tensor([e.input_ids]))
            for (l, i) in pairs:
                for p, v in enumerate(acts[l][0, :, i].tolist()):
                    ref[(l, i)].append((v, s, p))
    assert [(c.layer, c.index) for c in cards] == [tuple(p) for p in pairs]
    for c in cards:
        want = sorted(ref[(c.layer, c.index)], reverse=True)[:3]
        assert [(enc[s].id, p) for _, s, p in want] == [(x.sample_id, x.position) for x in c.contexts]
        np.testing.assert_allclose([x.activation for x in c.contexts], [v for v, _, _ in want], rtol=1e-4, atol=1e-6)
        top = c.contexts[0]
        ids = enc[int(top.sample_id)].input_ids
        assert top.tokens[top.mark] == lm.tokenizer.decode([ids[top.position]])
        assert len(top.tokens) <= 5 and "[[" in top.text()


def test_cards_refuse_bad_input(lm):
    ns = NeuronSet([[0, 1]], lm.site.n_layers + 1, lm.site.d_mlp)
    with pytest.raises(CaplocError):
        neuron_cards(lm, ns, _data())
    ok = NeuronSet([[0, 1]], lm.site.n_layers, lm.site.d_mlp)
    with pytest.raises(CaplocError, match="top >= 1"):
        neuron_cards(lm, ok, _data(), top=0)
    with pytest.raises(CaplocError, match="empty"):
        neuron_cards(lm, ok, Dataset("none", []))
    assert neuron_cards(lm, NeuronSet(np.zeros((0, 2), dtype=np.int64), lm.site.n_layers, lm.site.d_mlp),
                        _data()) == []
