"""Where each architecture's MLP neurons live.

A *neuron* is one coordinate of the input of the MLP's output projection (DESIGN.md §1): for gated MLPs
(Llama, Mistral, Qwen, Gemma, Phi-3) that is ``act(gate(x)) * up(x)``, the input of ``down_proj``; for GPT-2 / GPT-J /
NeoX the post-activation of the first projection (input of ``c_proj`` / ``fc_out`` / ``dense_4h_to_h``).
Method code never branches on model names: it asks this registry, keyed by ``config.model_type``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import ArchitectureError


@dataclass(frozen=True)
class MLPLayout:
    """Paths (dotted attribute names) to a model's MLP parts.

    layers:   the ModuleList of transformer blocks, from the top-level model (e.g. ``model.layers``)
    mlp:      the MLP inside one block (e.g. ``mlp``)
    out_proj: the output projection inside the MLP; its *input* is the neuron vector
    in_projs: the input projections inside the MLP whose rows (columns for Conv1D) belong to each neuron
    fused_gate_up: the single in_proj stacks gate and up (Phi-3): neuron i owns rows i and d_mlp + i
    conv1d:   HF ``Conv1D`` weights (GPT-2) are stored transposed: [in, out]
    """

    layers: str
    mlp: str
    out_proj: str
    in_projs: tuple[str, ...]
    fused_gate_up: bool = False
    conv1d: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def parse(cls, text: str) -> "MLPLayout":
        """From JSON or ``layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj+up_proj[,fused=1][,conv1d=1]``."""
        text = text.strip()
        try:
            if text.startswith("{"):
                d = json.loads(text)
                d["in_projs"] = tuple(d["in_projs"])
                return cls(**d)
            kv = dict(part.split("=", 1) for part in text.split(","))
            return cls(
                layers=kv["layers"], mlp=kv["mlp"], out_proj=kv["out"],
                in_projs=tuple(p for p in kv.get("in", "").split("+") if p),
                fused_gate_up=kv.get("fused", "0") in ("1", "true", "yes"),
                conv1d=kv.get("conv1d", "0") in ("1", "true", "yes"),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise ArchitectureError(
                f"cannot parse layout {text!r} ({e}); use 'layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj+up_proj'"
            ) from None


_GATED = MLPLayout("model.layers", "mlp", "down_proj", ("gate_proj", "up_proj"))

LAYOUTS: dict[str, MLPLayout] = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    "gemma3_text": _GATED,
    "phi3": MLPLayout("model.layers", "mlp", "down_proj", ("gate_up_proj",), fused_gate_up=True),
    "gpt2": MLPLayout("transformer.h", "mlp", "c_proj", ("c_fc",), conv1d=True),
    "gptj": MLPLayout("transformer.h", "mlp", "fc_out", ("fc_in",)),
    "gpt_neox": MLPLayout("gpt_neox.layers", "mlp", "dense_4h_to_h", ("dense_h_to_4h",)),
}


def register_layout(model_type: str, layout: MLPLayout) -> None:
    """Add or replace the layout for ``model_type`` (for architectures caploc does not know)."""
    LAYOUTS[model_type] = layout


def _get(obj, path: str):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


class Site:
    """The neuron site of one loaded model: layers, dimensions, and per-neuron parameter slices."""

    def __init__(self, model: nn.Module, layout: MLPLayout | str | None = None):
        self.model = model
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if isinstance(layout, str):
            layout = MLPLayout.parse(layout)
        if layout is None:
            if model_type not in LAYOUTS:
                raise ArchitectureError(
                    f"unknown architecture model_type={model_type!r} (known: {', '.join(sorted(LAYOUTS))}); "
                    "pass a custom layout, e.g. --layout 'layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj+up_proj'"
                )
            layout = LAYOUTS[model_type]
        self.layout = layout
        self.model_type = model_type or "custom"
        try:
            self.blocks = _get(model, layout.layers)
            self.mlps = [_get(b, layout.mlp) for b in self.blocks]
            self.out_projs = [_get(m, layout.out_proj) for m in self.mlps]
            self.in_projs = [[_get(m, p) for p in layout.in_projs] for m in self.mlps]
        except (AttributeError, IndexError, TypeError) as e:
            raise ArchitectureError(
                f"layout {layout.to_json()} does not match this {type(model).__name__} ({e}); pass --layout with the right paths"
            ) from None
        for what, mods in (("out", self.out_projs), ("in", [m for ps in self.in_projs for m in ps])):
            bad = next((m for m in mods if not isinstance(getattr(m, "weight", None), torch.Tensor)
                        or m.weight.dim() != 2), None)
            if bad is not None:
                raise ArchitectureError(
                    f"layout {layout.to_json()}: its {what} projection is a {type(bad).__name__}, not a linear layer "
                    "with a 2-D weight; pass --layout naming the MLP's Linear (or Conv1D) modules"
                )
        if not self.blocks:
            raise ArchitectureError(f"layout {layout.to_json()} finds no layers in this {type(model).__name__}")
        self.n_layers = len(self.blocks)
        w = self.out_projs[0].weight
        self.d_mlp = int(w.shape[0] if layout.conv1d else w.shape[1])
        self.d_model = int(w.shape[1] if layout.conv1d else w.shape[0])

    # ----- sizes -------------------------------------------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return self.n_layers * self.d_mlp

    def params_per_neuron(self) -> int:
        """Parameters owned by one neuron: its output-projection column plus its input-projection rows (+ biases)."""
        n = self.d_model  # output column
        for p in self.in_projs[0]:
            rows = 2 if self.layout.fused_gate_up else 1
            n += rows * self.d_model
            if getattr(p, "bias", None) is not None:
                n += rows
        return n

    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        return {
            "model_type": self.model_type, "n_layers": self.n_layers, "d_mlp": self.d_mlp, "d_model": self.d_model,
            "neuron_site": f"input of {self.layout.mlp}.{self.layout.out_proj}", "layout": json.loads(self.layout.to_json()),
        }

    # ----- parameter slices of a neuron -----------------------------------------------------------------------------
    def neuron_slices(self, layer: int) -> list[tuple[nn.Parameter, int, int]]:
        """(parameter, dim, offset) triples: neuron i of ``layer`` owns index ``offset + i`` along ``dim`` of each."""
        out = []
        op = self.out_projs[layer]
        out.append((op.weight, 0 if self.layout.conv1d else 1, 0))
        for p in self.in_projs[layer]:
            dim = 1 if self.layout.conv1d else 0
            offsets = (0, self.d_mlp) if self.layout.fused_gate_up else (0,)
            for off in offsets:
                out.append((p.weight, dim, off))
                if getattr(p, "bias", None) is not None:
                    out.append((p.bias, 0, off))
        return out

    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def layer_device(self, layer: int) -> torch.device:
        return self.out_projs[layer].weight.device
