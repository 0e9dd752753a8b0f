"""Model loading never runs code shipped with a model, never unpickles without an explicit opt-in, and turns missing,
corrupt or truncated model files into one-line errors."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from caploc.errors import CaplocError
from caploc.models import load_model, loading
from caploc.models.checks import safetensors_problem

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _logits(lm, text="hello world") -> torch.Tensor:
    enc = lm.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc).logits


@pytest.fixture
def saved(tmp_path) -> tuple[Path, object]:
    """A tiny llama saved with save_pretrained (safetensors), and the LoadedModel it came from."""
    lm = load_model("tiny:llama")
    d = tmp_path / "model"
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d, lm


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _write_payload(d: Path, marker: Path, module: str = "modeling_x") -> None:
    """Python code that, if anything ever imported it, would create ``marker``."""
    (d / f"{module}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class XConfig(LlamaConfig):\n    model_type = 'caploc_remote_x'\n"
        "class XForCausalLM(LlamaForCausalLM):\n    config_class = XConfig\n"
    )


# ----- code shipped with a model never runs -------------------------------------------------------------------------
def test_custom_code_model_is_refused_and_never_runs(saved, tmp_path):
    d, _ = saved
    marker = tmp_path / "MARKER"
    _write_payload(d, marker)
    _edit_config(d, model_type="caploc_remote_x", architectures=["XForCausalLM"],
                 auto_map={"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    with pytest.raises(CaplocError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "custom code" in msg and "auto_map" in msg and "trust_remote_code=False" in msg
    assert "upgrade transformers" in msg  # names the fix
    assert not marker.exists()


def test_auto_map_beside_a_native_architecture_uses_the_builtin_code(saved, tmp_path, caplog):
    d, lm = saved
    marker = tmp_path / "MARKER"
    _write_payload(d, marker)
    _edit_config(d, auto_map={"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["modeling_x.XTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    try:
        lm2 = load_model(d)
    except CaplocError as e:  # refusing the custom tokenizer is fine too, as long as nothing ran
        assert "\n" not in str(e)
    else:
        assert type(lm2.model).__name__ == "LlamaForCausalLM"
        assert lm2.info["fingerprint"] == lm.info["fingerprint"]
        assert "auto_map" in caplog.text
    assert not marker.exists()


def test_unknown_model_type_without_auto_map(saved):
    d, _ = saved
    _edit_config(d, model_type="caploc_no_such_arch")
    with pytest.raises(CaplocError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "'caploc_no_such_arch'" in msg and "upgrade transformers" in msg


def test_config_without_model_type(saved):
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    del cfg["model_type"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CaplocError) as e:
        load_model(d)
    assert "no model_type" in _one_line(e)


def test_every_transformers_call_passes_trust_remote_code_false():
    src = Path(loading.__file__).read_text()
    n_calls = src.count(".from_pretrained(")
    assert n_calls >= 4
    # each call site passes **kw built with trust_remote_code=False
    assert src.count('"trust_remote_code": False') == 2
    for line in (ln for ln in src.splitlines() if ".from_pretrained(" in ln):
        assert "**kw" in line or "**model_kw" in line, line


# ----- pickle-based weights -----------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates a marker file (what a malicious pytorch_model.bin could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle ran"))


def _to_pickle_dir(d: Path, lm) -> None:
    (d / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in lm.model.state_dict().items()}, d / "pytorch_model.bin")


def test_pickle_weights_refused_without_opt_in(saved, tmp_path):
    d, lm = saved
    (d / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CaplocError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "pytorch_model.bin" in msg and "allow_pickle=True" in msg and "safetensors" in msg
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pth"])
def test_other_pickle_suffixes_refused(saved, name):
    d, lm = saved
    (d / "model.safetensors").unlink()
    (d / name).write_bytes(b"not even read")
    with pytest.raises(CaplocError) as e:
        load_model(d)
    assert name in _one_line(e)


def test_pickle_weights_load_with_opt_in(saved):
    d, lm = saved
    _to_pickle_dir(d, lm)
    lm2 = load_model(d, allow_pickle=True)
    lm2.model.set_attn_implementation(lm.model.config._attn_implementation)
    assert torch.equal(_logits(lm), _logits(lm2))
    assert lm2.info["fingerprint"] == lm.info["fingerprint"]


def test_safetensors_preferred_over_a_pickle_beside_it(saved, tmp_path):
    d, lm = saved
    marker = tmp_path / "MARKER"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for allow in (False, True):
        lm2 = load_model(d, allow_pickle=allow)
        assert lm2.info["fingerprint"] == lm.info["fingerprint"]
    assert not marker.exists()


# ----- missing, corrupt and truncated files -------------------------------------------------------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(CaplocError) as e:
        load_model(str(tmp_path / "nope"))
    assert "no such file or directory" in _one_line(e)


def test_no_config(saved):
    d, _ = saved
    (d / "config.json").unlink()
    with pytest.raises(CaplocError) as e:
        load_model(d)
    assert "no config.json" in _one_line(e)


@pytest.mark.parametrize("content", [b"{\"model_type\": \"llama\", ", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b""])
def test_corrupt_config(saved, content):
    d, _ = saved
    (d / "config.json").write_bytes(content)
    with pytest.raises(CaplocError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "config.json is corrupt" in msg and "save_pretrained" in msg


def test_config_without_weights(saved):
    d, _ = saved
    (d / "model.safetensors").unlink()
    with pytest.raises(CaplocError) as e:
        load_model(d)
    assert "no weights" in _one_line(e)


@pytest.mark.parametrize("cut", [4, 100, 0.5, -1])
def test_truncated_safetensors(saved, cut):
    d, _ = saved
    f = d / "model.safetensors"
    blob = f.read_bytes()
    n = int(len(blob) * cut) if isinstance(cut, float) else (len(blob) + cut if cut < 0 else cut)
    f.write_bytes(blob[:n])
    with pytest.raises(CaplocError) as e:
        load_model(d)
    msg = _one_line(e)
    assert "model.safetensors is truncated or corrupt" in msg


def test_garbage_and_padded_safetensors(saved):
    d, _ = saved
    f = d / "model.safetensors"
    blob = f.read_bytes()
    assert safetensors_problem(f) is None
    for bad in (os.urandom(4096), blob + b"\0" * 16, blob[:8] + b"{not json" + blob[17:]):
        f.write_bytes(bad)
        assert safetensors_problem(f) is not None
        with pytest.raises(CaplocError) as e:
            load_model(d)
        assert "truncated or corrupt" in _one_line(e)


def test_safetensors_problem_reads_the_declared_sizes(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.int64)}, str(f))
    assert safetensors_problem(f) is None
    n = int.from_bytes(f.read_bytes()[:8], "little")
    assert f.stat().st_size == 8 + n + 3 * 5 * 4 + 7 * 8
    f.write_bytes(f.read_bytes()[:-1])
    assert "truncated" in safetensors_problem(f)
