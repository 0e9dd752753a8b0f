"""Scale-out: data-parallel runs equal single-process runs bit for bit, dead ranks do not hang the others, models split
by a device map score like unsplit ones, out-of-memory inside the forward backs off (the memory formula: test_memory.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from caploc import distributed as cd
from caploc.attribution.engine import AttributionConfig, Attributor
from caploc.errors import CaplocError
from caploc.hooks import count_hooks
from caploc.models.layouts import Site

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama():
    """The tiny random Llama (built here: the shared ``tiny_models`` fixture builds all 11 architectures)."""
    from caploc.models.tiny import tiny_model

    return tiny_model("llama")
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)
    return env


# ---------------------------------------------------------------------------------------------------------------------
# 1. torchrun: 2 processes == 1 process, bit for bit
# ---------------------------------------------------------------------------------------------------------------------
LOCATE_ARGS = ["--model", "tiny:llama", "--data", "rg:basic_arithmetic", "--n", "8", "--method", "ig", "--steps", "2", "--shard-size", "1",
               "--rule", "topk", "--topk", "5", "--min-freq", "0.25"]


def test_torchrun_two_processes_equal_one_process(tmp_path):
    out2 = tmp_path / "two"
    # ``--`` keeps torchrun's parser from reading caploc's options (``--n`` is an ambiguous prefix of its own)
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "caploc", "--",
           "locate", *LOCATE_ARGS, "--out", str(out2)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(CAPLOC_DIST_DEAD_AFTER="60"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # the 1-process reference, in this process while the 2 ranks run; one thread like each torchrun worker
        # (torchrun sets OMP_NUM_THREADS=1): CPU kernels may sum in another order with another thread count
        from caploc.data import load_dataset
        from caploc.localize import LocateConfig, locate
        from caploc.models.loading import load_model

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            lm = load_model("tiny:llama")
            ds = load_dataset("rg:basic_arithmetic", n=8, seed=0, target="cot")
            cfg = LocateConfig(attribution=AttributionConfig(method="ig", steps=2), shard_size=1, rule="topk", topk=5, min_freq=0.25)
            ref = locate(lm, ds, cfg, tmp_path / "one", progress=False)
        finally:
            torch.set_num_threads(threads)
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-3000:]

    from caploc.results import NeuronSet
    from caploc.scorestore import ScoreStore

    a, b = ref.store.load(), ScoreStore(out2 / "scores").load()
    assert len(list((out2 / "scores").glob("shard-*.safetensors"))) == 8
    assert torch.equal(a["index"], b["index"])
    assert torch.equal(a["scores"], b["scores"])  # bit for bit
    assert torch.equal(a["f"], b["f"])
    assert torch.equal(a["gap"].nan_to_num(7.0), b["gap"].nan_to_num(7.0))
    n1, n2 = ref.neurons, NeuronSet.load(out2)
    assert len(n1) > 0
    assert np.array_equal(n1.pairs, n2.pairs) and np.array_equal(n1.counts, n2.counts)


# ---------------------------------------------------------------------------------------------------------------------
# 2. a rank that dies does not leave the others waiting
# ---------------------------------------------------------------------------------------------------------------------
_DEATH_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from caploc import distributed as d
    from caploc.errors import CaplocError
    d.init_from_env()
    rank = int(os.environ["RANK"])
    try:
        if rank == 1:
            os._exit(3)  # killed: no finalize, no failure marker; only the heartbeat stops
        t0 = time.time()
        try:
            d.barrier()
        except CaplocError as e:
            print(f"RANK{rank} CaplocError after {time.time() - t0:.1f}s: {e}", flush=True)
            sys.exit(2)
        print(f"RANK{rank} passed the barrier", flush=True)
    finally:
        d.finalize()
""")


def test_dead_rank_is_detected_not_waited_for(tmp_path):
    """Two real processes over env:// (no torchrun agent to kill the survivor): rank 1 dies without a word; rank 0,
    which waits at a barrier (and hosts the store), stops with a one-line error after ~CAPLOC_DIST_DEAD_AFTER."""
    script = tmp_path / "death.py"
    script.write_text(_DEATH_SCRIPT)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                                  MASTER_PORT=port, CAPLOC_DIST_DEAD_AFTER="2",
                                                  CAPLOC_DIST_TIMEOUT="120"))
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == 3
    assert procs[0].returncode == 2, outs[0][-2000:]
    line = next((ln for ln in outs[0].splitlines() if ln.startswith("RANK0 CaplocError")), outs[0][-2000:])
    assert "rank 1 stopped responding (no heartbeat for 2 s)" in line, line
    assert float(line.split("after ")[1].split("s:")[0]) < 60  # not the 1800 s rendezvous timeout


