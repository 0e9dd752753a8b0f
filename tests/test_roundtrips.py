"""Every export caploc writes is read back by the verbs that take such files: KN JSON (--kn-json) by eval /
intervene --neurons, an enhanced model (export-enhanced) by --model, a fine-tuned adapter by finetune --merge."""
from __future__ import annotations

import json

import numpy as np

from caploc.cli import main
from caploc.results import NeuronSet

LOC = ["locate", "--model", "tiny:llama", "--data", "facts", "--n", "4", "--method", "grad_x_act", "--sigma", "1",
       "--min-freq", "0.25", "--cards", "0"]


def test_kn_json_and_enhanced_model_round_trip_through_the_verbs(tmp_path):
    loc, kn = tmp_path / "loc", tmp_path / "kn.json"
    assert main([*LOC, "--out", str(loc), "--kn-json", str(kn)]) == 0
    ns = NeuronSet.load(loc)
    assert json.loads(kn.read_text())["neurons"] == ns.pairs.tolist()
    # the KN export is accepted where a neuron set is: same set, same evaluation numbers
    for src, out in ((loc, "ev_dir"), (kn, "ev_kn")):
        assert main(["eval", "--model", "tiny:llama", "--data", "facts", "--n", "4", "--neurons", str(src),
                     "--mode", "erase", "--no-heldout", "--out", str(tmp_path / out)]) == 0
    a = json.loads((tmp_path / "ev_dir" / "report.json").read_text())["tables"][0]["rows"]
    b = json.loads((tmp_path / "ev_kn" / "report.json").read_text())["tables"][0]["rows"]
    assert a == b
    # an enhanced model is a plain model directory every verb loads
    ex = tmp_path / "enhanced"
    assert main(["export-enhanced", "--neurons", str(loc), "--k", "2", "--out", str(ex)]) == 0
    assert main([LOC[0], "--model", str(ex), *LOC[3:], "--out", str(tmp_path / "loc2")]) == 0
    back = NeuronSet.load(tmp_path / "loc2")
    assert back.n_layers == ns.n_layers and back.d_mlp == ns.d_mlp
    assert back.meta["model_fingerprint"] != ns.meta["model_fingerprint"]  # other weights, other fingerprint
    np.testing.assert_array_equal(NeuronSet.load(kn).pairs, ns.pairs)
