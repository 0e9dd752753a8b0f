"""The notebook API: every verb on a model you already hold, on data you already hold.

    import caploc
    res = caploc.locate(model, [{"prompt": "2 + 3 =", "target": " 5"}, ...], tokenizer=tok, method="grad_x_act")
    res                      # Localization(12 neurons of 30 x 1536 (0.03%), top layers L3: 4, ..., 48 samples)
    res.pairs                # [[layer, index], ...]
    res.to_pandas()          # layer, index, frequency, mean_score

``model`` is an already-loaded transformers causal LM (pass its ``tokenizer``), a :class:`~caploc.models.LoadedModel`,
or anything :func:`caploc.models.load_model` takes (``"smollm2-135m"``, ``"tiny:llama"``, a directory, a ``.gguf``).
``data`` is a list of ``{"prompt", "target"}`` dicts (other keys: ``group``, ``id``, kept as metadata), a pandas
``DataFrame``, a ``datasets.Dataset``, a :class:`caploc.data.Dataset` or a spec string (``"gsm_symbolic"``,
``"rg:basic_arithmetic"``, a file path). Settings are the fields of the verb's config dataclasses (``method=``,
``sigma=``, ``min_freq=``, ``n_random=``...), validated exactly as the CLI and the TOML are; an unknown name is refused
with the list of valid ones.

A model passed in is borrowed, not changed: its weights are never modified (interventions are contexts that restore
them bit for bit), and its train/eval mode, its tokenizer's pad token and padding side are put back afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .attribution.engine import AttributionConfig
from .data import Dataset, load_dataset
from .data.files import records_to_samples
from .errors import CaplocError
from .evalsets import eval_sets
from .localize import LocateConfig, LocateResult
from .localize import locate as _locate
from .models import LoadedModel, load_model
from .models.fingerprint import model_fingerprint
from .models.layouts import Site
from .models.loading import model_info, prepare_tokenizer, resolve_layout
from .results import NeuronSet
from .splits import StabilityConfig
from .stages.finetune import FinetuneConfig, finetune_data
from .stages.finetune import finetune as _finetune
from .stages.intervene import InterveneConfig, InterventionResult, run_intervention
from .stages.stability import stability as _stability

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------------
def as_model(model: Any, tokenizer: Any = None, *, layout: Any = None, **load_kw) -> LoadedModel:
    """A :class:`LoadedModel` from a loaded transformers model (+ its tokenizer), a LoadedModel, or a name/path."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, Path)):
        return load_model(str(model), layout=layout, **load_kw)
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise CaplocError(f"model must be a transformers causal LM, a LoadedModel or a model name/path, not "
                          f"{type(model).__name__}")
    if tokenizer is None:
        raise CaplocError("pass tokenizer= with an in-memory model (caploc never downloads one)")
    site = Site(model, resolve_layout(layout))
    model_id = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    info = model_info(model, site, model_id, source="in-memory", fingerprint=model_fingerprint(model))
    return LoadedModel(model=model, tokenizer=tokenizer, site=site, model_id=model_id, info=info)


@contextlib.contextmanager
def borrowed(lm: LoadedModel) -> Iterator[LoadedModel]:
    """Put the model in eval mode and give its tokenizer a pad token and right padding for the duration; restore the
    caller's settings afterwards (also on errors)."""
    model, tok = lm.model, lm.tokenizer
    was_training = bool(getattr(model, "training", False))
    pad, side = getattr(tok, "pad_token", None), getattr(tok, "padding_side", None)
    try:
        model.eval()
        prepare_tokenizer(tok, lm.model_id)
        yield lm
    finally:
        model.train(was_training)
        if pad is None and tok.pad_token is not None:
            tok.pad_token = None
        if side is not None:
            tok.padding_side = side


def _records(data: Any) -> list[dict] | None:
    """Rows of a list of dicts, a pandas DataFrame or a datasets.Dataset (``None`` for anything else)."""
    if isinstance(data, (list, tuple)):
        return list(data)
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas.DataFrame
        return data.to_dict("records")
    if hasattr(data, "column_names") and hasattr(data, "__getitem__") and hasattr(data, "__len__"):  # datasets
        return [data[i] for i in range(len(data))]
    return None


