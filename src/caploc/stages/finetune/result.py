"""The fine-tuning result: one :class:`ArmResult` per trained arm, the untuned baseline, comparisons and claims.

Files (unchanged since before the stage split): ``results.json`` (kind ``finetune_result``), ``curves.safetensors``
(``loss|<arm>`` training curves, ``nll|<arm>|<dataset>`` per-sample NLL) and, through :meth:`FinetuneResult.to_report`,
``report.json`` + figures (:mod:`caploc.report.finetune`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ... import __version__
from ...report.finetune import build_report
from ...results import atomic_save_tensors, atomic_write_json, read_result
from ...runs import DataInfo, ModelInfo, Provenance

JSON_KIND = "finetune_result"


@dataclass
class ArmResult:
    name: str  # neurons | random-s<seed> | full | lora
    kind: str  # neurons | random | full | lora
    seed: int | None
    lr: float  # the rate of this result (the selected one after a sweep)
    n_trainable: int
    n_optimizer_state: int
    losses: list[float]
    seconds: float
    step_seconds_median: float
    eval: dict  # dataset -> {"nll": per-token NLL after, "delta": after - before, "accuracy": ..., ...}
    adapter_dir: str | None = None
    n_neurons: int | None = None
    val_nll: float | None = None  # validation NLL/token at ``lr`` (sweep only)
    sweep: list[dict] | None = None  # [{"lr", "val_nll", "train_loss_last", "selected"}] (sweep only)


@dataclass
class FinetuneResult:
    config: dict
    arms: list[ArmResult]
    untuned: dict  # dataset -> {"nll": ..., "accuracy": ...}
    datasets: dict  # dataset -> {"role": on|off, "n": .., "fingerprint": ..}
    comparisons: dict  # dataset -> compare_to_null(...) of the neuron arm vs random arms, + paired CI
    specificity: dict
    claims: dict
    meta: dict
    per_sample: dict = field(default_factory=dict, repr=False)  # "arm|dataset" -> np.ndarray [n] per-sample NLL
    out_dir: str | None = None

    kind: ClassVar[str] = "finetune"

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(name)

    @property
    def provenance(self) -> Provenance:
        m, t = self.meta, self.meta.get("train") or {}
        return Provenance(ModelInfo(model_id=m.get("model_id"), model_type=m.get("model_type"),
                                    fingerprint=m.get("model_fingerprint"), n_layers=m.get("n_layers"),
                                    d_mlp=m.get("d_mlp"), params_per_neuron=m.get("params_per_neuron"),
                                    total_params=m.get("n_params")),
                          DataInfo(t.get("name"), t.get("fingerprint"), t.get("source") or {}, t.get("n")),
                          self.config, self.config.get("seed"), m.get("caploc_version", __version__))

    def to_json(self) -> dict:
        d = {k: getattr(self, k) for k in ("config", "untuned", "datasets", "comparisons", "specificity", "claims",
                                            "meta")}
        d["arms"] = [asdict(a) for a in self.arms]
        d["kind"] = JSON_KIND
        d["caploc_version"] = __version__
        return d

    def save(self, out_dir: Path | str) -> Path:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "results.json", self.to_json())
        tensors = {f"loss|{a.name}": torch.tensor(a.losses, dtype=torch.float64) for a in self.arms}
        tensors.update({f"nll|{k}": torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in self.per_sample.items()})
        atomic_save_tensors(out_dir / "curves.safetensors", tensors)
        return out_dir

    @classmethod
    def load(cls, out_dir: Path | str) -> "FinetuneResult":
        out_dir = Path(out_dir)
        d, t = read_result(out_dir, "results.json", JSON_KIND, "finetune result", "curves.safetensors",
                           tensors_required=False)
        per = {k[4:]: v.numpy() for k, v in t.items() if k.startswith("nll|")}
        return cls(config=d["config"], arms=[ArmResult(**a) for a in d["arms"]], untuned=d["untuned"],
                   datasets=d["datasets"], comparisons=d["comparisons"], specificity=d["specificity"],
                   claims=d["claims"], meta=d["meta"], per_sample=per, out_dir=str(out_dir))

    def to_report(self, out_dir: Path | str) -> dict:
        """Figures into ``out_dir`` and the ``report.json`` dict (:func:`caploc.report.finetune.build_report`)."""
        return build_report(self, out_dir)


__all__ = ["ArmResult", "FinetuneResult", "JSON_KIND"]
