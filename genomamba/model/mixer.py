"""Mamba mixer and the bidirectional (Caduceus) mixer on the genomamba_kernels ops.

Shapes: x (batch, L, d); inside, channels-first (batch, d_inner, L) as the kernels want.
The reverse direction runs the conv and the scan with reverse=True: no flipped activations.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from genomamba_kernels import bimamba_inner, causal_conv1d, selective_scan
from genomamba_kernels.bimamba_inner import bimamba_inner_forward_keeping_chunks, weight_grad
from genomamba_kernels.selective_scan import resolve_backend


def project_channels_first(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight (m, k) applied to x (batch, k, L) -> (batch, m, L), L contiguous.

    A batched GEMM whose weight operand has batch stride 0: torch.matmul(weight, x) folds the
    batch into the GEMM and then copies its transposed result to contiguous memory with a generic
    strided kernel (measured on H100: 75% of a 1 Mb inference).
    """
    return torch.bmm(weight.unsqueeze(0).expand(x.shape[0], -1, -1), x)


class _InProjection(torch.autograd.Function):
    """x (batch, L, k) -> weight @ x^T (batch, m, L): the in_proj, from the residual layout to the
    channels-first one the kernels read. Its own backward returns dx as (batch, L, k), contiguous:
    autograd through x.transpose(1, 2) hands back a transposed gradient, and the norm's backward
    then copies it (a strided copy per layer: 3.6 ms of a 131 kb training step on an H100)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return project_channels_first(weight, x.transpose(1, 2))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w = weight.unsqueeze(0).expand(g.shape[0], -1, -1)
        dx = torch.bmm(g.transpose(1, 2), w) if ctx.needs_input_grad[0] else None       # (batch, L, k)
        dw = weight_grad(g, x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def project_channels_last(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight (m, k) applied to y (batch, k, L) -> (batch, L, m): out_proj back to the residual layout."""
    return torch.bmm(y.transpose(1, 2), weight.t().unsqueeze(0).expand(y.shape[0], -1, -1))