def as_dataset(data: Any, *, name: str = "data", prompt_field: str | None = None, target_field: str | None = None,
               group_field: str | None = None, n: int | None = None, seed: int = 0, target: str = "cot") -> Dataset:
    """A :class:`caploc.data.Dataset` from rows (list of dicts, DataFrame, datasets.Dataset), a Dataset or a spec."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(str(data), n=n, seed=seed, target=target, prompt_field=prompt_field,
                            target_field=target_field, group_field=group_field)
    rows = _records(data)
    if rows is None:
        raise CaplocError(f"data must be a list of {{'prompt', 'target'}} dicts, a pandas DataFrame, a datasets.Dataset, "
                          f"a caploc Dataset or a dataset spec string, not {type(data).__name__}")
    samples, fields = records_to_samples(rows, f"'{name}'", prompt_field=prompt_field, target_field=target_field,
                                         group_field=group_field)
    if n is not None:
        if n < 1 or n > len(samples):
            raise CaplocError(f"n={n} but '{name}' has {len(samples)} rows")
        keep = np.sort(np.random.default_rng(seed).permutation(len(samples))[:n])
        samples = [samples[i] for i in keep]
    return Dataset(name, samples, {"loader": "in-memory", "rows": len(rows), "n": n, "seed": seed, **fields})


def split_settings(settings: dict, *classes: type) -> list[dict]:
    """Distribute ``settings`` over the fields of ``classes`` (the first class naming a field gets it); an unknown name
    is refused with the valid ones."""
    out: list[dict] = [{} for _ in classes]
    names = [{f.name for f in dataclasses.fields(c)} for c in classes]
    for key, value in settings.items():
        for i, fields in enumerate(names):
            if key in fields:
                out[i][key] = value
                break
        else:
            valid = sorted(set().union(*names))
            raise CaplocError(f"unknown setting {key!r}; valid settings: {', '.join(valid)}")
    return out


def _out_dir(out: str | Path | None) -> tuple[Path, Any]:
    """``(directory, keeper)``: ``out`` itself, or a temporary directory that lives as long as ``keeper``."""
    if out is not None:
        return Path(out), None
    tmp = tempfile.TemporaryDirectory(prefix="caploc-")
    return Path(tmp.name) / "run", tmp


def _frame(rows: list[dict]):
    try:
        import pandas as pd
    except ImportError:
        raise CaplocError("to_pandas needs pandas: pip install pandas") from None
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Localization:
    """What :func:`locate` found: the commonality neurons, the run's summary and the run directory (``out``, or a
    temporary directory that lives as long as this object, so :func:`stability` can use the stored scores)."""

    neurons: NeuronSet
    summary: dict
    out_dir: Path | None
    run_dir: Path | None = None
    _keep: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def pairs(self) -> list[list[int]]:
        return self.neurons.pairs.tolist()

    def to_pandas(self):
        """One row per neuron: layer, index, frequency, mean_score."""
        return self.neurons.to_pandas()

    def __len__(self) -> int:
        return len(self.neurons)

    def __repr__(self) -> str:
        inner = repr(self.neurons)
        inner = inner[inner.index("(") + 1: -1] if "(" in inner else inner
        return f"Localization({inner})"


# ---------------------------------------------------------------------------------------------------------------------
# verbs
# ---------------------------------------------------------------------------------------------------------------------
def locate(model: Any, data: Any, tokenizer: Any = None, *, out: str | Path | None = None, overwrite: bool = False,
           prompt_field: str | None = None, target_field: str | None = None, n: int | None = None, seed: int = 0,
           **settings) -> Localization:
    """Commonality neuron localization on ``data``: per-sample attribution, the per-sample rule, the frequency rule.

    Settings: the fields of :class:`~caploc.localize.LocateConfig` (``rule``, ``sigma``, ``min_freq``, ...) and of
    :class:`~caploc.attribution.engine.AttributionConfig` (``method``, ``steps``, ``objective``, ``layers``, ...).
    With ``out`` the run is written there (resumable, readable by every CLI verb); without, it lives in a temporary
    directory for the duration of the call.
    """
    lm = as_model(model, tokenizer)
    ds = as_dataset(data, prompt_field=prompt_field, target_field=target_field, n=n, seed=seed)
    akw, lkw = split_settings(settings, AttributionConfig, LocateConfig)
    if "attribution" in lkw:
        raise CaplocError("pass attribution settings by name (method=, steps=, ...), not attribution=")
    cfg = LocateConfig(attribution=AttributionConfig(**akw), **lkw)
    out_dir, keep = _out_dir(out)
    with borrowed(lm):
        res: LocateResult = _locate(lm, ds, cfg, out_dir, overwrite=overwrite)
    return Localization(neurons=res.neurons, summary=res.summary, out_dir=Path(out) if out is not None else None,
                        run_dir=out_dir, _keep=keep)


def _neurons(neurons: Any, lm: LoadedModel | None = None) -> NeuronSet:
    if isinstance(neurons, Localization):
        return neurons.neurons
    if isinstance(neurons, NeuronSet):
        return neurons
    if isinstance(neurons, (str, Path)):
        return NeuronSet.load(neurons)
    if lm is not None:  # [[layer, index], ...]
        return NeuronSet(np.asarray(neurons), lm.site.n_layers, lm.site.d_mlp, meta={"model_id": lm.model_id})
    raise CaplocError("neurons must be a Localization, a NeuronSet, a result directory or [[layer, index], ...] pairs")


def _eval_data(lm, ns: NeuronSet, data: Any, off_target: Any, n: int, seed: int, heldout: bool, **fields):
    """Evaluation sets: spec strings go through the verbs' held-out rule (:func:`caploc.evalsets.eval_sets`);
    in-memory data is used as given (``(label, Dataset, role)``, on-target first)."""
    off = [] if off_target is None else (list(off_target) if isinstance(off_target, (list, tuple)) else [off_target])
    if isinstance(data, str) and all(isinstance(o, str) for o in off):
        return eval_sets([data, *off], n=n, seed=seed, neuron_meta=ns.meta, heldout=heldout,
                         load_kw={k: v for k, v in fields.items() if v is not None})
    sets = [("on-target", as_dataset(data, name="on-target", n=None, **fields), "on")]
    for i, o in enumerate(off):
        name = o if isinstance(o, str) else f"off-target-{i + 1}"
        sets.append((name, as_dataset(o, name=name, n=n if isinstance(o, str) else None, seed=seed), "off"))
    return sets


@dataclasses.dataclass
class Interventions:
    """What :func:`intervene` measured: per dataset, gain and condition the change in NLL/token against the
    untouched model and the random-set distribution, and the claims with their verdicts."""

    result: InterventionResult
    out_dir: Path | None

    @property
    def claims(self) -> dict:
        return self.result.claims()

    def to_pandas(self, what: str = "effects"):
        """``"effects"``: one row per dataset x gain x condition; ``"claims"``: one row per claim."""
        if what == "effects":
            return _frame(self.result.summary_rows())
        if what == "claims":
            return _frame([{"claim": k, **{kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}}
                           for k, v in self.claims.items()])
        raise CaplocError(f"to_pandas(what={what!r}): choose effects or claims")

    def __repr__(self) -> str:
        bits = []
        for name, c in self.claims.items():
            v = c.get("value")
            val = f"{v:+.3g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
            bits.append(f"{name}={val} ({c.get('verdict', c.get('holds'))})")
        n = len(self.result.random_conditions)
        return f"Interventions({len(self.result.datasets)} datasets, {n} random sets; " + "; ".join(bits) + ")"


def intervene(model: Any, neurons: Any, data: Any, tokenizer: Any = None, *, off_target: Any = None, n: int = 32,
              seed: int = 1, heldout: bool = True, out: str | Path | None = None, prompt_field: str | None = None,
              target_field: str | None = None, **settings) -> Interventions:
    """Erase / enhance ``neurons`` on ``data`` (on-target) and ``off_target`` data against layer-matched random sets
    and an activation-matched set. Settings: the fields of :class:`~caploc.stages.intervene.InterveneConfig`
    (``ks``, ``n_random``, ``min_controls``, ...). Spec strings are held out from the localization rows as the CLI
    does; rows passed in are used as given."""
    lm = as_model(model, tokenizer)
    ns = _neurons(neurons, lm)
    (ikw,) = split_settings(settings, InterveneConfig)
    cfg = InterveneConfig(**ikw)
    sets = _eval_data(lm, ns, data, off_target, n, seed, heldout, prompt_field=prompt_field,
                      target_field=target_field)
    with borrowed(lm):
        res = run_intervention(lm, ns, sets, cfg, out_dir=out)
    return Interventions(res, Path(out) if out is not None else None)


def stability(localization: Any, **settings):
    """Split agreement of a localization from its stored per-sample scores (no model needed): pass the
    :class:`Localization` (or a locate run directory). Settings: :class:`~caploc.splits.StabilityConfig` fields
    (``k``, ``seeds``, ``kinds``, ...). Returns the stage's :class:`~caploc.stages.stability.StabilityResult`."""
    run = localization.run_dir if isinstance(localization, Localization) else Path(localization)
    if run is None:
        raise CaplocError("this Localization has no run directory; locate with out= to keep its scores")
    (skw,) = split_settings(settings, StabilityConfig)
    return _stability(run, StabilityConfig(**skw))


