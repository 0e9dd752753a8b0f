"""The four study verbs end to end on a tiny model: locate twice (two scorers), fidelity, stability-gap, learn-mask,
faithfulness with runs, a fixed set and the mask (the verbs' wiring; the math is tested in the stage tests)."""
from __future__ import annotations

import json

from caploc.cli import main
from caploc.results import NeuronSet


def test_study_verbs_end_to_end(tmp_path, capsys):
    common = ["--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--n", "6", "--sigma", "2", "--min-freq", "0.3",
              "--shard-size", "3"]
    a, b = tmp_path / "ig", tmp_path / "gxa"
    assert main(["locate", *common, "--method", "ig", "--steps", "2", "--out", str(a)]) == 0
    assert main(["locate", *common, "--method", "grad_x_act", "--out", str(b)]) == 0
    assert main(["fidelity", "--run", f"ig={a}", "--run", f"gxa={b}", "--sigma", "2", "--topk", "10",
                 "--out", str(tmp_path / "fid")]) == 0
    fid = json.loads((tmp_path / "fid" / "fidelity.json").read_text())
    assert fid["n_samples"] == 6 and -1 <= fid["comparisons"]["gxa"]["spearman"] <= 1
    assert main(["stability-gap", "--run", f"gxa={b}", "--ns", "4,6", "--sigmas", "2", "--min-freqs", "0.5",
                 "--seeds", "2", "--out", str(tmp_path / "gap")]) == 0
    gap = json.loads((tmp_path / "gap" / "stability_gap.json").read_text())
    assert [r["n_samples"] for r in gap["rows"]] == [4, 4, 6, 6]
    m = tmp_path / "mask"
    assert main(["learn-mask", "--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--off", "rg:basic_arithmetic",
                 "--n", "3", "--steps", "3", "--out", str(m)]) == 0
    assert (m / "mask.safetensors").exists() and (m / "neurons.json").exists()
    out = tmp_path / "faith"
    assert main(["faithfulness", "--model", "tiny:llama", "--run", f"gxa={b}", "--set", f"ig_set={a}", "--mask", str(m),
                 "--reference", f"other={a}",
                 "--data", "rg:basic_arithmetic", "--off", "facts", "--n", "3", "--seed", "5",
                 "--lo", "0.01", "--hi", "0.1", "--points", "3", "--n-random", "2", "--out", str(out)]) == 0
    res = json.loads((out / "faithfulness.json").read_text())
    text = json.dumps(res)
    assert "gxa:pooled" in text and "mask" in text and "random:1" in text and "gxa:contrast_z" in text
    assert (out / "faithfulness.png").exists()
    printed = capsys.readouterr().out
    assert "AUC" in printed and len(NeuronSet.load(m)) >= 0
    # one dataset named as both on- and off-target is refused before any work, in one line
    assert main(["faithfulness", "--model", "tiny:llama", "--run", f"gxa={b}", "--data", "facts", "--off", "facts",
                 "--out", str(tmp_path / "x")]) == 2
    assert "twice" in capsys.readouterr().err
