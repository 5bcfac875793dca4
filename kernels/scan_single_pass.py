"""Single-pass forward of the selective scan, for inference when the batch is small and L long.

Why: the chunked forward (selective_scan_triton) needs (batch x channel blocks) programs to fill
the GPU; at batch 1 it splits L into chunks and so computes every decay exp(dt A) twice (a
chunk-state pass, then the output pass from the passed states), and the exponentials bound it
(kernels/BENCHMARKS.md, "What the targets need"). Here the lanes span (channel, state) pairs
instead of channels: 16 lanes hold the 16 states of one channel, so batch x D x N / 32 warps walk
the whole sequence once (D = 512, both directions of a bidirectional layer: 512 warps, about one
per scheduler of an H100), with every decay computed once and nothing written but the output.

Per tile of T = N steps, a thread holds its (channel, state) for all T steps: decays and inputs,
the sequential scan in registers, the products C_t h_t; these are summed over the N state lanes
by a reduce-scatter (log2 N rounds of warp shuffles, after which lane n holds step n's sum), so
the skip term D u, the gate silu(z), the optional add and the store are done once per (step,
channel), by one lane each. dt's bias and softplus, when asked for, are computed on all N lanes
of a channel (dt made outside the scan, as the model's mixer does, avoids that).

Full tiles are loaded without masks (vector loads), two tiles ahead of the one computed; a last
partial tile is done on its own, masked (first in the reverse direction, which walks the same
physical tiles from the end and scans each right to left).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .selective_scan_triton import _exp2, _pick, _reduce_scatter, _scan_tnd, _sigmoid, _softplus


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _tile_loads(u_ptr, dl_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
                s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, j, L,
                T: tl.constexpr, MASKED: tl.constexpr, HAS_Z: tl.constexpr, HAS_ADD: tl.constexpr):
    """The raw inputs of tile j: per step (T, BD) u and dt and (T, N) B and C, broadcast over the
    state lanes; per (channel, step) (BD, T) u, z and add, one step per state lane."""
    p = j.to(tl.int64) * T + tl.arange(0, T)
    mt = p < L
    u = _load(u_ptr, ub + offs_d[None, :] * s_u_d + p[:, None], mt[:, None], MASKED)
    dt = _load(dl_ptr, dlb + offs_d[None, :] * s_dl_d + p[:, None], mt[:, None], MASKED)
    Bt = _load(B_ptr, Bb + offs_n[None, :] * s_B_n + p[:, None], mt[:, None], MASKED)
    Ct = _load(C_ptr, Cb + offs_n[None, :] * s_C_n + p[:, None], mt[:, None], MASKED)
    us = _load(u_ptr, ub + offs_d[:, None] * s_u_d + p[None, :], mt[None, :], MASKED)
    if HAS_Z:
        zs = _load(z_ptr, zb + offs_d[:, None] * s_z_d + p[None, :], mt[None, :], MASKED)
    else:
        zs = us
    if HAS_ADD:
        adds = _load(add_ptr, ab + offs_d[:, None] * s_a_d + p[None, :], mt[None, :], MASKED)
    else:
        adds = us
    return u, dt, Bt, Ct, us, zs, adds


@triton.jit
def _tile_step(h, u, dt, Bt, Ct, us, zs, adds, A2, Dv, db, out_ptr, ob, s_o_d, seq_ptr, s_seq_b, pid_b,
               offs_d, offs_n, j, L,
               T: tl.constexpr, MASKED: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
               HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ADD: tl.constexpr,
               REVERSE: tl.constexpr, FAST: tl.constexpr, RS_MODE: tl.constexpr):
    """Scans tile j from state h (BD, N), writes its outputs and returns the state it hands on."""
    p = j.to(tl.int64) * T + tl.arange(0, T)
    mt = p < L
    dt = dt.to(tl.float32)
    if HAS_DB:
        dt += db[None, :]
    if SOFTPLUS:
        dt = _softplus(dt, FAST)
    if MASKED:
        if HAS_DB or SOFTPLUS:
            dt = tl.where(mt[:, None], dt, 0.0)          # a = 1, b = 0 past the end: h passes through
    a = _exp2(dt[:, :, None] * A2[None, :, :], FAST)     # (T, BD, N)
    if HAS_SEQ:
        if REVERSE:
            q = p + 1
        else:
            q = p - 1
        mq = (q >= 0) & (q < L) & (p < L)
        cur = tl.load(seq_ptr + pid_b * s_seq_b + p, mask=p < L, other=0)
        prev = tl.load(seq_ptr + pid_b * s_seq_b + q, mask=mq, other=0)
        a = tl.where((mq & (cur != prev))[:, None, None], 0.0, a)
    b = (dt * u.to(tl.float32))[:, :, None] * Bt.to(tl.float32)[:, None, :]
    hs = _scan_tnd(a, b, h, T, REVERSE)
    y = _reduce_scatter(hs * Ct.to(tl.float32)[:, None, :], T, a.shape[1], T, RS_MODE)   # (1, BD, T)
    y = tl.sum(y, axis=0)                                 # (BD, T): step n of the tile on state lane n
    if HAS_D:
        y += Dv[:, None] * us.to(tl.float32)
    if HAS_Z:
        zf = zs.to(tl.float32)
        y = y * zf * _sigmoid(zf, FAST)
    if HAS_ADD:
        y += adds.to(tl.float32)
    offs = ob + offs_d[:, None] * s_o_d + p[None, :]
    if MASKED:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mt[None, :])
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty))
    if REVERSE:
        return _pick(hs, 0, T)
    else:
        return _pick(hs, T - 1, T)


@triton.jit
def _fwd_single_pass_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, seq_ptr, h0_ptr, out_ptr, Hlast_ptr, add_ptr,
    L, DIM, DIM_PER_GROUP,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d,
    s_o_b, s_o_d, s_a_b, s_a_d, s_seq_b, s_h0_b, s_h0_d, s_hl_b, s_hl_d,
    BD: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr, HAS_ADD: tl.constexpr, REVERSE: tl.constexpr,
    TAIL: tl.constexpr, FAST: tl.constexpr, RS_MODE: tl.constexpr,
):
    """One program: BD channels x T (= N) states of one batch row, over the whole sequence.
    Tiles are T steps; the caller guarantees at least one full tile (L >= T); TAIL: L % T != 0."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)      # the caller makes DIM % BD == 0
    offs_n = tl.arange(0, T)
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2 = tl.load(A_ptr + offs_d[:, None] * T + offs_n[None, :]) * 1.4426950408889634   # A (DIM, T) fp32
    Dv = 0.0
    db = 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d)
    if HAS_DB:
        db = tl.load(db_ptr + offs_d)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :])
    else:
        h = tl.zeros((BD, T), dtype=tl.float32)
    ub, dlb, zb, ob, ab = pid_b * s_u_b, pid_b * s_dl_b, pid_b * s_z_b, pid_b * s_o_b, pid_b * s_a_b
    Bb, Cb = pid_b * s_B_b + g * s_B_g, pid_b * s_C_b + g * s_C_g
    n_full = L // T
    if REVERSE and TAIL:
        u, dt, Bt, Ct, us, zs, adds = _tile_loads(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
            s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, n_full, L, T, True, HAS_Z, HAS_ADD)
        h = _tile_step(h, u, dt, Bt, Ct, us, zs, adds, A2, Dv, db, out_ptr, ob, s_o_d, seq_ptr, s_seq_b, pid_b,
                       offs_d, offs_n, n_full, L,
                       T, True, HAS_D, HAS_Z, HAS_DB, SOFTPLUS, HAS_SEQ, HAS_ADD, REVERSE, FAST, RS_MODE)
    # Two full tiles in flight ahead of the one computed; the index is clamped at the ends (a
    # repeated load of a tile already read, never a load past the sequence).
    if REVERSE:
        j0 = n_full - 1
        j1 = tl.maximum(n_full - 2, 0)
    else:
        j0 = n_full * 0
        j1 = tl.minimum(1, n_full - 1)
    u0, dt0, B0, C0, us0, zs0, ad0 = _tile_loads(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
        s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, j0, L, T, False, HAS_Z, HAS_ADD)
    u1, dt1, B1, C1, us1, zs1, ad1 = _tile_loads(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
        s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, j1, L, T, False, HAS_Z, HAS_ADD)
    for i in range(0, n_full):
        if REVERSE:
            j = n_full - 1 - i
            j2 = tl.maximum(n_full - 3 - i, 0)
        else:
            j = i
            j2 = tl.minimum(i + 2, n_full - 1)
        u2, dt2, B2, C2, us2, zs2, ad2 = _tile_loads(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
            s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, j2, L, T, False, HAS_Z, HAS_ADD)
        h = _tile_step(h, u0, dt0, B0, C0, us0, zs0, ad0, A2, Dv, db, out_ptr, ob, s_o_d, seq_ptr, s_seq_b, pid_b,
                       offs_d, offs_n, j, L,
                       T, False, HAS_D, HAS_Z, HAS_DB, SOFTPLUS, HAS_SEQ, HAS_ADD, REVERSE, FAST, RS_MODE)
        u0, dt0, B0, C0, us0, zs0, ad0 = u1, dt1, B1, C1, us1, zs1, ad1
        u1, dt1, B1, C1, us1, zs1, ad1 = u2, dt2, B2, C2, us2, zs2, ad2
    if TAIL and not REVERSE:
        u, dt, Bt, Ct, us, zs, adds = _tile_loads(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, add_ptr, ub, dlb, Bb, Cb, zb, ab,
            s_u_d, s_dl_d, s_B_n, s_C_n, s_z_d, s_a_d, offs_d, offs_n, n_full, L, T, True, HAS_Z, HAS_ADD)
        h = _tile_step(h, u, dt, Bt, Ct, us, zs, adds, A2, Dv, db, out_ptr, ob, s_o_d, seq_ptr, s_seq_b, pid_b,
                       offs_d, offs_n, n_full, L,
                       T, True, HAS_D, HAS_Z, HAS_DB, SOFTPLUS, HAS_SEQ, HAS_ADD, REVERSE, FAST, RS_MODE)
    tl.store(Hlast_ptr + pid_b * s_hl_b + offs_d[:, None] * s_hl_d + offs_n[None, :], h)


