"""The BiMamba backbone: embedding, pre-norm residual blocks, final norm; embeddings API."""

from __future__ import annotations

import torch
import torch.nn as nn
from genomamba_kernels import add_rms_norm
from torch.utils.checkpoint import checkpoint

from .checkpointed_mix import checkpointed_layer, rebuild_checkpoint_applies, rms_norm_eps
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
    """residual += hidden; hidden = mixer(norm(residual)), with the residual stream kept in fp32.

    The add and the norm are one fused kernel (genomamba_kernels.add_rms_norm) that writes the
    normalised activations directly in the autocast dtype the in_proj GEMM reads.
    """

    def __init__(self, cfg: BiMambaConfig):
        super().__init__()
        width = cfg.mixer_width
        mixer = _MixerAdapter(BiMambaMixer(width, cfg))
        norm = nn.RMSNorm(width, eps=cfg.norm_eps)
        self.mixer = RCPSWrapper(mixer) if cfg.rc_equivariant else mixer
        self.norm = RCPSNorm(norm) if cfg.rc_equivariant else norm
        self.residual_in_fp32 = cfg.residual_in_fp32

    def add_norm(self, hidden, residual):
        """(normed, hidden + residual); residual None at the first block."""
        return add_norm(self.norm, hidden, residual, self.residual_in_fp32)

    def forward(self, hidden, residual, seq_idx=None, chunk_len=None):
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer(normed, seq_idx=seq_idx, chunk_len=chunk_len), residual

    def mix(self, residual, seq_idx=None, chunk_len=None):
        """mixer(norm(residual)) for an already summed residual stream (the checkpointed step)."""
        return self.mixer(self.add_norm(residual, None)[0], seq_idx=seq_idx, chunk_len=chunk_len)


def add_norm(norm: nn.Module, hidden, residual, residual_in_fp32: bool, autocast_out: bool = True):
    """Residual add then pre-norm: (normed, residual). With autocast_out the normed output is in
    the autocast dtype when autocast is on (what the next GEMM casts it to anyway); otherwise, and
    without autocast, in the residual's dtype (the final norm: heads and embeddings read fp32)."""
    res_dtype = torch.float32 if residual_in_fp32 else hidden.dtype
    device_type = hidden.device.type
    out_dtype = torch.get_autocast_dtype(device_type) \
        if autocast_out and torch.is_autocast_enabled(device_type) else res_dtype
    if isinstance(norm, nn.RMSNorm):
        return add_rms_norm(hidden, residual, norm.weight, rms_norm_eps(norm, res_dtype), out_dtype=out_dtype,
                            residual_dtype=res_dtype)
    residual = (hidden if residual is None else hidden + residual).to(res_dtype)  # RCPS: norm per strand half
    return norm(residual).to(out_dtype), residual


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
        fp32 = self.config.residual_in_fp32
        for layer in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # The checkpoint keeps one tensor per layer, the summed residual stream: 4 bytes
                # per position and channel.
                if rebuild_checkpoint_applies(layer, hidden, chunk_len):   # no second scan forward
                    hidden, residual = checkpointed_layer(layer, hidden, residual, seq_idx)
                else:   # the add outside the checkpoint saves nothing for its backward
                    residual = (hidden if residual is None else hidden + residual).to(
                        torch.float32 if fp32 else hidden.dtype)
                    hidden = checkpoint(layer.mix, residual, seq_idx, chunk_len, use_reentrant=False)
            else:
                hidden, residual = layer(hidden, residual, seq_idx, chunk_len)
        normed, _ = add_norm(self.norm_f, hidden, residual, fp32, autocast_out=False)
        return normed

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
