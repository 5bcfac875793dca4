"""Triton selective scan: chunked forward and backward kernels.

Layout. A register tile is (T, N, BD): T time steps x N states x BD channels, time axis *first*.
Triton's default layout puts lanes and warps on the last axis, so with BD = 32 x warps every
thread owns one channel with all T steps and all N states in its registers: the scan along axis 0
is a sequential loop in registers and sums over N are in-thread multiply-adds (no shuffles, no
shared memory). The backward's main kernel uses BD = 8 per warp instead (N split over 4 lanes):
it must also reduce dB and dC over channels, and one channel per thread does not fit in registers.
Scans against the register order flip the tile (`_flip_if`) rather than using reverse=True,
which costs two lane shuffles per element even along an in-thread axis. Exponentials, reciprocals
and logarithms use the bare `.approx.ftz` instructions on the GPU (`FAST`); kernels/BENCHMARKS.md
has the measurements behind each choice.

Passes (DESIGN.md section 4 says why):
* Forward. Tiles are grouped into chunks. `_chunk_state_kernel` reduces every chunk to its end
  state from zero and its sum of dt (its decay is exp(A * sum dt)); `_state_passing_kernel` (a
  tiled associative scan over chunks, one program per channel block and state) gives every chunk
  its entering state; `_fwd_kernel` rescans each chunk from that state, writes
  out = (C.h + D u) * silu(z) and, for the backward, the state entering every tile. When
  (batch x channel blocks) already fill the GPU the sequence is one chunk and passes 1-2 are skipped.
* Backward. `_adjoint_tile_kernel` walks segments of TPP tiles against the scan, storing for every
  tile the adjoint entering it from within its segment, and reduces every segment's adjoint from a
  zero boundary; the same state-passing kernel run right to left over segments (not tiles: 16 x
  fewer rows) gives the adjoint entering each segment; `_bwd_kernel`, one program per (batch,
  tile, channel split), adds the two (the segment's decayed over the tiles between), recomputes h
  from the saved tile state, gets
  q_t = dL/dh_t = C_t dy_t + a_{t+1} q_{t+1} from one scan (`_combine_next`: no shifted a_{t+1},
  no second exponential), and loops over channel blocks so dB and dC are reduced over channels in
  registers and stored once: each block's contributions are folded across the 8 channel lanes by
  a reduce-scatter (warp shuffles; one time step per lane), so the accumulators take 4 registers
  per thread instead of 32 and the loop does not spill. When the forward kept no tile states
  (checkpointing), `_chunk_state_kernel` rebuilds them: from the forward's chunk states, each
  chunk rescanned from the state entering it (H_IN); without those, per segment from zero, then
  the passing gives each segment's entering state and `_segment_fixup_kernel` adds it in.
  `_bwd_kernel` can then also write the forward's output (Y_OUT), so a checkpointed layer need
  not rerun the scan's forward.
* reverse=True visits physical tiles from the end of the sequence and scans each right to left:
  loads stay in increasing address order and nothing is flipped in memory.
* seq_idx resets the state (a_t = 0) where the sequence id changes. All offsets are 64-bit.
* State buffers are (batch, tile or chunk, N, dim): channels contiguous, like the threads; fp32,
  except the training path's per-tile copies with bf16 inputs (selective_scan._tile_dtype): the
  kernels store whatever dtype they are given and compute in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# SUF where the sequence restarts between a tile and its segment's end: exp(A * _NO_PATH) is 0 for
# every A < 0 (and 1, not NaN, for the zero A of masked-out channels, whose adjoints are 0).
_NO_PATH = tl.constexpr(1.0e30)


@triton.jit
def _combine(a1, b1, a2, b2):
    # Two steps h -> a h + b; in a reverse scan the first argument is the later segment.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _combine_next(f1, p1, q1, f2, p2, q2):
    # The adjoint q_t = c_t + a_{t+1} q_{t+1} pairs step t with the decay of the step after it.
    # A segment [s..e] is (f, p, q) = (a_s, a_{s+1}...a_e, q_s with nothing after e). Argument 1 is
    # the logically later segment, 2 the earlier one (as for _combine in a reverse scan).
    # A single step is (a_t, 1, c_t), so per step the scan costs one multiply-add for q (and one
    # multiply for p, which the compiler drops where p is not used).
    return f2, p2 * f1 * p1, q2 + p2 * f1 * q1


@triton.jit
def _ptx_ftz(x, INSTR: tl.constexpr):
    """One approximate float32 PTX instruction with subnormals flushed to zero (`INSTR`.approx.ftz).
    tl.exp2 and friends add a range test and two multiplies per call to keep subnormal results,
    which a decaying state does not need. The interpreter has no inline PTX: callers pass FAST=False."""
    return tl.inline_asm_elementwise(INSTR + ".approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _exp2(x, FAST: tl.constexpr):
    if FAST:
        return _ptx_ftz(x, "ex2")
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    if FAST:
        return _ptx_ftz(x, "lg2")
    else:
        return tl.log2(x)


@triton.jit
def _recip(x, FAST: tl.constexpr):
    if FAST:
        return _ptx_ftz(x, "rcp")
    else:
        return 1.0 / x


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    return _recip(1.0 + _exp2(x * -1.4426950408889634, FAST), FAST)


@triton.jit
def _one_minus_exp_neg(x, FAST: tl.constexpr):
    """1 - exp(-x) for x >= 0 (softplus's derivative, from softplus's value), without the
    cancellation of small x: a Taylor polynomial below 1/16 (error < 2e-7 relative)."""
    series = x * (1.0 - x * (0.5 - x * (0.16666666666666666 - x * 0.041666666666666664)))
    return tl.where(x < 0.0625, series, 1.0 - _exp2(x * -1.4426950408889634, FAST))


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    e = _exp2(tl.minimum(x, 20.0) * 1.4426950408889634, FAST)
    return tl.where(x > 20.0, x, _log2(1.0 + e, FAST) * 0.6931471805599453)


@triton.jit
def _tile_positions(k, L, T: tl.constexpr, REVERSE: tl.constexpr):
    """Physical positions (T,) of logical tile k, always increasing, and the in-range mask."""
    if REVERSE:
        p = L - (k + 1) * T + tl.arange(0, T)
    else:
        p = k * T + tl.arange(0, T)
    p = p.to(tl.int64)
    return p, (p >= 0) & (p < L)


@triton.jit
def _end_index(T: tl.constexpr, REVERSE: tl.constexpr):
    """Index of the logically last step of a tile (the state it hands on)."""
    if REVERSE:
        return 0
    else:
        return T - 1


@triton.jit
def _pick(x, idx, T: tl.constexpr):
    """x[idx] along axis 0 of a (T, N, BD) tile. The axis is in-thread, and -0.0 is the exact
    identity of addition, so the compiler folds the masked sum down to the one element."""
    return tl.sum(tl.where((tl.arange(0, T) == idx)[:, None, None], x, -0.0), axis=0)


@triton.jit
def _sum_states(x, BN: tl.constexpr):
    """Sum of a (T, N, BD) tile over its in-thread state axis as one chain of additions (the last
    element of a cumulative sum): the compiler fuses it with the products into one FMA per state,
    where Triton 3.9's tl.sum takes a multiply, an FMA and an add per pair (offline sm_90 compile
    of the forward's output pass: 128 -> 121 instructions per step; Triton 3.6 chains either way)."""
    last = (tl.arange(0, BN) == BN - 1)[None, :, None]
    return tl.sum(tl.where(last, tl.cumsum(x, axis=1), -0.0), axis=1)


