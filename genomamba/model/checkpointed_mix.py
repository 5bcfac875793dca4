"""Per-layer gradient checkpointing that does not re-run the scans' forward.

torch.utils.checkpoint runs a layer's forward once without gradients and, in the backward, once
more with them, to rebuild what the backward reads. For a tied bidirectional layer on the Triton
kernels most of that second forward is the two scans (a chunk-state pass and an output pass each),
and all it is needed for is their output y: out_proj's weight gradient reads it. The scans'
backward recomputes the states that give y anyway, so here it writes y out
(`bimamba_inner_backward_rebuilt`), and the second forward stops at in_proj and the scans'
inputs. The first forward keeps the state entering each of its scans' chunks (ChunkStates, a few
MiB per layer), from which the backward rebuilds the per-tile states in one pass.

The node also holds the block's residual add: `checkpointed_layer(block, hidden, residual,
seq_idx)` returns (block.mix(hidden + residual), hidden + residual), so the add is the norm's
fused add in the forward, and in the backward the norm's kernel adds the gradient arriving from
the next block and writes both inputs' gradients (outside the node that was an add, a gradient
accumulation and a cast per layer, each a pass over the fp32 residual stream).

It equals `checkpoint(block.mix, hidden + residual, seq_idx)` in value and gradient up to
rounding: its forward is the inference path (torch.utils.checkpoint runs the training one and
drops what it keeps), and out_proj's weight gradient reads y as the scans' backward recomputes
it (from per-tile states stored in bf16 with bf16 inputs, as dz is). Layers it does not cover
(RC-equivariant, untied or one-directional mixers, the PyTorch path, chunked mixing,
torch.compile) keep torch.utils.checkpoint (`rebuild_checkpoint_applies`).
GENOMAMBA_CHECKPOINT=torch keeps it for every layer (A/B runs, tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from genomamba_kernels.add_rms_norm import add_rms_norm_backward, add_rms_norm_forward
from genomamba_kernels.bimamba_inner import bimamba_inner_backward_rebuilt, weight_grad
from genomamba_kernels.selective_scan import ChunkStates

from .mixer import BiMambaMixer, _joint_wanted, project_channels_first


def _mixer_of(block) -> BiMambaMixer | None:
    inner = getattr(block.mixer, "mixer", None)   # the _MixerAdapter's mixer (None under RCPS)
    return inner if isinstance(inner, BiMambaMixer) else None


def rebuild_checkpoint_applies(block, hidden: torch.Tensor, chunk_len: int | None) -> bool:
    """Whether `checkpointed_layer` covers this layer and call (else use torch.utils.checkpoint)."""
    mode = os.environ.get("GENOMAMBA_CHECKPOINT", "rebuild")
    if mode not in ("rebuild", "torch"):
        raise ValueError(f"GENOMAMBA_CHECKPOINT must be 'rebuild' or 'torch', got {mode!r}")
    mixer = _mixer_of(block)
    return (mode == "rebuild" and mixer is not None and mixer.rev is not None and not mixer.untied
            and isinstance(block.norm, nn.RMSNorm) and (chunk_len is None or chunk_len >= hidden.shape[1])
            and _joint_wanted(hidden))


def rms_norm_eps(norm: nn.RMSNorm, dtype: torch.dtype) -> float:
    """nn.RMSNorm's epsilon (its default, None, means the dtype's machine epsilon)."""
    return norm.eps if norm.eps is not None else torch.finfo(dtype).eps


class _CheckpointedLayer(torch.autograd.Function):
    """(hidden, residual) -> (block.mix(hidden + residual), hidden + residual), keeping only the
    sum and the scans' chunk states (a few MiB); the backward recomputes up to in_proj and the
    scans' inputs, not their forward. The residual add is inside the node, so that its forward is
    the norm's fused add and its backward adds the gradient arriving from the next block in the
    norm's backward kernel, which then writes both inputs' gradients (one pass over the residual
    stream instead of four: an add, an accumulation, a cast, the norm)."""

    @staticmethod
    def forward(ctx, block, hidden, residual, seq_idx, *params):
        dev = hidden.device.type
        ctx.block, ctx.seq_idx = block, seq_idx
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.hidden_dtype = hidden.dtype
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        normed, summed = block.add_norm(hidden, residual)
        # block.mix without gradients (the inference path), keeping the scans' chunk states: the
        # backward rebuilds their tile states from them in one pass
        out, chunks = _mixer_of(block).forward_keeping_chunks(normed, seq_idx)
        del normed
        ctx.chunk_tiles = [c.chunk_tiles for c in chunks]
        ctx.save_for_backward(summed, *(c.states for c in chunks))
        return out, summed

    @staticmethod
    def backward(ctx, dout, dsummed):
        summed, *states = ctx.saved_tensors
        chunks = [ChunkStates(s, n) for s, n in zip(states, ctx.chunk_tiles)]
        block, seq_idx = ctx.block, ctx.seq_idx
        mixer, norm = _mixer_of(block), block.norm
        params = list(block.parameters())
        enabled, dtype = ctx.autocast
        if dout is None:
            dout = torch.zeros_like(summed, dtype=dtype if enabled else summed.dtype)
        # The norm again (as block.add_norm: written in the autocast dtype), then in_proj
        normed, rows, rstd = add_rms_norm_forward(summed, None, norm.weight, rms_norm_eps(norm, summed.dtype),
                                                  dtype if enabled else summed.dtype, summed.dtype)
        normed = normed.view(summed.shape)
        w_in = mixer.in_proj.weight.to(normed.dtype)
        xz = project_channels_first(w_in, normed.transpose(1, 2))       # (batch, 2*d_inner, L)
        w_out = mixer.out_proj.weight
        dout_cf = dout.transpose(1, 2)                                  # (batch, d_model, L)
        dy = project_channels_first(w_out.t().to(dout.dtype), dout_cf)  # out_proj's input gradient
        grads = {}

        def out_proj_weight_grad(y):
            grads[id(w_out)] = weight_grad(dout_cf, y.transpose(1, 2)).to(w_out.dtype)

        fwd_params, rev_params = mixer.fwd.inner_params(), mixer.rev.inner_params()
        dxz, core_grads = bimamba_inner_backward_rebuilt(
            xz, fwd_params, rev_params, seq_idx, dy, out_proj_weight_grad, chunks)
        del dy, xz
        grads.update((id(p), g) for p, g in zip((*fwd_params, *rev_params), core_grads))
        if mixer.in_proj.weight.requires_grad:
            grads[id(mixer.in_proj.weight)] = weight_grad(dxz, normed).to(mixer.in_proj.weight.dtype)
        dhidden = dresidual = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or norm.weight.requires_grad:
            dnormed = torch.bmm(dxz.transpose(1, 2), w_in.expand(dxz.shape[0], -1, -1))   # (batch, L, d_model)
            del dxz
            dx, dres, dw = add_rms_norm_backward(dnormed, dsummed, rows, norm.weight, rstd, ctx.hidden_dtype,
                                                 ctx.residual_dtype)
            dhidden = dx.view(summed.shape) if ctx.needs_input_grad[1] else None
            dresidual = dres.view(summed.shape) if ctx.needs_input_grad[2] else None
            if norm.weight.requires_grad:
                grads[id(norm.weight)] = dw
        param_grads = [grads.get(id(p)) if p.requires_grad else None for p in params]
        return (None, dhidden, dresidual, None, *param_grads)


def checkpointed_layer(block, hidden: torch.Tensor, residual: torch.Tensor | None,
                       seq_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block.mix(hidden + residual), hidden + residual) as one checkpointed node (see the module
    docstring); residual None at the first block. The sum is in fp32 when the block keeps its
    residual stream so, like Block.forward's."""
    return _CheckpointedLayer.apply(block, hidden, residual, seq_idx, *block.parameters())
