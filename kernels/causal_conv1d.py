"""Depthwise causal conv1d with fused SiLU, in Triton (forward and backward), with dispatch.

Same call as `causal_conv1d.causal_conv1d_fn(x, weight, bias, seq_idx, activation)` plus
`reverse=True`, the anti-causal mirror used by the right-to-left half of a bidirectional block
(no flipped copy of x is made). Backend choice works as for `selective_scan`. The Triton path is a
torch.library custom op (with fake and autograd registrations), so torch.compile traces it
without a graph break.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import causal_conv1d_ref
from .selective_scan import _target_programs, resolve_backend


@triton.jit
def _cols(G):
    """(BD, R, 4) -> its 4 columns, each (BD, R): position 4 i + r of the tile is column r, row i."""
    BD: tl.constexpr = G.shape[0]
    R: tl.constexpr = G.shape[1]
    even, odd = tl.split(tl.reshape(G, (BD, R, 2, 2)))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _from_cols(c0, c1, c2, c3):
    """4 columns (BD, R) -> the (BD, R, 4) tile (inverse of _cols)."""
    BD: tl.constexpr = c0.shape[0]
    R: tl.constexpr = c0.shape[1]
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BD, R, 4))


@triton.jit
def _shift(p0, p1, p2, p3, p4, p5, p6, p7, k: tl.constexpr):
    """The tile whose column r is p[k + r], from the 8 columns of two tiles one row apart (p0-p3
    the earlier tile's, p4-p7 the later one's): the earlier tile shifted by k positions."""
    if k == 1:
        return _from_cols(p1, p2, p3, p4)
    elif k == 2:
        return _from_cols(p2, p3, p4, p5)
    elif k == 3:
        return _from_cols(p3, p4, p5, p6)
    elif k == 4:
        return _from_cols(p4, p5, p6, p7)
    else:
        return _from_cols(p0, p1, p2, p3)


@triton.jit
def _same_seq(seq_ptr, s_seq_b, pid_b, src, seq_at, L):
    """(1, R, 4): position src is in [0, L) and in the sequence seq_at (packed windows)."""
    ok = (src >= 0) & (src < L)
    return (tl.load(seq_ptr + pid_b * s_seq_b + src, mask=ok, other=-1) == seq_at)[None, :, :]


@triton.jit
def _tile_taps(x_lo, x_hi, seq_ptr, s_seq_b, pid_b, P, L, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The four taps x(P -/+ j), j = 0..3, of the (BD, R, 4) positions P, from the x tiles x_lo
    and x_hi one row apart: P is x_hi's positions (causal, taps x(P - j)) or x_lo's (REVERSE,
    taps x(P + j)). A tap across a sequence boundary is 0."""
    l0, l1, l2, l3 = _cols(x_lo)
    h0, h1, h2, h3 = _cols(x_hi)
    if REVERSE:
        x0 = x_lo
        x1 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 1)
        x2 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 2)
        x3 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 3)
    else:
        x0 = x_hi
        x1 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 3)
        x2 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 2)
        x3 = _shift(l0, l1, l2, l3, h0, h1, h2, h3, 1)
    if HAS_SEQ:
        in_p = (P >= 0) & (P < L)
        seq_p = tl.load(seq_ptr + pid_b * s_seq_b + P, mask=in_p, other=-2)
        step = 1 if REVERSE else -1
        x1 = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, P + step, seq_p, L), x1, 0.0)
        x2 = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, P + 2 * step, seq_p, L), x2, 0.0)
        x3 = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, P + 3 * step, seq_p, L), x3, 0.0)
    return x0, x1, x2, x3


@triton.jit
def _tap_weights(w_ptr, offs_d, mask_d, W):
    """Weight of tap j, w[:, W-1-j], as (BD, 1, 1) float32; taps j >= W get 0 (tensor tests in the
    masks: the interpreter takes no scalar one)."""
    w0 = tl.load(w_ptr + offs_d * W + (W - 1), mask=mask_d, other=0.0)
    w1 = tl.load(w_ptr + offs_d * W + (W - 2), mask=mask_d & (offs_d * 0 + 1 < W), other=0.0)
    w2 = tl.load(w_ptr + offs_d * W + (W - 3), mask=mask_d & (offs_d * 0 + 2 < W), other=0.0)
    w3 = tl.load(w_ptr + offs_d * W + (W - 4), mask=mask_d & (offs_d * 0 + 3 < W), other=0.0)
    return (w0.to(tl.float32)[:, None, None], w1.to(tl.float32)[:, None, None], w2.to(tl.float32)[:, None, None],
            w3.to(tl.float32)[:, None, None])


