"""Evaluation: teacher-forced NLL against a hand computation, answer parsing, greedy generation under hooks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caploc.answers import answer_kind, is_correct, normalize_number, parse_answer
from caploc.data import Dataset, Sample
from caploc.errors import CaplocError
from caploc.evalsets import heldout_splits
from caploc.hooks import count_hooks, erase_neurons, scale_neurons
from caploc.measure import EvalResult, accuracy, evaluate, generate, nll
from caploc.models.loading import load_model
from caploc.stages.evaluate import EvalRun, run_eval


@pytest.fixture(autouse=True, scope="module")
def _one_thread(single_thread):
    yield


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny:llama")


def _toy(n=7, name="toy"):
    # unequal prompt and target lengths so that a batch is really padded
    return Dataset(name, [Sample(f"Q{i}: {'ab' * (i % 4)} what is {i}+{i}?\nA:", f" {2 * i}{'!' * (i % 3)}",
                                 group=f"g{i % 3}", meta={"answer": str(2 * i)}) for i in range(n)])


def _hand_nll(model, tok, sample) -> tuple[float, int]:
    """Summed NLL of the target tokens, one unpadded sequence at a time, with an explicit log_softmax gather."""
    p = tok.encode(sample.prompt, add_special_tokens=False)
    t = tok.encode(sample.target, add_special_tokens=False)
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    total = -sum(float(lp[len(p) + j - 1, t[j]]) for j in range(len(t)))
    return total, len(t)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_nll_equals_hand_computation_on_padded_batch(arch):
    lm = load_model(f"tiny:{arch}")
    ds = _toy()
    res = nll(lm, ds, batch_size=4)  # 7 samples of different lengths: batches of 4 + 3, right-padded
    hand = [_hand_nll(lm.model, lm.tokenizer, s) for s in ds]
    sums = np.array([h[0] for h in hand])
    cnt = np.array([h[1] for h in hand])
    assert len(set(cnt)) > 1 and len({len(s.prompt) for s in ds}) > 1
    np.testing.assert_allclose(res.nll_per_sample, sums / cnt, rtol=0, atol=2e-5)
    assert res.nll_per_token == pytest.approx(sums.sum() / cnt.sum(), abs=2e-5)  # token-weighted
    np.testing.assert_array_equal(res.n_tokens, cnt)
    assert res.n == len(ds) and res.fingerprint == ds.fingerprint()


def test_nll_batch_size_invariant_and_runs_under_hooks(lm):
    ds = _toy()
    a = nll(lm, ds, batch_size=1)
    b = nll(lm, ds, batch_size=5)
    np.testing.assert_allclose(a.nll_per_sample, b.nll_per_sample, atol=2e-5)
    # under a caller's hook the NLL changes; the hook is gone afterwards
    with erase_neurons(lm.site, {1: list(range(lm.site.d_mlp))}):
        c = nll(lm, ds, batch_size=3)
    assert abs(c.nll_per_token - a.nll_per_token) > 1e-4
    assert count_hooks(lm.model) == 0


@pytest.mark.parametrize("text,want", [
    ("so the total is #### 1,234.0", "1234"),
    ("#### 1,234.0\nQuestion: 5", "1234"),
    ("He pays 3 + 4 = 7 dollars, then 10 more, so 17", "17"),  # last-number fallback
    ("The temperature drops to -12 degrees", "-12"),
    ("#### -5", "-5"),
    ("She earns 1687.50 in total #### 1687.5", "1687.5"),
    ("answer 1687.50", "1687.5"),
    ("#### $1,000", "1000"),
    ("3.0", "3"),
    ("no number here", None),
    ("a list 1,2,3", "3"),  # '1,2,3' is not a thousands-separated number
])
def test_parse_gsm(text, want):
    assert parse_answer("gsm", text) == want


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("3.0") == "3"
    assert normalize_number("-0.50") == "-0.5"
    assert normalize_number(".5") == "0.5"
    assert normalize_number("abc") is None


def test_parse_label_facts_exact_and_is_correct():
    assert parse_answer("label", " Positive. It was great", labels=["positive", "negative"]) == "positive"
    assert parse_answer("label", " I think negative", labels=["positive", "negative"]) == "negative"
    assert parse_answer("label", " hmm", labels=["positive", "negative"]) is None
    assert parse_answer("label", "  Joy!") == "joy"
    fact = Sample("The Eiffel Tower is in", " Paris", meta={"attribute": "Paris"})
    assert is_correct("facts", " paris, France", fact)
    assert is_correct("facts", "  PARIS", fact)
    assert not is_correct("facts", " Parisian", fact)  # the attribute must not end inside a word
    assert not is_correct("facts", " London", fact)
    assert is_correct("facts", " New   York City", Sample("x", " New York", meta={"attribute": "New York"}))
    gsm = Sample("q", " ... #### 1,500", meta={"answer": "1500"})
    assert is_correct("gsm", "blah #### 1500.0", gsm)
    assert not is_correct("gsm", "blah #### 150", gsm)
    assert is_correct("exact", " hello  world and more", Sample("q", " hello world"))
    assert not is_correct("exact", " Hello world", Sample("q", " hello world"))
    lab = Sample("q", " negative", meta={"label": "negative"})
    assert is_correct("label", " Negative.", lab, labels=["positive", "negative"])
    with pytest.raises(CaplocError):
        parse_answer("nope", "x")


def test_answer_kind():
    from caploc.data import load_dataset

    assert answer_kind(load_dataset("gsm_symbolic", n=2)) == "gsm"
    assert answer_kind(load_dataset("rg:letter_counting", n=3)) == "gsm"  # numeric reasoning-gym answers
    assert answer_kind(load_dataset("facts", n=3)) == "facts"
    labels = Dataset("sent", [Sample(f"text {i}", " positive" if i % 2 else " negative") for i in range(8)])
    assert answer_kind(labels) == "label"
    assert answer_kind(Dataset("free", [Sample(f"p{i}", f" some long text {i}") for i in range(4)])) == "exact"


def _greedy_reference(model, ids, steps):
    """Greedy decoding without KV cache: the full sequence is re-run at every step."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


