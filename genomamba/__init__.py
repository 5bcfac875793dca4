"""genomamba: long-context DNA modelling with a bidirectional Mamba backbone."""

__version__ = "0.1.0"
