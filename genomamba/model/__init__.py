"""The BiMamba model: config, mixer, RCPS, backbone, heads, save/load."""

from .backbone import BiMambaModel, pool_hidden, seq_idx_from_mask
from .config import BiMambaConfig, load_model_config
from .heads import (ARCHITECTURES, BiMambaForMaskedLM, BiMambaForSequenceClassification, BiMambaForTokenClassification,
                    BiMambaForVariantClassification)
from .pretrained import from_pretrained, save_pretrained

__all__ = ["BiMambaConfig", "load_model_config", "BiMambaModel", "BiMambaForMaskedLM", "BiMambaForSequenceClassification",
           "BiMambaForTokenClassification", "BiMambaForVariantClassification", "ARCHITECTURES",
           "save_pretrained", "from_pretrained", "pool_hidden", "seq_idx_from_mask"]
