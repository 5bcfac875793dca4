"""Training: masking, data modules, Lightning modules, YAML configs and the run driver."""

from .config import load_config
from .masking import mask_tokens
from .run import run

__all__ = ["load_config", "mask_tokens", "run"]