@triton.jit
def _bias_column(b_ptr, offs_d, mask_d, BD: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The bias as (BD, 1, 1) float32; 0 without one."""
    bias = tl.zeros((BD, 1, 1), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None, None]
    return bias


@triton.jit
def _tile_positions(k, BT: tl.constexpr):
    """(BT / 4, 4) positions of time tile k: t0 + 4 i + r at row i, column r."""
    R: tl.constexpr = BT // 4
    return (k * BT + 4 * tl.arange(0, R)[:, None] + tl.arange(0, 4)[None, :]).to(tl.int64)


@triton.jit
def _load_rows(x_ptr, row, md, t, L):
    """x at the (R, 4) positions t of the rows `row`, float32, 0 outside [0, L)."""
    return tl.load(x_ptr + row + t[None, :, :], mask=md & ((t >= 0) & (t < L))[None, :, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_out(x_lo, x_hi, w_ptr, b_ptr, seq_ptr, s_seq_b, pid_b, offs_d, mask_d, t, L, W,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """silu(conv(x) + bias) at the (BD, R, 4) positions t, float32 (see _tile_taps for x_lo / x_hi)."""
    x0, x1, x2, x3 = _tile_taps(x_lo, x_hi, seq_ptr, s_seq_b, pid_b, t, L, REVERSE, HAS_SEQ)
    w0, w1, w2, w3 = _tap_weights(w_ptr, offs_d, mask_d, W)
    acc = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None, None]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, w2_ptr, b2_ptr, out2_ptr, L, DIM, W,
                     s_x_b, s_x_d, s_o_b, s_o_d, s_o2_b, s_o2_d, s_seq_b,
                     BD: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, BOTH: tl.constexpr):
    """out = silu(conv(x) + bias) on a (BD, BT / 4, 4) tile: x read as two row-aligned tiles (this
    one and the one a row earlier, later when REVERSE), the taps shifted in registers. BOTH: also
    out2, the anti-causal conv of the same x with w2 / b2 (both directions of a bidirectional
    block from one read of x; then REVERSE is False)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    md = mask_d[:, None, None]
    row = pid_b * s_x_b + offs_d[:, None, None] * s_x_d
    t = _tile_positions(tl.program_id(2).to(tl.int64), BT)
    m = md & (t < L)[None, :, :]
    x_here = _load_rows(x_ptr, row, md, t, L)
    if REVERSE or BOTH:
        x_next = _load_rows(x_ptr, row, md, t + 4, L)
    if REVERSE:
        acc = _conv_out(x_here, x_next, w_ptr, b_ptr, seq_ptr, s_seq_b, pid_b, offs_d, mask_d, t, L, W,
                        HAS_BIAS, SILU, True, HAS_SEQ)
    else:
        acc = _conv_out(_load_rows(x_ptr, row, md, t - 4, L), x_here, w_ptr, b_ptr, seq_ptr, s_seq_b, pid_b, offs_d,
                        mask_d, t, L, W, HAS_BIAS, SILU, False, HAS_SEQ)
    tl.store(out_ptr + pid_b * s_o_b + offs_d[:, None, None] * s_o_d + t[None, :, :],
             acc.to(out_ptr.dtype.element_ty), mask=m)
    if BOTH:
        acc2 = _conv_out(x_here, x_next, w2_ptr, b2_ptr, seq_ptr, s_seq_b, pid_b, offs_d, mask_d, t, L, W,
                         HAS_BIAS, SILU, True, HAS_SEQ)
        tl.store(out2_ptr + pid_b * s_o2_b + offs_d[:, None, None] * s_o2_d + t[None, :, :],
                 acc2.to(out2_ptr.dtype.element_ty), mask=m)


@triton.jit
def _silu_grad_at(x_lo, x_hi, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md, P, L, w0, w1, w2, w3, bias,
                  HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """g = dL/d(pre-activation) at the (BD, R, 4) positions P (see _tile_taps for x_lo / x_hi),
    and P's four taps. 0 outside [0, L)."""
    x0, x1, x2, x3 = _tile_taps(x_lo, x_hi, seq_ptr, s_seq_b, pid_b, P, L, REVERSE, HAS_SEQ)
    g = tl.load(dout_ptr + do_row + P[None, :, :], mask=md & ((P >= 0) & (P < L))[None, :, :],
                other=0.0).to(tl.float32)
    if SILU:
        pre = w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3
        if HAS_BIAS:
            pre += bias
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g, x0, x1, x2, x3


@triton.jit
def _dx_share(x_prev, x_here, x_next, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md, t, in_t, L, w0, w1, w2, w3,
              bias, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """One conv's share of dx on the tile t, dx(t) = sum_j w[W-1-j] g(t +/- j), and its g(t) and
    taps at t (for dw, dbias). g is computed for this tile and for the tile one row (4 positions)
    later (earlier when REVERSE), whose first columns the shifted g(t +/- j) need."""
    if REVERSE:   # g here from (here, next); the other g one row earlier, from (prev, here)
        g, x0, x1, x2, x3 = _silu_grad_at(x_here, x_next, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md, t, L,
                                          w0, w1, w2, w3, bias, HAS_BIAS, SILU, REVERSE, HAS_SEQ)
        g_o, _0, _1, _2, _3 = _silu_grad_at(x_prev, x_here, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md,
                                            t - 4, L, w0, w1, w2, w3, bias, HAS_BIAS, SILU, REVERSE, HAS_SEQ)
        o0, o1, o2, o3 = _cols(g_o)
        h0, h1, h2, h3 = _cols(g)
        # g(t - j): column 4 + r - j of (previous row, this one)
        ga = _shift(o0, o1, o2, o3, h0, h1, h2, h3, 3)
        gb = _shift(o0, o1, o2, o3, h0, h1, h2, h3, 2)
        gc = _shift(o0, o1, o2, o3, h0, h1, h2, h3, 1)
    else:         # g here from (prev, here); the other g one row later, from (here, next)
        g, x0, x1, x2, x3 = _silu_grad_at(x_prev, x_here, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md, t, L,
                                          w0, w1, w2, w3, bias, HAS_BIAS, SILU, REVERSE, HAS_SEQ)
        g_o, _0, _1, _2, _3 = _silu_grad_at(x_here, x_next, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md,
                                            t + 4, L, w0, w1, w2, w3, bias, HAS_BIAS, SILU, REVERSE, HAS_SEQ)
        h0, h1, h2, h3 = _cols(g)
        o0, o1, o2, o3 = _cols(g_o)
        # g(t + j): column r + j of (this row, the next)
        ga = _shift(h0, h1, h2, h3, o0, o1, o2, o3, 1)
        gb = _shift(h0, h1, h2, h3, o0, o1, o2, o3, 2)
        gc = _shift(h0, h1, h2, h3, o0, o1, o2, o3, 3)
    if HAS_SEQ:  # g(t +/- j) reaches x(t) only through an output of t's own sequence
        seq_t = tl.load(seq_ptr + pid_b * s_seq_b + t, mask=in_t, other=-2)
        step = -1 if REVERSE else 1
        ga = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, t + step, seq_t, L), ga, 0.0)
        gb = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, t + 2 * step, seq_t, L), gb, 0.0)
        gc = tl.where(_same_seq(seq_ptr, s_seq_b, pid_b, t + 3 * step, seq_t, L), gc, 0.0)
    return w0 * g + w1 * ga + w2 * gb + w3 * gc, g, x0, x1, x2, x3


