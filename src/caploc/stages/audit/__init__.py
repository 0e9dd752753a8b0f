"""Individual-knowledge audit (Huang et al., ICLR 2025, §3): do fact-localization methods agree across paraphrases
(fidelity), and do their own manipulations work (reliability)?

* :mod:`.config` — settings (``AuditConfig``, ``KNConfig``, ``TracingConfig``, ``CircuitConfig``);
* :mod:`.facts` — facts, the known-fact filter and the fact selection; :mod:`.metrics` — the common metric (IoU of
  localized parameter sets between paraphrases), its controls and the summaries over facts;
* the methods, one module each, registered as data in :mod:`.methods`: :mod:`.kn` (knowledge neurons, Dai et al.
  2022) and :mod:`.cnl` on the shared neuron-set machinery of :mod:`.neurons`; :mod:`.tracing` (ROME causal tracing,
  Meng et al. 2022, on :mod:`.tracer`); :mod:`.circuits` (knowledge circuits by EAP, on :mod:`.circuit_graph`,
  :mod:`.circuit_eap`, :mod:`.circuit_result`);
* :mod:`.result` — ``AuditResult`` (save / load / summary); :mod:`.run` — ``run_audit``. Report: ``caploc.report.audit``.
"""
from .config import AuditConfig, CircuitConfig, KNConfig, TracingConfig
from .facts import Fact, facts_from_dataset
from .kn import kn_select
from .methods import METHODS
from .metrics import layer_iou, set_iou, weighted_iou
from .neurons import refine, share_threshold
from .result import AuditResult, summarize
from .run import run_audit
from .tracer import PhrasingTrace, Tracer, find_attention

__all__ = [
    "AuditConfig", "AuditResult", "CircuitConfig", "Fact", "KNConfig", "METHODS", "PhrasingTrace", "Tracer",
    "TracingConfig", "facts_from_dataset", "find_attention", "kn_select", "layer_iou", "refine", "run_audit",
    "set_iou", "share_threshold", "summarize", "weighted_iou",
]