def _ranks(store, world, fn):
    errors: dict[int, BaseException] = {}

    def run(r):
        try:
            fn(r)
        except BaseException as e:  # noqa: BLE001 - collected for the assertions
            errors[r] = e

    ts = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    return errors


def test_store_barrier_waits_for_live_slow_ranks_and_stops_on_failure():
    store = dist.HashStore()
    stops = [cd.start_heartbeat(store, r, dead_after=0.5)[0] for r in range(3)]
    try:
        def slow(r):  # rank 2 arrives after 4 x dead_after, but it is alive: no false alarm
            if r == 2:
                time.sleep(2.0)
            cd.store_barrier(store, r, 3, 1, dead_after=0.5, poll=0.05)

        assert _ranks(store, 3, slow) == {}
        stops[2].set()  # rank 2 dies (its heartbeat stops) and never reaches barrier 2
        t0 = time.monotonic()
        errs = _ranks(store, 2, lambda r: cd.store_barrier(store, r, 3, 2, dead_after=0.5, poll=0.05))
        assert set(errs) == {0, 1} and all("rank 2 stopped responding" in str(e) for e in errs.values())
        assert time.monotonic() - t0 < 10
        # a rank that records a failure (finalize during an exception) stops the others at once
        store.set("failed", "rank 1 failed (ValueError: boom)")
        t0 = time.monotonic()
        with pytest.raises(CaplocError, match="rank 1 failed"):
            cd.store_barrier(store, 0, 3, 3, dead_after=100, poll=0.05)
        assert time.monotonic() - t0 < 5
    finally:
        for s in stops:
            s.set()


def test_finalize_records_a_failure(monkeypatch):
    store = dist.HashStore()
    stop, thread = cd.start_heartbeat(store, 1, dead_after=1.0)
    monkeypatch.setattr(cd, "_STATE", cd._State(store, 1, 2, 1.0, owned=False, stop=stop, thread=thread))
    try:
        raise ValueError("boom")
    except ValueError:
        cd.finalize()
    assert store.get("failed").decode() == "rank 1 failed (ValueError: boom)"
    assert cd._STATE is None and not thread.is_alive()


# ---------------------------------------------------------------------------------------------------------------------
# 3. launcher environment, backend, per-rank device
# ---------------------------------------------------------------------------------------------------------------------
def test_launch_env_torchrun_and_mpi():
    assert cd.launch_env({}) == cd.LaunchEnv(0, 1, 0, 1)
    e = cd.launch_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert e == cd.LaunchEnv(3, 4, 1, 2)
    e = cd.launch_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                       "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert e == cd.LaunchEnv(2, 4, 0, 2)
    with pytest.raises(CaplocError, match="inconsistent launcher variables"):
        cd.launch_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(CaplocError, match="not an integer"):
        cd.launch_env({"WORLD_SIZE": "two"})


def test_backend_by_device_type(monkeypatch):
    monkeypatch.delenv(cd.ENV_BACKEND, raising=False)
    monkeypatch.setattr(cd, "_accelerator_type", lambda: None)
    assert cd.choose_backend() == "gloo" and cd.choose_backend("cpu") == "gloo"
    monkeypatch.setattr(cd, "_accelerator_type", lambda: "xpu")
    monkeypatch.setattr(cd, "backend_for_device_type", lambda t: {"xpu": "xccl"}.get(t, "gloo"))
    assert cd.choose_backend() == "cpu:gloo,xpu:xccl"
    assert cd.choose_backend("cpu") == "gloo"
    monkeypatch.setenv(cd.ENV_BACKEND, "gloo")
    assert cd.choose_backend() == "gloo"
    assert cd.backend_for_device_type("cpu") == "gloo"


def test_dist_info_per_rank_device(monkeypatch):
    assert cd.dist_info("cpu") == (0, 1, "cpu")  # no process group: a world of one
    cd.barrier()  # no-op
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setattr(cd, "_accelerator_type", lambda: "xpu")
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    assert cd.dist_info("auto") == (3, 4, "xpu:1")
    assert cd.dist_info("xpu") == (3, 4, "xpu:1")
    assert cd.dist_info("cpu") == (3, 4, "cpu")
    assert cd.dist_info("xpu:0") == (3, 4, "xpu:0")  # an explicit index is kept (with a warning)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    with pytest.raises(CaplocError, match="local rank 1 has no xpu device"):
        cd.dist_info("auto")


