"""caploc: capability localization in the MLP neurons of causal language models.

The notebook API (``caploc.locate``, ``caploc.intervene``, ...) lives in :mod:`caploc.api`; its names are available
here and load on first use, so ``import caploc`` stays cheap for the command line.
"""
__version__ = "0.1.0"

_API = ("locate", "intervene", "stability", "finetune", "as_model", "as_dataset", "Localization", "Interventions")


def __getattr__(name: str):  # PEP 562: load caploc.api (torch, transformers) only when one of its names is used
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'caploc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