@triton.jit
def _add_weight_grads(dw_ptr, db_ptr, s_g, s_0, s_1, s_2, s_3, offs_d, mask_d, W, HAS_BIAS: tl.constexpr):
    """dw[:, W-1-j] += sum of g * tap j, dbias += sum of g, over the program's positions (atomic)."""
    cols = tl.arange(0, 4)
    db = tl.sum(tl.sum(s_g, axis=2), axis=1)
    dw = tl.where((cols == W - 1)[None, :], tl.sum(tl.sum(s_0, axis=2), axis=1)[:, None], 0.0)
    dw += tl.where((cols == W - 2)[None, :], tl.sum(tl.sum(s_1, axis=2), axis=1)[:, None], 0.0)
    dw += tl.where((cols == W - 3)[None, :], tl.sum(tl.sum(s_2, axis=2), axis=1)[:, None], 0.0)
    dw += tl.where((cols == W - 4)[None, :], tl.sum(tl.sum(s_3, axis=2), axis=1)[:, None], 0.0)
    tl.atomic_add(dw_ptr + offs_d[:, None] * W + cols[None, :], dw, mask=mask_d[:, None] & (cols < W)[None, :])
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, db, mask=mask_d)


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, dx_ptr, dw_ptr, db_ptr,
                     w2_ptr, b2_ptr, dout2_ptr, dw2_ptr, db2_ptr, L, DIM, W, TILES_PER_PROG,
                     s_x_b, s_x_d, s_do_b, s_do_d, s_do2_b, s_do2_d, s_dx_b, s_dx_d, s_seq_b,
                     BD: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr, BOTH: tl.constexpr):
    """The whole backward in one pass: dx, dw and dbias (see _dx_share), no g written to memory.
    Tiles are (BD, BT / 4, 4), position t0 + 4 i + r at row i, column r, read with aligned loads
    (x at three row offsets, dout at two) and shifted in registers (_cols / _shift). The program
    walks TILES_PER_PROG time tiles; dw and dbias are summed per element, reduced once and added
    atomically. ACC: dx is added to what dx holds. BOTH: the anti-causal conv of the same x (w2,
    b2, gradient dout2, weight gradients dw2 / db2) adds its share to the same dx, from the same
    loads of x (then REVERSE is False). Widths <= 4."""
    R: tl.constexpr = BT // 4
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    md = mask_d[:, None, None]
    row = pid_b * s_x_b + offs_d[:, None, None] * s_x_d
    do_row = pid_b * s_do_b + offs_d[:, None, None] * s_do_d
    # per-element sums of g and of g * tap j (dbias, dw), reduced once at the end
    w0, w1, w2, w3 = _tap_weights(w_ptr, offs_d, mask_d, W)
    bias = _bias_column(b_ptr, offs_d, mask_d, BD, HAS_BIAS)
    s_g = tl.zeros((BD, R, 4), dtype=tl.float32)
    s_0, s_1, s_2, s_3 = s_g, s_g, s_g, s_g
    if BOTH:
        do2_row = pid_b * s_do2_b + offs_d[:, None, None] * s_do2_d
        v0, v1, v2, v3 = _tap_weights(w2_ptr, offs_d, mask_d, W)
        bias2 = _bias_column(b2_ptr, offs_d, mask_d, BD, HAS_BIAS)
        r_g, r_0, r_1, r_2, r_3 = s_g, s_g, s_g, s_g, s_g
    k_first = tl.program_id(2).to(tl.int64) * TILES_PER_PROG
    for i in range(0, TILES_PER_PROG):
        t = _tile_positions(k_first + i, BT)
        in_t = t < L
        m = md & in_t[None, :, :]
        x_prev = _load_rows(x_ptr, row, md, t - 4, L)
        x_here = _load_rows(x_ptr, row, md, t, L)
        x_next = _load_rows(x_ptr, row, md, t + 4, L)
        dx, g, x0, x1, x2, x3 = _dx_share(x_prev, x_here, x_next, dout_ptr, do_row, seq_ptr, s_seq_b, pid_b, md, t,
                                          in_t, L, w0, w1, w2, w3, bias, HAS_BIAS, SILU, REVERSE, HAS_SEQ)
        s_g += g
        s_0 += g * x0
        s_1 += g * x1
        s_2 += g * x2
        s_3 += g * x3
        if BOTH:
            dx2, g2, y0, y1, y2, y3 = _dx_share(x_prev, x_here, x_next, dout2_ptr, do2_row, seq_ptr, s_seq_b, pid_b,
                                                md, t, in_t, L, v0, v1, v2, v3, bias2, HAS_BIAS, SILU, True, HAS_SEQ)
            dx += dx2
            r_g += g2
            r_0 += g2 * y0
            r_1 += g2 * y1
            r_2 += g2 * y2
            r_3 += g2 * y3
        dx_off = pid_b * s_dx_b + offs_d[:, None, None] * s_dx_d + t[None, :, :]
        if ACC:
            dx += tl.load(dx_ptr + dx_off, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=m)
    _add_weight_grads(dw_ptr, db_ptr, s_g, s_0, s_1, s_2, s_3, offs_d, mask_d, W, HAS_BIAS)
    if BOTH:
        _add_weight_grads(dw2_ptr, db2_ptr, r_g, r_0, r_1, r_2, r_3, offs_d, mask_d, W, HAS_BIAS)