# ---------------------------------------------------------------------------------------------------------------------
# 4. models split by a device map (accelerate dispatch) score like the unsplit model
# ---------------------------------------------------------------------------------------------------------------------
def _split_map(offload: bool) -> dict:
    """All-"cpu" maps attach no accelerate hooks. Mixing ``torch.device("cpu")`` (the execution device) with the
    string "cpu" makes accelerate *offload* the "cpu" blocks: their weights stay on the meta device and its hooks load
    them at every call -- the same hook machinery that moves activations between GPUs."""
    C = torch.device("cpu") if offload else "cpu"
    return {"model.embed_tokens": C, "model.rotary_emb": C, "model.layers.0": C, "model.layers.1": "cpu",
            "model.layers.2": "cpu" if offload else C, "model.norm": C, "lm_head": C}


def test_device_map_split_gives_identical_scores():
    from caploc.models.loading import load_model

    plain = load_model("tiny:llama", device_map=_split_map(False))
    assert not any(hasattr(m, "_hf_hook") for m in plain.model.modules())  # one device: accelerate adds no hooks
    ref = load_model("tiny:llama")
    split = load_model("tiny:llama", device_map=_split_map(True))
    assert split.site.out_projs[1].weight.device.type == "meta"  # really dispatched: weights loaded by hooks per call
    assert all(hasattr(b, "_hf_hook") for b in split.site.blocks)
    ids = list(range(3, 19))
    # one micro-batch for all rows; and a prefix KV cache with micro-batches of 4 rows that replay the blocks below
    for positions, max_rows in (("all", 256), ("target", 4)):
        cfg = AttributionConfig(method="ig", steps=3, positions=positions, max_rows=max_rows)
        a = Attributor(ref.site, cfg).score(ids, 7)
        b = Attributor(split.site, cfg).score(ids, 7)
        assert torch.equal(a.scores, b.scores) and a.f == b.f and not b.fallback
        assert torch.equal(a.gap, b.gap)


def test_device_map_hooks_survive_attribution():
    from caploc.models.loading import load_model

    split = load_model("tiny:llama", device_map=_split_map(True))
    before = {i: "forward" in b.__dict__ for i, b in enumerate(split.site.blocks)}
    assert all(before.values())
    Attributor(split.site, AttributionConfig(method="ig", steps=1, max_rows=2, completeness=False)).score(list(range(3, 9)), 4)
    assert {i: "forward" in b.__dict__ for i, b in enumerate(split.site.blocks)} == before


# ---------------------------------------------------------------------------------------------------------------------
# 5. out of memory raised inside the model's forward
# ---------------------------------------------------------------------------------------------------------------------
class _OOMAbove:
    """A forward pre-hook on the final norm (its input: [rows, tokens, d]; the chunked LM head sees [positions, d])
    that fails like the allocator when the batch has more than ``limit`` rows."""

    def __init__(self, module, limit: int):
        self.limit, self.raised = limit, 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if args[0].shape[0] > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError(f"simulated: tried to allocate for {args[0].shape[0]} rows; out of memory")


def test_oom_inside_forward_backs_off_to_the_same_scores(llama):
    model = llama
    site = Site(model)
    ids = list(range(3, 17))
    cfg = AttributionConfig(method="ig", steps=4)
    # 9 rows with a backward (3 layers x alphas 1/4, 2/4, 3/4; alpha = 1 is the clean run) -> OOM at 9 and 4 rows ->
    # micro-batches of 2, like max_rows=2 (the 4 forward-only rows then also go 2 at a time)
    ref = Attributor(site, AttributionConfig(method="ig", steps=4, max_rows=2))
    ref3 = ref.score(ids, 6)
    oom = _OOMAbove(model.model.norm, limit=3)
    try:
        att = Attributor(site, cfg)
        res = att.score(ids, 6)
        res_again = att.score(ids, 6)  # the learnt row cap is kept: no new failure
    finally:
        oom.handle.remove()
    assert oom.raised == 2 and att.stats["oom_backoffs"] == 2
    assert torch.equal(res.scores, ref3.scores) and torch.equal(res_again.scores, ref3.scores)  # same micro-batches
    assert count_hooks(model) == 0 and all("forward" not in b.__dict__ for b in site.blocks)


def test_oom_inside_forward_grad_x_act(llama):
    model = llama
    site = Site(model)
    items = [(list(range(3, 3 + n)), 4) for n in (9, 12, 10, 14)]
    ref = Attributor(site, AttributionConfig(method="grad_x_act", batch_size=4)).score_batch(items)
    oom = _OOMAbove(model.model.norm, limit=2)
    try:
        att = Attributor(site, AttributionConfig(method="grad_x_act", batch_size=4))
        res = att.score_batch(items)
    finally:
        oom.handle.remove()
    assert oom.raised == 1 and att.stats["oom_backoffs"] == 1 and att._gxa_cap == 2
    for a, b in zip(res, ref):
        assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-7)
