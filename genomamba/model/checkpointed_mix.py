"""Per-layer gradient checkpointing that does not re-run the scans' forward.

torch.utils.checkpoint runs a layer's forward once without gradients and, in the backward, once
more with them, to rebuild what the backward reads. For a tied bidirectional layer on the Triton
kernels most of that second forward is the two scans (a chunk-state pass and an output pass each),
and all it is needed for is their output y: out_proj's weight gradient reads it. The scans'
backward recomputes the states that give y anyway, so here it writes y out
(`bimamba_inner_backward_rebuilt`), and the second forward stops at in_proj and the scans'
inputs. The first forward keeps the state entering each of its scans' chunks (ChunkStates, a few
MiB per layer), from which the backward rebuilds the per-tile states in one pass.

`checkpointed_mix(block, residual, seq_idx)` equals `checkpoint(block.mix, residual, seq_idx)` in
value and gradient up to rounding: its forward is the inference path (torch.utils.checkpoint runs
the training one and drops what it keeps), and out_proj's weight gradient reads y as the scans'
backward recomputes it (from per-tile states stored in bf16 with bf16 inputs, as dz is). Layers
it does not cover (RC-equivariant, untied or one-directional mixers, the PyTorch path, chunked
mixing, torch.compile) keep torch.utils.checkpoint (`rebuild_checkpoint_applies`).
GENOMAMBA_CHECKPOINT=torch keeps it for every layer (A/B runs, tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from genomamba_kernels.bimamba_inner import bimamba_inner_backward_rebuilt, weight_grad
from genomamba_kernels.selective_scan import ChunkStates

from .mixer import BiMambaMixer, _InProjection, _joint_wanted, project_channels_first


def _mixer_of(block) -> BiMambaMixer | None:
    inner = getattr(block.mixer, "mixer", None)   # the _MixerAdapter's mixer (None under RCPS)
    return inner if isinstance(inner, BiMambaMixer) else None


def rebuild_checkpoint_applies(block, residual: torch.Tensor, chunk_len: int | None) -> bool:
    """Whether `checkpointed_mix` covers this layer and call (else use torch.utils.checkpoint)."""
    mode = os.environ.get("GENOMAMBA_CHECKPOINT", "rebuild")
    if mode not in ("rebuild", "torch"):
        raise ValueError(f"GENOMAMBA_CHECKPOINT must be 'rebuild' or 'torch', got {mode!r}")
    mixer = _mixer_of(block)
    return (mode == "rebuild" and mixer is not None and mixer.rev is not None and not mixer.untied
            and isinstance(block.norm, nn.RMSNorm) and (chunk_len is None or chunk_len >= residual.shape[1])
            and _joint_wanted(residual))


class _CheckpointedMix(torch.autograd.Function):
    """block.mix(residual) keeping the residual and the scans' chunk states (a few MiB); the
    backward recomputes up to in_proj and the scans' inputs, not their forward."""

    @staticmethod
    def forward(ctx, block, residual, seq_idx, *params):
        dev = residual.device.type
        ctx.block, ctx.seq_idx = block, seq_idx
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        # block.mix without gradients (the inference path), keeping the scans' chunk states: the
        # backward rebuilds their tile states from them in one pass
        out, chunks = _mixer_of(block).forward_keeping_chunks(block.add_norm(residual, None)[0], seq_idx)
        ctx.chunk_tiles = [c.chunk_tiles for c in chunks]
        ctx.save_for_backward(residual, *(c.states for c in chunks))
        return out

    @staticmethod
    def backward(ctx, dout):
        residual, *states = ctx.saved_tensors
        chunks = [ChunkStates(s, n) for s, n in zip(states, ctx.chunk_tiles)]
        block, seq_idx = ctx.block, ctx.seq_idx
        mixer = _mixer_of(block)
        params = list(block.parameters())
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(residual.device.type, dtype=dtype, enabled=enabled):
            r = residual.detach().requires_grad_(ctx.needs_input_grad[1])
            normed = block.add_norm(r, None)[0]
            xz = _InProjection.apply(normed, mixer.in_proj.weight)     # (batch, 2*d_inner, L)
        w_out = mixer.out_proj.weight
        dout_cf = dout.transpose(1, 2)                                  # (batch, d_model, L)
        dy = project_channels_first(w_out.t().to(dout.dtype), dout_cf)  # out_proj's input gradient
        grads = {}

        def out_proj_weight_grad(y):
            grads[id(w_out)] = weight_grad(dout_cf, y.transpose(1, 2)).to(w_out.dtype)

        fwd_params, rev_params = mixer.fwd.inner_params(), mixer.rev.inner_params()
        dxz, core_grads = bimamba_inner_backward_rebuilt(
            xz.detach(), fwd_params, rev_params, seq_idx, dy, out_proj_weight_grad, chunks)
        del dy
        core = (*fwd_params, *rev_params)
        grads.update((id(p), g) for p, g in zip(core, core_grads))
        outer = [p for p in (block.norm.weight, mixer.in_proj.weight) if p.requires_grad]
        inputs = ([r] if r.requires_grad else []) + outer
        outer_grads = torch.autograd.grad(xz, inputs, dxz) if inputs else ()   # (all frozen: nothing)
        d_residual = outer_grads[0] if r.requires_grad else None
        grads.update((id(p), g) for p, g in zip(outer, outer_grads[len(inputs) - len(outer):]))
        param_grads = [grads.get(id(p)) if p.requires_grad else None for p in params]
        return (None, d_residual, None, *param_grads)


def checkpointed_mix(block, residual: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
    """block.mix(residual, seq_idx) as one checkpointed node (see the module docstring)."""
    return _CheckpointedMix.apply(block, residual, seq_idx, *block.parameters())
