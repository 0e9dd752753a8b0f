"""The fine-tuning comparison: arms trained with the same data order, steps, learning-rate schedule and clipping.

Arms: ``neurons`` (a located set), ``random`` (layer-matched random sets, several seeds), ``full`` (all parameters)
and ``lora`` (PEFT LoRA on the MLP projections), each evaluated before/after on held-out data. Neuron arms train
:class:`~caploc.stages.finetune.adapter.NeuronAdapter` deltas (the model is never written); ``full`` and ``lora``
train a copy. Choices that are ours (the paper does not state them): AdamW with weight decay 0 for neuron slices
(decay would pull the update to zero); random controls exclude the located neurons by default.

With a learning-rate sweep (:attr:`FinetuneConfig.sweep`) a validation split of the *training* data (never trained
on, never one of the evaluation sets) picks every arm's rate: each rate is trained on the rest of the training data,
the one with the lowest validation NLL per target token is kept, and only that one is evaluated on the evaluation
sets. Every random set is swept on its own, so the control gets the same tuning as the located set.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ... import __version__
from ...data import encode_dataset
from ...data import pad_id as token_pad_id
from ...errors import CaplocError
from ...hooks import frozen
from ...measure import evaluate as evaluate_set
from ...models.layouts import Site
from ...results import NeuronSet, atomic_save_tensors, atomic_write_json, check_out_dir, config_key, read_json
from ...runs import commit
from ...stats import random_layer_matched_set
from .adapter import NeuronAdapter, fingerprint_of, unwrap
from .compare import compare_arms
from .config import FinetuneConfig
from .result import ArmResult, FinetuneResult
from .splits import validation_split
from .train import DivergedError, TrainLog, train

log = logging.getLogger(__name__)

VALIDATION = "validation"


def replica(lm, model: nn.Module):
    """A LoadedModel-like view of ``lm`` with another model object (same tokenizer, layout, provenance)."""
    return dataclasses.replace(lm, model=model, site=Site(model, lm.site.layout),
                               info={**lm.info, "fingerprint": None, "variant": "finetuned"})


def lora_targets(site) -> list[str]:
    """Module names of every layer's MLP output and input projections (the LoRA arm's targets)."""
    names = {id(m): n for n, m in site.model.named_modules()}
    out = []
    for l in range(site.n_layers):
        out.append(names[id(site.out_projs[l])])
        out += [names[id(m)] for m in site.in_projs[l]]
    return out


class Checkpoints:
    """Finished arms as ``<name>.json`` (written last: the commit marker) + ``<name>.safetensors`` (per-sample NLL)."""

    def __init__(self, root: Path | None, key: str, overwrite: bool):
        self.root, self.key, self.overwrite = root, key, overwrite

    def get(self, name: str):
        if self.root is None:
            return None
        j = self.root / f"{name}.json"
        if not j.exists():
            return None
        d = read_json(j)
        if d.get("key") != self.key:
            if self.overwrite:
                return None
            raise CaplocError(f"{self.root.parent} holds fine-tuning results of another configuration (model, data, "
                              "neurons or settings); use a new --out directory or pass --overwrite")
        t = self.root / f"{name}.safetensors"
        ps = {k: v.numpy() for k, v in load_file(str(t)).items()} if t.exists() else {}
        return d["value"], ps

    def put(self, name: str, value, per_sample: dict) -> None:
        if self.root is None:
            return
        if per_sample:
            atomic_save_tensors(self.root / f"{name}.safetensors",
                                {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in per_sample.items()})
        atomic_write_json(self.root / f"{name}.json", {"key": self.key, "value": value})


class FinetuneExperiment:
    """One run of the arms comparison; :meth:`run` trains (or resumes) every arm and returns the result.

    State shared by the arms: the encoded training (fit) data, the untuned baseline, the per-sample NLL table, the
    finished arms and the checkpoints. See :func:`finetune` for the arguments.
    """

    def __init__(self, lm, neurons: NeuronSet | None, train_ds, cfg: FinetuneConfig | None = None,
                 out_dir: Path | str | None = None, *, eval_sets: Mapping[str, Any] | None = None,
                 on_target: Sequence[str] | None = None, progress: bool | None = None, overwrite: bool = False):
        self.lm, self.neurons, self.train_ds = lm, neurons, train_ds
        self.cfg = cfg = cfg or FinetuneConfig()
        self.progress = progress
        self.model, self.site, self.info = unwrap(lm)
        if any(a in cfg.arms for a in ("neurons", "random")):
            if neurons is None:
                raise CaplocError("the neurons and random arms need a neuron set: pass --neurons DIR "
                                  "(or use --arms full,lora)")
            neurons.check_compatible(self.site)
            if len(neurons) == 0:
                raise CaplocError("the neuron set is empty: relocalize with a lower threshold (e.g. --min-freq)")
        if len(train_ds) == 0:
            raise CaplocError("the training set is empty; pass --n-train 1 or more")
        self.eval_sets = dict(eval_sets or {})
        base_name = str(train_ds.name).split(":")[0].split("[")[0]
        if on_target is None:
            on_target = [n for n in self.eval_sets if n.split(":")[0].split("[")[0] == base_name] or list(self.eval_sets)
        self.on_target = list(on_target)
        self.roles = {n: ("on" if n in self.on_target else "off") for n in self.eval_sets}
        self.out_path = check_out_dir(out_dir) if out_dir is not None else None
        if self.out_path is not None:
            self.out_path.mkdir(parents=True, exist_ok=True)
        # with a sweep the arms train on ``fit`` and the validation part picks their rates
        self.fit_ds, self.val_ds = (validation_split(train_ds, cfg.val_fraction, cfg.seed) if cfg.sweep
                                    else (train_ds, None))
        self.encoded = encode_dataset(lm.tokenizer, self.fit_ds, chat=cfg.chat, max_length=cfg.max_length)
        self.pad_id = token_pad_id(lm.tokenizer, getattr(self.model, "config", None))
        # per-arm checkpoints: an interrupted run resumes with its finished arms (same configuration only)
        # which arms run and how many random ones do not change a finished arm (each random arm has its own seed):
        # adding random arms to a finished run trains only the new ones
        run_key = config_key({
            "config": {k: v for k, v in cfg.key_dict().items() if k not in ("arms", "n_random")},
            "model": fingerprint_of(self.model, self.info),
            "train": train_ds.fingerprint(), "eval": {n: ds.fingerprint() for n, ds in self.eval_sets.items()},
            "on_target": sorted(self.on_target), "neurons": None if neurons is None else neurons.flat.tolist(),
        })
        self.ckpt = Checkpoints(self.out_path / "arms" if self.out_path is not None else None, run_key, overwrite)
        self.per_sample: dict[str, np.ndarray] = {}
        self.arms: list[ArmResult] = []
        self.skipped: dict[str, str] = {}
        self.random_seeds: list[int] = []
        self.untuned: dict = {}
        self.val_untuned: float | None = None

    # ---- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self, lm, sets: Mapping[str, Any] | None = None) -> dict[str, dict]:
        """``{name: {"nll", "_per_sample", "accuracy"?}}`` of ``sets`` (default: the evaluation sets) under ``lm``."""
        cfg, out = self.cfg, {}
        for name, ds in (self.eval_sets if sets is None else sets).items():
            r = evaluate_set(lm, ds, metrics=cfg.metrics, chat=cfg.chat, batch_size=cfg.eval_batch_size,
                             max_length=cfg.max_length, progress=self.progress, memory_mb=cfg.memory_mb)
            row = {"nll": float(r.nll_per_token)}
            per = getattr(r, "nll_per_sample", None)
            if per is not None:
                row["_per_sample"] = np.asarray(torch.as_tensor(per).double().cpu().numpy() if torch.is_tensor(per)
                                                else per, dtype=np.float64)
            acc = getattr(r, "accuracy", None)
            if acc is not None and "accuracy" in cfg.metrics:
                row["accuracy"] = float(acc)
            out[name] = row
        return out

    def validation_nll(self, lm) -> float:
        """NLL per target token of the validation split under ``lm`` (its current hooks)."""
        r = evaluate_set(lm, self.val_ds, metrics=("nll",), chat=self.cfg.chat, batch_size=self.cfg.eval_batch_size,
                         max_length=self.cfg.max_length, progress=self.progress, memory_mb=self.cfg.memory_mb)
        return float(r.nll_per_token)

    def _split_per_sample(self, name: str, ev: dict) -> dict:
        out = {}
        for dname, row in ev.items():
            row = dict(row)
            if "_per_sample" in row:
                self.per_sample[f"{name}|{dname}"] = row.pop("_per_sample")
            out[dname] = row
        return out

    def _baseline(self) -> None:
        got = self.ckpt.get("untuned")
        if got is not None:
            value, ps = got
            self.per_sample.update(ps)
            # without a sweep the stored value is the evaluation itself (the format of runs made before the sweep)
            self.untuned, self.val_untuned = ((value["eval"], value[VALIDATION]) if self.val_ds is not None
                                              else (value, None))
            log.info("reusing the untuned evaluation from %s", self.ckpt.root)
            return
        log.info("evaluating the untuned model on %d sets", len(self.eval_sets))
        self.untuned = self._split_per_sample("untuned", self.evaluate(self.lm))
        if self.val_ds is not None:
            self.val_untuned = self.validation_nll(self.lm)
        value = self.untuned if self.val_ds is None else {"eval": self.untuned, VALIDATION: self.val_untuned}
        self.ckpt.put("untuned", value, {k: v for k, v in self.per_sample.items() if k.startswith("untuned|")})

    # ---- arms -------------------------------------------------------------------------------------------------------
    def _resume(self, name: str) -> bool:
        got = self.ckpt.get(name)
        if got is None:
            return False
        d, ps = got
        self.arms.append(ArmResult(**d))
        self.per_sample.update(ps)
        log.info("reusing finished arm %s from %s", name, self.ckpt.root)
        return True

    def _record(self, name: str, kind: str, seed: int | None, tl: TrainLog, ev: dict, adapter_dir=None,
                n_neurons=None, val_nll=None, sweep=None) -> None:
        evr = {}
        for dname, r in self._split_per_sample(name, ev).items():
            r["delta"] = r["nll"] - self.untuned[dname]["nll"]
            if "accuracy" in r and "accuracy" in self.untuned[dname]:
                r["delta_accuracy"] = r["accuracy"] - self.untuned[dname]["accuracy"]
            evr[dname] = r
        arm = ArmResult(name, kind, seed, tl.lr, tl.n_trainable, tl.n_optimizer_state, tl.losses, tl.seconds,
                        float(np.median(tl.step_seconds)), evr, adapter_dir, n_neurons, val_nll, sweep)
        self.arms.append(arm)
        self.ckpt.put(name, asdict(arm), {k: v for k, v in self.per_sample.items() if k.startswith(f"{name}|")})

    def _sweep(self, name: str, kind: str, attempt: Callable[[float], tuple[TrainLog, float, Callable[[], dict]]]):
        """Run ``attempt(lr)`` for each of the arm's rates: it trains and returns ``(log, validation NLL, evaluate)``.

        Without a sweep: one rate, no validation; ``evaluate()`` of that run. With a sweep: ``evaluate()`` is called
        only for a run whose validation NLL is the lowest so far (a diverged run counts as inf), so the evaluation
        sets never pick the rate. Returns ``(log, evaluation, validation NLL, sweep rows)`` of the selected rate."""
        lrs = self.cfg.arm_lrs(kind)
        if self.val_ds is None:
            tl, _, evaluate = attempt(lrs[0])
            return tl, evaluate(), None, None
        rows, best = [], None
        for lr in lrs:
            try:
                tl, val, evaluate = attempt(lr)
            except DivergedError as e:
                log.warning("%s at lr %g diverged (%s); not selectable", name, lr, e)
                rows.append({"lr": lr, "val_nll": math.inf, "train_loss_last": None, "selected": False})
                continue
            rows.append({"lr": lr, "val_nll": val, "train_loss_last": tl.losses[-1], "selected": False})
            log.info("%s lr %g: validation NLL %.4f", name, lr, val)
            if math.isfinite(val) and (best is None or val < best[2]):
                best = (tl, evaluate(), val, lr)
            evaluate = None  # release this run's model copy before the next rate trains
        if best is None:
            raise CaplocError(f"arm {name} diverged at every learning rate {lrs}; add lower rates to the sweep")
        for r in rows:
            r["selected"] = r["lr"] == best[3]
        return best[0], best[1], best[2], rows

    def adapter_arm(self, name: str, kind: str, seed: int | None, nset) -> None:
        """A neuron-only arm (``neurons`` or one ``random`` set): adapter deltas trained through hooks."""
        if self._resume(name):
            return
        cfg, model, kept = self.cfg, self.model, {}

        def attempt(lr: float):
            ad = NeuronAdapter(self.lm, nset)
            with frozen(model):
                tl = train(model, list(ad.deltas.values()), self.encoded, cfg, lr=lr, weight_decay=0.0,
                           pad_id=self.pad_id, desc=name if self.val_ds is None else f"{name} lr {lr:g}",
                           context=lambda: ad.applied(model), progress=self.progress)
                val = None
                if self.val_ds is not None:
                    with ad.applied(model):
                        val = self.validation_nll(self.lm)

            def evaluate():
                kept["adapter"] = ad
                with frozen(model), ad.applied(model):
                    return self.evaluate(self.lm)
            return tl, val, evaluate

        tl, ev, val, rows = self._sweep(name, kind, attempt)
        ad = kept["adapter"]
        adir = None
        if self.out_path is not None and cfg.save_adapters:
            adir = str(self.out_path / ("adapter" if kind == "neurons" else f"adapters/{name}"))
            ad.save(adir, extra={"arm": name, "train_dataset": self.train_ds.name, "lr": tl.lr,
                                 "train_fingerprint": self.train_ds.fingerprint(), "finetune_config": cfg.to_dict()})
        self._record(name, kind, seed, tl, ev, adir, ad.n_neurons, val, rows)

    def copy_arm(self, name: str) -> None:
        """``full`` / ``lora``: train a copy of the model; out of memory skips the arm (recorded) instead of failing."""
        if self._resume(name):
            return
        try:
            tl, ev, val, rows = self._sweep(name, name, self._full_attempt if name == "full" else self._lora_attempt)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, torch.OutOfMemoryError) and "memory" not in text.lower():
                raise
            self.skipped[name] = f"out of memory: {text[:200]}"
            log.warning("arm %s skipped: %s", name, self.skipped[name])
            return
        self._record(name, name, None, tl, ev, val_nll=val, sweep=rows)

    def _desc(self, name: str, lr: float) -> str:
        return name if self.val_ds is None else f"{name} lr {lr:g}"

    def _evaluated_copy(self, trained: nn.Module):
        """(validation NLL or None, evaluate()) of a trained model copy (released after evaluation)."""
        view = replica(self.lm, trained)
        with torch.no_grad():
            val = self.validation_nll(view) if self.val_ds is not None else None

        def evaluate():
            with torch.no_grad():
                return self.evaluate(view)
        return val, evaluate

    def _full_attempt(self, lr: float):
        model = copy.deepcopy(self.model)
        for p in model.parameters():
            p.requires_grad_(True)
        tl = train(model, list(model.parameters()), self.encoded, self.cfg, lr=lr,
                   weight_decay=self.cfg.weight_decay, pad_id=self.pad_id, desc=self._desc("full", lr),
                   progress=self.progress)
        return (tl, *self._evaluated_copy(model))

    def _lora_attempt(self, lr: float):
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise CaplocError("the lora arm needs peft: pip install 'caploc[peft]' (or drop lora from --arms)") from None
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = copy.deepcopy(self.model)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=lora_targets(replica(self.lm, model).site),
                          fan_in_fan_out=bool(self.site.layout.conv1d))
        peft_model = get_peft_model(model, lcfg)
        tl = train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], self.encoded, cfg, lr=lr,
                   weight_decay=cfg.weight_decay, pad_id=self.pad_id, desc=self._desc("lora", lr),
                   progress=self.progress)
        return (tl, *self._evaluated_copy(peft_model.merge_and_unload()))

    # ---- the run ------------------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        cfg, site, neurons = self.cfg, self.site, self.neurons
        t_start = time.time()
        self._baseline()
        if "neurons" in cfg.arms:
            self.adapter_arm("neurons", "neurons", None, neurons)
        if "random" in cfg.arms:
            sizes = neurons.per_layer_counts()
            for j in range(cfg.n_random):
                seed = cfg.seed + 1000 + j
                self.random_seeds.append(seed)
                flat = random_layer_matched_set(sizes, site.d_mlp, seed,
                                                exclude=neurons.flat if cfg.random_exclude else None)
                self.adapter_arm(f"random-s{seed}", "random", seed,
                                 NeuronSet.from_flat(flat, site.n_layers, site.d_mlp))
        for name in ("full", "lora"):
            if name in cfg.arms:
                self.copy_arm(name)
        comparisons, specificity, claims = compare_arms(self.arms, self.untuned, self.roles, self.per_sample)
        res = FinetuneResult(cfg.to_dict(), self.arms, self.untuned, self._datasets(), comparisons, specificity,
                             claims, self._meta(time.time() - t_start), self.per_sample,
                             str(self.out_path) if self.out_path is not None else None)
        if self.out_path is not None:
            commit(res, self.out_path)  # report.json last: the commit marker
        return res

    def _datasets(self) -> dict:
        return {n: {"role": self.roles[n], "n": len(ds), "fingerprint": ds.fingerprint()}
                for n, ds in self.eval_sets.items()}

    def _meta(self, seconds: float) -> dict:
        model, site, info, neurons, train_ds = self.model, self.site, self.info, self.neurons, self.train_ds
        meta = {
            "model_id": info.get("model_id"), "model_type": site.model_type,
            "model_fingerprint": info.get("fingerprint"), "n_params": int(sum(p.numel() for p in model.parameters())),
            "n_layers": site.n_layers, "d_mlp": site.d_mlp, "params_per_neuron": site.params_per_neuron(),
            "neurons": None if neurons is None else {
                "n": len(neurons), "per_layer": neurons.per_layer_counts().tolist(),
                "source": neurons.meta.get("dataset"), "method": neurons.meta.get("method"),
                "model_fingerprint": neurons.meta.get("model_fingerprint")},
            "train": {"name": train_ds.name, "n": len(train_ds), "fingerprint": train_ds.fingerprint(),
                      "source": train_ds.source},
            "random_seeds": self.random_seeds, "seconds": round(seconds, 1), "caploc_version": __version__,
            "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype),
            "torch_threads": torch.get_num_threads(), "skipped_arms": self.skipped,
        }
        if self.val_ds is not None:
            meta[VALIDATION] = {"name": self.val_ds.name, "n": len(self.val_ds), "n_fit": len(self.fit_ds),
                                "fraction": self.cfg.val_fraction, "fingerprint": self.val_ds.fingerprint(),
                                "untuned_nll": self.val_untuned,
                                "rule": "lowest validation NLL per target token; the validation split is part of "
                                        "the training data, held out of training; evaluation sets never choose"}
        return meta


def finetune(lm, neurons: NeuronSet | None, train_ds, cfg: FinetuneConfig | None = None,
             out_dir: Path | str | None = None, *, eval_sets: Mapping[str, Any] | None = None,
             on_target: Sequence[str] | None = None, progress: bool | None = None,
             overwrite: bool = False) -> FinetuneResult:
    """Fine-tune the arms of ``cfg`` and evaluate each before/after on ``eval_sets``.

    ``eval_sets``: {name: Dataset}; ``on_target``: names of the in-domain sets (default: names containing the
    training set's base name, or all if none do); the others are off-target (specificity, issue 9.1). ``neurons``
    is required by the ``neurons`` and ``random`` arms. The model ``lm`` is left bit-identical (adapters use hooks,
    ``full``/``lora`` train a copy). Writes ``out_dir`` (adapter/, results.json, curves.safetensors, report.json and
    figures) when given; every finished arm is checkpointed in ``out_dir/arms/``, so rerunning the same command
    resumes (a different configuration in the same directory is refused unless ``overwrite``).
    """
    return FinetuneExperiment(lm, neurons, train_ds, cfg, out_dir, eval_sets=eval_sets, on_target=on_target,
                              progress=progress, overwrite=overwrite).run()


__all__ = ["Checkpoints", "FinetuneExperiment", "finetune", "lora_targets", "replica"]
