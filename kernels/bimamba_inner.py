"""`bimamba_inner`: the tied bidirectional Mamba mixer between in_proj and out_proj as one autograd
node on the Triton kernels (training; without gradients, inference runs its forward alone), like
mamba_ssm's `mamba_inner_fn` for one direction.

xz (batch, 2*d_inner, L) = [x; z] -> y (batch, d_inner, L): per direction, causal (reverse:
anti-causal) conv1d + SiLU, x_proj, dt_proj, selective scan gated by silu(z); the reverse scan
adds the forward one's output (out_add). Same values as the separate ops, one autograd node.
dt_proj's bias and softplus are applied in its own kernel (dt_proj_softplus), not in the scans',
and its two gradients come from one read of the scan's dt gradient (projections.py).

Why: run as separate autograd nodes, the two directions' gradients meet in elementwise additions
(four per layer: z's, the conv input's, and each direction's conv output, read by both the scan
and x_proj) and the split of xz concatenates its two gradients. Here the backward writes them in
place: both scans write dz into the z half of one dxz buffer (the second adds to what the first
wrote, inside the kernel), one conv backward computes both directions' shares of dx from one read
of x and writes their sum into its x half, and x_proj's input gradient is added to the scan's du
by its kernel (add_projection_). The forward computes both convs from one read of x too.
"""

from __future__ import annotations

import torch

from .causal_conv1d import _conv_fwd, conv_bwd
from .projections import add_projection_, dt_proj_backward, dt_proj_softplus
from .selective_scan import ChunkStates, _tile_config, selective_scan_triton_bwd, selective_scan_triton_fwd

# One direction's parameters, in this order: conv weight (d_inner, W), conv bias (d_inner,),
# x_proj weight (dt_rank + 2N, d_inner), dt_proj weight (d_inner, dt_rank), dt_proj bias (d_inner,),
# A_log (d_inner, N), D (d_inner,).
N_DIRECTION_PARAMS = 7
# Tensors the forward keeps per direction for the backward (see _inner_forward).
_SAVED = 7


