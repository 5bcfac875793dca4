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
                           chunk_size=256, dtype=torch.float32, autograd_steps=False):
    """Vectorised selective scan for the CPU: per chunk, the decays and inputs of every step are
    computed at once as (batch, dim, N, T) tensors; the recurrence then runs one fused multiply-add
    per step over (batch, dim, N). Memory is O(batch * dim * N * chunk_size), never a
    (batch, dim, N, L) tensor. (On 2 CPU cores this measured ~3x faster, forward and backward,
    than a log-depth Hillis-Steele scan, which makes ~8 full passes over each chunk.)

    Without autograd (inference) each step is one in-place multiply-add into the chunk's state
    history, whose outputs are then read out at once (one product and one sum), and chunks are
    shortened to ~4 MB per (step, batch, dim, N) tensor so that they stay in cache: 1.8-2.8x
    faster CPU inference of a Caduceus-1k-sized model (BENCHMARKS.md, "CPU (no GPU)").
    With autograd (training) the same forward runs inside `_ChunkedScan`, which keeps only each
    chunk's entering state and computes the gradients itself, chunk by chunk, instead of
    recording a handful of autograd nodes per step (`autograd_steps=True` keeps that older form).
    """
    out_dtype = u.dtype
    u, delta, A, B, C = _prepare(u, delta, A, B, C, D, z, delta_bias, delta_softplus, dtype)
    batch, dim, L = u.shape
    reset = _reset_mask(seq_idx, reverse)
    h = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(dtype)
    inference = not any(t.requires_grad for t in (u, delta, A, B, C, h))
    # B and C shared by all channels (no groups) are broadcast views: keep one channel, do not copy.
    B, C = (X[:, :1] if X.stride(1) == 0 else X for X in (B, C))
    if inference or not autograd_steps:  # chunks of ~4 MB per (step, batch, dim, N) tensor
        chunk_size = max(16, min(chunk_size, L, (1 << 20) // (batch * dim * A.shape[1])))
    if not inference and not autograd_steps:
        keep = None if reset is None else (~reset).to(dtype)
        y, h = _ChunkedScan.apply(delta, u, A, B, C, h, keep, reverse, chunk_size)
        out = _finish(y, u, D, z, out_dtype, dtype)
        return (out, h.float()) if return_last_state else out
    if inference:  # two reused (step, batch, dim, N) buffers
        bufs = u.new_empty(2, chunk_size, batch, dim, A.shape[1])
    starts = list(range(0, L, chunk_size))
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


def _step_major(x: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Steps s..e of a (batch, dim, L) tensor as a contiguous (T, batch, dim, 1) one."""
    return x[:, :, s:e].permute(2, 0, 1).contiguous()[..., None]


def _keep_steps(keep: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """Steps s..e of a (batch, L) 0/1 restart mask as (T, batch, 1, 1)."""
    return None if keep is None else keep[:, s:e].T.contiguous()[:, :, None, None]


class _ChunkedScan(torch.autograd.Function):
    """The recurrence h_t = exp(dt_t A) h_t-1 + dt_t u_t B_t, y_t = C_t . h_t over prepared
    tensors, forward and backward chunk by chunk, for CPU training.

    Forward: the inference form (`_chunk_inference`), keeping each chunk's entering state.
    Backward, chunk by chunk against the scan: the chunk's states rebuilt from its entering state
    (one multiply-add per step), the adjoint g_t = dL/dh_t = gy_t C_t + a_t+1 g_t+1 (one more
    per step), then every gradient from them at once: dA, d(dt), du, dB, dC, d(initial state).
    Shapes: dt, u (batch, dim, L); A (dim, N); B, C (batch, 1 or dim, N, L); h0 (batch, dim, N);
    keep: (batch, L) 0 where the state restarts, or None.
    """

    @staticmethod
    def forward(ctx, dt, u, A, B, C, h0, keep, reverse, chunk):
        batch, dim, L = u.shape
        starts = list(range(0, L, chunk))
        bufs = u.new_empty(2, min(chunk, L), batch, dim, A.shape[1])
        h, entry, ys = h0, {}, {}
        with torch.no_grad():
            for s in (reversed(starts) if reverse else starts):
                e = min(s + chunk, L)
                entry[s] = h
                h, ys[s] = _chunk_inference(_step_major(dt, s, e), A, u[:, :, s:e], B[..., s:e], C[..., s:e],
                                            _keep_steps(keep, s, e), h, reverse, bufs)
            y = torch.cat([ys[s] for s in starts], dim=-1)
            entries = torch.stack([entry[s] for s in starts])
        ctx.save_for_backward(dt, u, A, B, C, entries, keep if keep is not None else u.new_empty(0))
        ctx.reverse, ctx.chunk, ctx.has_keep = reverse, chunk, keep is not None
        return y, h

    @staticmethod
    def backward(ctx, gy, gh):
        dt, u, A, B, C, entries, keep = ctx.saved_tensors
        keep = keep if ctx.has_keep else None
        reverse, chunk = ctx.reverse, ctx.chunk
        batch, dim, L = u.shape
        nstate = A.shape[1]
        starts = list(range(0, L, chunk))
        ddt, du = torch.zeros_like(dt), torch.zeros_like(u)
        dA, dB, dC = torch.zeros_like(A), torch.zeros_like(B), torch.zeros_like(C)
        gy = gy if gy is not None else torch.zeros_like(u)
        carry = gh.to(u.dtype) if gh is not None else u.new_zeros(batch, dim, nstate)  # a_next g_next
        for i in (range(len(starts)) if reverse else range(len(starts) - 1, -1, -1)):
            s = starts[i]
            e = min(s + chunk, L)
            T = e - s
            dtc, uc = _step_major(dt, s, e), _step_major(u, s, e)                  # (T, batch, dim, 1)
            Bc = B[..., s:e].permute(3, 0, 1, 2).contiguous()                      # (T, batch, 1|dim, N)
            Cc = C[..., s:e].permute(3, 0, 1, 2).contiguous()
            a = (dtc * A).exp_()                                                   # (T, batch, dim, N)
            kc = _keep_steps(keep, s, e)
            if kc is not None:
                a.mul_(kc)
            dtu = dtc * uc
            hist = dtu * Bc                                                        # b_t, then h_t
            fwd = range(T - 1, -1, -1) if reverse else range(T)
            hs, decays = hist.unbind(0), a.unbind(0)
            prev = entries[i]
            for t in fwd:
                prev = hs[t].addcmul_(decays[t], prev)
            gyc = _step_major(gy, s, e)
            g = gyc * Cc                                                           # gy_t C_t, then g_t
            gs = list(g.unbind(0))
            back = list(fwd)[::-1]                                                 # against the scan
            gs[back[0]].add_(carry)
            for t_next, t in zip(back[:-1], back[1:]):
                gs[t].addcmul_(decays[t_next], gs[t_next])
            carry = decays[back[-1]] * gs[back[-1]]
            # the state before each step: the chunk's entering state, then the chunk's own states
            if reverse:
                hprev = torch.cat([hist[1:], entries[i][None]])
            else:
                hprev = torch.cat([entries[i][None], hist[:-1]])
            gda = g * hprev * a                                                    # dL/da_t * a_t
            dA += (gda * dtc).sum((0, 1))
            gB = (g * Bc).sum(-1)                                                  # (T, batch, dim)
            ddt[:, :, s:e] = ((gda * A).sum(-1) + gB * uc[..., 0]).permute(1, 2, 0)
            du[:, :, s:e] = (gB * dtc[..., 0]).permute(1, 2, 0)
            gbu = g * dtu                                                          # dL/dB_t
            ghc = hist * gyc                                                       # dL/dC_t
            if B.shape[1] == 1:
                gbu = gbu.sum(2, keepdim=True)
            if C.shape[1] == 1:
                ghc = ghc.sum(2, keepdim=True)
            dB[..., s:e] = gbu.permute(1, 2, 3, 0)
            dC[..., s:e] = ghc.permute(1, 2, 3, 0)
        return ddt, du, dA, dB, dC, carry, None, None, None


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
