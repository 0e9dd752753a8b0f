"""Individual-knowledge audit (Huang et al., ICLR 2025, §3): do fact-localization methods agree across paraphrases
(fidelity), and do their own manipulations work (reliability)?

* :mod:`caploc.audit.kn` — knowledge neurons (Dai et al. 2022): IG per phrasing, t*max rule, p-refinement,
  suppress / enhance.
* :mod:`caploc.audit.tracing` — ROME causal tracing (Meng et al. 2022): noise on subject embeddings, restoration of
  hidden / MLP / attention states, peak sites.
* :mod:`caploc.audit.common` — facts, the known-fact filter, the common metric (IoU of localized parameter sets
  between paraphrases) and its controls.
* :mod:`caploc.audit.run` — orchestration (``run_audit``), ``AuditResult`` (save / load / report.json).
* :mod:`caploc.audit.circuits` — knowledge circuits (separate module; optional).
"""
from .common import Fact, facts_from_dataset, layer_iou, set_iou, weighted_iou
from .kn import KNConfig, kn_select, refine, share_threshold
from .run import AuditConfig, AuditResult, run_audit
from .tracing import PhrasingTrace, Tracer, TracingConfig, find_attention

__all__ = [
    "AuditConfig", "AuditResult", "Fact", "KNConfig", "PhrasingTrace", "Tracer", "TracingConfig", "facts_from_dataset",
    "find_attention", "kn_select", "layer_iou", "refine", "run_audit", "set_iou", "share_threshold", "weighted_iou",
]