# (channels, time steps, warps) per program on a GPU, forward and backward (H100 sweeps, 2026-11-24,
# fourteenth and seventeenth sessions: kernels/BENCHMARKS.md). Few channels per program keep the
# backward's per-element sums in registers; one channel over 2,048 steps made the two-direction
# forward 8-15% faster than 2 x 512 at batch 1 and at (8, 1536, 2048).
_GPU_BLOCKS = {"forward": (1, 2048, 4), "backward": (1, 256, 2)}


def _blocks(x, backward: bool = False):
    """(channels, time steps, warps) per program. GENOMAMBA_CONV_BLOCKS="BD,BT,warps" overrides both
    kernels' (tuning), "BD,BT,warps;BD,BT,warps" the forward's and the backward's. Both block sizes
    are powers of two, BT at least 8 (tiles of BT / 4 rows of 4 positions)."""
    if x.device.type != "cuda":
        return (4, 16, 1)
    override = os.environ.get("GENOMAMBA_CONV_BLOCKS")
    if not override:
        return _GPU_BLOCKS["backward" if backward else "forward"]
    parts = override.split(";")
    try:
        bd, bt, warps = (int(v) for v in parts[min(int(backward), len(parts) - 1)].split(","))
    except ValueError:
        raise ValueError(f"GENOMAMBA_CONV_BLOCKS={override!r}: expected 'BD,BT,warps' or 'BD,BT,warps;BD,BT,warps'")
    if len(parts) > 2 or bd & (bd - 1) or bt & (bt - 1) or bt < 8:
        raise ValueError(f"GENOMAMBA_CONV_BLOCKS={override!r}: BD and BT must be powers of two, BT >= 8")
    return bd, bt, warps


