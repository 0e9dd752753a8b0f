"""Resumable localization: a ``caploc locate`` killed with SIGKILL resumes from its finished shards and ends with
exactly the neurons and scores of an uninterrupted run; a changed configuration on the same --out is refused."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from caploc.results import NeuronSet, read_json
from caploc.scorestore import ScoreStore

N = 40
ARGS = ["locate", "--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--n", str(N), "--method", "ig",
        "--steps", "12", "--rule", "topk", "--topk", "5", "--min-freq", "0.3", "--shard-size", "1"]


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(*extra):
    return [sys.executable, "-m", "caploc", "-v", *ARGS, *extra]


def _shards(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "scores").glob("shard-*.safetensors")}


def _start_and_kill(out: Path, timeout: float = 240.0) -> dict[str, int]:
    """Start the run, SIGKILL it once >= 2 shards are on disk (before the last one); return the shards' mtimes."""
    proc = subprocess.Popen(_cmd("--out", str(out)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if proc.poll() is not None:
                pytest.fail(f"locate exited (rc {proc.returncode}) before it could be killed: "
                            f"{proc.stderr.read().decode()[-500:]}")
            if len(_shards(out)) >= 2:
                break
            time.sleep(0.02)
        else:
            pytest.fail("no shard was written in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return _shards(out)


@pytest.fixture
def one_thread():
    """The killed subprocess runs with one thread; in-process runs use one too, so float reductions match."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _main(*extra) -> int:
    from caploc.cli import main

    return main([*ARGS, *extra])


def test_sigkill_resume_equals_uninterrupted_run(tmp_path, one_thread, caplog, capsys):
    out, ref = tmp_path / "killed", tmp_path / "ref"
    before = _start_and_kill(out)  # a real process, really killed with SIGKILL
    assert 2 <= len(before) < N, f"expected an interrupted run, found {len(before)} of {N} shards"
    assert not (out / "neurons.json").exists()
    time.sleep(0.05)  # make a rewritten shard's mtime distinguishable

    # resume: the same command finishes the run and does not recompute finished shards
    caplog.set_level(logging.INFO, logger="caploc")
    assert _main("--out", str(out)) == 0
    assert f"resuming score store {out / 'scores'} ({len(before)} finished shards)" in caplog.text
    after = _shards(out)
    assert len(after) == N
    for name, mtime in before.items():
        assert after[name] == mtime, f"{name} was recomputed on resume"

    # reference: an uninterrupted run in another directory
    assert _main("--out", str(ref)) == 0
    a, b = ScoreStore(out / "scores").load(), ScoreStore(ref / "scores").load()
    for key in ("index", "scores", "f", "gap"):
        assert torch.equal(a[key], b[key]), key
    assert a["scores"].abs().sum() > 0
    na, nb = NeuronSet.load(out), NeuronSet.load(ref)
    assert len(na) > 0
    assert np.array_equal(na.pairs, nb.pairs)
    assert np.array_equal(na.counts, nb.counts) and np.array_equal(na.frequency, nb.frequency)
    assert np.array_equal(na.mean_score, nb.mean_score)
    assert read_json(out / "neurons.json") == read_json(ref / "neurons.json")
    # a kill in the middle of a shard write may leave a temporary file; it must never be taken for a shard
    leftovers = sorted(p.name for p in (out / "scores").iterdir() if p.name.endswith(".tmp"))
    assert all(name.startswith(".shard-") for name in leftovers)

    # the same --out with a changed attribution setting is refused with one line naming the change
    capsys.readouterr()
    args = list(ARGS)
    args[args.index("--steps") + 1] = "7"
    from caploc.cli import main

    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "attribution.steps 12 -> 7" in err[0] and "--overwrite" in err[0]
    assert _shards(out) == after  # nothing was touched

    # a changed selection rule is not an attribution change: the stored scores are reused, only the set changes
    from caploc.localize import LocateConfig, neuron_set_from_scores

    args = list(ARGS)
    args[args.index("--min-freq") + 1] = "0.6"
    assert main([*args, "--out", str(out)]) == 0
    assert _shards(out) == after
    fresh = neuron_set_from_scores(a["scores"], LocateConfig(rule="topk", topk=5, min_freq=0.6), {})
    assert np.array_equal(NeuronSet.load(out).pairs, fresh.pairs)

    # a different memory budget (e.g. resuming on a smaller GPU) is not a configuration change: nothing is recomputed
    assert main([*ARGS, "--memory-mb", "1", "--out", str(out)]) == 0
    assert _shards(out) == after