@triton.jit
def _lane_offsets(start, BD: tl.constexpr):
    """Channel offsets start + arange(BD), int64, declared non-contiguous, for the A and state tiles
    of the forward's output pass: a 4-wide vector load gives these tiles a layout other than the
    compute layout. Triton gives every access that shares index ops with a vectorised one the same
    vector width, so the A load, although outside the loop, needs this too. The hint is an
    attribute of the op made here, which is why this builds the offsets instead of taking them."""
    return tl.max_contiguous((start + tl.arange(0, BD)).to(tl.int64), 1)


@triton.jit
def _load_td(ptr, base, s_d, offs_d, mask_d, p, mask_t):
    """(T, BD) tile of a (batch, dim, L) tensor, as float32 (0 outside)."""
    return tl.load(ptr + base + offs_d[None, :] * s_d + p[:, None],
                   mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_tdl(ptr, base, s_d, s_l, offs_d, mask_d, p, mask_t):
    """(T, BD) tile with any stride along L (the incoming gradient may be channels-contiguous: it
    then loads coalesced across channels, and no transposed copy is made)."""
    return tl.load(ptr + base + offs_d[None, :] * s_d + p[:, None] * s_l,
                   mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _load_tn(ptr, base, s_n, offs_n, mask_n, p, mask_t):
    """(T, N) tile of B or C for one group, as float32."""
    return tl.load(ptr + base + offs_n[None, :] * s_n + p[:, None],
                   mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)


@triton.jit
def _delta(delta_ptr, base, s_d, offs_d, mask_d, p, mask_t, db_ptr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
           FAST: tl.constexpr):
    dt = _load_td(delta_ptr, base, s_d, offs_d, mask_d, p, mask_t)
    if HAS_DB:
        dt += tl.load(db_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if SOFTPLUS:
        dt = _softplus(dt, FAST)
    return tl.where(mask_t[:, None] & mask_d[None, :], dt, 0.0)


@triton.jit
def _resets(seq_ptr, s_seq_b, pid_b, p, mask_t, L, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """(T,) True where the state restarts: the sequence id differs from the logically previous step."""
    if HAS_SEQ:
        if REVERSE:
            q = p + 1
        else:
            q = p - 1
        mq = mask_t & (q >= 0) & (q < L)
        cur = tl.load(seq_ptr + pid_b * s_seq_b + p, mask=mask_t, other=0)
        prev = tl.load(seq_ptr + pid_b * s_seq_b + q, mask=mq, other=0)
        return mq & (cur != prev)
    else:
        return p < 0


@triton.jit
def _fwd_inputs(u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k, L,
                u_base, s_u_d, dl_base, s_dl_d, z_base, s_z_d, B_base, s_B_n, C_base, s_C_n,
                offs_d, mask_d, offs_n, mask_n, T: tl.constexpr,
                HAS_Z: tl.constexpr, LOAD_C: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, FAST: tl.constexpr):
    """Everything the forward needs of logical tile k (issued together, so it can be prefetched)."""
    p, mask_t = _tile_positions(k, L, T, REVERSE)
    u = _load_td(u_ptr, u_base, s_u_d, offs_d, mask_d, p, mask_t)
    dt = _delta(delta_ptr, dl_base, s_dl_d, offs_d, mask_d, p, mask_t, db_ptr, HAS_DB, SOFTPLUS, FAST)
    Bt = _load_tn(B_ptr, B_base, s_B_n, offs_n, mask_n, p, mask_t)
    if LOAD_C:
        Ct = _load_tn(C_ptr, C_base, s_C_n, offs_n, mask_n, p, mask_t)
    else:
        Ct = Bt
    if HAS_Z:
        zz = _load_td(z_ptr, z_base, s_z_d, offs_d, mask_d, p, mask_t)
    else:
        zz = u
    reset = _resets(seq_ptr, s_seq_b, pid_b, p, mask_t, L, HAS_SEQ, REVERSE)
    return p, mask_t, u, dt, Bt, Ct, zz, reset


@triton.jit
def _flip_if(x, FLIP: tl.constexpr):
    """x reversed along axis 0 when FLIP. Scans against the register order go through this:
    tl.associative_scan(reverse=True) also reverses the lane order (two shuffles per element, even
    when the scanned axis lies within each thread), while a flip of an in-thread axis is free."""
    if FLIP:
        return tl.flip(x, 0)
    else:
        return x


@triton.jit
def _decay(dt, A2t, reset, FAST: tl.constexpr, HAS_SEQ: tl.constexpr):
    """a_t = exp(dt_t A) for a (T, N, BD) tile, 0 where the sequence restarts. Steps outside the
    sequence or the channel range carry dt = 0, so a = 1 there (the state passes through): no mask."""
    a = _exp2(dt[:, None, :] * A2t[None, :, :], FAST)
    if HAS_SEQ:
        a = tl.where(reset[:, None, None], 0.0, a)
    return a


@triton.jit
def _scan_tnd(a, b, h, T: tl.constexpr, REVERSE: tl.constexpr):
    """States h_t of a (T, N, BD) tile entered with state h (N, BD).

    h is folded into the logically first step (b += a h there), so only the b half of the scan is
    used: the running products of a that the pair scan also forms are dead code and compiled away.
    """
    is_first = (tl.arange(0, T) == _end_index(T, not REVERSE))[:, None, None]
    b = tl.where(is_first, b + a * h[None, :, :], b)
    _a, hs = tl.associative_scan((_flip_if(a, REVERSE), _flip_if(b, REVERSE)), 0, _combine)
    return _flip_if(hs, REVERSE)


@triton.jit
def _chunk_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, db_ptr, seq_ptr, S_ptr, SDT_ptr, RST_ptr, H_ptr, PRE_ptr,
    L, DIM, NSTATE, CHUNK_TILES, DIM_PER_GROUP, N_ROWS,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_seq_b, s_S_b, s_S_c, s_S_n, s_t_b, s_t_c, s_r_b,
    s_H_b, s_H_c, s_H_n, s_p_b, s_p_c,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
    FAST: tl.constexpr, PER_TILE: tl.constexpr, H_IN: tl.constexpr = False,
):
    """Forward pass 1: each chunk's end state from a zero start (S), the sum of dt over the chunk
    (SDT) and whether the sequence restarts inside it (RST). The chunk's total decay is
    exp(A * SDT), or 0 after a restart: the passing kernel forms it, so no (N, dim) decay buffer.

    PER_TILE (the backward's own tile-entry states, when the forward did not keep them): also, for
    every tile of the chunk (here a segment of the backward's), H, the state entering it from the
    segment's start, and PRE, the sum of dt over the segment's tiles before it (_NO_PATH after a
    restart). H has N_ROWS rows. The passing kernel then gives the state entering every segment,
    and the backward's main kernel adds it, decayed by exp(A * PRE).

    H_IN (with PER_TILE; the backward's rebuild from the forward's chunk states): each chunk starts
    from the state entering it, read from S (the forward's chunks and their entering states), so H
    gets whole states; nothing else is written.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mnd = mask_n[:, None] & mask_d[None, :]
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2t = tl.load(A_ptr + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd, other=0.0) * 1.4426950408889634
    off = pid_b * s_S_b + pid_c * s_S_c + offs_n[:, None] * s_S_n + offs_d[None, :]
    if H_IN:
        h = tl.load(S_ptr + off, mask=mnd, other=0.0)
    else:
        h = tl.zeros((BN, BD), dtype=tl.float32)
    sdt = tl.zeros((BD,), dtype=tl.float32)
    n_reset = 0
    end = _end_index(T, REVERSE)
    k0 = pid_c * CHUNK_TILES
    u_base, dl_base, B_base = pid_b * s_u_b, pid_b * s_dl_b, pid_b * s_B_b + g * s_B_g
    p_n, m_n, u_n, dt_n, B_n, _c, _z, r_n = _fwd_inputs(
        u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k0, L,
        u_base, s_u_d, dl_base, s_dl_d, 0, 0, B_base, s_B_n, 0, 0,
        offs_d, mask_d, offs_n, mask_n, T, False, False, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
    for i in range(0, CHUNK_TILES):
        u, dt, Bt, reset = u_n, dt_n, B_n, r_n
        p_n, m_n, u_n, dt_n, B_n, _c, _z, r_n = _fwd_inputs(
            u_ptr, delta_ptr, u_ptr, B_ptr, B_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k0 + i + 1, L,
            u_base, s_u_d, dl_base, s_dl_d, 0, 0, B_base, s_B_n, 0, 0,
            offs_d, mask_d, offs_n, mask_n, T, False, False, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
        if PER_TILE:
            kt = k0 + i
            # a tensor test for the tiles past the last (the interpreter takes no scalar mask, nor a
            # tensor mask combined with a scalar test)
            past = (kt + offs_d * 0) >= N_ROWS
            tl.store(H_ptr + pid_b * s_H_b + kt * s_H_c + offs_n[:, None] * s_H_n + offs_d[None, :], h,
                     mask=mnd & ~past[None, :])
            if not H_IN:
                pre = sdt
                if HAS_SEQ:
                    pre = tl.where(n_reset > 0, _NO_PATH, sdt)
                tl.store(PRE_ptr + pid_b * s_p_b + kt * s_p_c + offs_d, pre, mask=mask_d & ~past)
        a = _decay(dt, A2t, reset, FAST, HAS_SEQ)
        b = (dt * u)[:, None, :] * Bt[:, :, None]
        h = _pick(_scan_tnd(a, b, h, T, REVERSE), end, T)
        sdt += tl.sum(dt, axis=0)
        if HAS_SEQ:
            n_reset += tl.sum(reset.to(tl.int32), axis=0)
    if not H_IN:
        tl.store(S_ptr + off, h, mask=mnd)
        tl.store(SDT_ptr + pid_b * s_t_b + pid_c * s_t_c + offs_d, sdt, mask=mask_d)
        if HAS_SEQ:
            tl.store(RST_ptr + pid_b * s_r_b + pid_c, n_reset)


@triton.jit
def _segment_fixup_kernel(H_ptr, Hseg_ptr, PRE_ptr, A_ptr, DIM, NSTATE, SEG_TILES, N_ROWS,
                          s_H_b, s_H_c, s_H_n, s_S_b, s_S_c, s_S_n, s_p_b, s_p_c,
                          BD: tl.constexpr, BN: tl.constexpr):
    """Rebuilt tile states made whole, for the TPP tiles of one segment: H (the state entering
    each tile from its segment's start, _chunk_state_kernel with PER_TILE) += exp(A * PRE) * Hseg
    (the state entering the segment, decayed over PRE, the sum of dt between; 0 after a restart).
    Done here once, the backward's main kernel reads H as it reads kept states (no HSEG)."""
    seg = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = (tl.program_id(2) * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mnd = (offs_n < NSTATE)[:, None] & mask_d[None, :]
    A2 = tl.load(A_ptr + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd, other=0.0) * 1.4426950408889634
    hs = tl.load(Hseg_ptr + pid_b * s_S_b + seg * s_S_c + offs_n[:, None] * s_S_n + offs_d[None, :], mask=mnd,
                 other=0.0)
    for i in range(0, SEG_TILES):
        kt = seg * SEG_TILES + i
        past = (kt + offs_d * 0) >= N_ROWS      # a tensor test, as in _chunk_state_kernel
        pre = tl.load(PRE_ptr + pid_b * s_p_b + kt * s_p_c + offs_d, mask=mask_d & ~past, other=0.0)
        hoff = pid_b * s_H_b + kt * s_H_c + offs_n[:, None] * s_H_n + offs_d[None, :]
        m = mnd & ~past[None, :]
        h = tl.load(H_ptr + hoff, mask=m, other=0.0).to(tl.float32) + tl.exp2(A2 * pre[None, :]) * hs
        tl.store(H_ptr + hoff, h.to(H_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pass_block(S_ptr, SDT_ptr, RST_ptr, base, base_t, base_r, s_c, s_t_c, A2, mask_d, c0, NCHUNK,
                BC: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """Chunk indices, the (BC, BD) block of S and the chunks' decays for logical chunks c0 .. c0+BC-1."""
    j = c0 + tl.arange(0, BC)                          # logical chunk order
    mj = j < NCHUNK
    if REVERSE:
        c = (NCHUNK - 1 - j).to(tl.int64)
    else:
        c = j.to(tl.int64)
    mm = mj[:, None] & mask_d[None, :]
    s = tl.load(S_ptr + base + c[:, None] * s_c, mask=mm, other=0.0).to(tl.float32)
    sdt = tl.load(SDT_ptr + base_t + c[:, None] * s_t_c, mask=mm, other=0.0)
    p = tl.exp2(A2[None, :] * sdt)                     # exp(A * sum of dt) = product of the decays
    if HAS_SEQ:
        rst = tl.load(RST_ptr + base_r + c, mask=mj, other=0)
        p = tl.where((rst > 0)[:, None], 0.0, p)
    return j, c, mm, s, p


@triton.jit
def _state_passing_kernel(
    S_ptr, SDT_ptr, RST_ptr, A_ptr, H0_ptr, Hin_ptr, Hlast_ptr,
    NCHUNK, DIM,
    s_b, s_c, s_n, s_t_b, s_t_c, s_r_b, s_h0_b, s_h0_d,
    BC: tl.constexpr, BD: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
):
    """Pass 2: H_in[c] = state entering chunk c, from H[c] = P[c] * H[c-1] + S[c], where the
    chunk's decay P = exp(A * SDT[c]) (0 if the sequence restarts inside the chunk).

    One program per (batch, channel block, state): the (channel, state) pairs are independent
    chains, so a 1 Mb backward (131,072 tiles) still has D x N chains in flight. Each walks its
    chunks in blocks of BC (an in-thread associative scan per block, the next block's loads issued
    before the current block is combined). REVERSE walks from the last chunk (the adjoint).
    Writes H_in for every chunk and the final state.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    A2 = tl.load(A_ptr + n * DIM + offs_d, mask=mask_d, other=0.0) * 1.4426950408889634
    if HAS_H0:
        h = tl.load(H0_ptr + pid_b * s_h0_b + offs_d * s_h0_d + n, mask=mask_d, other=0.0)
    else:
        h = tl.zeros((BD,), dtype=tl.float32)
    base = pid_b * s_b + n * s_n + offs_d[None, :]
    base_t = pid_b * s_t_b + offs_d[None, :]
    base_r = pid_b * s_r_b
    j_n, c_n, mm_n, s_n_, p_n = _pass_block(S_ptr, SDT_ptr, RST_ptr, base, base_t, base_r, s_c, s_t_c, A2, mask_d,
                                            0, NCHUNK, BC, HAS_SEQ, REVERSE)
    for c0 in range(0, NCHUNK, BC):
        j, c, mm, s, p = j_n, c_n, mm_n, s_n_, p_n
        j_n, c_n, mm_n, s_n_, p_n = _pass_block(S_ptr, SDT_ptr, RST_ptr, base, base_t, base_r, s_c, s_t_c, A2,
                                                mask_d, c0 + BC, NCHUNK, BC, HAS_SEQ, REVERSE)
        if REVERSE:
            c_next = c - 1
        else:
            c_next = c + 1
        # Every store below targets a chunk of this block and follows the loads of this block, so
        # H_in may share memory with S (the backward does that to save a state-sized buffer).
        first = (j == c0)[:, None] & mm                 # the block is entered with the carry
        tl.store(Hin_ptr + base + c[:, None] * s_c, h[None, :] + 0.0 * s, mask=first)
        p_cum, s_cum = tl.associative_scan((p, s), 0, _combine)
        h_after = s_cum + p_cum * h[None, :]            # state after chunk j = entering j + 1
        j_last = tl.minimum(c0 + BC, NCHUNK) - 1
        tl.store(Hin_ptr + base + c_next[:, None] * s_c, h_after, mask=mm & (j < j_last)[:, None])
        h = tl.sum(tl.where((j == j_last)[:, None], h_after, -0.0), axis=0)
    tl.store(Hlast_ptr + pid_b * s_h0_b + offs_d * s_h0_d + n, h, mask=mask_d)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, seq_ptr,
    Hchunk_ptr, out_ptr, Htile_ptr, Hlast_ptr, add_ptr,
    L, DIM, NSTATE, CHUNK_TILES, N_TILES, DIM_PER_GROUP,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d,
    s_o_b, s_o_d, s_seq_b, s_a_b, s_a_d,
    s_hc_b, s_hc_c, s_hc_d, s_hc_n, s_ht_b, s_ht_c, s_ht_n, s_hl_b, s_hl_d,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, HAS_HCHUNK: tl.constexpr, SAVE_TILES: tl.constexpr,
    HAS_ADD: tl.constexpr, FAST: tl.constexpr,
):
    """Forward pass 3: outputs of one chunk from its entering state; saves every tile's entering state.
    HAS_ADD: out = add + (the scan's output), one rounding (a bidirectional block's second direction
    adds the first's output here instead of in a separate elementwise pass).

    The next tile's inputs are loaded before the current tile is computed (software prefetch).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mnd = mask_n[:, None] & mask_d[None, :]
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    # Inference (no tile states saved): the entering state is folded into the first tile's first
    # step (FOLD) and the loop-carried state starts from zeros, with the A and state tiles read one
    # channel per lane (_lane_offsets). Starting the loop-carried state from a load instead made
    # Triton keep the load's vectorised layout through the loop and convert it through shared memory
    # twice per tile (Triton 3.6, sm_90: 20 -> 4 barriers per tile; 1 Mb model inference 359 -> 348.5 ms on
    # an H100). With tile states saved (training) the old form measured faster, so it stays.
    FOLD: tl.constexpr = HAS_HCHUNK and not SAVE_TILES
    if SAVE_TILES:
        st_d = offs_d
    else:
        st_d = _lane_offsets(pid_d * BD, BD)
    A2t = tl.load(A_ptr + offs_n[:, None] * DIM + st_d[None, :], mask=mnd, other=0.0) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    h = tl.zeros((BN, BD), dtype=tl.float32)
    if HAS_HCHUNK:
        h_in = tl.load(Hchunk_ptr + pid_b * s_hc_b + pid_c * s_hc_c + st_d[None, :] * s_hc_d + offs_n[:, None] * s_hc_n,
                       mask=mnd, other=0.0)
        if FOLD:
            h_in = h_in[None, :, :]
            first = (tl.arange(0, T) == _end_index(T, not REVERSE))[:, None, None]
        else:
            h = h_in
    end = _end_index(T, REVERSE)
    k0 = pid_c * CHUNK_TILES
    n_here = tl.minimum(CHUNK_TILES, N_TILES - k0)  # the last chunk may be short
    u_base, dl_base, z_base = pid_b * s_u_b, pid_b * s_dl_b, pid_b * s_z_b
    B_base, C_base = pid_b * s_B_b + g * s_B_g, pid_b * s_C_b + g * s_C_g
    p_n, m_n, u_n, dt_n, B_n, C_n, z_n, r_n = _fwd_inputs(
        u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k0, L,
        u_base, s_u_d, dl_base, s_dl_d, z_base, s_z_d, B_base, s_B_n, C_base, s_C_n,
        offs_d, mask_d, offs_n, mask_n, T, HAS_Z, True, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
    for i in range(0, n_here):
        p, mask_t, u, dt, Bt, Ct, zz, reset = p_n, m_n, u_n, dt_n, B_n, C_n, z_n, r_n
        p_n, m_n, u_n, dt_n, B_n, C_n, z_n, r_n = _fwd_inputs(
            u_ptr, delta_ptr, z_ptr, B_ptr, C_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k0 + i + 1, L,
            u_base, s_u_d, dl_base, s_dl_d, z_base, s_z_d, B_base, s_B_n, C_base, s_C_n,
            offs_d, mask_d, offs_n, mask_n, T, HAS_Z, True, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
        if SAVE_TILES:
            tl.store(Htile_ptr + pid_b * s_ht_b + (k0 + i) * s_ht_c + offs_n[:, None] * s_ht_n + offs_d[None, :],
                     h, mask=mnd)
        a = _decay(dt, A2t, reset, FAST, HAS_SEQ)
        b = (dt * u)[:, None, :] * Bt[:, :, None]
        if FOLD:
            b = tl.where(first & (i == 0), b + a * h_in, b)
        hs = _scan_tnd(a, b, h, T, REVERSE)                        # (T, N, BD)
        if SAVE_TILES:
            y = tl.sum(hs * Ct[:, :, None], axis=1)                 # (T, BD)
        else:
            y = _sum_states(hs * Ct[:, :, None], BN)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            y = y * zz * _sigmoid(zz, FAST)
        if HAS_ADD:
            y += tl.load(add_ptr + pid_b * s_a_b + offs_d[None, :] * s_a_d + p[:, None],
                         mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptr + pid_b * s_o_b + offs_d[None, :] * s_o_d + p[:, None],
                 y.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
        h = _pick(hs, end, T)
    if pid_c == tl.num_programs(2) - 1:
        tl.store(Hlast_ptr + pid_b * s_hl_b + offs_d[None, :] * s_hl_d + offs_n[:, None], h, mask=mnd)


@triton.jit
def _adjoint_inputs(delta_ptr, C_ptr, z_ptr, dout_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k, L,
                    dl_base, s_dl_d, C_base, s_C_n, z_base, s_z_d, do_base, s_do_d, s_do_l,
                    offs_d, mask_d, offs_n, mask_n, T: tl.constexpr,
                    HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
                    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, FAST: tl.constexpr):
    """What the adjoint pass needs of logical tile k: dt, C, dy (gated by silu(z)) and resets."""
    p, mask_t = _tile_positions(k, L, T, REVERSE)
    dt = _delta(delta_ptr, dl_base, s_dl_d, offs_d, mask_d, p, mask_t, db_ptr, HAS_DB, SOFTPLUS, FAST)
    Ct = _load_tn(C_ptr, C_base, s_C_n, offs_n, mask_n, p, mask_t)
    dy = _load_tdl(dout_ptr, do_base, s_do_d, s_do_l, offs_d, mask_d, p, mask_t)
    if HAS_Z:
        zz = _load_td(z_ptr, z_base, s_z_d, offs_d, mask_d, p, mask_t)
        dy = dy * zz * _sigmoid(zz, FAST)
    reset = _resets(seq_ptr, s_seq_b, pid_b, p, mask_t, L, HAS_SEQ, REVERSE)
    return dt, Ct, dy, reset


@triton.jit
def _adjoint_tile_kernel(
    u_ptr, delta_ptr, A_ptr, C_ptr, z_ptr, dout_ptr, db_ptr, seq_ptr, R_ptr, SUF_ptr, S_ptr, SDT_ptr, RST_ptr,
    L, DIM, NSTATE, DIM_PER_GROUP, N_TILES, TILES_PER_PROG,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d, s_do_b, s_do_d, s_do_l, s_seq_b,
    s_R_b, s_R_c, s_R_n, s_f_b, s_f_c,
    s_S_b, s_S_c, s_S_n, s_t_b, s_t_c, s_r_b,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    REVERSE: tl.constexpr, FAST: tl.constexpr,
):
    """Backward pass 1, one program per segment of TILES_PER_PROG tiles, walked against the scan
    (logically last tile first) from a zero adjoint at the segment's logical end. Per tile: R, the
    adjoint entering the tile's logical end from the tiles after it in the segment, and SUF, the
    sum of dt over those tiles (_NO_PATH when the sequence restarts in them). Per segment: S, the
    adjoint it hands to the state before it, its sum of dt (SDT) and restart count (RST), from
    which the passing kernel gives the adjoint entering every segment, R_seg. The main kernel then
    has the adjoint entering tile k as R[k] + exp(A * SUF[k]) * R_seg[segment of k]: the passing
    walks segments, not tiles (16 x fewer rows, each read and written once).

    With q_t = dL/dh_t: q_t = C_t dy_t + a_{t+1} q_{t+1}, and the gradient a tile hands to the
    state before it is a_first q_first. Tiles are (T, N, BD) like the forward's. Grid:
    (segments, batch, channel blocks): segments on axis 0, which allows more than 65,535.
    """
    pid_t = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_d = tl.program_id(2)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mnd = mask_n[:, None] & mask_d[None, :]
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2t = tl.load(A_ptr + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd, other=0.0) * 1.4426950408889634
    start = _end_index(T, not REVERSE)
    is_last = (tl.arange(0, T) == _end_index(T, REVERSE))[:, None, None]
    dl_base, C_base, z_base, do_base = pid_b * s_dl_b, pid_b * s_C_b + g * s_C_g, pid_b * s_z_b, pid_b * s_do_b
    k0 = pid_t * TILES_PER_PROG
    n_here = tl.minimum(TILES_PER_PROG, N_TILES - k0)
    carry = tl.zeros((BN, BD), dtype=tl.float32)
    suf = tl.zeros((BD,), dtype=tl.float32)
    n_reset = 0
    dt_n, C_n, dy_n, r_n = _adjoint_inputs(
        delta_ptr, C_ptr, z_ptr, dout_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, k0 + n_here - 1, L,
        dl_base, s_dl_d, C_base, s_C_n, z_base, s_z_d, do_base, s_do_d, s_do_l,
        offs_d, mask_d, offs_n, mask_n, T, HAS_Z, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
    for i in range(0, n_here):
        kt = k0 + n_here - 1 - i
        dt, Ct, dy, reset = dt_n, C_n, dy_n, r_n
        # the next tile to the logical left (tile k0 - 1 after the last: masked out when it is -1)
        dt_n, C_n, dy_n, r_n = _adjoint_inputs(
            delta_ptr, C_ptr, z_ptr, dout_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, kt - 1, L,
            dl_base, s_dl_d, C_base, s_C_n, z_base, s_z_d, do_base, s_do_d, s_do_l,
            offs_d, mask_d, offs_n, mask_n, T, HAS_Z, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE, FAST)
        tl.store(R_ptr + pid_b * s_R_b + kt * s_R_c + offs_n[:, None] * s_R_n + offs_d[None, :], carry, mask=mnd)
        suf_out = suf
        if HAS_SEQ:
            suf_out = tl.where(n_reset > 0, _NO_PATH, suf)
        tl.store(SUF_ptr + pid_b * s_f_b + kt * s_f_c + offs_d, suf_out, mask=mask_d)
        a = _decay(dt, A2t, reset, FAST, HAS_SEQ)
        c = dy[:, None, :] * Ct[:, :, None]
        c = tl.where(is_last, c + carry[None, :, :], c)
        # q runs against the scan (right to left for a forward scan), with the next step's decay.
        ones = tl.full((T, BN, BD), 1.0, dtype=tl.float32)
        _f, _p, q = tl.associative_scan((_flip_if(a, not REVERSE), ones, _flip_if(c, not REVERSE)), 0, _combine_next)
        q = _flip_if(q, not REVERSE)
        carry = _pick(a, start, T) * _pick(q, start, T)
        suf += tl.sum(dt, axis=0)
        if HAS_SEQ:
            n_reset += tl.sum(reset.to(tl.int32), axis=0)
    tl.store(S_ptr + pid_b * s_S_b + pid_t * s_S_c + offs_n[:, None] * s_S_n + offs_d[None, :], carry, mask=mnd)
    tl.store(SDT_ptr + pid_b * s_t_b + pid_t * s_t_c + offs_d, suf, mask=mask_d)
    if HAS_SEQ:
        tl.store(RST_ptr + pid_b * s_r_b + pid_t, n_reset)


@triton.jit
def _lane_fold(lo, hi, upper, xor: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MODE: tl.constexpr):
    """One butterfly step of a reduce-scatter over the channel lanes: channel j keeps hi where
    `upper` is set, else lo, plus the same half of channel j ^ xor. MODE 1: one warp shuffle per
    value (the channel axis is the low lane bits of the backward's layout: Triton 3.6 and 3.9 give
    its operands threadsPerWarp [1, 4, 8], which a CPU test checks on the installed Triton);
    MODE 2: the same arithmetic in plain Triton (a flip of the channel axis), for the interpreter."""
    if MODE == 1:
        return tl.inline_asm_elementwise(
            asm="""{ .reg .pred p; .reg .f32 s, k, r;
            setp.ne.s32 p, $3, 0;
            selp.f32 s, $1, $2, p;
            selp.f32 k, $2, $1, p;
            shfl.sync.bfly.b32 r, s, $4, 0x1f, -1;
            add.f32 $0, k, r; }""",
            constraints="=f,f,f,r,r", args=[lo, hi, upper, tl.full(upper.shape, xor, tl.int32)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        H: tl.constexpr = lo.shape[0]
        pair = (H, BN, BD // (2 * xor), 2, xor)
        lo_p = tl.reshape(tl.flip(tl.reshape(lo, pair), 3), (H, BN, BD))
        hi_p = tl.reshape(tl.flip(tl.reshape(hi, pair), 3), (H, BN, BD))
        return tl.where(upper != 0, hi + hi_p, lo + lo_p)


@triton.jit
def _reduce_scatter(x, T: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MODE: tl.constexpr):
    """Sum of a (T, N, BD) tile over its channel axis (T == BD lanes), scattered over the lanes:
    the result (1, N, BD) holds at channel lane j the sum for step j. log2(T) halving rounds
    (28 shuffles per thread at T = 8, against 96 for a full reduction) and 4 registers per
    thread for the result instead of 32: the backward's dB / dC accumulators no longer spill."""
    tl.static_assert(T == BD and T <= 16)
    if T >= 16:
        x = _reduce_round(x, 8, BN, BD, MODE)
    if T >= 8:
        x = _reduce_round(x, 4, BN, BD, MODE)
    if T >= 4:
        x = _reduce_round(x, 2, BN, BD, MODE)
    if T >= 2:
        x = _reduce_round(x, 1, BN, BD, MODE)
    return x


@triton.jit
def _reduce_round(x, H: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, MODE: tl.constexpr):
    """(2H, N, BD) -> (H, N, BD): halves along the step axis folded across lanes j, j ^ H."""
    halves = tl.reshape(x, (2, H, BN, BD))
    first = (tl.arange(0, 2) == 0)[:, None, None, None]
    lo = tl.sum(tl.where(first, halves, -0.0), axis=0)           # in-thread axis: folded to a copy
    hi = tl.sum(tl.where(first, -0.0, halves), axis=0)
    j = tl.arange(0, BD)[None, None, :]
    return _lane_fold(lo, hi, j & H, H, BN, BD, MODE)


@triton.jit
def _put_partial(ptr, x, mask, PART_ROWS: tl.constexpr):
    """A partial sum into its row: stored (one row per tile) or added (rows shared by tiles)."""
    if PART_ROWS > 0:
        tl.atomic_add(ptr, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _bwd_inputs(u_ptr, delta_ptr, z_ptr, dout_ptr, A_ptr, Htile_ptr, Rtile_ptr, Rseg_ptr, SUF_ptr, db_ptr, dz_ptr,
                pid_b, k, seg, d0, d_end, offs_n, mask_n, p, mask_t, DIM,
                s_u_b, s_u_d, s_dl_b, s_dl_d, s_z_b, s_z_d, s_do_b, s_do_d, s_do_l, s_h_b, s_h_c, s_h_n,
                s_rs_b, s_rs_c, s_f_b, s_f_c, s_dz_b, s_dz_d,
                BD: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, DZ_ACC: tl.constexpr,
                HSEG: tl.constexpr):
    """Raw loads of one channel block for the backward (issued one block ahead: prefetch), with
    the dz already there when DZ_ACC (a load at the store would stall the warp on memory).
    r0 (the adjoint entering the tile from within its segment), rseg (the one entering the
    segment) and suf (the sum of dt between them) make the tile's entering adjoint. (Made here, a
    block ahead, the loop spills less but the kernel is 2% slower: H100, fifteenth session.)
    HSEG (tile states the backward rebuilt, per segment like the adjoints): the loaded h0 is the
    state entering the tile from its segment's start; the state entering the segment and the sum
    of dt between sit in the second halves (batch rows pid_b + batch) of the Rseg and SUF
    buffers, and h0 gets the first, decayed over the second, here."""
    offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < d_end
    mnd = mask_n[:, None] & mask_d[None, :]
    At = tl.load(A_ptr + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd, other=0.0)
    u = _load_td(u_ptr, pid_b * s_u_b, s_u_d, offs_d, mask_d, p, mask_t)
    raw = _load_td(delta_ptr, pid_b * s_dl_b, s_dl_d, offs_d, mask_d, p, mask_t)
    if HAS_DB:
        raw += tl.load(db_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    dout = _load_tdl(dout_ptr, pid_b * s_do_b, s_do_d, s_do_l, offs_d, mask_d, p, mask_t)
    if HAS_Z:
        zz = _load_td(z_ptr, pid_b * s_z_b, s_z_d, offs_d, mask_d, p, mask_t)
    else:
        zz = dout
    hoff = pid_b * s_h_b + k * s_h_c + offs_n[:, None] * s_h_n + offs_d[None, :]
    h0 = tl.load(Htile_ptr + hoff, mask=mnd, other=0.0).to(tl.float32)
    r0 = tl.load(Rtile_ptr + hoff, mask=mnd, other=0.0).to(tl.float32)
    rseg = tl.load(Rseg_ptr + pid_b * s_rs_b + seg * s_rs_c + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd,
                   other=0.0)
    suf = tl.load(SUF_ptr + pid_b * s_f_b + k * s_f_c + offs_d, mask=mask_d, other=0.0)
    if HSEG:
        b2 = pid_b + tl.num_programs(1)
        hs = tl.load(Rseg_ptr + b2 * s_rs_b + seg * s_rs_c + offs_n[:, None] * DIM + offs_d[None, :], mask=mnd,
                     other=0.0)
        pre = tl.load(SUF_ptr + b2 * s_f_b + k * s_f_c + offs_d, mask=mask_d, other=0.0)
        h0 += tl.exp2(At * 1.4426950408889634 * pre[None, :]) * hs
    if DZ_ACC:
        dz0 = _load_td(dz_ptr, pid_b * s_dz_b, s_dz_d, offs_d, mask_d, p, mask_t)
    else:
        dz0 = zz
    return offs_d, mask_d, At, u, raw, dout, zz, h0, r0, rseg, suf, dz0


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, seq_ptr, dout_ptr,
    Htile_ptr, Rtile_ptr, Rseg_ptr, SUF_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddb_ptr, y_ptr,
    L, DIM, NSTATE, DIM_PER_GROUP, DIM_PER_SPLIT, NSPLIT, SEG_TILES,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d,
    s_do_b, s_do_d, s_do_l, s_seq_b,
    s_h_b, s_h_c, s_h_n, s_rs_b, s_rs_c, s_f_b, s_f_c,
    s_du_b, s_du_d, s_ddl_b, s_ddl_d, s_dz_b, s_dz_d, s_dB_b, s_dB_g, s_dB_n, s_dC_b, s_dC_g, s_dC_n,
    s_dA_t, s_dD_t, s_y_b, s_y_d,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, ATOMIC_BC: tl.constexpr, FAST: tl.constexpr,
    LANE_RS: tl.constexpr, RELOAD_BC: tl.constexpr, DZ_ACC: tl.constexpr, PART_ROWS: tl.constexpr,
    HSEG: tl.constexpr, Y_OUT: tl.constexpr, DT_PRE: tl.constexpr,
):
    """Backward pass 3: all gradients of one time tile, looping over the channels of a split.

    Tiles are (T, N, BD). h_t is recomputed from the saved tile-entry state, q_t = dL/dh_t from the
    adjoint entering from the right (r0 + exp(A * suf) * rseg, see _adjoint_tile_kernel) by one
    reverse scan (_combine_next). dB and dC
    are accumulated per channel lane across the loop and reduced over channels once at the end.
    dA, dD and d(delta_bias) are per-tile partial sums, summed afterwards: PART_ROWS = 0 stores
    them in row `part` of buffers with one row per tile (deterministic); PART_ROWS = R adds them
    atomically into row `part % R` of R zeroed rows (R x less to write and to sum afterwards).
    Y_OUT (with z): also writes the gated output y * silu(z), which the states recomputed here give
    for free, into y_ptr (adding to what it holds with DZ_ACC, like dz): a layer's backward can then
    skip re-running the scan's forward for out_proj's weight gradient (checkpointed training).
    DT_PRE (without SOFTPLUS and HAS_DB): delta is softplus(raw + bias), made outside
    (dt_proj_softplus); ddelta is written for raw, and the bias's gradient summed like
    d(delta_bias), both from dt alone (softplus'(raw) = 1 - exp(-dt)).
    """
    k = tl.program_id(0).to(tl.int64)            # tiles on axis 0 (more than 65,535 at 1 Mb)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    p, mask_t = _tile_positions(k, L, T, REVERSE)
    reset = _resets(seq_ptr, s_seq_b, pid_b, p, mask_t, L, HAS_SEQ, REVERSE)
    g = (pid_s // NSPLIT).to(tl.int64)
    d_start = g * DIM_PER_GROUP + (pid_s % NSPLIT) * DIM_PER_SPLIT
    d_end = tl.minimum(d_start + DIM_PER_SPLIT, (g + 1) * DIM_PER_GROUP)
    if not RELOAD_BC:
        Bt = _load_tn(B_ptr, pid_b * s_B_b + g * s_B_g, s_B_n, offs_n, mask_n, p, mask_t)
        Ct = _load_tn(C_ptr, pid_b * s_C_b + g * s_C_g, s_C_n, offs_n, mask_n, p, mask_t)
    if LANE_RS:
        dB_acc = tl.zeros((1, BN, BD), dtype=tl.float32)
        dC_acc = tl.zeros((1, BN, BD), dtype=tl.float32)
    else:
        dB_acc = tl.zeros((T, BN, BD), dtype=tl.float32)
        dC_acc = tl.zeros((T, BN, BD), dtype=tl.float32)
    is_last = (tl.arange(0, T) == _end_index(T, REVERSE))[:, None, None]
    part = (pid_b * tl.num_programs(0) + k)                     # row of the partial-sum buffers
    if PART_ROWS > 0:
        part = part % PART_ROWS
    seg = k // SEG_TILES
    o_n, md_n, A_n, u_n, raw_n, do_n, z_n, h0_n, r0_n, rs_n, sf_n, dz_n = _bwd_inputs(
        u_ptr, delta_ptr, z_ptr, dout_ptr, A_ptr, Htile_ptr, Rtile_ptr, Rseg_ptr, SUF_ptr, db_ptr, dz_ptr,
        pid_b, k, seg, d_start, d_end, offs_n, mask_n, p, mask_t, DIM,
        s_u_b, s_u_d, s_dl_b, s_dl_d, s_z_b, s_z_d, s_do_b, s_do_d, s_do_l, s_h_b, s_h_c, s_h_n,
        s_rs_b, s_rs_c, s_f_b, s_f_c, s_dz_b, s_dz_d, BD, HAS_Z, HAS_DB, DZ_ACC, HSEG)
    for d0 in range(d_start, d_end, BD):
        offs_d, mask_d, At, u, raw, dout, zz, h0, r0, rseg, suf, dz0 = \
            o_n, md_n, A_n, u_n, raw_n, do_n, z_n, h0_n, r0_n, rs_n, sf_n, dz_n
        o_n, md_n, A_n, u_n, raw_n, do_n, z_n, h0_n, r0_n, rs_n, sf_n, dz_n = _bwd_inputs(
            u_ptr, delta_ptr, z_ptr, dout_ptr, A_ptr, Htile_ptr, Rtile_ptr, Rseg_ptr, SUF_ptr, db_ptr, dz_ptr,
            pid_b, k, seg, d0 + BD, d_end, offs_n, mask_n, p, mask_t, DIM,
            s_u_b, s_u_d, s_dl_b, s_dl_d, s_z_b, s_z_d, s_do_b, s_do_d, s_do_l, s_h_b, s_h_c, s_h_n,
            s_rs_b, s_rs_c, s_f_b, s_f_c, s_dz_b, s_dz_d, BD, HAS_Z, HAS_DB, DZ_ACC, HSEG)
        if RELOAD_BC:  # the loop-dependent mask keeps the compiler from hoisting the loads
            mtl = mask_t & (p * 0 + d0 < d_end)
            Bt = _load_tn(B_ptr, pid_b * s_B_b + g * s_B_g, s_B_n, offs_n, mask_n, p, mtl)
            Ct = _load_tn(C_ptr, pid_b * s_C_b + g * s_C_g, s_C_n, offs_n, mask_n, p, mtl)
        mnd = mask_n[:, None] & mask_d[None, :]
        m2 = mask_t[:, None] & mask_d[None, :]
        if SOFTPLUS:
            dt = _softplus(raw, FAST)
        else:
            dt = raw
        dt = tl.where(m2, dt, 0.0)
        a = _decay(dt, At * 1.4426950408889634, reset, FAST, HAS_SEQ)
        dtu = dt * u
        b = dtu[:, None, :] * Bt[:, :, None]
        hs = _scan_tnd(a, b, h0, T, REVERSE)                    # h_t, (T, N, BD)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
        if HAS_Z:
            y = tl.sum(hs * Ct[:, :, None], axis=1)              # (T, BD)
            if HAS_D:
                y += Dv[None, :] * u
            sig = _sigmoid(zz, FAST)
            dy = dout * zz * sig
            dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
            dz_off = pid_b * s_dz_b + offs_d[None, :] * s_dz_d + p[:, None]
            if DZ_ACC:  # a second scan gated by the same z (the other direction) adds its share
                dz += dz0.to(tl.float32)
            tl.store(dz_ptr + dz_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
            if Y_OUT:
                y_off = pid_b * s_y_b + offs_d[None, :] * s_y_d + p[:, None]
                yg = y * zz * sig
                if DZ_ACC:
                    yg += tl.load(y_ptr + y_off, mask=m2, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_off, yg.to(y_ptr.dtype.element_ty), mask=m2)
        else:
            dy = dout
        # q_t = C_t dy_t + a_{t+1} q_{t+1}, entered from the right with r0: one reverse scan.
        c = dy[:, None, :] * Ct[:, :, None]
        r0 += _exp2(At * 1.4426950408889634 * suf[None, :], FAST) * rseg     # + what enters the segment
        c = tl.where(is_last, c + r0[None, :, :], c)
        ones = tl.full((T, BN, BD), 1.0, dtype=tl.float32)
        _f, _p, q = tl.associative_scan((_flip_if(a, not REVERSE), ones, _flip_if(c, not REVERSE)), 0, _combine_next)
        q = _flip_if(q, not REVERSE)
        qh = q * (hs - b)                                         # q_t a_t h_{t-1}
        qb = tl.sum(q * Bt[:, :, None], axis=1)                   # (T, BD)
        ddt = qb * u + tl.sum(qh * At[None, :, :], axis=1)
        du = qb * dt
        if HAS_D:
            du += Dv[None, :] * dy
            _put_partial(dD_ptr + part * s_dD_t + offs_d, tl.sum(tl.where(m2, dy * u, 0.0), axis=0), mask_d,
                         PART_ROWS)
        _put_partial(dA_ptr + part * s_dA_t + offs_n[:, None] * DIM + offs_d[None, :],
                     tl.sum(qh * dt[:, None, :], axis=0), mnd, PART_ROWS)
        if LANE_RS:
            dB_acc += _reduce_scatter(q * dtu[:, None, :], T, BN, BD, LANE_RS)
            dC_acc += _reduce_scatter(hs * dy[:, None, :], T, BN, BD, LANE_RS)
        else:
            dB_acc += q * dtu[:, None, :]
            dC_acc += hs * dy[:, None, :]
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt * _sigmoid(raw, FAST))
        if DT_PRE:
            ddt *= _one_minus_exp_neg(dt, FAST)
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_DB or DT_PRE:
            _put_partial(ddb_ptr + part * s_dD_t + offs_d, tl.sum(ddt, axis=0), mask_d, PART_ROWS)
        tl.store(du_ptr + pid_b * s_du_b + offs_d[None, :] * s_du_d + p[:, None], du.to(du_ptr.dtype.element_ty),
                 mask=m2)
        tl.store(ddelta_ptr + pid_b * s_ddl_b + offs_d[None, :] * s_ddl_d + p[:, None],
                 ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
    if LANE_RS:  # step j of the tile sits on channel lane j
        mtn = mask_n[None, :, None] & mask_t[None, None, :]
        dBo = dB_ptr + pid_b * s_dB_b + g * s_dB_g + offs_n[None, :, None] * s_dB_n + p[None, None, :]
        dCo = dC_ptr + pid_b * s_dC_b + g * s_dC_g + offs_n[None, :, None] * s_dC_n + p[None, None, :]
        dB_tn = dB_acc
        dC_tn = dC_acc
    else:
        mtn = mask_t[:, None] & mask_n[None, :]
        dBo = dB_ptr + pid_b * s_dB_b + g * s_dB_g + offs_n[None, :] * s_dB_n + p[:, None]
        dCo = dC_ptr + pid_b * s_dC_b + g * s_dC_g + offs_n[None, :] * s_dC_n + p[:, None]
        dB_tn = tl.sum(dB_acc, axis=2)
        dC_tn = tl.sum(dC_acc, axis=2)
    if ATOMIC_BC:
        tl.atomic_add(dBo, dB_tn, mask=mtn)
        tl.atomic_add(dCo, dC_tn, mask=mtn)
    else:
        tl.store(dBo, dB_tn, mask=mtn)
        tl.store(dCo, dC_tn, mask=mtn)