def test_batched_left_padded_generation_matches_reference_under_hooks(lm):
    tok = lm.tokenizer
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Q: 1+1?\nA:", "Hi", "Question: a much longer one?")]
    neurons = {l: list(range(lm.site.d_mlp)) for l in range(lm.site.n_layers)}
    with scale_neurons(lm.site, neurons, 25.0):  # strong enough to change a random model's greedy choices
        gens = generate(lm, prompts, max_new_tokens=6, batch_size=3)
        refs = []
        for p in prompts:
            ref = _greedy_reference(lm.model, p, 6)
            eos = tok.eos_token_id
            if eos in ref:  # generate stops at eos
                ref = ref[:ref.index(eos)]
            refs.append(tok.decode(ref, skip_special_tokens=True))
    assert gens == refs
    plain = generate(lm, prompts, max_new_tokens=6, batch_size=3)
    assert plain != gens  # the hooks really acted during generation
    assert count_hooks(lm.model) == 0
    assert tok.padding_side == "right"  # shared tokenizer state untouched


def test_accuracy_and_evaluate(lm):
    ds = _toy(5)
    assert answer_kind(ds) == "exact"  # not a known numeric loader: exact-prefix answers
    acc, correct, gens = accuracy(lm, ds, batch_size=2, max_new_tokens=3, parser="gsm")
    assert correct.shape == (5,) and correct.dtype == bool and len(gens) == 5
    assert acc == pytest.approx(correct.mean())
    # correctness re-derived from the generations with the public parser
    assert list(correct) == [is_correct("gsm", g, s) for g, s in zip(gens, ds)]
    res = evaluate(lm, ds, metrics=("nll", "accuracy"), batch_size=2, max_new_tokens=3, parser="gsm")
    assert res.kind == "gsm" and res.generations == gens and np.isfinite(res.nll_per_token)
    with pytest.raises(CaplocError):
        evaluate(lm, ds, metrics=("bleu",))


def test_eval_result_roundtrip(tmp_path, lm):
    res = evaluate(lm, _toy(4), metrics=("nll", "accuracy"), max_new_tokens=2)
    res.save(tmp_path)
    back = EvalResult.load(tmp_path)
    np.testing.assert_allclose(back.nll_per_sample, res.nll_per_sample)
    np.testing.assert_array_equal(back.correct, res.correct)
    assert back.nll_per_token == pytest.approx(res.nll_per_token)
    json.dumps(res.to_dict())


def test_heldout_splits():
    pool = Dataset("pool", [Sample(f"p{i}", " t", group=f"g{i % 5}") for i in range(20)])
    loc = Dataset("loc", [Sample(f"p{i}", " t", group=f"g{i % 5}") for i in (0, 1, 2, 5)])  # groups g0, g1, g2
    a, b = heldout_splits(pool, exclude=loc)
    assert not {s.prompt for s in a} & {s.prompt for s in loc}
    assert {s.group for s in a} <= {"g0", "g1", "g2"}
    assert {s.group for s in b} == {"g3", "g4"}
    assert len(a) + len(b) == 16
    a2, b2 = heldout_splits(pool, None, seed=0)  # train_test_split(by_group=True)
    assert not {s.group for s in a2} & {s.group for s in b2}


def test_run_eval_report(tmp_path, lm):
    from caploc.results import NeuronSet

    ns = NeuronSet(np.array([[0, 1], [1, 4], [2, 7]]), lm.site.n_layers, lm.site.d_mlp)
    run_eval(lm, {"a": _toy(4), "b": _toy(3, "other")}, neurons=ns, mode="enhance", k=3.0, out_dir=tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["kind"] == "eval" and rep["tables"][0]["rows"]
    back = EvalRun.load(tmp_path)
    assert set(back.results["a"]) == {"untouched", "enhance(x3)"}
    base, enh = back.results["a"]["untouched"], back.results["a"]["enhance(x3)"]
    assert enh.nll_per_token != base.nll_per_token
    assert count_hooks(lm.model) == 0


@pytest.mark.real
def test_real_model_nll_and_facts_accuracy():
    from caploc.data import load_dataset

    lm = load_model("smollm2-135m")
    gsm = load_dataset("gsm_symbolic", n=2, seed=0)
    r = nll(lm, gsm, batch_size=2)
    assert 0.3 < r.nll_per_token < 4.0  # ~1.4 nats/token on gsm_symbolic CoT (docs/ASSETS)
    facts = load_dataset("facts", n=3, seed=0)
    res = evaluate(lm, facts, metrics=("nll", "accuracy"), batch_size=3)
    assert res.kind == "facts" and len(res.generations) == 3 and all(isinstance(g, str) for g in res.generations)
    with erase_neurons(lm.site, {l: list(range(lm.site.d_mlp)) for l in (0, 1)}):
        hurt = nll(lm, facts, batch_size=3)
    assert hurt.nll_per_token > res.nll_per_token
    assert count_hooks(lm.model) == 0
