"""The stage layer: one module per verb (a config dataclass + one function)."""
