"""Small tier on the real default model (SmolLM2-135M-Instruct), tiny settings."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def lm():
    from caploc.models.loading import load_model

    return load_model("smollm2-135m")


def test_real_ig_matches_reference_and_is_complete(lm):
    from caploc.attribution.engine import AttributionConfig, Attributor
    from caploc.data import encode, load_dataset

    from .test_attribution import reference_ig

    s = load_dataset("gsm_symbolic", n=1, seed=0, target="answer")[0]
    e = encode(lm.tokenizer, s)
    cfg = AttributionConfig(method="ig", steps=2, layers=[20, 29], positions="target")
    res = Attributor(lm.site, cfg).score(e.input_ids, e.prompt_len)
    assert not res.fallback
    ref = reference_ig(lm.site, e.input_ids, e.prompt_len, 29, cfg)
    assert float((res.scores[29] - ref).abs().max() / ref.abs().max()) < 1e-4
    assert torch.isfinite(res.gap[[20, 29]]).all()


def test_real_hooked_logits_equal_plain(lm):
    from caploc.hooks import capture, count_hooks

    ids = lm.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = lm.model(ids).logits
        with capture(lm.site) as cap:
            hooked = lm.model(ids).logits
    assert torch.equal(plain, hooked)
    assert len(cap) == 30 and cap[0].shape[-1] == 1536
    assert count_hooks(lm.model) == 0


def test_real_locate_cli(tmp_path):
    from caploc.cli import main
    from caploc.results import NeuronSet

    out = tmp_path / "loc"
    assert main(["locate", "--data", "gsm_symbolic", "--n", "3", "--method", "grad_x_act", "--min-freq", "0.6",
                 "--out", str(out)]) == 0
    ns = NeuronSet.load(out)
    assert ns.n_layers == 30 and ns.d_mlp == 1536 and ns.meta["model_type"] == "llama"
    assert ns.counts.sum() > 0
