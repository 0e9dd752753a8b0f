"""Integrity of stored runs: every score shard carries its store's key and a checksum and is verified when read (a
corrupted or foreign shard is recomputed, never used); one writer per result directory; output locations are checked
before any work starts."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from caploc.errors import CaplocError
from caploc.results import OutLock, ScoreStore, check_out_dir, tensors_digest


def _store(root, spec=None, n=4, shard=2):
    st = ScoreStore(root)
    st.open(spec or {"model": {"fingerprint": "A"}}, n, shard)
    for k in range(n // shard):
        idx = list(range(k * shard, (k + 1) * shard))
        st.write_shard(k, idx, torch.randn(shard, 2, 3), [0.5] * shard, torch.zeros(shard, 2))
    return st


def test_digest_depends_on_every_byte_name_and_shape():
    t = {"a": torch.arange(6, dtype=torch.float32)}
    d = tensors_digest(t)
    assert d == tensors_digest({"a": torch.arange(6, dtype=torch.float32)})
    b = t["a"].clone()
    b.view(torch.uint8)[5] ^= 1  # flip one bit of one value
    assert tensors_digest({"a": b}) != d
    assert tensors_digest({"b": t["a"]}) != d
    assert tensors_digest({"a": t["a"].reshape(2, 3)}) != d


def test_corrupted_shard_with_intact_header_is_recomputed(tmp_path, caplog):
    st = _store(tmp_path / "scores")
    assert st.finished_shards() == {0, 1}
    p = st.shard_path(1)
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF  # a data byte: the safetensors header still parses
    p.write_bytes(bytes(raw))
    load_file(str(p))  # the file is still readable ...
    assert st.finished_shards() == {0}  # ... but not used
    assert "fails its checksum" in caplog.text
    with pytest.raises(CaplocError, match="incomplete"):
        st.load()


def test_shard_of_another_store_is_not_used(tmp_path, caplog):
    a = _store(tmp_path / "a" / "scores", {"model": {"fingerprint": "A"}})
    b = _store(tmp_path / "b" / "scores", {"model": {"fingerprint": "B"}})  # same shapes, another model
    b.shard_path(0).write_bytes(a.shard_path(0).read_bytes())
    assert b.finished_shards() == {1}
    assert "another configuration or model" in caplog.text
    # a shard without caploc's metadata (e.g. written by hand) is not used either
    t = load_file(str(b.shard_path(1)))
    save_file(t, str(b.shard_path(1)))
    assert b.finished_shards() == set()


def _hold(path, ready, release):
    with OutLock(path):
        ready.set()
        release.wait(30)


def test_second_writer_is_refused(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path / "out"), ready, release))
    p.start()
    try:
        assert ready.wait(60)
        with pytest.raises(CaplocError, match="another caploc process is writing into"):
            with OutLock(tmp_path / "out"):
                pass
    finally:
        release.set()
        p.join(30)
    with OutLock(tmp_path / "out"):  # free again once the first writer is gone
        with OutLock(tmp_path / "out"):  # re-entrant in one process
            pass


def test_out_dir_checked_up_front(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CaplocError, match="is a file"):
        check_out_dir(f)
    with pytest.raises(CaplocError, match="which is a file"):
        check_out_dir(f / "sub")
    assert check_out_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root may write anywhere: let the permission check see what a normal user would
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(CaplocError, match="not writable"):
        check_out_dir(ro / "x")
