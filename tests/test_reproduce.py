"""caploc reproduce: config validation, a tiny end-to-end study, and per-stage resume."""
from __future__ import annotations

import json

import pytest

from caploc.errors import CaplocError
from caploc.reproduce import STAGES, load_study, reproduce, validate

TINY = """
[study]
name = "tiny"
model = "tiny:llama"
seed = 0
out = "{out}"

[locate]
data = "rg:basic_arithmetic"
n = 8
method = "grad_x_act"
sigma = 2.0
min_freq = 0.25

[stability]
k = 2
seeds = [0, 1, 2]
kinds = ["random"]

[sweep]
sigmas = [1.0, 2.0]
min_freqs = [0.25, 0.5]
topks = [5]

[crosscap]
n = 6
capabilities = {{ letters = "rg:letter_counting", facts = "facts" }}

[contrast]
references = ["letters", "facts"]

[intervene]
off_target = ["rg:letter_counting"]
n = 4
n_random = 3
ks = [0.0, 2.0]
held_out_templates = false
act_matched = true

[finetune]
n_train = 6
n_eval = 4
steps = 2
arms = ["neurons", "random"]
n_random = 1
eval_data = ["rg:letter_counting"]

[audit]
n_facts = 2
methods = ["kn", "tracing", "cnl"]
kn_steps = 2
max_phrasings = 2
known = "none"

[decouple]
n_groups = 2
group_size = 2
domains = ["facts"]  # gsm chains of thought exceed the tiny model's 256 positions with its character tokenizer
"""


@pytest.mark.parametrize("text,msg", [
    ("[study]\nmodle = 'x'\n", "unknown key 'modle' in [study]"),
    ("[locat]\nn = 3\n", "unknown section [locat]"),
    ("[locate]\nn = 'ten'\n", "[locate] n"),
    ("[locate]\nmethod = 'shap'\n", "'shap'"),
    ("[locate]\nsigma = -1\n", "[locate] sigma"),
    ("[locate]\nalphas = 'random'\n", "'random'"),
    ("[finetune]\nlr = nan\n", "[finetune] lr"),
    ("[intervene]\nn_random = 'ten'\n", "[intervene] n_random"),
    ("[audit]\nkn_steps = 0\n", "[audit.kn] steps"),
    ("[audit]\nkn_stepz = 2\n", "unknown key 'kn_stepz' in [audit]"),
    ("[decouple]\nn_groups = 50\ngroup_size = 20\n", "pool_size"),
    ("[stability]\nk = 1\n", "[stability] k must be >= 2"),
    ("[locate\n", "not valid TOML"),
])
def test_config_errors_are_one_line(tmp_path, text, msg):
    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(CaplocError) as e:
        load_study(p)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_toml_sets_every_attribution_setting_and_stage_configs_are_typed(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text("[study]\nseed = 7\n[locate]\nmethod = 'ig'\nsteps = 4\nalphas = 'midpoint'\n"
                 "objective = 'prob'\nlayers = [0, 1]\n[audit]\nkn_steps = 3\n[audit.tracing]\nn_noise = 2\n"
                 "[intervene]\nseed = 3\n")
    st = load_study(p)
    att = st.configs["locate"].attribution
    assert (att.method, att.steps, att.alphas, att.objective, list(att.layers)) == ("ig", 4, "midpoint", "prob", [0, 1])
    assert st.configs["audit"].kn.steps == 3 and st.configs["audit"].tracing.n_noise == 2
    assert st.configs["audit"].seed == 7 and st.configs["intervene"].seed == 3  # study seed unless the section sets one
    assert st.configs["sweep"].split.seeds == list(st.configs["stability"].seeds)[:3]


def test_builtin_configs_validate():
    for name in ("quick", "full", "paper-llama2-7b", "paper-gptj"):
        st = load_study(name)
        assert st["study"]["name"] == name
    assert validate({})["locate"]["sigma"] == 6.0


def test_tiny_study_end_to_end_and_resume(tmp_path):
    out = tmp_path / "study"
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(out=out))
    st = load_study(p)
    seen = []
    res = reproduce(st, progress=lambda s, w: seen.append((s, w)))
    assert [s for s, w in seen if w == "running"] == list(STAGES)
    html = open(res["report"]).read()
    data = json.loads((out / "report" / "report_data.json").read_text())
    kinds = {s["kind"] for s in data["sections"]}
    for stage_kind in ("locate", "stability", "sweep", "crosscap", "claims"):
        assert stage_kind in kinds, (stage_kind, kinds)
    assert len(kinds) >= 9, kinds
    assert "Paper claims" in html and "96.42" in html
    rows = res["claims"]["rows"]
    assert len(rows) >= 6 and all(len(r) == 5 for r in rows)
    man = json.loads((out / "manifest.json").read_text())
    assert man["packages"]["torch"] and set(man["stage_fingerprints"]) == set(STAGES)
    # resume: nothing reruns
    seen.clear()
    reproduce(load_study(p), progress=lambda s, w: seen.append((s, w)))
    assert all(w == "cached" for _, w in seen) and len(seen) == len(STAGES)
    # an execution-only setting (the memory budget) reruns nothing
    p.write_text(TINY.format(out=out).replace('method = "grad_x_act"', 'method = "grad_x_act"\nmemory_mb = 64.0')
                 .replace("act_matched = true", "act_matched = true\nmemory_mb = 32.0"))
    seen.clear()
    reproduce(load_study(p), progress=lambda s, w: seen.append((s, w)))
    assert all(w == "cached" for _, w in seen)
    # a changed sweep section reruns only the sweep
    p.write_text(TINY.format(out=out).replace("topks = [5]", "topks = [5, 10]"))
    seen.clear()
    reproduce(load_study(p), progress=lambda s, w: seen.append((s, w)))
    assert [s for s, w in seen if w == "running"] == ["sweep"]


def test_claim_cells_are_readable_and_finetune_verdict_uses_beats():
    from caploc.report.claims import _holds, _ours, _verdict

    ft = {"value": -0.0581, "null_mean": -0.0051, "null_sd": 0.001, "z": -52.7, "p": 0.33, "n_null": 2, "beats": True}
    assert _holds(ft) and not _holds({**ft, "beats": False}) and _holds({"value": True})
    line = _ours(ft)
    assert line.startswith("-0.0581; random -0.0051 ± 0.001 (n = 2); z -52.7") and "{" not in line
    assert _ours({"value": 0.3, "ci": [0.1, 0.5]}) == "0.3 [0.1, 0.5]"
    assert _verdict({"value": 0.2, "holds": None, "verdict": "insufficient controls"}) == "insufficient controls"
    assert _verdict({"value": 0.2, "holds": False, "verdict": "does not hold"}) == "differs"
