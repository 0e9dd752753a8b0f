"""caploc: capability localization in the MLP neurons of causal language models."""
__version__ = "0.1.0"
