"""Settings of the fine-tuning comparison (one source of defaults for the library, the CLI and the study TOML)."""
from __future__ import annotations

from dataclasses import dataclass

from ...config import check, setting, to_mapping
from ...errors import CaplocError

ARMS = ("neurons", "random", "full", "lora")
#: settings added with the learning-rate sweep; left out of the resume key while unset, so runs made before the
#: sweep existed still resume
SWEEP_KEYS = ("lrs", "neurons_lrs", "random_lrs", "full_lrs", "lora_lrs", "val_fraction")
_LR = dict(min=0, min_exclusive=True)


@dataclass
class FinetuneConfig:
    """Training and evaluation settings shared by all arms (only the learning rate can differ per arm).

    Without a sweep (the default) every arm trains on the whole training set at ``lr`` (``full_lr`` / ``lora_lr``
    where given). With a sweep (``lrs``, or a per-arm ``*_lrs`` list) a validation split (``val_fraction`` of the
    training data, never trained on) is held out; every arm (each random set on its own) is trained at each of its
    rates on the rest and the rate with the lowest validation NLL is the arm's result. The evaluation sets (held-out
    samples / templates, off-target sets) never choose a rate. An arm's rates: its own list, else ``lrs``, else its
    single rate.
    """

    arms: tuple[str, ...] = setting(("neurons", "random", "full"), choices=ARMS,
                                    help="Arms to train: a comma list of neurons, random, full, lora.")
    steps: int = setting(20, min=1, help="Optimizer steps per arm.")
    lr: float = setting(1e-3, **_LR, help="Learning rate (all arms unless --full-lr/--lora-lr or a sweep).")
    full_lr: float | None = setting(None, **_LR, help="Learning rate of the full arm (default: --lr).")
    lora_lr: float | None = setting(None, **_LR, help="Learning rate of the lora arm (default: --lr).")
    batch_size: int = setting(4, min=1, help="Training batch size.")
    max_grad_norm: float = setting(1.0, min=0, help="Gradient clipping (0 = off).")
    warmup_steps: int = setting(0, min=0, help="Linear warm-up steps.")
    schedule: str = setting("constant", choices=("constant", "linear"),
                            help="Learning-rate schedule after warm-up: constant | linear (decay to 0 at the last step).")
    weight_decay: float = setting(0.0, min=0, help="AdamW weight decay of the full and lora arms (neuron slices: 0).")
    betas: tuple[float, float] = setting((0.9, 0.999), min=0, max=1, item=float, help="AdamW betas.")
    n_random: int = setting(3, min=0, help="Random layer-matched neuron sets (one arm each).")
    random_exclude: bool = setting(True, help="Random control sets avoid the located neurons.")
    seed: int = setting(0, help="Seed of the batch order, random control sets and validation split.")
    lora_r: int = setting(8, min=1, help="LoRA rank.")
    lora_alpha: float = setting(16.0, **_LR, help="LoRA alpha.")
    chat: bool = setting(False, help="Wrap prompts in the tokenizer's chat template.")
    max_length: int | None = setting(None, min=1, help="Refuse samples longer than this many tokens.")
    eval_batch_size: int = setting(8, min=1, help="At most this many samples per evaluation forward pass.")
    memory_mb: float | None = setting(None, min=0, min_exclusive=True,
                                      help="Budget of one training or evaluation forward/backward beyond the weights, MB: "
                                      "a training batch that does not fit is split into micro-batches whose gradients "
                                      "add up to the batch's (same loss); default: from free memory (on a CPU at most "
                                      "512 MB).")
    metrics: tuple[str, ...] = setting(("nll",), choices=("nll", "accuracy"),
                                       help="nll and/or accuracy (comma list; accuracy generates and is slow).")
    save_adapters: bool = setting(True, help="Save the neuron and random arms' adapters.")
    lrs: tuple[float, ...] = setting((), **_LR, item=float,
                                     help="Learning-rate sweep of every arm (comma list; empty = no sweep, one rate).")
    neurons_lrs: tuple[float, ...] = setting((), **_LR, item=float,
                                             help="Learning-rate sweep of the neurons arm (empty = --lrs).")
    random_lrs: tuple[float, ...] = setting((), **_LR, item=float,
                                            help="Learning-rate sweep of the random arms (empty = the neurons arm's).")
    full_lrs: tuple[float, ...] = setting((), **_LR, item=float,
                                          help="Learning-rate sweep of the full arm (empty = --lrs).")
    lora_lrs: tuple[float, ...] = setting((), **_LR, item=float,
                                          help="Learning-rate sweep of the lora arm (empty = --lrs).")
    val_fraction: float = setting(0.25, min=0, max=0.9, min_exclusive=True,
                                  help="Share of the training data held out to pick each arm's learning rate "
                                       "(only with a sweep).")

    def __post_init__(self):
        for name in ("arms", "metrics"):
            v = getattr(self, name)
            if isinstance(v, str):
                setattr(self, name, tuple(a.strip() for a in v.split(",") if a.strip()))
        for name in ("arms", "metrics", "betas", *SWEEP_KEYS[:5]):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, tuple(v))
        check(self)
        if not self.arms:
            raise CaplocError(f"no arms given; use a comma list of {', '.join(ARMS)}")
        if len(set(self.arms)) != len(self.arms):
            raise CaplocError(f"arms {','.join(self.arms)} list an arm twice; name each once")
        if "random" in self.arms and self.n_random < 1:
            raise CaplocError(f"n_random={self.n_random!r}: the random arm needs at least 1 seed (--n-random 3)")
        if len(self.betas) != 2:
            raise CaplocError(f"betas={self.betas!r} must be two numbers")
        for name in SWEEP_KEYS[:5]:
            v = getattr(self, name)
            if len(set(v)) != len(v):
                raise CaplocError(f"{name}={list(v)} lists a rate twice; name each once")
        if not self.metrics:
            raise CaplocError("no metrics given; use nll and/or accuracy")

    # ---- learning rates -----------------------------------------------------------------------------------------
    def arm_lr(self, arm: str) -> float:
        """The single rate of ``arm`` (no sweep)."""
        if arm == "full" and self.full_lr is not None:
            return float(self.full_lr)
        if arm == "lora" and self.lora_lr is not None:
            return float(self.lora_lr)
        return float(self.lr)

    @property
    def sweep(self) -> bool:
        """True when a learning-rate sweep (and so a validation split) is configured."""
        return any(getattr(self, k) for k in SWEEP_KEYS[:5])

    def arm_lrs(self, arm: str) -> list[float]:
        """The rates ``arm`` is trained at: its own list (random: else the neurons arm's), else ``lrs``, else its one
        rate."""
        own = {"neurons": self.neurons_lrs, "random": self.random_lrs or self.neurons_lrs, "full": self.full_lrs,
               "lora": self.lora_lrs}[arm]
        return [float(x) for x in (own or self.lrs)] or [self.arm_lr(arm)]

    def to_dict(self) -> dict:
        return to_mapping(self)

    def key_dict(self) -> dict:
        """The settings that change results (resume key): no output-only settings, sweep settings only when used."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("save_adapters", "eval_batch_size", "memory_mb")}
        if not self.sweep:
            for k in SWEEP_KEYS:
                d.pop(k)
        return d


__all__ = ["ARMS", "FinetuneConfig", "SWEEP_KEYS"]
