"""Pure-PyTorch selective scan and causal conv1d: the specification and the CPU fast path.

`selective_scan_ref` walks the sequence one step at a time (float64-capable); it *is* the
definition the Triton kernels are tested against. `selective_scan_chunked` computes the same
function chunk by chunk, with everything but the recurrence itself vectorised: differentiable
through autograd, bounded memory, and fast enough for CPU inference and CI.

Shapes (the `mamba_ssm.selective_scan_fn` contract):
    u, delta, z: (batch, dim, L)      A: (dim, N)       D, delta_bias: (dim,)
    B, C: (batch, N, L) or (batch, groups, N, L)        seq_idx: (batch, L) int
    initial_state / last state: (batch, dim, N), float32
Semantics: h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t;  y_t = C_t . h_t + D u_t;
out = y * silu(z). With reverse=True the scan runs right to left (h_t depends on h_{t+1}).
With seq_idx, the state is reset to zero wherever seq_idx changes between neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(X: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L), channel d using group d // (dim/G)."""
    if X.dim() == 3:
        return X.unsqueeze(1).expand(-1, dim, -1, -1)
    groups = X.shape[1]
    if dim % groups:
        raise ValueError(f"dim={dim} is not divisible by the number of B/C groups {groups}")
    return X.repeat_interleave(dim // groups, dim=1)


def _reset_mask(seq_idx: torch.Tensor | None, reverse: bool) -> torch.Tensor | None:
    """Boolean (batch, L): True where the state must restart before adding this step's input."""
    if seq_idx is None:
        return None
    change = seq_idx[:, 1:] != seq_idx[:, :-1]  # (batch, L-1): boundary between t and t+1
    pad = torch.zeros_like(seq_idx[:, :1], dtype=torch.bool)
    # Forward: step t restarts when it differs from t-1; reverse: when it differs from t+1.
    return torch.cat([pad, change], dim=1) if not reverse else torch.cat([change, pad], dim=1)


def _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype):
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]
    return u.to(dtype), delta, A.to(dtype), _expand_groups(B, dim).to(dtype), _expand_groups(C, dim).to(dtype)


