"""Task heads on the backbone: masked LM, sequence classification, token classification, variant effect.

Every model has `.backbone` (a BiMambaModel) and a `head_config` dict saved with it.
`conjoin=True` is Caduceus-Ph post-hoc RC conjoining: the prediction on x and on its reverse
complement are averaged (mapped back to x's positions and strand first).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import tokenizer
from .backbone import BiMambaModel, pool_hidden
from .config import BiMambaConfig
from .rcps import complement_index, rcps_lm_logits, rcps_strand_average


def _rc_inputs(input_ids, attention_mask):
    rc = tokenizer.reverse_complement(input_ids)
    return rc, (attention_mask.flip(1) if attention_mask is not None else None)


class _HeadModel(nn.Module):
    def __init__(self, config: BiMambaConfig, **head_config):
        super().__init__()
        self.config = config
        self.head_config = head_config
        self.backbone = BiMambaModel(config)

    def features(self, input_ids, attention_mask=None, chunk_len=None):
        """Per-position features for a head: width d_model, or d_model/2 averaged strands under RCPS."""
        h = self.backbone(input_ids, attention_mask, chunk_len=chunk_len)
        return rcps_strand_average(h) if self.config.rc_equivariant else h

    @property
    def feature_width(self):
        return self.config.d_model // 2 if self.config.rc_equivariant else self.config.d_model


class BiMambaForMaskedLM(_HeadModel):
    """Logits over the 16-token vocabulary at every position; LM head tied to the embedding."""

    def __init__(self, config: BiMambaConfig):
        super().__init__(config)
        if not config.tie_lm_head:
            width = config.d_model // 2 if config.rc_equivariant else config.d_model
            self.lm_head = nn.Parameter(torch.empty(config.vocab_size, width))
            nn.init.normal_(self.lm_head, std=0.02)

    def lm_weight(self):
        return self.backbone.embedding.weight if self.config.tie_lm_head else self.lm_head

    def forward(self, input_ids, attention_mask=None, *, conjoin=False, chunk_len=None):
        logits = self._logits(input_ids, attention_mask, chunk_len)
        if conjoin:
            rc_ids, rc_mask = _rc_inputs(input_ids, attention_mask)
            comp = complement_index(logits.device)
            logits = (logits + self._logits(rc_ids, rc_mask, chunk_len).flip(1)[..., comp]) / 2
        return logits

    def _logits(self, input_ids, attention_mask, chunk_len):
        h = self.backbone(input_ids, attention_mask, chunk_len=chunk_len)
        if self.config.rc_equivariant:
            return rcps_lm_logits(h, self.lm_weight())
        return F.linear(h, self.lm_weight())


class BiMambaForSequenceClassification(_HeadModel):
    """Pooled features -> linear classifier. pooling: mean, max, first or last."""

    def __init__(self, config: BiMambaConfig, num_classes: int = 2, pooling: str = "mean", conjoin: bool = False):
        super().__init__(config, num_classes=num_classes, pooling=pooling, conjoin=conjoin)
        if pooling not in ("mean", "max", "first", "last"):
            raise ValueError(f"pooling must be mean, max, first or last; got {pooling!r}")
        self.classifier = nn.Linear(self.feature_width, num_classes)

    def forward(self, input_ids, attention_mask=None, *, conjoin=None, chunk_len=None):
        conjoin = self.head_config["conjoin"] if conjoin is None else conjoin
        logits = self._one(input_ids, attention_mask, chunk_len)
        if conjoin:
            rc_ids, rc_mask = _rc_inputs(input_ids, attention_mask)
            logits = (logits + self._one(rc_ids, rc_mask, chunk_len)) / 2
        return logits

    def _one(self, input_ids, attention_mask, chunk_len):
        pooled = pool_hidden(self.features(input_ids, attention_mask, chunk_len), attention_mask,
                             self.head_config["pooling"])
        return self.classifier(pooled)


class BiMambaForTokenClassification(_HeadModel):
    """Per-position logits (e.g. per-base labels from a BED track)."""

    def __init__(self, config: BiMambaConfig, num_classes: int = 2, conjoin: bool = False):
        super().__init__(config, num_classes=num_classes, conjoin=conjoin)
        self.classifier = nn.Linear(self.feature_width, num_classes)

    def forward(self, input_ids, attention_mask=None, *, conjoin=None, chunk_len=None):
        conjoin = self.head_config["conjoin"] if conjoin is None else conjoin
        logits = self.classifier(self.features(input_ids, attention_mask, chunk_len))
        if conjoin:
            rc_ids, rc_mask = _rc_inputs(input_ids, attention_mask)
            logits = (logits + self.classifier(self.features(rc_ids, rc_mask, chunk_len)).flip(1)) / 2
        return logits


class BiMambaForVariantClassification(_HeadModel):
    """Ref and alt windows -> [ref, alt, alt - ref] features around the variant -> MLP -> logits.

    `position` is the variant's index in the window (the same for ref and alt); features are
    the mean over `context` positions either side, so small indels shift nothing important.
    """

    def __init__(self, config: BiMambaConfig, num_classes: int = 2, context: int = 8, hidden: int = 64):
        super().__init__(config, num_classes=num_classes, context=context, hidden=hidden)
        w = self.feature_width
        self.mlp = nn.Sequential(nn.Linear(3 * w, hidden), nn.GELU(), nn.Linear(hidden, num_classes))

    def _local(self, ids, mask, position):
        h = self.features(ids, mask)
        c = self.head_config["context"]
        idx = position[:, None] + torch.arange(-c, c + 1, device=h.device)[None, :]
        idx = idx.clamp(0, h.shape[1] - 1)
        return torch.gather(h, 1, idx[..., None].expand(-1, -1, h.shape[-1])).mean(1)

    def forward(self, ref_ids, alt_ids, position, ref_mask=None, alt_mask=None):
        ref, alt = self._local(ref_ids, ref_mask, position), self._local(alt_ids, alt_mask, position)
        return self.mlp(torch.cat([ref, alt, alt - ref], dim=-1))


ARCHITECTURES = {cls.__name__: cls for cls in (BiMambaModel, BiMambaForMaskedLM, BiMambaForSequenceClassification,
                                                BiMambaForTokenClassification, BiMambaForVariantClassification)}