def finetune(model: Any, neurons: Any, data: str, tokenizer: Any = None, *, eval_data: Sequence[str] = (),
             n_train: int = 32, n_eval: int = 16, seed: int = 0, data_seed: int = 1, out: str | Path | None = None,
             **settings):
    """Fine-tune only ``neurons`` (and the control arms in ``arms``) on ``data`` (a dataset spec), evaluated on
    held-out rows and ``eval_data`` as ``caploc finetune`` does. The model passed in is not changed: arms train
    adapters or copies. Settings: :class:`~caploc.stages.finetune.FinetuneConfig` fields (``arms``, ``steps``,
    ``lr``, ...). Returns the stage's :class:`~caploc.stages.finetune.FinetuneResult`."""
    if not isinstance(data, str):
        raise CaplocError("finetune takes its data as a dataset spec (a built-in name or a file path) so the "
                          "held-out evaluation rows can be drawn apart from the training rows")
    lm = as_model(model, tokenizer)
    ns = _neurons(neurons, lm)
    (fkw,) = split_settings(settings, FinetuneConfig)
    cfg = FinetuneConfig(**{"seed": seed, **fkw})
    train, sets, on = finetune_data(data, n_train, n_eval, eval_data=list(eval_data), seed=seed, data_seed=data_seed,
                                    neuron_meta=ns.meta)
    with borrowed(lm):
        return _finetune(lm, ns, train, cfg, out, eval_sets=sets, on_target=on)


__all__ = ["Localization", "Interventions", "as_dataset", "as_model", "borrowed", "locate", "intervene", "stability",
           "finetune", "split_settings"]
