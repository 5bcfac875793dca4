"""The BiMamba backbone: embedding, pre-norm residual blocks, final norm; embeddings API."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import BiMambaConfig
from .mixer import BiMambaMixer
from .rcps import RCPSEmbedding, RCPSNorm, RCPSWrapper, rcps_strand_average


def seq_idx_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Segment ids that change wherever the mask does: padding never reaches real tokens."""
    if attention_mask is None:
        return None
    m = attention_mask.to(torch.int32)
    change = (m[:, 1:] != m[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(m[:, :1]), change.cumsum(1)], dim=1).to(torch.int32)


class _MixerAdapter(nn.Module):
    """Gives BiMambaMixer the (h, seq_idx=..., chunk_len=...) call the RCPS wrapper uses."""

    def __init__(self, mixer: BiMambaMixer):
        super().__init__()
        self.mixer = mixer

    def forward(self, h, seq_idx=None, chunk_len=None):
        if chunk_len is not None and chunk_len < h.shape[1]:
            return self.mixer.forward_chunked(h, chunk_len, seq_idx)
        return self.mixer(h, seq_idx)


class Block(nn.Module):
    """residual += hidden; hidden = mixer(norm(residual)), with the residual stream kept in fp32."""

    def __init__(self, cfg: BiMambaConfig):
        super().__init__()
        width = cfg.mixer_width
        mixer = _MixerAdapter(BiMambaMixer(width, cfg))
        norm = nn.RMSNorm(width, eps=cfg.norm_eps)
        self.mixer = RCPSWrapper(mixer) if cfg.rc_equivariant else mixer
        self.norm = RCPSNorm(norm) if cfg.rc_equivariant else norm
        self.residual_in_fp32 = cfg.residual_in_fp32

    def forward(self, hidden, residual, seq_idx=None, chunk_len=None):
        residual = hidden if residual is None else hidden + residual
        if self.residual_in_fp32:
            residual = residual.float()
        # Normalise in the residual's precision (fp32 with fp32 norm weights keeps RMSNorm on its
        # fused path); autocast casts the result for the projections that follow.
        normed = self.norm(residual if self.residual_in_fp32 else residual.to(hidden.dtype))
        return self.mixer(normed, seq_idx=seq_idx, chunk_len=chunk_len), residual


class BiMambaModel(nn.Module):
    """Token ids (batch, L) -> hidden states (batch, L, d_model)."""

    def __init__(self, cfg: BiMambaConfig):
        super().__init__()
        self.config = cfg
        if cfg.rc_equivariant:
            self.embedding = RCPSEmbedding(cfg.vocab_size, cfg.d_model)
            self.norm_f = RCPSNorm(nn.RMSNorm(cfg.d_model // 2, eps=cfg.norm_eps))
        else:
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.embedding.weight, std=0.02)
        for layer in self.layers:  # Mamba's rescaled init of the residual-branch output projection
            mixer = layer.mixer.module.mixer if self.config.rc_equivariant else layer.mixer.mixer
            for proj in [mixer.out_proj] + ([mixer.out_proj_rev] if mixer.untied else []):
                nn.init.kaiming_uniform_(proj.weight, a=5 ** 0.5)
                with torch.no_grad():
                    proj.weight /= self.config.n_layer ** 0.5

    def forward(self, input_ids, attention_mask=None, *, chunk_len: int | None = None):
        """chunk_len: run each layer's mixer over chunks of this many positions (long inputs)."""
        seq_idx = seq_idx_from_mask(attention_mask)
        hidden, residual = self.embedding(input_ids), None
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, residual = checkpoint(layer, hidden, residual, seq_idx, chunk_len, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, seq_idx, chunk_len)
        residual = hidden + residual
        return self.norm_f(residual if self.config.residual_in_fp32 else residual.to(hidden.dtype))

    @torch.no_grad()
    def embed(self, input_ids, attention_mask=None, *, pool: str = "mean", chunk_len: int | None = None):
        """Per-position (pool="none") or pooled (mean/max/first/last) embeddings, float32.

        Under RCPS the two strand halves are averaged first, so mean-pooled embeddings are
        identical for a sequence and its reverse complement.
        """
        h = self(input_ids, attention_mask, chunk_len=chunk_len).float()
        if self.config.rc_equivariant:
            h = rcps_strand_average(h)
        return pool_hidden(h, attention_mask, pool)


def pool_hidden(h, attention_mask, pool: str):
    """Pool (batch, L, d) over real positions: mean, max, first, last, or none."""
    if pool == "none":
        return h
    mask = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device) if attention_mask is None else attention_mask.bool()
    if pool == "mean":
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)
    if pool == "max":
        return h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(1).values
    if pool == "first":
        return h[torch.arange(h.shape[0], device=h.device), mask.float().argmax(1)]
    if pool == "last":
        last = mask.shape[1] - 1 - mask.flip(1).float().argmax(1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"pool must be mean, max, first, last or none; got {pool!r}")
