"""Bad input, verb by verb, as a hostile user would give it: every case must end in ONE line on stderr naming what to
fix (no traceback), exit status 2, and no file written into the output directory.

Cases are data: (id, argv, words the error line must contain). ``{run}`` is a finished tiny locate run, ``{tmp}`` a
fresh directory per case, ``{file}`` an ordinary file, and the ``{bad_*}`` paths are crafted files (see ``paths``).
"""
from __future__ import annotations

import json
import os

import pytest

from caploc.cli import main

TINY = "tiny:llama"
LOC = ["locate", "--model", TINY, "--data", "facts", "--n", "4", "--method", "grad_x_act"]
STAB = ["stability", "--model", TINY, "--data", "facts", "--n", "4", "--method", "grad_x_act"]
IV = ["intervene", "--neurons", "{run}", "--data", "facts", "--n", "4"]
EV = ["eval", "--model", TINY, "--data", "facts", "--n", "4"]
FT = ["finetune", "--model", TINY, "--neurons", "{run}", "--data", "facts", "--n-train", "4", "--n-eval", "4"]

CASES = [
    # ---- numeric options: NaN, inf, negative, zero, out of range -----------------------------------------------------
    ("locate-sigma-negative", LOC + ["--sigma", "-1"], "sigma"),
    ("locate-sigma-nan", LOC + ["--sigma", "nan"], "sigma"),
    ("locate-sigma-inf", LOC + ["--sigma", "inf"], "sigma"),
    ("locate-min-freq-zero", LOC + ["--min-freq", "0"], "min_freq"),
    ("locate-min-freq-nan", LOC + ["--min-freq", "nan"], "min_freq"),
    ("locate-min-freq-fraction-count", LOC + ["--min-freq", "2.5"], "min_freq"),
    ("locate-kn-t-above-one", LOC + ["--rule", "kn", "--kn-t", "1.5"], "kn_t"),
    ("locate-topk-zero", LOC + ["--rule", "topk", "--topk", "0"], "topk"),
    ("locate-steps-zero", LOC + ["--method", "ig", "--steps", "0"], "steps"),
    ("locate-max-length-zero", LOC + ["--max-length", "0"], "max_length"),
    ("locate-max-length-beyond-context", LOC + ["--max-length", "100000"], "context"),
    ("locate-memory-negative", LOC + ["--memory-mb", "-5"], "memory_mb"),
    ("locate-memory-nan", LOC + ["--memory-mb", "nan"], "memory_mb"),
    ("locate-batch-size-zero", LOC + ["--batch-size", "0"], "batch_size"),
    ("locate-shard-size-zero", LOC + ["--shard-size", "0"], "shard_size"),
    ("locate-n-zero", LOC + ["--n", "0"], "n"),
    ("stability-k-one", STAB + ["--k", "1"], "k"),
    ("stability-seeds-zero", STAB + ["--seeds", "0"], "seeds"),
    ("stability-sigma-nan", STAB + ["--sigma", "nan"], "sigma"),
    ("intervene-n-random-negative", IV + ["--n-random", "-1"], "n_random"),
    ("intervene-k-nan", IV + ["--mode", "enhance", "--k", "nan"], "k"),
    ("intervene-n-boot-zero", IV + ["--n-boot", "0"], "n_boot"),
    ("intervene-batch-size-zero", IV + ["--batch-size", "0"], "batch_size"),
    ("eval-k-inf", EV + ["--neurons", "{run}", "--mode", "enhance", "--k", "inf"], "k"),
    ("finetune-lr-negative", FT + ["--lr", "-0.1"], "lr"),
    ("finetune-lr-nan", FT + ["--lr", "nan"], "lr"),
    ("finetune-steps-zero", FT + ["--steps", "0"], "steps"),
    ("finetune-grad-norm-negative", FT + ["--max-grad-norm", "-1"], "max_grad_norm"),
    ("decouple-group-size-zero", ["decouple", "--model", TINY, "--group-size", "0"], "group_size"),
    ("audit-n-facts-zero", ["audit", "--model", TINY, "--n-facts", "0"], "n_facts"),
    # ---- choices and ranges -----------------------------------------------------------------------------------------
    ("locate-method-unknown", LOC + ["--method", "magic"], "method"),
    ("locate-rule-unknown", LOC + ["--rule", "vote"], "rule"),
    ("locate-objective-unknown", LOC + ["--objective", "entropy"], "objective"),
    ("locate-positions-unknown", LOC + ["--positions", "middle"], "positions"),
    ("locate-alphas-unknown", LOC + ["--alphas", "random"], "'random'"),
    ("locate-layers-reversed", LOC + ["--layers", "2-1"], "layers"),
    ("locate-layers-garbage", LOC + ["--layers", "a-b"], "layers"),
    ("locate-layers-beyond-model", LOC + ["--layers", "0-40"], "layer"),
    ("locate-dtype-unknown", LOC + ["--dtype", "float8"], "dtype"),
    ("locate-device-unknown", LOC + ["--device", "tpu9"], "device"),
    ("locate-target-unknown", LOC + ["--target", "essay"], "target"),
    ("intervene-mode-unknown", IV + ["--mode", "shuffle"], "mode"),
    ("intervene-metrics-unknown", IV + ["--metrics", "bleu"], "metric"),
    ("intervene-ks-garbage", IV + ["--ks", "1,x"], "ks"),
    ("finetune-arms-unknown", FT + ["--arms", "neurons,everything"], "arm"),
    ("finetune-schedule-unknown", FT + ["--schedule", "zigzag"], "schedule"),
    ("audit-methods-unknown", ["audit", "--model", TINY, "--methods", "kn,telepathy"], "method"),
    # ---- models ------------------------------------------------------------------------------------------------------
    ("model-missing-dir", ["locate", "--model", "{tmp}/nope/", "--data", "facts", "--n", "2"], "no such"),
    ("model-empty-dir", ["locate", "--model", "{tmp}", "--data", "facts", "--n", "2"], "config"),
    ("model-not-gguf-file", ["locate", "--model", "{file}", "--data", "facts", "--n", "2"], "gguf"),
    ("model-unknown-tiny", ["locate", "--model", "tiny:notanarch", "--data", "facts", "--n", "2"], "tiny"),
    ("layout-not-linear", LOC + ["--layout", "layers=model.layers,mlp=mlp,out=act_fn,in=up_proj"], "layout"),
    ("layout-garbage", LOC + ["--layout", "{{not json"], "layout"),
    # ---- data files --------------------------------------------------------------------------------------------------
    ("data-missing-file", ["locate", "--model", TINY, "--data", "{tmp}/none.jsonl"], "none.jsonl"),
    ("data-empty-file", ["locate", "--model", TINY, "--data", "{bad_empty}"], "empty"),
    ("data-not-utf8", ["locate", "--model", TINY, "--data", "{bad_latin1}"], "UTF-8"),
    ("data-deep-json", ["locate", "--model", TINY, "--data", "{bad_deep}"], "deep"),
    ("data-no-prompt-column", ["locate", "--model", TINY, "--data", "{bad_columns}"], "prompt"),
    ("data-unknown-field", ["locate", "--model", TINY, "--data", "{good_jsonl}", "--prompt-field", "nope"], "nope"),
    ("data-unknown-builtin", ["locate", "--model", TINY, "--data", "rg:not_a_task"], "not_a_task"),
    ("data-n-larger-than-file", ["locate", "--model", TINY, "--data", "{good_jsonl}", "--n", "500"], "500"),
    # ---- output locations --------------------------------------------------------------------------------------------
    ("out-is-a-file", LOC + ["--out", "{file}"], "is a file"),
    ("out-under-a-file", LOC + ["--out", "{file}/sub"], "is a file"),
    ("intervene-out-is-a-file", IV + ["--out", "{file}"], "is a file"),
    ("finetune-out-is-a-file", FT + ["--out", "{file}"], "is a file"),
    ("report-out-is-a-file", ["report", "{run}", "--out", "{file}"], "is a file"),
    # ---- result files: missing, truncated, foreign, crafted ----------------------------------------------------------
    ("neurons-missing", ["intervene", "--neurons", "{tmp}/none", "--data", "facts"], "none"),
    ("neurons-truncated", ["intervene", "--neurons", "{bad_truncated_run}", "--data", "facts", "--n", "4"],
     "truncated or corrupt"),
    ("neurons-json-garbage", ["intervene", "--neurons", "{bad_json_run}", "--data", "facts", "--n", "4"], "JSON"),
    ("neurons-foreign-model", ["intervene", "--neurons", "{run}", "--model", "tiny:gpt2", "--data", "facts",
                               "--n", "4"], "layers"),
    ("neurons-kn-json-float", ["eval", "--model", TINY, "--data", "facts", "--n", "4", "--neurons", "{bad_kn_float}"],
     "integers"),
    ("neurons-kn-json-out-of-range", ["eval", "--model", TINY, "--data", "facts", "--n", "4", "--neurons",
                                      "{bad_kn_range}"], "outside"),
    ("sweep-not-a-run", ["sweep", "--run", "{tmp}"], "caploc locate"),
    ("stability-run-not-a-run", ["stability", "--run", "{file}"], "caploc locate"),
    ("report-nothing", ["report", "{tmp}/none"], "none"),
    # ---- reproduce: the config is checked whole, before anything runs ------------------------------------------------
    ("reproduce-missing-config", ["reproduce", "{tmp}/none.toml", "--check"], "none.toml"),
    ("reproduce-bad-toml", ["reproduce", "{bad_toml_syntax}", "--check"], "TOML"),
    ("reproduce-unknown-section", ["reproduce", "{bad_toml_section}", "--check"], "nonsense"),
    ("reproduce-unknown-key", ["reproduce", "{bad_toml_key}", "--check"], "sigmaa"),
    ("reproduce-negative-sigma", ["reproduce", "{bad_toml_sigma}", "--check"], "sigma"),
    ("reproduce-nan-lr", ["reproduce", "{bad_toml_lr}", "--check"], "lr"),
    ("reproduce-wrong-type", ["reproduce", "{bad_toml_type}", "--check"], "n_random"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "loc"
    assert main(LOC + ["--sigma", "1", "--min-freq", "0.25", "--cards", "0", "--out", str(out)]) == 0
    return out


def _toml(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def paths(run_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    p = {"run": str(run_dir)}
    (d / "file.txt").write_text("I am a file\n")
    p["file"] = str(d / "file.txt")
    (d / "empty.jsonl").write_text("")
    p["bad_empty"] = str(d / "empty.jsonl")
    (d / "latin1.jsonl").write_bytes('{"prompt": "caf\u00e9", "target": " x"}\n'.encode("latin-1"))
    p["bad_latin1"] = str(d / "latin1.jsonl")
    (d / "deep.json").write_text("[" * 100000 + "]" * 100000)
    p["bad_deep"] = str(d / "deep.json")
    (d / "cols.jsonl").write_text('{"foo": "a", "bar": "b"}\n' * 3)
    p["bad_columns"] = str(d / "cols.jsonl")
    (d / "good.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "target": f" t{i}"}) + "\n"
                                          for i in range(5)))
    p["good_jsonl"] = str(d / "good.jsonl")
    for name, damage in (("truncated", "tensors"), ("json", "json")):
        r = d / f"{name}_run"
        r.mkdir()
        for f in ("neurons.json", "neurons.safetensors"):
            (r / f).write_bytes((run_dir / f).read_bytes())
        if damage == "tensors":
            blob = (r / "neurons.safetensors").read_bytes()
            (r / "neurons.safetensors").write_bytes(blob[: len(blob) // 2])
        else:
            (r / "neurons.json").write_text('{"kind": "neuron_set", "n_layers": ')
        p[f"bad_{name}_run"] = str(r)
    (d / "kn_float.json").write_text(json.dumps({"n_layers": 3, "d_mlp": 48, "neurons": [[0, 1.5]]}))
    p["bad_kn_float"] = str(d / "kn_float.json")
    (d / "kn_range.json").write_text(json.dumps({"n_layers": 3, "d_mlp": 48, "neurons": [[0, 480]]}))
    p["bad_kn_range"] = str(d / "kn_range.json")
    base = '[study]\nname = "bad"\nmodel = "tiny:llama"\n[locate]\ndata = "facts"\nn = 4\n'
    p["bad_toml_syntax"] = _toml(d / "syntax.toml", base + "[stability\nk = 1\n")
    p["bad_toml_section"] = _toml(d / "section.toml", base + "[nonsense]\nx = 1\n")
    p["bad_toml_key"] = _toml(d / "key.toml", base + "sigmaa = 1\n")
    p["bad_toml_sigma"] = _toml(d / "sigma.toml", base + "sigma = -1\n")
    p["bad_toml_lr"] = _toml(d / "lr.toml", base + "[finetune]\nlr = nan\n")
    p["bad_toml_type"] = _toml(d / "type.toml", base + '[intervene]\nn_random = "ten"\n')
    return p


def _files(root):
    return sorted(os.path.join(a, f) for a, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(argv, words, paths, tmp_path, capsys):
    values = dict(paths, tmp=str(tmp_path))
    argv = [a.format(**values) for a in argv]
    if "--out" not in argv and argv[0] not in ("report", "reproduce", "sweep"):
        argv += ["--out", str(tmp_path / "out")]
    before = {k: _files(v) for k, v in paths.items() if os.path.isdir(v)}
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error:"), f"not one error line: {err[-2000:]}"
    assert "Traceback" not in err
    assert words.lower() in lines[0].lower(), lines[0]
    assert not _files(tmp_path / "out"), "files written for a refused command"
    assert {k: _files(v) for k, v in paths.items() if os.path.isdir(v)} == before, "an input directory was changed"


def test_there_are_enough_cases():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


def test_every_option_of_every_verb_has_help():
    import typer.main

    from caploc.cli import app

    cmd = typer.main.get_command(app)
    missing = [f"{name} --{p.name}" for name, sub in cmd.commands.items() for p in sub.params
               if getattr(p, "param_type_name", "") == "option" and p.name != "help"
               and not (getattr(p, "help", None) or "").strip()]
    assert missing == []
    assert len(cmd.commands) >= 18
