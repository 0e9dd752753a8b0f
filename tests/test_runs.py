"""The run layer: dataset rebuild from a recorded source, settings checks, provenance, padding, config validation."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from caploc.config import check, default_of, from_mapping, help_of, setting, to_mapping
from caploc.data import collate, load_dataset, pad_id
from caploc.errors import CaplocError
from caploc.runs import DataInfo, Provenance, eval_sets, rebuild_dataset, settings_diff, spec_of, try_rebuild_dataset


def test_rebuild_keeps_every_field():
    ds = load_dataset("gsm_symbolic", n=6, seed=3, target="answer")
    again = rebuild_dataset(ds.source, ds.fingerprint())
    assert again.fingerprint() == ds.fingerprint()
    assert [s.target for s in again] == [s.target for s in ds]  # answer targets, not chains of thought
    sub = ds.subset([4, 1])
    assert rebuild_dataset(sub.source, sub.fingerprint()).fingerprint() == sub.fingerprint()
    rg = load_dataset("rg:basic_arithmetic", n=5, seed=2)
    assert rebuild_dataset(rg.source).fingerprint() == rg.fingerprint()
    assert spec_of(rg.source) == "rg:basic_arithmetic" and spec_of(sub.source) == "gsm_symbolic"


def test_rebuild_refuses_changed_content_and_unnamed_files(tmp_path):
    ds = load_dataset("gsm_symbolic", n=4, seed=0)
    with pytest.raises(CaplocError, match="fingerprint"):
        rebuild_dataset(ds.source, "0" * 16)
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}", "target": f" a{i}"}) for i in range(5)))
    user = load_dataset(str(f))
    ok, why = try_rebuild_dataset(user.source, user.fingerprint())
    assert ok is None and "command line" in why  # a path recorded in a result file is not followed on its own
    assert rebuild_dataset(user.source, user.fingerprint(), allow_paths=[tmp_path]).fingerprint() == user.fingerprint()
    with pytest.raises(CaplocError, match="seed"):
        rebuild_dataset({"loader": "gsm_symbolic", "n": 3, "seed": "x"})
    with pytest.raises(CaplocError, match="cannot be replayed"):
        rebuild_dataset({"loader": "mystery"})


def test_settings_diff_ignores_memory_knobs():
    a = {"model": {"n_layers": 2, "d_mlp": 8, "fingerprint": "f"}, "chat": False,
         "attribution": {"method": "ig", "steps": 4, "memory_mb": 100, "batch_size": 2}}
    b = json.loads(json.dumps(a))
    b["attribution"].update(memory_mb=5000, batch_size=16)
    assert settings_diff(a, b) == []
    b["attribution"]["steps"] = 8
    b["chat"] = True
    b["model"]["fingerprint"] = "g"
    assert settings_diff(a, b) == ["model.fingerprint", "attribution.steps", "chat"]


def test_provenance_round_trip_and_legacy_meta():
    meta = {"model_id": "m", "model_type": "llama", "model_fingerprint": "abc", "n_layers": 3, "d_mlp": 16,
            "dataset": "gsm_symbolic", "dataset_fingerprint": "fp", "dataset_source": {"loader": "gsm_symbolic"},
            "config": {"rule": "sigma"}, "seed": 0}
    p = Provenance.from_meta(meta)
    assert p.model.fingerprint == "abc" and p.data.spec == "gsm_symbolic" and p.config == {"rule": "sigma"}
    assert Provenance.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert DataInfo.of(load_dataset("facts", n=3, seed=0)).seed == 0


def test_eval_sets_hold_out_the_localization_prompts():
    loc = load_dataset("gsm_symbolic", n=8, seed=0)
    meta = {"dataset": loc.name, "dataset_fingerprint": loc.fingerprint(), "dataset_source": loc.source}
    sets = eval_sets(["gsm_symbolic", "facts"], n=6, seed=0, neuron_meta=meta)
    seen = {s.prompt for s in loc}
    on = [ds for _, ds, role in sets if role == "on"]
    assert on and all(s.prompt not in seen for ds in on for s in ds)
    assert [role for *_, role in sets][-1] == "off"
    with pytest.raises(CaplocError, match="twice"):
        eval_sets(["gsm_symbolic", "facts", "facts"], n=2, neuron_meta=None)


def test_pad_id_and_collate():
    class Tok:
        pad_token_id = None
        eos_token_id = 7

    class Cfg:
        pad_token_id = None
        eos_token_id = [5, 6]

    assert pad_id(Tok()) == 7 and pad_id(None, Cfg()) == 5 and pad_id() == 0
    ids, mask = collate([[1, 2, 3], [4]], 9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = collate([[1]], 0, width=3)
    assert ids.shape == (1, 3) and mask.sum() == 1


@dataclasses.dataclass
class _Inner:
    steps: int = setting(4, help="steps", min=1)

    def __post_init__(self):
        check(self)


@dataclasses.dataclass
class _Cfg:
    sigma: float = setting(6.0, help="the sigma", min=0, min_exclusive=True)
    kinds: list = setting(default_factory=lambda: ["random"], help="kinds", choices=("random", "group"))
    n: int | None = setting(None, help="count", min=1)
    flag: bool = setting(False, help="a flag")
    inner: _Inner = setting(default_factory=_Inner, help="nested")

    def __post_init__(self):
        check(self)


@pytest.mark.parametrize("kw, match", [
    ({"sigma": -1.0}, "sigma must be >"), ({"sigma": math.nan}, "finite"), ({"sigma": "6"}, "number"),
    ({"kinds": ["randm"]}, "one of"), ({"kinds": "random"}, "list"), ({"n": 2.5}, "whole"), ({"n": 0}, ">= 1"),
    ({"flag": 1}, "true or false"), ({"sigma": True}, "number"),
])
def test_config_check_rejects_bad_values(kw, match):
    with pytest.raises(CaplocError, match=match):
        _Cfg(**kw)


def test_config_mapping_round_trip():
    c = from_mapping(_Cfg, {"sigma": 3, "kinds": ["group"], "inner": {"steps": 2}}, "study")
    assert c.sigma == 3.0 and isinstance(c.sigma, float) and c.inner.steps == 2
    assert from_mapping(_Cfg, to_mapping(c)) == c
    with pytest.raises(CaplocError, match=r"unknown key 'sigmaa' in \[s\]"):
        from_mapping(_Cfg, {"sigmaa": 1}, "s")
    with pytest.raises(CaplocError, match=r"^\[s.inner\] steps must be >= 1, got 0$"):
        from_mapping(_Cfg, {"inner": {"steps": 0}}, "s")
    assert default_of(_Cfg, "kinds") == ["random"] and help_of(_Cfg, "sigma") == "the sigma"
