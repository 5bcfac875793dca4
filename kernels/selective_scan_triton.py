"""Triton selective scan: chunked forward and backward kernels.

Design (see DESIGN.md section 4 for why):
* Time is cut into tiles of T steps. Inside a tile the recurrence h_t = a_t h_{t-1} + b_t is a
  `tl.associative_scan` over a (channels, N, T) register tile, so the whole chip works on one long
  sequence instead of one thread block walking a million steps.
* Forward: tiles are grouped into chunks. Pass 1 (`_chunk_state_kernel`) reduces every chunk to
  its end state from zero and its total decay; pass 2 (`_state_passing_kernel`, itself a tiled
  associative scan over chunks) gives every chunk its entering state; pass 3 (`_fwd_kernel`)
  rescans each chunk from that state, writes out = (C.h + D u) * silu(z) and the state entering
  every tile (kept for the backward). With enough (batch, channel) programs to fill the GPU the
  whole sequence is one chunk and passes 1-2 are skipped.
* Backward recomputes h inside each tile from the saved tile-entry state and computes the adjoint
  by a reverse scan; the adjoint entering each tile from the right comes from the same two-pass
  scheme run right to left. One backward program owns one time tile and loops over channel
  blocks, so dB and dC are reduced over channels in registers and stored once.
* reverse=True maps logical step tau to position L-1-tau in the pointer arithmetic: no flipped
  copy of anything is made. seq_idx resets the state (a_t = 0) where the sequence id changes.
* All offsets are 64-bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _combine(a1, b1, a2, b2):
    # Composition of h -> a1 h + b1 then h -> a2 h + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _positions(tau, L, REVERSE: tl.constexpr):
    # Logical step -> physical position along L.
    if REVERSE:
        return L - 1 - tau
    else:
        return tau


@triton.jit
def _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau, mask_t, offs_d, mask_d,
               s_u_b, s_u_d, s_dl_b, s_dl_d, L,
               HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr):
    """u and softplus'd delta for a (BD, T) tile, and the (T,) reset mask."""
    t = _positions(tau, L, REVERSE).to(tl.int64)
    m2 = mask_d[:, None] & mask_t[None, :]
    u = tl.load(u_ptr + pid_b * s_u_b + offs_d[:, None] * s_u_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
    dt = tl.load(delta_ptr + pid_b * s_dl_b + offs_d[:, None] * s_dl_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_DB:
        dt += tl.load(db_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(m2, dt, 0.0)
    if HAS_SEQ:
        tp = _positions(tau - 1, L, REVERSE).to(tl.int64)
        mp = mask_t & (tau > 0)
        cur = tl.load(seq_ptr + pid_b * s_seq_b + t, mask=mask_t, other=0)
        prev = tl.load(seq_ptr + pid_b * s_seq_b + tp, mask=mp, other=0)
        reset = mp & (cur != prev)
    else:
        reset = tau < 0
    return u, dt, reset


@triton.jit
def _load_bc(X_ptr, s_b, s_g, s_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE: tl.constexpr):
    t = _positions(tau, L, REVERSE).to(tl.int64)
    return tl.load(X_ptr + pid_b * s_b + g * s_g + offs_n[:, None] * s_n + t[None, :],
                   mask=mask_n[:, None] & mask_t[None, :], other=0.0).to(tl.float32)


@triton.jit
def _decay_and_input(u, dt, Bt, A2, reset, mask_t):
    """a = exp(dt A) (reset -> 0, outside L -> 1) and b = dt u B, both (BD, N, T)."""
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    a = tl.where(reset[None, None, :], 0.0, a)
    a = tl.where(mask_t[None, None, :], a, 1.0)
    b = (dt * u)[:, None, :] * Bt[None, :, :]
    return a, b


@triton.jit
def _chunk_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, db_ptr, seq_ptr, S_ptr, P_ptr,
    L, DIM, NSTATE, CHUNK_TILES, DIM_PER_GROUP,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_seq_b,
    s_S_b, s_S_c, s_S_d,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr,
):
    """Pass 1: every chunk's end state from a zero start (S) and its total decay (P)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2 = tl.load(A_ptr + offs_d[:, None] * NSTATE + offs_n[None, :],
                 mask=mask_d[:, None] & mask_n[None, :], other=0.0) * 1.4426950408889634
    h = tl.zeros((BD, BN), dtype=tl.float32)
    p = tl.full((BD, BN), 1.0, dtype=tl.float32)
    for i in range(0, CHUNK_TILES):
        tau = (pid_c * CHUNK_TILES + i) * T + tl.arange(0, T)
        mask_t = tau < L
        u, dt, reset = _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau, mask_t, offs_d, mask_d,
                                  s_u_b, s_u_d, s_dl_b, s_dl_d, L, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE)
        Bt = _load_bc(B_ptr, s_B_b, s_B_g, s_B_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
        a, b = _decay_and_input(u, dt, Bt, A2, reset, mask_t)
        a_tot, b_tot = _scan_total(a, b, T, False)
        h = a_tot * h + b_tot
        p = a_tot * p
    off = pid_b * s_S_b + pid_c * s_S_c + offs_d[:, None] * s_S_d + offs_n[None, :]
    m = mask_d[:, None] & mask_n[None, :]
    tl.store(S_ptr + off, h, mask=m)
    tl.store(P_ptr + off, p, mask=m)


@triton.jit
def _state_passing_kernel(
    S_ptr, P_ptr, H0_ptr, Hin_ptr, Hlast_ptr,
    NCHUNK, DIM, NSTATE,
    s_b, s_c, s_d, s_h0_b, s_h0_d,
    BC: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
):
    """Pass 2: H_in[c] = state entering chunk c, from H[c] = P[c] * H[c-1] + S[c].

    A tiled associative scan over blocks of BC chunks, so thousands of chunks are not a
    thousands-long dependent chain of memory loads. REVERSE walks the chunks from the last one
    (the adjoint in the backward). Writes H_in for every chunk and the final state.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mdn = mask_d[:, None] & mask_n[None, :]
    if HAS_H0:
        h = tl.load(H0_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :], mask=mdn, other=0.0)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    base = pid_b * s_b + offs_d[None, :, None] * s_d + offs_n[None, None, :]
    m3 = mdn[None, :, :]
    for c0 in range(0, NCHUNK, BC):
        j = c0 + tl.arange(0, BC)                      # logical chunk order
        mj = j < NCHUNK
        if REVERSE:
            c = (NCHUNK - 1 - j).to(tl.int64)
            c_next = c - 1
        else:
            c = j.to(tl.int64)
            c_next = c + 1
        mm = mj[:, None, None] & m3
        # The chunk entering state is the previous chunk's end state: write the first one here,
        # every later one as the inclusive result of the chunk before it.
        first = (j == 0)[:, None, None] & m3
        tl.store(Hin_ptr + base + c[:, None, None] * s_c, h[None, :, :] + tl.zeros((BC, BD, BN), tl.float32),
                 mask=first)
        s = tl.load(S_ptr + base + c[:, None, None] * s_c, mask=mm, other=0.0)
        p = tl.load(P_ptr + base + c[:, None, None] * s_c, mask=mm, other=1.0)
        p_cum, s_cum = tl.associative_scan((p, s), 0, _combine)
        h_after = s_cum + p_cum * h[None, :, :]        # state after chunk j
        tl.store(Hin_ptr + base + c_next[:, None, None] * s_c, h_after,
                 mask=mm & ((j + 1) < NCHUNK)[:, None, None])
        j_last = tl.minimum(c0 + BC, NCHUNK) - 1
        h = tl.sum(tl.where((j == j_last)[:, None, None], h_after, 0.0), axis=0)
    tl.store(Hlast_ptr + pid_b * s_h0_b + offs_d[:, None] * s_h0_d + offs_n[None, :], h, mask=mdn)


@triton.jit
def _scan_total(a, b, T: tl.constexpr, RIGHT_TO_LEFT: tl.constexpr):
    """The composite map (decay, offset) of a whole tile, via an ordered scan along axis 2."""
    a_c, b_c = tl.associative_scan((a, b), 2, _combine, reverse=RIGHT_TO_LEFT)
    if RIGHT_TO_LEFT:
        sel = tl.arange(0, T) == 0
    else:
        sel = tl.arange(0, T) == T - 1
    return tl.sum(tl.where(sel[None, None, :], a_c, 0.0), axis=2), tl.sum(tl.where(sel[None, None, :], b_c, 0.0), axis=2)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, seq_ptr,
    Hchunk_ptr, out_ptr, Htile_ptr, Hlast_ptr,
    L, DIM, NSTATE, CHUNK_TILES, DIM_PER_GROUP,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d,
    s_o_b, s_o_d, s_seq_b,
    s_hc_b, s_hc_c, s_hc_d, s_ht_b, s_ht_c, s_ht_d, s_hl_b, s_hl_d,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, HAS_HCHUNK: tl.constexpr, SAVE_TILES: tl.constexpr,
):
    """Pass 3: outputs of one chunk from its entering state; saves every tile's entering state."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mdn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2 = tl.load(A_ptr + offs_d[:, None] * NSTATE + offs_n[None, :], mask=mdn, other=0.0) * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    if HAS_HCHUNK:
        h = tl.load(Hchunk_ptr + pid_b * s_hc_b + pid_c * s_hc_c + offs_d[:, None] * s_hc_d + offs_n[None, :],
                    mask=mdn, other=0.0)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    last_t = tl.arange(0, T) == T - 1
    for i in range(0, CHUNK_TILES):
        tile = pid_c * CHUNK_TILES + i
        if SAVE_TILES:
            if tile * T < L:  # the last chunk may hold fewer tiles
                tl.store(Htile_ptr + pid_b * s_ht_b + tile * s_ht_c + offs_d[:, None] * s_ht_d + offs_n[None, :],
                         h, mask=mdn)
        tau = tile * T + tl.arange(0, T)
        mask_t = tau < L
        u, dt, reset = _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau, mask_t, offs_d, mask_d,
                                  s_u_b, s_u_d, s_dl_b, s_dl_d, L, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE)
        Bt = _load_bc(B_ptr, s_B_b, s_B_g, s_B_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
        Ct = _load_bc(C_ptr, s_C_b, s_C_g, s_C_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
        a, b = _decay_and_input(u, dt, Bt, A2, reset, mask_t)
        a_cum, h_loc = tl.associative_scan((a, b), 2, _combine)
        hs = h_loc + a_cum * h[:, :, None]                      # (BD, N, T)
        y = tl.sum(hs * Ct[None, :, :], axis=1)                 # (BD, T)
        if HAS_D:
            y += Dv[:, None] * u
        t = _positions(tau, L, REVERSE).to(tl.int64)
        m2 = mask_d[:, None] & mask_t[None, :]
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_ptr + pid_b * s_o_b + offs_d[:, None] * s_o_d + t[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=m2)
        h = tl.sum(tl.where(last_t[None, None, :], hs, 0.0), axis=2)
    if pid_c == tl.num_programs(2) - 1:
        tl.store(Hlast_ptr + pid_b * s_hl_b + offs_d[:, None] * s_hl_d + offs_n[None, :], h, mask=mdn)


@triton.jit
def _adjoint_tile_state_kernel(
    u_ptr, delta_ptr, A_ptr, C_ptr, z_ptr, dout_ptr, db_ptr, seq_ptr, S_ptr, P_ptr,
    L, DIM, NSTATE, DIM_PER_GROUP,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d, s_do_b, s_do_d, s_seq_b,
    s_S_b, s_S_c, s_S_d,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Backward pass 1: per tile, r at the tile start from a zero right boundary, and the decay.

    r_t = a_t (C_t dy_t + r_{t+1}) is the gradient reaching h_{t-1}; it runs right to left.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    tile = tl.program_id(2).to(tl.int64)
    offs_d = (pid_d * BD + tl.arange(0, BD)).to(tl.int64)
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    mdn = mask_d[:, None] & mask_n[None, :]
    g = (pid_d * BD // DIM_PER_GROUP).to(tl.int64)
    A2 = tl.load(A_ptr + offs_d[:, None] * NSTATE + offs_n[None, :], mask=mdn, other=0.0) * 1.4426950408889634
    tau = tile * T + tl.arange(0, T)
    mask_t = tau < L
    u, dt, reset = _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau, mask_t, offs_d, mask_d,
                              s_u_b, s_u_d, s_dl_b, s_dl_d, L, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE)
    Ct = _load_bc(C_ptr, s_C_b, s_C_g, s_C_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
    t = _positions(tau, L, REVERSE).to(tl.int64)
    m2 = mask_d[:, None] & mask_t[None, :]
    dy = tl.load(dout_ptr + pid_b * s_do_b + offs_d[:, None] * s_do_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    a = tl.exp2(dt[:, None, :] * A2[:, :, None])
    a = tl.where(reset[None, None, :], 0.0, a)
    a = tl.where(mask_t[None, None, :], a, 1.0)
    c = a * (dy[:, None, :] * Ct[None, :, :])
    # r_t = a_t r_{t+1} + a_t c_t, composed right to left over the tile.
    p_tot, r_tot = _scan_total(a, c, T, True)
    off = pid_b * s_S_b + tile * s_S_c + offs_d[:, None] * s_S_d + offs_n[None, :]
    tl.store(S_ptr + off, r_tot, mask=mdn)
    tl.store(P_ptr + off, p_tot, mask=mdn)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, db_ptr, seq_ptr, dout_ptr,
    Htile_ptr, Rtile_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, ddb_ptr,
    L, DIM, NSTATE, DIM_PER_GROUP, DIM_PER_SPLIT, NSPLIT,
    s_u_b, s_u_d, s_dl_b, s_dl_d, s_B_b, s_B_g, s_B_n, s_C_b, s_C_g, s_C_n, s_z_b, s_z_d,
    s_do_b, s_do_d, s_seq_b,
    s_h_b, s_h_c, s_h_d,
    s_du_b, s_du_d, s_ddl_b, s_ddl_d, s_dz_b, s_dz_d, s_dB_b, s_dB_g, s_dB_n, s_dC_b, s_dC_g, s_dC_n,
    BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DB: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_SEQ: tl.constexpr, REVERSE: tl.constexpr, ATOMIC_BC: tl.constexpr,
):
    """Backward pass 3: all gradients of one time tile, looping over the channels of a split."""
    pid_b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    offs_n = tl.arange(0, BN)
    mask_n = offs_n < NSTATE
    tau = tile * T + tl.arange(0, T)
    mask_t = tau < L
    t = _positions(tau, L, REVERSE).to(tl.int64)
    # The next logical step, for the adjoint's a_{t+1}; inside the tile only (the last step of
    # the tile takes the boundary adjoint, which already carries a_{t+1}).
    tau1 = tau + 1
    inner = (tl.arange(0, T) < T - 1) & (tau1 < L)
    g = (pid_s // NSPLIT).to(tl.int64)
    d_start = g * DIM_PER_GROUP + (pid_s % NSPLIT) * DIM_PER_SPLIT
    d_end = tl.minimum(d_start + DIM_PER_SPLIT, (g + 1) * DIM_PER_GROUP)
    Bt = _load_bc(B_ptr, s_B_b, s_B_g, s_B_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
    Ct = _load_bc(C_ptr, s_C_b, s_C_g, s_C_n, pid_b, g, offs_n, mask_n, tau, mask_t, L, REVERSE)
    dB_acc = tl.zeros((BN, T), dtype=tl.float32)
    dC_acc = tl.zeros((BN, T), dtype=tl.float32)
    for d0 in range(d_start, d_end, BD):
        offs_d = (d0 + tl.arange(0, BD)).to(tl.int64)
        mask_d = offs_d < d_end
        mdn = mask_d[:, None] & mask_n[None, :]
        m2 = mask_d[:, None] & mask_t[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * NSTATE + offs_n[None, :], mask=mdn, other=0.0)
        A2 = A * 1.4426950408889634
        u, dt, reset = _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau, mask_t, offs_d, mask_d,
                                  s_u_b, s_u_d, s_dl_b, s_dl_d, L, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE)
        _u1, dt1, reset1 = _load_tile(u_ptr, delta_ptr, db_ptr, seq_ptr, s_seq_b, pid_b, tau1, inner, offs_d, mask_d,
                                      s_u_b, s_u_d, s_dl_b, s_dl_d, L, HAS_DB, SOFTPLUS, HAS_SEQ, REVERSE)
        a, b = _decay_and_input(u, dt, Bt, A2, reset, mask_t)
        a1 = tl.exp2(dt1[:, None, :] * A2[:, :, None])
        a1 = tl.where(reset1[None, None, :], 0.0, a1)
        a1 = tl.where(inner[None, None, :], a1, 1.0)
        hoff = pid_b * s_h_b + tile * s_h_c + offs_d[:, None] * s_h_d + offs_n[None, :]
        h0 = tl.load(Htile_ptr + hoff, mask=mdn, other=0.0)
        r0 = tl.load(Rtile_ptr + hoff, mask=mdn, other=0.0)
        a_cum, h_loc = tl.associative_scan((a, b), 2, _combine)
        hs = h_loc + a_cum * h0[:, :, None]                       # h_t, (BD, N, T)
        y = tl.sum(hs * Ct[None, :, :], axis=1)
        dout = tl.load(dout_ptr + pid_b * s_do_b + offs_d[:, None] * s_do_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
            y += Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * s_z_b + offs_d[:, None] * s_z_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zz)
            dy = dout * zz * sig
            dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(dz_ptr + pid_b * s_dz_b + offs_d[:, None] * s_dz_d + t[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=m2)
        else:
            dy = dout
        c = dy[:, None, :] * Ct[None, :, :]
        # q_t = dL/dh_t = C_t dy_t + a_{t+1} q_{t+1}; the tile's last step adds the boundary r0.
        al_cum, q_loc = tl.associative_scan((a1, c), 2, _combine, reverse=True)
        q = q_loc + al_cum * r0[:, :, None]
        qh = q * (hs - b)                                         # q_t a_t h_{t-1}
        qh = tl.where(mask_t[None, None, :], qh, 0.0)
        ddt = tl.sum(q * Bt[None, :, :], axis=1) * u + tl.sum(qh * A[:, :, None], axis=1)
        du = tl.sum(q * Bt[None, :, :], axis=1) * dt
        if HAS_D:
            du += Dv[:, None] * dy
            tl.atomic_add(dD_ptr + offs_d, tl.sum(tl.where(m2, dy * u, 0.0), axis=1), mask=mask_d)
        tl.atomic_add(dA_ptr + offs_d[:, None] * NSTATE + offs_n[None, :],
                      tl.sum(qh * dt[:, None, :], axis=2), mask=mdn)
        dB_acc += tl.sum(q * (dt * u)[:, None, :], axis=0)
        dC_acc += tl.sum(hs * dy[:, None, :], axis=0)
        if HAS_DB or SOFTPLUS:
            raw = tl.load(delta_ptr + pid_b * s_dl_b + offs_d[:, None] * s_dl_d + t[None, :], mask=m2, other=0.0).to(tl.float32)
            if HAS_DB:
                raw += tl.load(db_ptr + offs_d, mask=mask_d, other=0.0)[:, None]
            if SOFTPLUS:
                ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        ddt = tl.where(m2, ddt, 0.0)
        if HAS_DB:
            tl.atomic_add(ddb_ptr + offs_d, tl.sum(ddt, axis=1), mask=mask_d)
        tl.store(du_ptr + pid_b * s_du_b + offs_d[:, None] * s_du_d + t[None, :], du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + pid_b * s_ddl_b + offs_d[:, None] * s_ddl_d + t[None, :],
                 ddt.to(ddelta_ptr.dtype.element_ty), mask=m2)
    mnt = mask_n[:, None] & mask_t[None, :]
    dBo = dB_ptr + pid_b * s_dB_b + g * s_dB_g + offs_n[:, None] * s_dB_n + t[None, :]
    dCo = dC_ptr + pid_b * s_dC_b + g * s_dC_g + offs_n[:, None] * s_dC_n + t[None, :]
    if ATOMIC_BC:
        tl.atomic_add(dBo, dB_acc, mask=mnt)
        tl.atomic_add(dCo, dC_acc, mask=mnt)
    else:
        tl.store(dBo, dB_acc, mask=mnt)
        tl.store(dCo, dC_acc, mask=mnt)
