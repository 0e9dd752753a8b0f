"""Faults from outside: Ctrl-C in the middle of a run, a shared result file that names a model with custom code.
(Other faults have their own tests: a kill between the two writes of a neuron set - test_neuronset; a corrupted or
foreign score shard and a concurrent writer - test_integrity; a recorded dataset path outside the result - test_runs.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from caploc.cli import main
from caploc.models import load_model
from caploc.results import NeuronSet

ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
LOCATE = ["locate", "--model", "tiny:llama", "--data", "facts", "--n", "48", "--method", "ig", "--steps", "64",
          "--shard-size", "4", "--sigma", "1", "--min-freq", "0.25", "--cards", "0"]


def test_ctrl_c_exits_130_keeps_finished_shards_and_resumes_identically(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "caploc", *LOCATE, "--out", str(out)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT as ignored; a user's terminal does not
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "scores").glob("shard-*")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "neurons.json").exists(), "a result was written for an interrupted run"
    kept = list((out / "scores").glob("shard-*"))
    assert kept, "finished shards were lost"
    assert main([*LOCATE, "--out", str(out)]) == 0  # resumes
    assert main([*LOCATE, "--out", str(tmp_path / "fresh")]) == 0
    a, b = NeuronSet.load(out), NeuronSet.load(tmp_path / "fresh")
    np.testing.assert_array_equal(a.pairs, b.pairs)
    np.testing.assert_array_equal(a.mean_score, b.mean_score)


def test_result_naming_a_custom_code_model_never_runs_it(tmp_path, capsys):
    """A shared neurons.json whose model is a directory with code in it: the verb refuses; the code never runs."""
    lm = load_model("tiny:llama")
    d = tmp_path / "evil-model"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    marker = tmp_path / "code-ran"
    (d / "modeling_x.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="caploc_evil", auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "shared"
    NeuronSet([[0, 1], [1, 2]], lm.site.n_layers, lm.site.d_mlp, n_samples=4,
              meta={"model_id": str(d), "dataset": "facts"}).save(run)
    capsys.readouterr()
    rc = main(["intervene", "--neurons", str(run), "--data", "facts", "--n", "4", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and "custom code" in err.lower(), err
    assert not Path(tmp_path / "o").exists()