def single_pass_applies(batch: int, dim: int, nstate: int, L: int, groups: int, warps: int) -> bool:
    """Whether the single-pass kernel can run this shape: N a power of two from 4 to 16 (one tile
    step per state lane), at least one full tile, and whole channel blocks within each B/C group."""
    bd = (32 // nstate) * warps if nstate in (4, 8, 16) else 0
    return bd > 0 and L >= nstate and dim % groups == 0 and (dim // groups) % bd == 0


def single_pass_forward(u, delta, A, Bg, Cg, D, z, delta_bias, delta_softplus, h0, reverse, seq, out_add,
                        warps: int, fast: bool, rs_mode: int):
    """Launches _fwd_single_pass_kernel. u, delta, z, out_add (batch, dim, L) and Bg, Cg (batch,
    groups, N, L) with L contiguous; A (dim, N); D, delta_bias (dim,) or None; h0 (batch, dim, N)
    or None; seq (batch, L) int32 or None. Returns (out, last state (batch, dim, N) float32)."""
    import torch

    batch, dim, L = u.shape
    nstate = A.shape[1]
    bd = (32 // nstate) * warps
    out = torch.empty_like(u)
    last = torch.empty(batch, dim, nstate, device=u.device, dtype=torch.float32)
    A_c = A.float().contiguous()
    dummy = last
    zz = z if z is not None else u
    ad = out_add if out_add is not None else u
    h0c = h0.float().contiguous() if h0 is not None else None
    _fwd_single_pass_kernel[(batch, dim // bd)](
        u, delta, A_c, Bg, Cg, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
        seq if seq is not None else dummy, h0c if h0c is not None else dummy, out, last, ad,
        L, dim, dim // Bg.shape[1],
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        Bg.stride(0), Bg.stride(1), Bg.stride(2), Cg.stride(0), Cg.stride(1), Cg.stride(2),
        zz.stride(0), zz.stride(1), out.stride(0), out.stride(1), ad.stride(0), ad.stride(1),
        seq.stride(0) if seq is not None else 0,
        h0c.stride(0) if h0c is not None else 0, h0c.stride(1) if h0c is not None else 0,
        last.stride(0), last.stride(1),
        BD=bd, T=nstate, HAS_D=D is not None, HAS_Z=z is not None, HAS_DB=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq is not None, HAS_H0=h0c is not None,
        HAS_ADD=out_add is not None, REVERSE=bool(reverse), TAIL=L % nstate != 0, FAST=fast, RS_MODE=rs_mode,
        num_warps=warps)
    return out, last
