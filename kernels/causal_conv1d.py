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
def _tap(x_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, j, L,
         REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x at t - j (causal) or t + j (reverse), zero outside [0, L) or across a sequence boundary."""
    if REVERSE:
        src = t + j
    else:
        src = t - j
    ok = (src >= 0) & (src < L)
    if HAS_SEQ:
        s_src = tl.load(seq_ptr + pid_b * s_seq_b + src, mask=ok, other=-1)
        ok = ok & (s_src == seq_t)
    return tl.load(x_ptr + row + src[None, :], mask=mask_d[:, None] & ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_pre(x_ptr, w_ptr, b_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, L, W,
              WP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
              HAS_BIAS: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Pre-activation conv output at positions t, (BD, BT), float32."""
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * s_seq_b + t, mask=(t >= 0) & (t < L), other=-2)
    else:
        seq_t = t
    acc = tl.zeros((BD, BT), dtype=tl.float32)
    for k in tl.static_range(WP):
        if k < W:
            wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
            acc += wk[:, None] * _tap(x_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, W - 1 - k, L,
                                      REVERSE, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, L, DIM, W,
                     s_x_b, s_x_d, s_o_b, s_o_d, s_seq_b,
                     WP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SILU: tl.constexpr, REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
    t = (tl.program_id(2) * BT + tl.arange(0, BT)).to(tl.int64)
    mask_d = offs_d < DIM
    row = pid_b * s_x_b + offs_d[:, None] * s_x_d
    acc = _conv_pre(x_ptr, w_ptr, b_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, L, W,
                    WP, BD, BT, HAS_BIAS, REVERSE, HAS_SEQ)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(out_ptr + pid_b * s_o_b + offs_d[:, None] * s_o_d + t[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_d[:, None] & (t < L)[None, :])


@triton.jit
def _tap_w(x_ptr, w_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, j: tl.constexpr, L, W,
           REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Tap at shift j of outputs t and its weight w[:, W-1-j]; both 0 when j >= W."""
    m = mask_d & ((offs_d * 0 + j) < W)  # a tensor test: the interpreter takes no scalar one in a mask
    x = _tap(x_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, m, t, seq_t, j, L, REVERSE, HAS_SEQ)
    return x, tl.load(w_ptr + offs_d * W + (W - 1 - j), mask=m, other=0.0).to(tl.float32)


@triton.jit
def _conv_grad_kernel(x_ptr, w_ptr, b_ptr, seq_ptr, dout_ptr, g_ptr, dw_ptr, db_ptr, L, DIM, W, TILES_PER_PROG,
                      s_x_b, s_x_d, s_do_b, s_do_d, s_g_b, s_g_d, s_seq_b,
                      BD: tl.constexpr, BT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                      REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Backward pass 1: g = dL/d(pre-activation) (dout * silu'(pre), written in float32 when SILU so
    that pass 2 reads it at W shifts instead of recomputing the conv), and dw, dbias from the same
    taps. The program walks TILES_PER_PROG time tiles, so dw and dbias are summed in registers and
    added atomically once per program. Widths up to 4 (the taps are kept as four register tiles:
    each shifted load is unaligned, so loading a tap twice costs as much as the arithmetic)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    row = pid_b * s_x_b + offs_d[:, None] * s_x_d
    cols = tl.arange(0, 4)
    dw = tl.zeros((BD, 4), dtype=tl.float32)
    db = tl.zeros((BD,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    k_first = tl.program_id(2).to(tl.int64) * TILES_PER_PROG
    for i in range(0, TILES_PER_PROG):
        t = (k_first + i) * BT + tl.arange(0, BT).to(tl.int64)
        in_t = t < L
        m = mask_d[:, None] & in_t[None, :]
        if HAS_SEQ:
            seq_t = tl.load(seq_ptr + pid_b * s_seq_b + t, mask=in_t, other=-2)
        else:
            seq_t = t
        x0, w0 = _tap_w(x_ptr, w_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, 0, L, W, REVERSE, HAS_SEQ)
        x1, w1 = _tap_w(x_ptr, w_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, 1, L, W, REVERSE, HAS_SEQ)
        x2, w2 = _tap_w(x_ptr, w_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, 2, L, W, REVERSE, HAS_SEQ)
        x3, w3 = _tap_w(x_ptr, w_ptr, seq_ptr, s_seq_b, pid_b, row, offs_d, mask_d, t, seq_t, 3, L, W, REVERSE, HAS_SEQ)
        g = tl.load(dout_ptr + pid_b * s_do_b + offs_d[:, None] * s_do_d + t[None, :], mask=m, other=0.0).to(tl.float32)
        if SILU:
            pre = w0[:, None] * x0 + w1[:, None] * x1 + w2[:, None] * x2 + w3[:, None] * x3
            if HAS_BIAS:
                pre += bias[:, None]
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
            tl.store(g_ptr + pid_b * s_g_b + offs_d[:, None] * s_g_d + t[None, :], g, mask=m)
        db += tl.sum(g, axis=1)
        # column W-1-j of dw takes the tap at shift j
        dw += tl.where((cols == W - 1)[None, :], tl.sum(g * x0, axis=1)[:, None], 0.0)
        dw += tl.where((cols == W - 2)[None, :], tl.sum(g * x1, axis=1)[:, None], 0.0)
        dw += tl.where((cols == W - 3)[None, :], tl.sum(g * x2, axis=1)[:, None], 0.0)
        dw += tl.where((cols == W - 4)[None, :], tl.sum(g * x3, axis=1)[:, None], 0.0)
    tl.atomic_add(dw_ptr + offs_d[:, None] * W + cols[None, :], dw, mask=mask_d[:, None] & (cols < W)[None, :])
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_d, db, mask=mask_d)


@triton.jit
def _conv_dx_kernel(w_ptr, seq_ptr, g_ptr, dx_ptr, L, DIM, W, s_g_b, s_g_d, s_dx_b, s_dx_d, s_seq_b,
                    WP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                    REVERSE: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr):
    """Backward pass 2: dx(t) = sum_k w_k g(t +/- j), j = W-1-k, over the outputs whose tap k read
    x(t) from the same sequence (the mirrored conv of g). ACC: added to what dx holds."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
    t = (tl.program_id(2) * BT + tl.arange(0, BT)).to(tl.int64)
    mask_d = offs_d < DIM
    in_t = t < L
    grow = pid_b * s_g_b + offs_d[:, None] * s_g_d
    if HAS_SEQ:
        seq_t = tl.load(seq_ptr + pid_b * s_seq_b + t, mask=in_t, other=-2)
    dx = tl.zeros((BD, BT), dtype=tl.float32)
    for k in tl.static_range(WP):
        if k < W:
            j = W - 1 - k
            if REVERSE:
                tt = t - j
            else:
                tt = t + j
            ok = (tt >= 0) & (tt < L)
            gk = tl.load(g_ptr + grow + tt[None, :], mask=mask_d[:, None] & ok[None, :], other=0.0).to(tl.float32)
            if HAS_SEQ:
                s_tt = tl.load(seq_ptr + pid_b * s_seq_b + tt, mask=ok, other=-3)
                gk = tl.where((s_tt == seq_t)[None, :], gk, 0.0)
            wk = tl.load(w_ptr + offs_d * W + k, mask=mask_d, other=0.0).to(tl.float32)
            dx += wk[:, None] * gk
    dx_off = pid_b * s_dx_b + offs_d[:, None] * s_dx_d + t[None, :]
    if ACC:
        dx += tl.load(dx_ptr + dx_off, mask=mask_d[:, None] & in_t[None, :], other=0.0).to(tl.float32)
    tl.store(dx_ptr + dx_off, dx.to(dx_ptr.dtype.element_ty), mask=mask_d[:, None] & in_t[None, :])


def _blocks(x):
    """(channels, time steps, warps) per program; GENOMAMBA_CONV_BLOCKS="BD,BT,warps" overrides (tuning)."""
    if x.device.type != "cuda":
        return (4, 16, 1)
    override = os.environ.get("GENOMAMBA_CONV_BLOCKS")
    return tuple(int(v) for v in override.split(",")) if override else (4, 256, 4)


def _grad_tiles_per_program(x, n_rows, n_tiles):
    """Time tiles walked by one program of backward pass 1: enough programs to fill the GPU (~8 per
    SM) and as few atomic additions of dw / dbias as that allows. 2 on the CPU (tests cover the loop)."""
    if x.device.type != "cuda":
        return 2
    return max(1, min(16, n_tiles * n_rows // _target_programs(x.device)))


def _launch_args(x, weight, bias, seq_idx):
    batch, dim, L = x.shape
    W = weight.shape[1]
    BD, BT, warps = _blocks(x)
    grid = (batch, triton.cdiv(dim, BD), triton.cdiv(L, BT))
    w = weight.contiguous()
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    return batch, dim, L, W, BD, BT, warps, grid, w, seq


Tensor = torch.Tensor


def _conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
              reverse: bool) -> Tensor:
    """The forward launch (the custom op below wraps it; inference calls it directly)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    batch, dim, L, W, BD, BT, warps, grid, w, seq = _launch_args(x, weight, bias, seq_idx)
    out = torch.empty_like(x)
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else w, seq if seq is not None else w, out, L, dim, W,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), seq.stride(0) if seq is not None else 0,
        WP=triton.next_power_of_2(W), BD=BD, BT=BT, HAS_BIAS=bias is not None, SILU=silu,
        REVERSE=reverse, HAS_SEQ=seq is not None, num_warps=warps)
    return out


@torch.library.custom_op("genomamba::causal_conv1d_fwd", mutates_args=())
def _conv_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
                 reverse: bool) -> Tensor:
    return _conv_fwd(x, weight, bias, seq_idx, silu, reverse)


@_conv_fwd_op.register_fake
def _(x, weight, bias, seq_idx, silu, reverse):
    return torch.empty_like(x)


def conv_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None, silu: bool,
             reverse: bool, dx_out: Tensor | None = None, accumulate: bool = False) -> list[Tensor]:
    """The backward launches: [dx, dweight, dbias (empty without bias)]. dx_out (like x, last dim
    contiguous): where dx is written; with accumulate, dx is added to what it holds (one input
    read by two convs, as in a bidirectional block)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    batch, dim, L, W, BD, BT, warps, grid, w, seq = _launch_args(x, weight, bias, seq_idx)
    if dx_out is not None and (dx_out.shape != x.shape or dx_out.stride(-1) != 1):
        raise ValueError("dx_out must be shaped like x with its last dim contiguous")
    if accumulate and dx_out is None:
        raise ValueError("accumulate needs dx_out")
    dx = dx_out if dx_out is not None else torch.empty_like(x)
    dw = torch.zeros(dim, W, device=x.device, dtype=torch.float32)
    db = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else dw.new_empty(0)
    g = torch.empty(x.shape, device=x.device, dtype=torch.float32) if silu else dout
    seq_arg, seq_stride = (seq, seq.stride(0)) if seq is not None else (w, 0)
    per = _grad_tiles_per_program(x, batch * grid[1], grid[2])
    _conv_grad_kernel[(batch, grid[1], triton.cdiv(grid[2], per))](
        x, w, bias if bias is not None else w, seq_arg, dout, g, dw, db if bias is not None else dw, L, dim, W, per,
        x.stride(0), x.stride(1), dout.stride(0), dout.stride(1), g.stride(0), g.stride(1), seq_stride,
        BD=BD, BT=BT, HAS_BIAS=bias is not None, SILU=silu, REVERSE=reverse, HAS_SEQ=seq is not None,
        num_warps=warps)
    _conv_dx_kernel[grid](
        w, seq_arg, g, dx, L, dim, W, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1), seq_stride,
        WP=triton.next_power_of_2(W), BD=BD, BT=BT, REVERSE=reverse, HAS_SEQ=seq is not None, ACC=bool(accumulate),
        num_warps=warps)
    return [dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else db]


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