def _finish(y, u, D, z, out_dtype, dtype):
    if D is not None:
        y = y + u * D.to(dtype)[None, :, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out_dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, reverse=False, seq_idx=None,
                       dtype=torch.float64):
    """Sequential reference: one step at a time, in `dtype` (float64 by default)."""
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype)
    batch, dim, L = u.shape
    reset = _reset_mask(seq_idx, reverse)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    ys = [None] * L
    steps = range(L - 1, -1, -1) if reverse else range(L)
    for t in steps:
        dA = torch.exp(delta[:, :, t, None] * A)                      # (batch, dim, N)
        if reset is not None:
            dA = dA * (~reset[:, t]).to(dtype)[:, None, None]
        h = dA * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]
        ys[t] = (h * C[:, :, :, t]).sum(-1)                           # (batch, dim)
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u, D, z, out_dtype, dtype)
    return (out, h.float()) if return_last_state else out


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, reverse=False, seq_idx=None,
                           chunk_size=256, dtype=torch.float32):
    """Vectorised selective scan for the CPU: per chunk, the decays and inputs of every step are
    computed at once as (batch, dim, N, T) tensors; the recurrence then runs one fused multiply-add
    per step over (batch, dim, N). Memory is O(batch * dim * N * chunk_size), never a
    (batch, dim, N, L) tensor. (On 2 CPU cores this measured ~3x faster, forward and backward,
    than a log-depth Hillis-Steele scan, which makes ~8 full passes over each chunk.)

    Without autograd (inference) each step is one in-place multiply-add into the chunk's state
    history, whose outputs are then read out at once (one product and one sum), and chunks are
    shortened to ~4 MB per (step, batch, dim, N) tensor so that they stay in cache: 1.8-2.8x
    faster CPU inference of a Caduceus-1k-sized model (BENCHMARKS.md, "CPU (no GPU)").
    """
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype)
    batch, dim, L = u.shape
    reset = _reset_mask(seq_idx, reverse)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    inference = not any(t.requires_grad for t in (u, delta, A, B, C, h))
    if inference:  # two reused (step, batch, dim, N) buffers of at most ~4 MB each
        chunk_size = max(16, min(chunk_size, L, (1 << 20) // (batch * dim * A.shape[1])))
        bufs = u.new_empty(2, chunk_size, batch, dim, A.shape[1])
    starts = list(range(0, L, chunk_size))
    # B and C shared by all channels (no groups) are broadcast views: keep one channel, do not copy.
    B, C = (X[:, :1] if X.stride(1) == 0 else X for X in (B, C))
    ys = {}
    for s in (reversed(starts) if reverse else starts):
        e = min(s + chunk_size, L)
        # Step-major layout (T, batch, dim, N): each step's slice is contiguous, and so is the
        # stack that autograd builds for unbind's backward (a strided stack was 35% of the time).
        dt = delta[:, :, s:e].permute(2, 0, 1).contiguous()[..., None]    # (T, batch, dim, 1)
        keep = None if reset is None else (~reset[:, s:e]).T.to(dtype)[:, :, None, None]
        if inference:
            h, ys[s] = _chunk_inference(dt, A, u[:, :, s:e], B[..., s:e], C[..., s:e], keep, h, reverse, bufs)
            continue
        dA = torch.exp(dt * A)                                            # (T, batch, dim, N)
        if keep is not None:
            dA = dA * keep
        dBu = (dt * u[:, :, s:e].permute(2, 0, 1)[..., None]) * B[..., s:e].permute(3, 0, 1, 2).contiguous()
        # The output of each step is read out at once, (batch, dim, N) x (batch, ., N) -> (batch, dim),
        # so the (batch, dim, N, T) state history is never stacked.
        steps = list(zip(dA.unbind(0), dBu.unbind(0), C[..., s:e].permute(3, 0, 1, 2).contiguous().unbind(0)))
        outs = []
        for a_t, b_t, c_t in (reversed(steps) if reverse else steps):
            h = torch.addcmul(b_t, a_t, h)
            outs.append((h * c_t).sum(-1))
        ys[s] = torch.stack(outs[::-1] if reverse else outs, dim=-1)
    y = torch.cat([ys[s] for s in starts], dim=-1)
    out = _finish(y, u, D, z, out_dtype, dtype)
    return (out, h.float()) if return_last_state else out


def _chunk_inference(dt, A, u, B, C, keep, h, reverse: bool, bufs):
    """One chunk without autograd, in the two reused buffers of `bufs`: the decays, then the
    inputs dt u B turned into the chunk's states h_t by one in-place multiply-add per step (at
    batch 1 the loop is bound by per-op overhead: one op per step instead of three), then the
    outputs C_t . h_t read out at once. No (step, batch, dim, N) tensor is allocated per chunk.
    Returns the last state and the (batch, dim, T) outputs."""
    T = dt.shape[0]
    a = torch.mul(dt, A, out=bufs[0, :T]).exp_()                        # (T, batch, dim, N)
    if keep is not None:
        a.mul_(keep)
    # B and C made contiguous first (T x N values per group): with a strided inner axis the
    # broadcast products took 6x longer (1.29 vs 0.21 ms per 256-step chunk, batch 1, dim 236).
    hist = torch.mul(dt * u.permute(2, 0, 1)[..., None], B.permute(3, 0, 1, 2).contiguous(), out=bufs[1, :T])
    hs, decays = hist.unbind(0), a.unbind(0)
    prev = h
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        prev = hs[t].addcmul_(decays[t], prev)
    y = torch.mul(hist, C.permute(3, 0, 1, 2).contiguous(), out=a).sum(-1)  # (T, batch, dim)
    # contiguous (batch, dim, T): the concatenated output otherwise keeps the permuted strides,
    # and every elementwise op after the scan walks it against memory order
    return prev.clone(), y.permute(1, 2, 0).contiguous()


def causal_conv1d_ref(x, weight, bias=None, activation=None, seq_idx=None, reverse=False,
                      dtype=torch.float32):
    """Depthwise causal conv1d: out[d, t] = sum_k w[d, k] x[d, t - (W-1) + k] (+ bias), then SiLU.

    reverse=True is the anti-causal mirror: out[d, t] = sum_k w[d, k] x[d, t + (W-1) - k].
    With seq_idx, taps that reach into another sequence read zero.
    x: (batch, dim, L); weight: (dim, W); bias: (dim,).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    out_dtype = x.dtype
    xd, w = x.to(dtype), weight.to(dtype)
    batch, dim, L = x.shape
    W = w.shape[1]
    out = torch.zeros(batch, dim, L, dtype=dtype, device=x.device)
    for k in range(W):
        shift = W - 1 - k
        if shift >= L:
            continue
        if not reverse:
            src = F.pad(xd, (shift, 0))[..., :L]
        else:
            src = F.pad(xd, (0, shift))[..., shift:]
        if seq_idx is not None and shift:
            sidx = F.pad(seq_idx, (shift, 0), value=-1)[..., :L] if not reverse else \
                F.pad(seq_idx, (0, shift), value=-1)[..., shift:]
            src = src * (sidx == seq_idx).to(dtype)[:, None, :]
        out = out + w[None, :, k, None] * src
    if bias is not None:
        out = out + bias.to(dtype)[None, :, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(out_dtype)
