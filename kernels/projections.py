"""Low-rank projections over long sequences, with what surrounds them fused in (Triton).

A Mamba direction's dt_proj maps a rank-R projection (R = dt_rank, 16 at d_model 256) to one step
size per channel, and x_proj's input gradient maps the (R + 2N)-row gradient back to the channels.
Both are GEMMs with an inner dimension of 16-64 over ~10^6 positions: memory-bound passes, so
what matters is touching each big tensor once.

- `dt_proj_softplus(W, dt_low, b)`: dt = softplus(W @ dt_low + b) in the GEMM's epilogue. The scan
  kernels then read dt as it is: the five scan passes of a training step (chunk states, output,
  the backward's rebuild, adjoint and main kernel) each skip a softplus (two MUFU operations and
  a few more per channel and step, 7-10% of the forward-type passes' instructions;
  kernels/BENCHMARKS.md). The scan's backward turns its dt gradient into the pre-activation's
  from dt alone (softplus' = 1 - exp(-dt); `selective_scan_triton_bwd(delta_pre_softplus=True)`).
  Rounding: dt is rounded to the input dtype once, after the softplus, where the scan's own
  softplus read a rounded pre-activation (bf16: that moved small dt by up to ~1%; dt's own
  rounding moves it by at most 0.4%).
- `dt_proj_backward(g, dt_low, W)`: both of dt_proj's gradients (input and weight) from one read
  of the (channels x positions) gradient g, where two GEMMs read it twice.
- `add_projection_(out, W, x)`: out += W @ x with out read and written once by the kernel
  (cuBLAS's in-place baddbmm ran at ~1.75 TB/s here).

Each has a PyTorch reference; the Triton path runs on CUDA tensors (and under the interpreter).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .selective_scan import _interpreting, _last_contig, resolve_backend
from .selective_scan_triton import _exp2, _log2


def dt_proj_softplus_ref(weight: torch.Tensor, dt_low: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The specification: softplus(weight @ dt_low + bias) in float32, returned in dt_low's dtype."""
    raw = torch.matmul(weight.float(), dt_low.float()) + bias.float()[:, None]
    return F.softplus(raw).to(dt_low.dtype)


def dt_proj_backward_ref(g: torch.Tensor, dt_low: torch.Tensor, weight: torch.Tensor):
    """(weight^T @ g in g's dtype, sum over the batch of g @ dt_low^T in float32)."""
    d_low = torch.matmul(weight.float().t(), g.float()).to(g.dtype)
    d_weight = torch.matmul(g.float(), dt_low.float().transpose(1, 2)).sum(0)
    return d_low, d_weight


