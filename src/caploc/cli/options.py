"""Typer options derived from the stage config dataclasses: default and help text come from the config field
(``caploc.config.setting``), so the CLI, the TOML and the library share one source of defaults and help."""
from __future__ import annotations

import inspect
from typing import Any

import typer

from ..config import default_of, field_of, help_of


def opt(cls, name: str, *flags: str, default: Any = ..., help: str | None = None, **kw) -> Any:
    """``typer.Option`` for setting ``name`` of config class ``cls``.

    ``default`` overrides the config's default only where the CLI must differ (say why at the call site); lists
    and tuples become comma-separated text options parsed by the verb (``--ks 0,2``)."""
    d = default_of(cls, name) if default is ... else default
    if isinstance(d, (list, tuple)):
        d = ",".join(str(x) for x in d)
    text = help if help is not None else help_of(cls, name)
    choices = field_of(cls, name).metadata.get("choices")
    if choices and "one of" not in text and "|" not in text:
        text = f"{text} One of: {', '.join(map(str, choices))}."
    return typer.Option(d, *flags, help=text, **kw)


def split_list(text: str | None, cast=str) -> list:
    """'a,b , c' -> ['a', 'b', 'c'] (cast applied to each item); None or '' -> []."""
    if text is None:
        return []
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


# Help of the options many verbs share (model loading, data fields, outputs): one text per name, filled in where a
# verb declares such an option without its own help.
COMMON_HELP = {
    "model": "Model: built-in 'smollm2-135m', a local HF model directory, a .gguf file, a cached HF id or tiny:<arch>.",
    "dtype": "Weights dtype: float32 | bfloat16 | float16.",
    "device": "cpu | cuda | cuda:N | auto.",
    "device_map": "accelerate device_map, e.g. auto (spreads a large model over devices).",
    "layout": "MLP layout for an architecture caploc does not know, e.g. "
              "'layers=model.layers,mlp=mlp,out=down_proj,in=gate_proj+up_proj'.",
    "prompt_field": "Column of a data file holding the prompt (default: detected from the column names).",
    "target_field": "Column of a data file holding the target (default: detected from the column names).",
    "group_field": "Column of a data file holding the commonality group (default: detected; the choice is logged).",
    "seed": "Data seed.",
    "target": "gsm_symbolic target: cot (gold chain of thought) | answer.",
    "out": "Output directory.",
    "sigma": "sigma rule: Attr > mean + sigma*sd.",
    "min_freq": "Keep neurons selected in >= this fraction (<= 1) or count (> 1) of samples.",
    "topk": "topk rule: the k highest-scoring neurons of each sample.",
    "steps": "Optimizer steps.",
    "lr": "Learning rate.",
    "batch_size": "Samples per batch.",
    "sigmas": "Comma-separated sigma values.",
    "min_freqs": "Comma-separated min_freq values.",
    "rules": "Comma-separated per-sample rules: sigma | sigma_layer | topk | kn.",
    "seeds": "Number of split seeds.",
    "save_scores": "Keep per-phrasing KN scores (float16) in the result.",
    "report_only": "Re-render the report of an existing audit directory without computing anything.",
}


def fill_missing_help(app) -> None:
    """Give every option declared without help the shared text of its name (``COMMON_HELP``)."""
    for info in app.registered_commands:
        for p in inspect.signature(info.callback).parameters.values():
            d = p.default
            if isinstance(d, typer.models.OptionInfo) and not d.help and p.name in COMMON_HELP:
                d.help = COMMON_HELP[p.name]