def _project(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (m, k) @ x (batch, k, L) -> (batch, m, L) in x's dtype (what autocast would pick)."""
    w = weight.to(x.dtype)
    return torch.bmm(w.unsqueeze(0).expand(x.shape[0], -1, -1), x)


# torch.mm(..., out_dtype=torch.float32) for bf16 / fp16 inputs on CUDA (measured on torch 2.11; the
# project allows torch >= 2.4, where older versions take the bmm + sum path).
_MM_OUT_DTYPE = torch.__version__ >= "2.10"


def weight_grad(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over the batch of a (batch, m, L) @ b (batch, L, k), in float32: a weight's gradient.
    Batch 1 on a GPU: one GEMM with float32 output (no bf16 rounding of the product, and no
    separate reduction and cast kernels)."""
    if a.is_cuda and a.shape[0] == 1:
        if a.dtype == torch.float32:
            return torch.mm(a[0], b[0])
        if _MM_OUT_DTYPE:
            return torch.mm(a[0], b[0], out_dtype=torch.float32)
    return torch.bmm(a, b).sum(0, dtype=torch.float32)


def _decays(A_log: torch.Tensor) -> torch.Tensor:
    """A = -exp(A_log) (d_inner, N) in float32, laid out as the scan kernels read it, (N, d_inner)
    contiguous (A.t() is): two small kernels, where -exp then the scan's own transposed copy make three
    per call; the backward reuses it."""
    A_t = torch.empty(A_log.shape[1], A_log.shape[0], device=A_log.device, dtype=torch.float32)
    A = A_t.t()
    torch.exp(A_log.float(), out=A)
    return A.neg_()


def _direction_forward(xc, z, seq_idx, params, reverse, save_tiles, y_add, for_backward, scan=True,
                       keep_chunks=False):
    """One direction after its conv: x_proj, dt_proj, the scan (adding y_add inside it). Returns y
    and, when for_backward, what the backward needs (its locals are freed on return otherwise).
    scan=False: only what the backward needs (y is None, no tile states kept). keep_chunks
    (without for_backward): y and [the scan's ChunkStates]. With for_backward but not save_tiles
    (the backward rebuilds the tile states), the scan's ChunkStates take the tile states' place:
    the rebuild is then one pass from them rather than per segment."""
    cw, cb, wx, wdt, bdt, A_log, D = params
    nstate, rank = A_log.shape[1], wdt.shape[1]
    wx, wdt = wx.to(xc.dtype), wdt.to(xc.dtype)                       # cast once, kept for the backward
    xdbl = _project(wx, xc)                                           # (batch, R + 2N, L)
    dtl, B, C = torch.split(xdbl, [rank, nstate, nstate], dim=1)
    dt = dt_proj_softplus(wdt, dtl, bdt, backend="triton")            # (batch, d_inner, L), softplus'd
    A = _decays(A_log)
    tiles = None
    if scan:
        y, _, tiles, _ = selective_scan_triton_fwd(
            xc, dt, A, B, C, D.float(), z, None, False, None, reverse, seq_idx,
            save_tile_states=save_tiles, out_add=y_add,
            keep_chunk_states=keep_chunks or (for_backward and not save_tiles))
    else:
        y = None
    if not for_backward:
        return y, ([tiles] if keep_chunks else [])
    return y, [xc, xdbl, dt, tiles if tiles is not None else xc.new_empty(0, dtype=torch.float32), A, wx, wdt]


def _inner_forward(xz, seq_idx, recompute_fwd, recompute_rev, params, for_backward, scan=True, keep_chunks=False):
    """Both directions' forward: y, and per direction what the backward needs (conv output,
    x_proj output, dt, per-tile states or an empty tensor, A, the x_proj and dt_proj weights in
    the activations' dtype) when for_backward. scan=False: the latter only, no scan run.
    keep_chunks (inference): y and each direction's scan ChunkStates."""
    d = xz.shape[1] // 2
    xi, z = xz[:, :d], xz[:, d:]
    fwd_p, rev_p = params[:N_DIRECTION_PARAMS], params[N_DIRECTION_PARAMS:]
    # Both convs from one read of xi: the causal one with the forward direction's weights, the
    # anti-causal one with the reverse direction's. Each is let go once its direction is done.
    convs = list(_conv_fwd(xi, fwd_p[0], fwd_p[1], seq_idx, True, False, rev_p[0], rev_p[1]))
    saved, y = [], None
    for i, (reverse, recompute) in enumerate(((False, recompute_fwd), (True, recompute_rev))):
        xc, convs[i] = convs[i], None
        y, kept = _direction_forward(xc, z, seq_idx, params[i * N_DIRECTION_PARAMS:(i + 1) * N_DIRECTION_PARAMS],
                                     reverse, for_backward and not recompute, y, for_backward, scan, keep_chunks)
        del xc
        saved += kept
    return y, saved


def _inner_backward(xz, seq_idx, saved, params, dy, y_sink=None):
    """Gradients of both directions from what _inner_forward kept (`saved`, emptied as it goes):
    (dxz, the 14 parameter gradients). y_sink: the scans' backward also writes the summed, gated
    output y (see selective_scan_triton_bwd), into the x half of dxz, which holds nothing until
    the conv backward; y_sink(y) is called in between."""
    d = xz.shape[1] // 2
    xi, z = xz[:, :d], xz[:, d:]
    dxz = torch.empty_like(xz)
    dxi, dz = dxz[:, :d], dxz[:, d:]
    grads = [None] * (2 * N_DIRECTION_PARAMS)
    dus = [None, None]
    # The reverse direction first, as separate nodes would run: its kept states are freed
    # (under checkpointing) before the forward direction's backward rebuilds its own.
    for i in (1, 0):
        reverse, second = i == 1, i == 0
        xc, xdbl, dt, tiles, A, wx_c, wdt_c = saved[_SAVED * i:_SAVED * (i + 1)]
        saved[_SAVED * i:_SAVED * (i + 1)] = [None] * _SAVED
        cw, cb, wx, wdt, bdt, A_log, D = params[i * N_DIRECTION_PARAMS:(i + 1) * N_DIRECTION_PARAMS]
        nstate, rank = A_log.shape[1], wdt.shape[1]
        dtl, B, C = torch.split(xdbl, [rank, nstate, nstate], dim=1)
        du, ddt, dA, dB, dC, dD, _, ddb, _ = selective_scan_triton_bwd(   # ddt, ddb: dt_proj's raw output's
            dy, None, xc, dt, A, B, C, D.float(), z, None, False, None, reverse, seq_idx, tiles,
            _tile_config(nstate, xc.device), dz_out=dz, dz_accumulate=second,
            y_out=dxi if y_sink is not None else None, delta_pre_softplus=True)
        del tiles, dt
        ddtl, dwdt = dt_proj_backward(ddt, dtl, wdt_c, backend="triton")   # one read of ddt
        del ddt
        dxdbl = torch.cat([ddtl, dB.to(du.dtype), dC.to(du.dtype)], dim=1)   # (batch, R + 2N, L)
        del ddtl, dB, dC
        dwx = weight_grad(dxdbl, xc.transpose(1, 2))
        add_projection_(du, wx_c.to(du.dtype).t(), dxdbl, backend="triton")   # + x_proj's input gradient
        del dxdbl, xc
        dus[i] = du                                                   # the conv output's gradient
        del du
        grads[i * N_DIRECTION_PARAMS + 2:(i + 1) * N_DIRECTION_PARAMS] = [
            dwx.to(wx.dtype), dwdt.to(wdt.dtype), ddb.to(bdt.dtype), (dA * A).to(A_log.dtype), dD.to(D.dtype)]
    if y_sink is not None:
        y_sink(dxi)
    # Both convs' backward in one pass over xi, writing dx into the x half of dxz.
    (cw, cb), (cw_r, cb_r) = params[0:2], params[N_DIRECTION_PARAMS:N_DIRECTION_PARAMS + 2]
    _, dcw, dcb, dcw_r, dcb_r = conv_bwd(dus[0], xi, cw, cb, seq_idx, True, False, dx_out=dxi,
                                         dout2=dus[1], weight2=cw_r, bias2=cb_r)
    del dus
    grads[0:2] = [dcw.to(cw.dtype), dcb.to(cb.dtype) if cb is not None else None]
    grads[N_DIRECTION_PARAMS:N_DIRECTION_PARAMS + 2] = [dcw_r.to(cw_r.dtype),
                                                        dcb_r.to(cb_r.dtype) if cb_r is not None else None]
    return dxz, grads


class _BiMambaInner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xz, seq_idx, recompute_fwd, recompute_rev, *params):
        y, saved = _inner_forward(xz, seq_idx, recompute_fwd, recompute_rev, params, True)
        # A recomputing direction keeps its scan's ChunkStates (~9 MiB at 1 Mb) where the other
        # keeps tile states: saved as their tensor, the chunk length aside
        ctx.chunk_tiles = [None, None]
        for i in (0, 1):
            kept = saved[_SAVED * i + 3]
            if isinstance(kept, ChunkStates):
                ctx.chunk_tiles[i], saved[_SAVED * i + 3] = kept.chunk_tiles, kept.states
        ctx.save_for_backward(xz, seq_idx, *saved, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        xz, seq_idx, *rest = ctx.saved_tensors
        saved, params = rest[:2 * _SAVED], rest[2 * _SAVED:]
        del rest
        for i, chunk_tiles in enumerate(ctx.chunk_tiles):
            if chunk_tiles is not None:
                saved[_SAVED * i + 3] = ChunkStates(saved[_SAVED * i + 3], chunk_tiles)
        dxz, grads = _inner_backward(xz, seq_idx, saved, params, dy)
        return (dxz, None, None, None, *grads)


def bimamba_inner_forward_keeping_chunks(xz: torch.Tensor, fwd_params, rev_params,
                                         seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """bimamba_inner's forward without autograd that also returns both scans' ChunkStates (the
    state entering each forward chunk, a few MiB), for bimamba_inner_backward_rebuilt."""
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    with torch.no_grad():
        return _inner_forward(xz, seq, False, False, (*fwd_params, *rev_params), False, keep_chunks=True)


def bimamba_inner_backward_rebuilt(xz: torch.Tensor, fwd_params, rev_params, seq_idx: torch.Tensor | None,
                                   dy: torch.Tensor, y_sink, chunk_states=None) -> tuple[torch.Tensor, list]:
    """bimamba_inner's backward when its forward kept nothing (a checkpointed layer's backward):
    recomputes both convs, x_proj and dt_proj from xz, but not the scans' forward. Both scans'
    backward rebuild their tile states (in one pass from chunk_states, the two directions'
    ChunkStates from bimamba_inner_forward_keeping_chunks; else per segment), and also write the
    summed gated output y, which the caller needs for out_proj's weight gradient: y_sink(y) is
    called with it (a view valid only during the call). Returns (dxz, the 14 parameter gradients
    in fwd_params + rev_params order).

    Why: in a checkpointed layer the forward is run twice, once to get the layer's output and
    again in the backward to recompute what the gradients need. The second scan forward per
    direction (a chunk-state pass and an output pass) only produces y, which the scan's backward
    computes anyway; the rebuild of the tile states costs one chunk-state pass.
    """
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    params = (*fwd_params, *rev_params)
    _, saved = _inner_forward(xz, seq, True, True, params, True, scan=False)
    for i, chunks in enumerate(chunk_states or ()):
        saved[_SAVED * i + 3] = chunks               # in place of the empty tile-state tensor
    return _inner_backward(xz, seq, saved, params, dy, y_sink)


def bimamba_inner(xz: torch.Tensor, fwd_params, rev_params, seq_idx: torch.Tensor | None = None,
                  recompute_fwd: bool = False, recompute_rev: bool = False) -> torch.Tensor:
    """xz (batch, 2*d_inner, L), last dim contiguous -> y (batch, d_inner, L), both directions summed.

    fwd_params / rev_params: each direction's 7 tensors (conv weight, conv bias, x_proj weight,
    dt_proj weight, dt_proj bias, A_log, D), parameters of the module that owns them. Softplus on
    dt as in Mamba. recompute_*: that direction's scan keeps only the state entering each of its
    chunks (a few MiB), from which its backward rebuilds the per-tile states in one pass (see
    `selective_scan(recompute_states=)`). Triton only (CUDA tensors, or TRITON_INTERPRET=1).
    """
    if len(fwd_params) != N_DIRECTION_PARAMS or len(rev_params) != N_DIRECTION_PARAMS:
        raise ValueError(f"each direction takes {N_DIRECTION_PARAMS} parameters")
    if xz.dim() != 3 or xz.shape[1] % 2 or xz.stride(-1) != 1:
        raise ValueError(f"xz must be (batch, 2*d_inner, L) with L contiguous, got {tuple(xz.shape)}")
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    params = (*fwd_params, *rev_params)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (xz, *params))):
        return _inner_forward(xz, seq, False, False, params, False)[0]   # nothing to keep for a backward
    return _BiMambaInner.apply(xz, seq, bool(recompute_fwd), bool(recompute_rev), *params)