class SSMDirection(nn.Module):
    """The per-direction parameters of a Mamba mixer: conv1d, x_proj, dt_proj, A_log, D."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, dt_min: float, dt_max: float,
                 dt_init_floor: float, recompute_states: bool = False):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        # With gradient checkpointing: the scan's backward rebuilds its per-tile states instead of
        # the forward keeping them (both directions' states would otherwise be live at once).
        self.recompute_states = recompute_states
        self.conv_weight = nn.Parameter(torch.empty(d_inner, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(d_inner))
        bound = 1 / math.sqrt(d_conv)  # nn.Conv1d's default init for a depthwise conv
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank ** -0.5, dt_rank ** -0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real: A = -(1, 2, ..., N) for every channel; A = -exp(A_log).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def conv(self, xi, seq_idx=None, reverse=False):
        """Depthwise conv + SiLU; anti-causal for the reverse direction."""
        return causal_conv1d(xi, self.conv_weight, self.conv_bias, seq_idx, activation="silu", reverse=reverse)

    def scan(self, x, z, *, seq_idx=None, reverse=False, initial_state=None, return_last_state=False, out_add=None):
        """x (after conv), z: (batch, d_inner, L) -> x_proj, dt_proj, selective scan, gate by silu(z)
        (plus out_add, added inside the scan's output pass)."""
        # Channels-first products (W @ x) keep L contiguous, so the kernels need no copies.
        x_dbl = project_channels_first(self.x_proj.weight, x)                       # (batch, R + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = project_channels_first(self.dt_proj.weight, dt)                        # (batch, d_inner, L)
        A = -torch.exp(self.A_log.float())
        return selective_scan(x, dt, A, B, C, self.D.float(), z, delta_bias=self.dt_proj.bias.float(),
                              delta_softplus=True, return_last_state=return_last_state,
                              initial_state=initial_state, reverse=reverse, seq_idx=seq_idx,
                              recompute_states=self.recompute_states, out_add=out_add)

    def forward(self, xi, z, *, seq_idx=None, reverse=False, out_add=None):
        """xi, z: (batch, d_inner, L) -> y (batch, d_inner, L), plus out_add if given."""
        return self.scan(self.conv(xi, seq_idx, reverse), z, seq_idx=seq_idx, reverse=reverse, out_add=out_add)

    def inner_params(self) -> tuple:
        """The 7 tensors `bimamba_inner` takes for one direction."""
        return (self.conv_weight, self.conv_bias, self.x_proj.weight, self.dt_proj.weight, self.dt_proj.bias,
                self.A_log, self.D)


def _joint_wanted(x: torch.Tensor) -> bool:
    """On the Triton path, the tied bidirectional core runs as `bimamba_inner`: in training one
    autograd node; in inference too, for its conv of both directions from one read of x (1 Mb
    model inference 0-2% faster on an H100, same peak memory: kernels/BENCHMARKS.md).
    GENOMAMBA_MIXER_AUTOGRAD=modular keeps one op (and autograd node) per step (A/B, tests)."""
    mode = os.environ.get("GENOMAMBA_MIXER_AUTOGRAD", "joint")
    if mode not in ("joint", "modular"):
        raise ValueError(f"GENOMAMBA_MIXER_AUTOGRAD must be 'joint' or 'modular', got {mode!r}")
    return mode == "joint" and not torch.compiler.is_compiling() and resolve_backend(None, x) == "triton"


class BiMambaMixer(nn.Module):
    """in_proj -> [forward direction (+ reverse direction)] -> out_proj, directions added.

    With tied projections (Caduceus) the reverse direction reads the same in_proj output, so it
    is computed once, and out_proj (linear, no bias) is applied once to the sum.
    """

    def __init__(self, d_model: int, cfg):
        super().__init__()
        d_inner = cfg.expand * d_model
        self.d_inner, self.d_conv = d_inner, cfg.d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        args = (d_inner, cfg.d_state, cfg.d_conv, cfg.resolved_dt_rank, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        # Scan-state rebuild (see BiMambaConfig.recompute_scan_states). Left to the default, only the
        # forward direction rebuilds under checkpointing: the reverse direction's backward runs first
        # (its scan is the later node) and frees its kept states before the forward direction's are
        # rebuilt, so keeping them adds no peak memory and saves half the rebuilds.
        rebuild = cfg.gradient_checkpointing if cfg.recompute_scan_states is None else cfg.recompute_scan_states
        self.fwd = SSMDirection(*args, recompute_states=rebuild)
        self.rev = SSMDirection(*args, recompute_states=rebuild and cfg.recompute_scan_states is not None) \
            if cfg.bidirectional else None
        self.untied = cfg.bidirectional and not cfg.tie_in_out_proj
        if self.untied:
            self.in_proj_rev = nn.Linear(d_model, 2 * d_inner, bias=False)
            self.out_proj_rev = nn.Linear(d_inner, d_model, bias=False)

    def _split(self, proj, x):
        xz = _InProjection.apply(x, proj.weight)                                    # (batch, 2*d_inner, L)
        # torch.split, not two slices: its backward concatenates the two gradients in one pass, where
        # each slice's backward fills a full-size zero tensor, copies into it, and the two are added.
        return torch.split(xz, self.d_inner, dim=1)

    def forward(self, x, seq_idx=None):
        if self.rev is not None and not self.untied and _joint_wanted(x):
            xz = _InProjection.apply(x, self.in_proj.weight)                        # (batch, 2*d_inner, L)
            y = bimamba_inner(xz, self.fwd.inner_params(), self.rev.inner_params(), seq_idx,
                              self.fwd.recompute_states, self.rev.recompute_states)
            return project_channels_last(y, self.out_proj.weight)
        xi, z = self._split(self.in_proj, x)
        y = self.fwd(xi, z, seq_idx=seq_idx)
        if self.rev is None:
            return project_channels_last(y, self.out_proj.weight)
        if self.untied:
            xr, zr = self._split(self.in_proj_rev, x)
            yr = self.rev(xr, zr, seq_idx=seq_idx, reverse=True)
            return project_channels_last(y, self.out_proj.weight) + project_channels_last(yr, self.out_proj_rev.weight)
        y = self.rev(xi, z, seq_idx=seq_idx, reverse=True, out_add=y)  # the directions' sum, in the scan
        return project_channels_last(y, self.out_proj.weight)

    def forward_keeping_chunks(self, x, seq_idx=None):
        """forward() of a tied bidirectional mixer on the Triton path, without autograd, also
        returning both scans' ChunkStates (what a checkpointed layer keeps for its backward)."""
        with torch.no_grad():
            xz = _InProjection.apply(x, self.in_proj.weight)
            y, chunks = bimamba_inner_forward_keeping_chunks(xz, self.fwd.inner_params(), self.rev.inner_params(),
                                                             seq_idx)
            return project_channels_last(y, self.out_proj.weight), chunks

    def forward_chunked(self, x, chunk_len: int, seq_idx=None):
        """Same result as forward() with activations for only `chunk_len` positions at a time.

        The forward direction walks chunks left to right carrying its conv context (the last
        d_conv-1 inputs) and its scan state; the reverse direction walks right to left. A state
        carried over a chunk boundary that is also a sequence boundary (seq_idx) is reset.
        """
        L = x.shape[1]
        out = torch.zeros_like(x)
        k = self.d_conv - 1
        directions = [(self.fwd, False, self.in_proj, self.out_proj)]
        if self.rev is not None:
            directions.append((self.rev, True, self.in_proj_rev if self.untied else self.in_proj,
                               self.out_proj_rev if self.untied else self.out_proj))
        for ssm, reverse, proj_in, proj_out in directions:
            starts = list(range(0, L, chunk_len))
            state = None
            for s in (reversed(starts) if reverse else starts):
                e = min(s + chunk_len, L)
                lo, hi = (s, min(e + k, L)) if reverse else (max(s - k, 0), e)  # chunk plus conv context
                xi, z = self._split(proj_in, x[:, lo:hi])
                sidx = seq_idx[:, lo:hi] if seq_idx is not None else None
                xc = ssm.conv(xi, sidx, reverse)
                keep = slice(0, e - s) if reverse else slice(s - lo, hi - lo)
                if state is not None and seq_idx is not None:
                    before, first = (seq_idx[:, e], seq_idx[:, e - 1]) if reverse else (seq_idx[:, s - 1], seq_idx[:, s])
                    state = state * (before == first).to(state.dtype)[:, None, None]
                y, state = ssm.scan(xc[..., keep], z[..., keep], seq_idx=sidx[:, keep] if sidx is not None else None,
                                    reverse=reverse, initial_state=state, return_last_state=True)
                out[:, s:e] += proj_out(y.transpose(1, 2))
        return out