def _grad_tiles_per_program(x, n_rows, n_tiles):
    """Time tiles walked by one program of the backward: enough programs to fill the GPU (~8 per
    SM) and as few atomic additions of dw / dbias as that allows, up to 32 (16 was 3-6% slower at
    batch 1) and never more than the row has (the loop would run masked). 2 on the CPU (tests
    cover the loop)."""
    if x.device.type != "cuda":
        return 2
    return max(1, min(32, n_tiles, n_tiles * n_rows // _target_programs(x.device)))


def _launch_args(x, weight, bias, seq_idx, backward=False):
    batch, dim, L = x.shape
    W = weight.shape[1]
    BD, BT, warps = _blocks(x, backward)
    grid = (batch, triton.cdiv(dim, BD), triton.cdiv(L, BT))
    w = weight.contiguous()
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    return batch, dim, L, W, BD, BT, warps, grid, w, seq


Tensor = torch.Tensor


def _conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
              reverse: bool, weight2: Tensor | None = None, bias2: Tensor | None = None):
    """The forward launch (the custom op below wraps it; inference calls it directly). With
    weight2 (and bias2 when bias is given): (out, out2), the causal conv with weight / bias and the
    anti-causal one with weight2 / bias2, from one read of x (then reverse must be False)."""
    both = weight2 is not None
    if both and (reverse or (bias is None) != (bias2 is None) or weight2.shape != weight.shape):
        raise ValueError("both directions: reverse=False, weight2 shaped like weight, bias2 given iff bias is")
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, dim, L, W, BD, BT, warps, grid, w, seq = _launch_args(x, weight, bias, seq_idx)
    out = torch.empty_like(x)
    out2 = torch.empty_like(x) if both else out
    w2 = weight2.contiguous() if both else w
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else w, seq if seq is not None else w, out,
        w2, bias2 if bias2 is not None else w2, out2, L, dim, W,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), out2.stride(0), out2.stride(1),
        seq.stride(0) if seq is not None else 0,
        BD=BD, BT=BT, HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, HAS_SEQ=seq is not None,
        BOTH=both, num_warps=warps)
    return (out, out2) if both else out


@torch.library.custom_op("genomamba::causal_conv1d_fwd", mutates_args=())
def _conv_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
                 reverse: bool) -> Tensor:
    return _conv_fwd(x, weight, bias, seq_idx, silu, reverse)


@_conv_fwd_op.register_fake
def _(x, weight, bias, seq_idx, silu, reverse):
    return torch.empty_like(x)


def conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
             reverse: bool, dx_out: Tensor | None = None, accumulate: bool = False, dout2: Tensor | None = None,
             weight2: Tensor | None = None, bias2: Tensor | None = None) -> list[Tensor]:
    """The backward launch: [dx, dweight, dbias (empty without bias)]. dx_out (like x, last dim
    contiguous): where dx is written; with accumulate, dx is added to what it holds (one input
    read by two convs, as in a bidirectional block). With dout2 / weight2 / bias2, the backward
    of _conv_fwd's two directions in one pass: dx gets both shares, and dweight2, dbias2 follow."""
    both = dout2 is not None
    if both and (reverse or weight2 is None or (bias is None) != (bias2 is None) or dout2.shape != x.shape):
        raise ValueError("both directions: reverse=False, dout2 shaped like x, weight2, bias2 given iff bias is")
    x = x if x.stride(-1) == 1 else x.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    batch, dim, L, W, BD, BT, warps, grid, w, seq = _launch_args(x, weight, bias, seq_idx, backward=True)
    if dx_out is not None and (dx_out.shape != x.shape or dx_out.stride(-1) != 1):
        raise ValueError("dx_out must be shaped like x with its last dim contiguous")
    if accumulate and dx_out is None:
        raise ValueError("accumulate needs dx_out")
    dx = dx_out if dx_out is not None else torch.empty_like(x)
    n_dir = 2 if both else 1
    dw = torch.zeros(n_dir, dim, W, device=x.device, dtype=torch.float32)
    db = torch.zeros(n_dir, dim, device=x.device, dtype=torch.float32) if bias is not None else dw.new_empty(0)
    if both:
        dout2 = dout2 if dout2.stride(-1) == 1 else dout2.contiguous()
        w2 = weight2.contiguous()
        b2 = bias2 if bias2 is not None else w2
    else:
        dout2, w2, b2 = dout, w, w
    seq_arg, seq_stride = (seq, seq.stride(0)) if seq is not None else (w, 0)
    per = _grad_tiles_per_program(x, batch * grid[1], grid[2])
    _conv_bwd_kernel[(batch, grid[1], triton.cdiv(grid[2], per))](
        x, w, bias if bias is not None else w, seq_arg, dout, dx, dw[0], db[0] if bias is not None else dw,
        w2, b2, dout2, dw[-1], db[-1] if bias is not None else dw, L, dim, W, per,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), dout2.stride(0), dout2.stride(1),
        dx.stride(0), dx.stride(1), seq_stride,
        BD=BD, BT=BT, HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, HAS_SEQ=seq is not None,
        ACC=bool(accumulate), BOTH=both, num_warps=warps)
    grads = [dx]
    for i, (wt, bt) in enumerate([(weight, bias), (weight2, bias2)][:n_dir]):
        grads += [dw[i].to(wt.dtype), db[i].to(bt.dtype) if bt is not None else db]
    return grads


@torch.library.custom_op("genomamba::causal_conv1d_bwd", mutates_args=())
def _conv_bwd_op(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
                 reverse: bool) -> list[Tensor]:
    return conv_bwd(dout, x, weight, bias, seq_idx, silu, reverse)


@_conv_bwd_op.register_fake
def _(dout, x, weight, bias, seq_idx, silu, reverse):
    return [torch.empty_like(x), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, silu, reverse = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu, ctx.reverse = silu, reverse


def _conv_backward(ctx, dout):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dw, db = _conv_bwd_op(dout, x, weight, bias, seq_idx, ctx.silu, ctx.reverse)
    return dx, dw, (db if bias is not None else None), None, None, None


_conv_fwd_op.register_autograd(_conv_backward, setup_context=_conv_setup)


def causal_conv1d(x, weight, bias=None, seq_idx=None, activation=None, *, reverse=False, backend=None):
    """Depthwise conv over L. x (batch, dim, L), weight (dim, W), bias (dim,), seq_idx (batch, L).

    activation: None or "silu"/"swish". reverse=True: anti-causal (each output sees itself and the
    W-1 positions to its right).
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (dim={x.shape[1]}, width), got {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= 4:
        raise ValueError(f"conv width must be 1 to 4 (as in causal-conv1d), got {weight.shape[1]}")
    if resolve_backend(backend, x) == "torch":
        return causal_conv1d_ref(x, weight, bias, activation, seq_idx, reverse)
    seq = seq_idx.to(torch.int32) if seq_idx is not None else None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if not needs_grad and not torch.compiler.is_compiling():  # inference: no custom-op dispatch (see selective_scan)
        return _conv_fwd(x, weight, bias, seq, activation is not None, bool(reverse))
    return _conv_fwd_op(x, weight, bias, seq, activation is not None, bool(reverse))
