"""Reverse-complement parameter sharing (Caduceus-PS): modules with model(rc(x)) == rc(model(x)).

Hidden states (batch, L, d) carry the forward strand in channels [:d/2] and the reverse strand,
flipped in position and channel, in [d/2:]. The reverse complement of a hidden state is then
`flip(h, (1, 2))` (position and channel); of token ids, complement + flip; of logits, flip in
position + complement permutation of the vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import tokenizer


def rc_hidden(h: torch.Tensor) -> torch.Tensor:
    """Reverse complement of RCPS hidden states (batch, L, d): flip position and channel."""
    return h.flip(1, 2)


def complement_index(device=None) -> torch.Tensor:
    """id -> complementary id, on `device` (cached: see tokenizer._rc_table)."""
    return tokenizer._rc_table(torch.device(device) if device is not None else torch.device("cpu"))


class RCPSEmbedding(nn.Module):
    """Embeds the strand and its reverse complement into the two channel halves."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model // 2)

    @property
    def weight(self):
        return self.embedding.weight

    def forward(self, input_ids):
        fwd = self.embedding(input_ids)
        rc = self.embedding(tokenizer.reverse_complement(input_ids))
        return torch.cat([fwd, rc_hidden(rc)], dim=-1)


class RCPSWrapper(nn.Module):
    """Applies one module to the forward half and (flipped) to the reverse-strand half."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, h, seq_idx=None, **kw):
        half = h.shape[-1] // 2
        rc_seq = seq_idx.flip(1) if seq_idx is not None else None
        fwd = self.module(h[..., :half], seq_idx=seq_idx, **kw)
        rc = self.module(rc_hidden(h[..., half:]), seq_idx=rc_seq, **kw)
        return torch.cat([fwd, rc_hidden(rc)], dim=-1)


class RCPSNorm(nn.Module):
    """One norm shared by both halves (the reverse half is channel-flipped around it)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, h):
        half = h.shape[-1] // 2
        return torch.cat([self.norm(h[..., :half]), self.norm(h[..., half:].flip(-1)).flip(-1)], dim=-1)


def rcps_lm_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Masked-LM logits from both strands: W h_fwd + W[complement] flip(h_rc)."""
    half = h.shape[-1] // 2
    comp = complement_index(h.device)
    return F.linear(h[..., :half], weight) + F.linear(h[..., half:].flip(-1), weight[comp])


def rcps_strand_average(h: torch.Tensor) -> torch.Tensor:
    """(h_fwd + flip(h_rc)) / 2: per-position features of width d/2 that a reverse complement
    maps to their own position-flip, so mean pooling over them is RC-invariant."""
    half = h.shape[-1] // 2
    return (h[..., :half] + h[..., half:].flip(-1)) / 2
