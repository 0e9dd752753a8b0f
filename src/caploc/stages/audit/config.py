"""Settings of the individual-knowledge audit: the audit itself and each method's own settings.

One :func:`caploc.config.setting` per field (default, help text, constraints) feeds the library, the CLI
(``cli.options.opt``) and the study TOML. Cross-field rules follow ``check(self)`` in ``__post_init__``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ...attribution.engine import ALPHAS, AttributionConfig
from ...config import check, setting, to_mapping
from ...errors import CaplocError
from ...results import config_key

#: audit methods, in the order they run on a fact (the registry in ``methods.py`` holds one class per name)
METHOD_NAMES = ("kn", "cnl", "tracing", "circuits")
KNOWN_MODES = ("none", "prob", "topk")
CNL_METHODS = ("grad_x_act", "ig")
SHARE_RULES = ("gt", "ge")
POSITIONS = ("last", "all")
TRACE_KINDS = ("hidden", "mlp", "attn")
TOKEN_MODES = ("subject", "key", "all")
CIRCUIT_METRICS = ("logprob", "logit", "target_logprob")
CORRUPTIONS = ("noise", "swap")


@dataclass
class KNConfig:
    """Knowledge-neuron settings (Dai et al. 2022)."""

    steps: int = setting(20, help="KN: IG steps m (Dai et al.: 20).", min=1)
    alphas: str = setting("right", help="KN: IG points right | linspace | midpoint.", choices=ALPHAS)
    t: float = setting(0.2, help="KN: coarse neurons Attr > t * max (in [0, 1)).", min=0.0, max=1.0)
    p: float = setting(0.5, help="KN: sharing fraction for refinement.", min=0.0, max=1.0)
    share_rule: str = setting("gt", help="KN refinement: gt (count > p*n, Dai et al.) or ge (count >= p*n).",
                              choices=SHARE_RULES)
    layers: list[int] | None = setting(None, help="KN/CNL: layers to score, e.g. '10-29' (default all).", item=int,
                                       min=0)
    enhance: float = setting(2.0, help="Enhancement factor for KN/CNL neurons (suppress is x0).", min=0.0,
                             min_exclusive=True)
    positions: str = setting("last", help="KN/CNL manipulation at the last prompt position or all positions.",
                             choices=POSITIONS)
    memory_mb: float | None = setting(None, help="Attribution memory budget (MB); default: from free memory (on a "
                                      "CPU at most 512 MB).", min=0.0, min_exclusive=True)

    def __post_init__(self):
        check(self)
        if not self.t < 1.0:
            raise CaplocError(f"KN threshold t must be in [0, 1), got {self.t}")

    def attribution(self) -> AttributionConfig:
        return AttributionConfig(method="ig", steps=self.steps, alphas=self.alphas, objective="prob",
                                 positions="last", layers=self.layers, memory_mb=self.memory_mb)

    def to_dict(self) -> dict:
        return to_mapping(self)


@dataclass
class TracingConfig:
    """Causal-tracing settings (Meng et al. 2022)."""

    noise_mult: float = setting(3.0, help="Tracing: noise sd = this x sd of the embedding entries (ROME: 3).",
                                min=0.0, min_exclusive=True)
    n_noise: int = setting(5, help="Tracing: noise samples per phrasing (ROME: 10).", min=1)
    kinds: tuple[str, ...] = setting(TRACE_KINDS, help="Tracing: restored states (hidden, mlp, attn).",
                                     choices=TRACE_KINDS, item=str)
    tokens: str = setting("subject", help="Tracing: restore at subject (all subject tokens + last token) | key (last "
                                          "subject token + last token) | all.", choices=TOKEN_MODES)
    window: int = setting(1, help="Tracing: layers restored together for mlp/attn (ROME figures: 10).", min=1)
    reuse: bool = setting(True, help="Tracing: layer skipping + prefix KV cache (same numbers, faster).")
    max_rows: int = setting(256, help="Tracing: rows per forward pass.", min=1)

    def __post_init__(self):
        if isinstance(self.kinds, list):
            self.kinds = tuple(self.kinds)
        check(self)
        if not self.kinds:
            raise CaplocError(f"tracing kinds must be a non-empty subset of {', '.join(TRACE_KINDS)}")

    def to_dict(self) -> dict:
        return to_mapping(self)


@dataclass
class CircuitConfig:
    """How to build and audit knowledge circuits (edge attribution patching)."""

    top_k: int = setting(200, help="Circuits: edges per circuit (by |EAP score|).", min=1)
    metric: str = setting("logprob", help="Circuits metric: logprob (log P first target token) | logit | "
                                          "target_logprob.", choices=CIRCUIT_METRICS)
    corrupt: str = setting("noise", help="Circuits corruption: noise (Gaussian noise on subject embeddings) | swap "
                                         "(another subject).", choices=CORRUPTIONS)
    noise_scale: float = setting(3.0, help="Circuits: noise sd = this x sd of clean subject embeddings (ROME: 3).",
                                 min=0.0, min_exclusive=True)
    max_phrasings: int = setting(4, help="Circuits: per fact the prompt + up to this - 1 paraphrases.", min=2)
    min_phrasings: int = setting(2, help="Circuits: facts with fewer usable phrasings are skipped.", min=2)
    random_draws: int = setting(10, help="Circuits: random node sets per phrasing (reliability baseline).", min=1)
    fidelity_draws: int = setting(200, help="Circuits: random edge-set pairs for the parameter-IoU baseline.", min=1)
    keep_first_position: bool = setting(True, help="Circuits: never ablate position 0; means over positions >= 1.")
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template.")
    seed: int = setting(0, help="Seed of the noise and the random node sets.")

    def __post_init__(self):
        check(self)
        if self.max_phrasings < self.min_phrasings:
            raise CaplocError("need 2 <= min_phrasings <= max_phrasings (fidelity compares a fact's phrasings)")

    def to_dict(self) -> dict:
        return to_mapping(self)


@dataclass
class AuditConfig:
    """Settings of ``caploc audit``."""

    methods: tuple[str, ...] = setting(("kn", "tracing", "cnl"), help="Comma list of kn, tracing, cnl, circuits.",
                                       choices=METHOD_NAMES, item=str)
    n_facts: int = setting(50, help="Number of facts to audit (after the known filter).", min=1)
    seed: int = setting(0, help="Seed of the fact order, noise, random controls and bootstrap.")
    min_phrasings: int = setting(2, help="Facts with fewer distinct phrasings are dropped.", min=2)
    max_phrasings: int | None = setting(None, help="Keep at most this many phrasings per fact (cost control).", min=2)
    known: str = setting("prob", help="Known-fact filter: none | prob (P(first target token) >= threshold) | topk.",
                         choices=KNOWN_MODES)
    known_threshold: float = setting(0.05, help="prob filter threshold.", min=0.0, max=1.0)
    known_topk: int = setting(10, help="topk filter: target token among the model's top k.", min=1)
    known_on: str = setting("prompt", help="Apply the filter to the original prompt only, or to all phrasings.",
                            choices=("prompt", "all"))
    kn: KNConfig = setting(default_factory=KNConfig, help="Knowledge-neuron settings.")
    tracing: TracingConfig = setting(default_factory=TracingConfig, help="Causal-tracing settings.")
    cnl_method: str = setting("grad_x_act", help="CNL per phrasing: grad_x_act | ig.", choices=CNL_METHODS)
    cnl_sigma: float = setting(6.0, help="CNL per phrasing: Attr > mean + sigma * sd.")
    cnl_steps: int = setting(20, help="CNL per phrasing: IG steps when the CNL method is ig.", min=1)
    n_random: int = setting(5, help="Random-set seeds per fact for the reliability baselines.", min=1)
    fidelity_criterion: float = setting(0.5, help="facts_localizable: paraphrase IoU CI lower bound needed.",
                                        min=0.0, min_exclusive=True, max=1.0)
    save_scores: bool = setting(True, help="Keep per-phrasing KN scores (float16) in the result.")
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template.")
    circuits: dict = setting(default_factory=dict, help="Overrides of the knowledge-circuits settings "
                                                        "(CircuitConfig fields, e.g. top_k).")

    def __post_init__(self):
        items = self.methods.split(",") if isinstance(self.methods, str) else self.methods
        self.methods = tuple(str(m).strip() for m in items if str(m).strip())
        check(self)
        if not self.methods:
            raise CaplocError(f"no audit method given; choose from {', '.join(METHOD_NAMES)}")
        if "circuits" in self.methods:
            self.circuit_config()  # unknown or bad circuit settings fail here, not after the per-fact loop

    def circuit_config(self) -> CircuitConfig:
        """The knowledge-circuits settings: seed, chat and phrasing limits from the audit, then ``circuits``."""
        known = [f.name for f in fields(CircuitConfig)]
        unknown = [k for k in self.circuits if k not in known]
        if unknown:
            raise CaplocError(f"unknown circuits option(s) {', '.join(unknown)}; CircuitConfig takes {', '.join(known)}")
        want = {"seed": self.seed, "chat": self.chat, "max_phrasings": self.max_phrasings,
                "min_phrasings": self.min_phrasings, **self.circuits}
        return CircuitConfig(**{k: v for k, v in want.items() if v is not None})

    def to_dict(self) -> dict:
        return to_mapping(self)

    def fact_key(self) -> str:
        """Key of everything that changes a fact's stored record (resume check)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("seed", "n_random", "chat", "save_scores")}
        if "kn" in self.methods:
            keep["kn"] = d["kn"]
        if "tracing" in self.methods:
            keep["tracing"] = {k: v for k, v in d["tracing"].items() if k not in ("reuse", "max_rows", "band_rows")}
        if "cnl" in self.methods:
            keep["cnl"] = [self.cnl_method, self.cnl_sigma, self.cnl_steps if self.cnl_method == "ig" else None,
                           d["kn"]["p"], d["kn"]["share_rule"], d["kn"]["enhance"], d["kn"]["positions"]]
        keep["methods"] = sorted(m for m in self.methods if m != "circuits")
        return config_key(keep)


__all__ = ["AuditConfig", "KNConfig", "TracingConfig", "CircuitConfig", "METHOD_NAMES", "KNOWN_MODES", "CNL_METHODS",
           "SHARE_RULES", "POSITIONS", "TRACE_KINDS", "TOKEN_MODES", "CIRCUIT_METRICS", "CORRUPTIONS"]