@triton.jit
def _softplus_f32(raw, FAST: tl.constexpr):
    """softplus as torch computes it (linear above 20), keeping small values' digits: log1p(e) by
    its series below e = 1/16 (relative error < 3e-6), where log2(1 + e) would lose e's low bits
    (and lg2.approx, absolute error 2^-22 near 1, most of them)."""
    e = _exp2(tl.minimum(raw, 20.0) * 1.4426950408889634, FAST)
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * 0.25)))
    big = _log2(1.0 + e, FAST) * 0.6931471805599453
    return tl.where(raw > 20.0, raw, tl.where(e < 0.0625, series, big))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32. IEEE: float32 inputs, or the interpreter (its bf16 tl.dot is
    wrong: Triton 3.9), as exact float32 products; else bf16 / fp16 products (exact too)."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _project_kernel(w_ptr, x_ptr, b_ptr, out_ptr, D, R, L, s_w_d, s_w_r, s_x_b, s_x_r, s_o_b, s_o_d,
                    BD: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr,
                    FAST: tl.constexpr, SOFTPLUS: tl.constexpr):
    """One (BD channels, BL positions) block of W @ x: SOFTPLUS, softplus(. + bias) stored; else
    added to what out holds. Channel blocks are grid axis 0, so the programs that share a block
    of x run together and read it once from memory."""
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = (tl.program_id(0) * BD + tl.arange(0, BD)).to(tl.int64)
    offs_l = (tl.program_id(1) * BL + tl.arange(0, BL)).to(tl.int64)
    mask_d, mask_l = offs_d < D, offs_l < L
    acc = tl.zeros((BD, BL), dtype=tl.float32)
    for r0 in range(0, R, BR):
        offs_r = r0 + tl.arange(0, BR)
        mask_r = offs_r < R
        w = tl.load(w_ptr + offs_d[:, None] * s_w_d + offs_r[None, :] * s_w_r,
                    mask=mask_d[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptr + pid_b * s_x_b + offs_r[:, None] * s_x_r + offs_l[None, :],
                    mask=mask_r[:, None] & mask_l[None, :], other=0.0)
        acc += _dot(w.to(x.dtype), x, IEEE)
    o_ptrs = out_ptr + pid_b * s_o_b + offs_d[:, None] * s_o_d + offs_l[None, :]
    mask = mask_d[:, None] & mask_l[None, :]
    if SOFTPLUS:
        out = _softplus_f32(acc + tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None], FAST)
    else:
        out = acc + tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dt_proj_bwd_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, D, R, L, BLOCKS_PER_PROG,
                        s_g_b, s_g_d, s_x_b, s_x_r, s_w_d, s_dx_b, s_dx_r,
                        BD: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr):
    """A run of BLOCKS_PER_PROG blocks of BL positions, all D (<= BD) channels at once: per block
    dx = W^T @ g stored, and g @ x^T summed into this program's row of dw (summed afterwards)."""
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BD).to(tl.int64)
    offs_r = tl.arange(0, BR)
    mask_d, mask_r = offs_d < D, offs_r < R
    w = tl.load(w_ptr + offs_d[:, None] * s_w_d + offs_r[None, :], mask=mask_d[:, None] & mask_r[None, :],
                other=0.0)
    w_t = tl.trans(w.to(g_ptr.dtype.element_ty))                          # (BR, BD)
    dw = tl.zeros((BD, BR), dtype=tl.float32)
    for i in range(BLOCKS_PER_PROG):
        offs_l = ((pid * BLOCKS_PER_PROG + i) * BL + tl.arange(0, BL)).to(tl.int64)
        mask_l = offs_l < L
        g = tl.load(g_ptr + pid_b * s_g_b + offs_d[:, None] * s_g_d + offs_l[None, :],
                    mask=mask_d[:, None] & mask_l[None, :], other=0.0)  # (BD, BL)
        x = tl.load(x_ptr + pid_b * s_x_b + offs_r[None, :] * s_x_r + offs_l[:, None],
                    mask=mask_r[None, :] & mask_l[:, None], other=0.0)  # (BL, BR): x^T
        dx = _dot(w_t, g, IEEE)
        tl.store(dx_ptr + pid_b * s_dx_b + offs_r[:, None] * s_dx_r + offs_l[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_l[None, :])
        dw += _dot(g, x.to(g.dtype), IEEE)
    row = pid_b * tl.num_programs(0) + pid
    tl.store(dw_ptr + row * BD * BR + offs_d[:, None] * BR + offs_r[None, :], dw)


def _ieee(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or not x.is_cuda


# (channels, positions, warps) per program of _project_kernel on a GPU; GENOMAMBA_PROJ_BLOCKS=
# "BD,BL,warps" for tuning. 64 x 128 x 4 was the fastest of 12 shapes for dt_proj_softplus at
# (1, 512, 16, 2^20) bf16 on an H100 (kernels/BENCHMARKS.md, seventeenth session).
_GPU_BLOCKS = (64, 128, 4)


def _blocks(x: torch.Tensor) -> tuple[int, int, int]:
    override = os.environ.get("GENOMAMBA_PROJ_BLOCKS")
    if override:
        bd, bl, warps = (int(v) for v in override.split(","))
        return bd, bl, warps
    return _GPU_BLOCKS if x.is_cuda else (16, 16, 1)


def _launch_project(weight, x, out, bias):
    D, R = weight.shape
    batch, _, L = x.shape
    bd, bl, warps = _blocks(x)
    br = max(16, min(64, triton.next_power_of_2(R)))   # tl.dot's inner dimension is at least 16
    _project_kernel[(triton.cdiv(D, bd), triton.cdiv(L, bl), batch)](
        weight, x, bias if bias is not None else weight, out, D, R, L, weight.stride(0), weight.stride(1),
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BD=bd, BL=bl, BR=br, IEEE=_ieee(x), FAST=x.is_cuda and not _interpreting(), SOFTPLUS=bias is not None,
        num_warps=warps)


def _check(weight, x, what):
    D, R = weight.shape
    if x.dim() != 3 or x.shape[1] != R:
        raise ValueError(f"{what}: weight {tuple(weight.shape)} and x {tuple(x.shape)} do not make "
                         f"(D, R) @ (batch, R, L)")


def dt_proj_softplus(weight: torch.Tensor, dt_low: torch.Tensor, bias: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """softplus(weight @ dt_low + bias): weight (D, R), dt_low (batch, R, L) with L contiguous
    (a row slice of x_proj's output is), bias (D,) -> dt (batch, D, L) in dt_low's dtype,
    accumulated and activated in float32. No autograd: bimamba_inner's backward differentiates
    it (see the module docstring)."""
    _check(weight, dt_low, "dt_proj_softplus")
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"dt_proj_softplus: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if resolve_backend(backend, dt_low) == "torch":
        return dt_proj_softplus_ref(weight, dt_low, bias)
    x = _last_contig(dt_low)
    out = torch.empty(x.shape[0], weight.shape[0], x.shape[2], device=x.device, dtype=x.dtype)
    _launch_project(weight, x, out, bias)
    return out


def add_projection_(out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, *,
                    backend: str | None = None) -> torch.Tensor:
    """out += weight @ x in place: out (batch, D, L) and x (batch, R, L), L contiguous; weight
    (D, R) any strides (x_proj's weight transposed is a view). Accumulated in float32, rounded
    once to out's dtype. Returns out."""
    _check(weight, x, "add_projection_")
    if out.shape != (x.shape[0], weight.shape[0], x.shape[2]) or out.stride(-1) != 1:
        raise ValueError(f"add_projection_: out {tuple(out.shape)} must be (batch, D, L) with L contiguous")
    if resolve_backend(backend, x) == "torch":
        out.copy_((out.float() + torch.matmul(weight.float(), x.float())).to(out.dtype))
        return out
    _launch_project(weight, _last_contig(x), out, None)
    return out


# Positions per block and warps of _dt_proj_bwd_kernel (all channels per program): at (1, 512, 16,
# 2^20) bf16 on an H100, 0.461 ms (64, 8) against 0.666 (32, 8), 0.662 (32, 4), 0.931 (16, 4) and
# 0.778 ms for the two GEMMs it replaces (seventeenth session).
_BWD_BL, _BWD_WARPS, _BWD_MAX_CHANNELS = 64, 8, 1024


def dt_proj_backward(g: torch.Tensor, dt_low: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None):
    """dt_proj's gradients from g (batch, D, L), the gradient of its output: (weight^T @ g in g's
    dtype, (batch, R, L); sum over the batch of g @ dt_low^T in float32, (D, R)). One read of g;
    above 1,024 channels, for float32 on a GPU, or on the PyTorch path, the two products as
    separate GEMMs."""
    _check(weight, dt_low, "dt_proj_backward")
    D, R = weight.shape
    if g.shape != (dt_low.shape[0], D, dt_low.shape[2]):
        raise ValueError(f"dt_proj_backward: g {tuple(g.shape)} must be (batch, {D}, L)")
    if resolve_backend(backend, g) == "torch" or D > _BWD_MAX_CHANNELS or R > 64 or \
            (g.is_cuda and g.dtype == torch.float32):   # float32: the pipelined blocks overflow shared memory
        return dt_proj_backward_ref(g, dt_low, weight)
    g, x = _last_contig(g), _last_contig(dt_low)
    w = _last_contig(weight)
    batch, _, L = g.shape
    bd, br = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(R))
    # g's block is a tl.dot operand in shared memory, kept per pipeline stage: at most 64 KiB of it
    # (bf16: 64 positions at 512 channels, 32 at 1,024)
    bl = max(16, min(_BWD_BL, 65536 // (bd * g.element_size()))) if g.is_cuda else 16
    n_blocks = triton.cdiv(L, bl)
    target = 4 * torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 4
    per = triton.cdiv(n_blocks, max(1, min(n_blocks, triton.cdiv(target, batch))))
    progs = triton.cdiv(n_blocks, per)
    d_low = torch.empty(batch, R, L, device=g.device, dtype=g.dtype)
    dw_rows = torch.empty(batch * progs, bd, br, device=g.device, dtype=torch.float32)
    _dt_proj_bwd_kernel[(progs, batch)](
        g, x, w, d_low, dw_rows, D, R, L, per, g.stride(0), g.stride(1), x.stride(0), x.stride(1), w.stride(0),
        d_low.stride(0), d_low.stride(1), BD=bd, BL=bl, BR=br, IEEE=_ieee(g),
        num_warps=_BWD_WARPS if g.is_cuda else 1)
    return d_low, dw_rows.sum(0)[:D, :R]
