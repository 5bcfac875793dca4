"""`selective_scan`: the mamba_ssm `selective_scan_fn` call, on Triton (CUDA) or PyTorch (anywhere).

Backend choice, in order: the `backend=` argument, the GENOMAMBA_SCAN_BACKEND environment variable
("triton" or "torch"), else Triton for CUDA tensors and the chunked PyTorch path otherwise.
Forcing "triton" on CPU tensors works under TRITON_INTERPRET=1 (that is how CI tests the kernels).
Under torch.compile the Triton path is a pair of torch.library custom ops (forward, backward) with
fake-tensor and autograd registrations, so it traces `selective_scan` without a graph break. In eager
mode the same functions run through a plain autograd.Function (training) or directly (inference),
which costs the host less time per call than the dispatcher.
"""

from __future__ import annotations

import os

import torch
import triton

from typing import NamedTuple

from . import selective_scan_triton as K
from .reference import selective_scan_chunked

BACKENDS = ("triton", "torch")


class ChunkStates(NamedTuple):
    """The forward's chunks and the state entering each: states (batch, chunks, N, dim) float32,
    each chunk chunk_tiles tiles long. A few MiB per scan (a chunk is hundreds of tiles at batch 1);
    from them the backward rebuilds its tile states in one pass (selective_scan_triton_bwd)."""
    states: torch.Tensor
    chunk_tiles: int


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """Pick "triton" or "torch" for tensor `x` (argument, then environment, then device)."""
    choice = backend or os.environ.get("GENOMAMBA_SCAN_BACKEND") or "auto"
    if choice == "auto":
        return "triton" if x.is_cuda else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"unknown scan backend {choice!r}; choose one of {BACKENDS} or 'auto'")
    if choice == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    return choice


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, L: int) -> torch.Tensor:
    """Packed-sequence boundaries [0, l0, l0+l1, ..., L] -> (1, L) int32 sequence ids."""
    lengths = torch.diff(cu_seqlens.to(torch.int64))
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != L or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to L={L}, got {cu_seqlens.tolist()}")
    ids = torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32)
    return torch.repeat_interleave(ids, lengths).unsqueeze(0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tile_config(nstate: int, device: torch.device) -> dict:
    """Tile shapes: small under the interpreter (it runs numpy per op), register-sized on GPU.

    T is the number of time steps each thread scans sequentially (the tile's in-thread axis).
    """
    bn = triton.next_power_of_2(nstate)
    if _interpreting() or device.type != "cuda":
        cfg = dict(T=8, BD=4, BD_BWD=4, BC=8, BD_PASS=64, BN=bn, warps=1, warps_bwd=1, warps_pass=1, TPP=2,
                   FAST=False, lane_rs=1, reload_bc=0, part_rows=3, tile_bf16=0, seg_fixup=1)
        return _override(cfg)
    # BD = 32 x warps puts one channel on each thread with all N states in its registers, so the
    # sums over N need no shuffles or shared memory (kernels/BENCHMARKS.md has the measurements;
    # the backward's main kernel splits N over 4 lanes instead: BD_BWD = 8 channels per warp).
    # 128 channels on 4 warps rather than 64 on 2: 1% faster at batch 1, 12% at (8, 1536, 2048)
    # forward (H100, eighth session).
    # warps_pass = 0: chosen per launch by _passing_warps.
    # lane_rs / reload_bc: the backward main kernel's dB/dC reduce-scatter and B/C reloads (see
    # _bwd_kernel; kernels/BENCHMARKS.md has the measurements).
    # maxnreg_chunk = 128: the chunk-state pass fits in 128 registers without spilling in its loop
    # (sm_90), so 4 instead of 3 programs share an SM: 1 Mb model inference 350.5 -> 346.2 ms
    # (mean of 5 alternating pairs, H100, eleventh session), training unchanged. Capping the
    # other kernels makes them spill: forward 1.5-4.5x, forward+backward up to 1.4x slower
    # (kernels/BENCHMARKS.md).
    # part_rows = 64: the backward adds its dA / dD / d(delta_bias) partial sums atomically into 64
    # rows instead of storing one row per tile (512 MB per scan at (1, 512, 131072)) and summing
    # them afterwards: forward+backward there 4.92 -> 4.62 ms, training step at 131 kb 217 -> 204-206
    # ms (H100, twelfth session; kernels/BENCHMARKS.md).
    # tile_bf16 = 1: with bf16 inputs the per-tile state buffers of the training path are bf16
    # (_tile_dtype). The interpreter's default stays 0 (tests select the levels explicitly).
    # TPP: tiles per program of the backward's adjoint pass, which is also the segment the state
    # passing walks in the backward (see _adjoint_tile_kernel).
    # seg_fixup = 1: tile states the backward rebuilds per segment get their segment's entering
    # state from a kernel of their own (_segment_fixup_kernel) rather than in the main kernel
    # (HSEG): the (1, 512, 2^20) backward from rebuilt states 28.0 -> 27.5 ms (29.0 -> 28.0 ms
    # writing y too), checkpointed 1 Mb training step 1,685 -> 1,632 ms (H100, sixteenth session;
    # since then checkpointed layers rebuild from the forward's ChunkStates instead, 1,582 ms).
    cfg = dict(T=8, BD=128, BD_BWD=8, BC=32, BD_PASS=32, BN=bn, warps=4, warps_bwd=1, warps_pass=0,
               maxnreg_bwd=0, TPP=16, FAST=True, lane_rs=1, reload_bc=1, maxnreg_fwd=0, maxnreg_fwdt=0,
               maxnreg_chunk=128, maxnreg_adj=0, part_rows=64, tile_bf16=1, seg_fixup=1)
    return _override(cfg)


_TUNING_KEYS = ("T", "BD", "BD_BWD", "warps", "warps_bwd", "maxnreg_bwd", "TPP", "BC", "BD_PASS", "warps_pass",
                "lane_rs", "reload_bc", "maxnreg_fwd", "maxnreg_fwdt", "maxnreg_chunk", "maxnreg_adj",
                "part_rows", "tile_bf16", "seg_fixup")


def _override(cfg: dict) -> dict:
    """For tuning: GENOMAMBA_SCAN_TILES="field=value,..." (any of _TUNING_KEYS) or, positionally,
    "T,BD,BD_BWD,warps,warps_bwd[,maxnreg_bwd[,TPP[,BC[,BD_PASS[,warps_pass
    [,lane_rs[,reload_bc[,maxnreg_fwd[,maxnreg_fwdt[,maxnreg_chunk[,maxnreg_adj[,part_rows[,tile_bf16
    [,seg_fixup]]]]]]]]]]]]]]]"
    (maxnreg 0 = the compiler's choice, warps_pass 0 = per launch; maxnreg_fwd caps the forward's
    output pass without autograd, maxnreg_fwdt the one that saves tile states; part_rows: the rows
    the backward's dA / dD / d(delta_bias) partial sums are added into, 0 = one per tile, stored;
    tile_bf16: with bf16 inputs, 0 = every per-tile state buffer of the training path in fp32,
    1 (the GPU default) = in bf16; see _tile_dtype; seg_fixup: rebuilt tile states made whole by
    their own kernel, 1, the default, or in the backward's main kernel, 0)."""
    override = os.environ.get("GENOMAMBA_SCAN_TILES")
    if override and "=" in override:  # named fields, e.g. "tile_bf16=0,part_rows=0"
        for item in override.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in _TUNING_KEYS:
                raise ValueError(f"GENOMAMBA_SCAN_TILES: unknown field {key.strip()!r} "
                                 f"(fields: {', '.join(_TUNING_KEYS)})")
            cfg[key.strip()] = int(value)
    elif override:
        cfg.update({k: int(v) for k, v in zip(_TUNING_KEYS, override.split(","))})
    return cfg


def _lane_rs_mode(cfg: dict, T: int, bd: int, device: torch.device) -> int:
    """The backward's dB/dC reduce-scatter needs one time step per channel lane (T == BD, a power of
    two up to 16): 1 = warp shuffles on the GPU, 2 = the same arithmetic in plain Triton (the
    interpreter), 0 = off."""
    if not cfg.get("lane_rs") or T != bd or bd & (bd - 1) or bd > 16:
        return 0
    return 1 if device.type == "cuda" and not _interpreting() else 2


def _reg_cap(maxnreg: int, device: torch.device) -> dict:
    """Launch option capping registers per thread (more CTAs per SM); CUDA only."""
    return {"maxnreg": maxnreg} if maxnreg and device.type == "cuda" else {}


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * 8
    return 4


def _block_channels(bd: int, dim_per_group: int, groups: int) -> int:
    """A channel block must not straddle two B/C groups."""
    while groups > 1 and dim_per_group % bd:
        bd //= 2
    return max(bd, 1)


def _decay_buffers(batch: int, n: int, dim: int, has_seq: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per chunk (or backward segment): the sum of dt per channel, and a restart flag when seq_idx is given.
    The passing kernel turns them into decays exp(A * sum dt): 1/N of a per-state decay buffer."""
    sdt = torch.empty(batch, n, dim, device=device, dtype=torch.float32)
    rst = torch.empty(batch, n if has_seq else 1, device=device, dtype=torch.int32)
    return sdt, rst


def _passing_warps(programs: int, device: torch.device, cfg: dict) -> tuple[int, int]:
    """Warps and chunks per block of the state passing. Its one-warp programs are latency-bound
    when there are fewer than ~4 per SM (D x N / 32 = 256 at D = 512, batch 1): then 4 warps walk
    4 x BC chunks per block, 4 x the loads in flight. H100, fwd+bwd (1, 512, 2^20): 44.0 -> 41.7 ms;
    (1, 1536, 131072) with 768 programs: 15.47 -> 15.72 ms, so not there."""
    if cfg["warps_pass"]:
        return cfg["warps_pass"], cfg["BC"]
    if device.type == "cuda" and programs < 4 * torch.cuda.get_device_properties(device).multi_processor_count:
        return 4, 4 * cfg["BC"]
    return 1, cfg["BC"]


def _pass_states(S, SDT, RST, A_nd, h0, H_in, H_last, has_seq: bool, reverse: bool, cfg: dict) -> None:
    """State passing over chunks (forward) or tiles (adjoint, reverse=True): fills H_in, the state
    entering each, and H_last, the final state, from S (batch, n, N, dim) and the decay sums.
    h0 (the state before the first one, or None) has H_last's layout: contiguous (batch, dim, N)."""
    batch, n, nstate, dim = S.shape
    grid = (batch, triton.cdiv(dim, cfg["BD_PASS"]), nstate)
    warps, bc = _passing_warps(grid[0] * grid[1] * grid[2], S.device, cfg)
    K._state_passing_kernel[grid](
        S, SDT, RST, A_nd, h0 if h0 is not None else H_last, H_in, H_last,
        n, dim, S.stride(0), S.stride(1), S.stride(2), SDT.stride(0), SDT.stride(1), RST.stride(0),
        H_last.stride(0), H_last.stride(1),
        BC=bc, BD=cfg["BD_PASS"], HAS_H0=h0 is not None, HAS_SEQ=has_seq, REVERSE=reverse, num_warps=warps)


def _tile_dtype(cfg: dict, u: torch.Tensor) -> torch.dtype:
    """dtype of the per-tile state buffers of the training path: bf16 for bf16 inputs when
    tile_bf16 >= 1 (the GPU default), else fp32. The scan itself always carries its state in fp32.

    The buffers are the ones the backward's main kernel reads: the forward's saved tile-entry
    states and the adjoints entering each tile from within its segment (the adjoint pass's). Each
    is a rounded copy of a chain carried in fp32, so no rounding feeds a chain or accumulates along
    the sequence. They are most of what the backward moves (8 bytes per channel and step each, in
    fp32, against 2 per bf16 input); in bf16 a 131 kb training step took 202 -> 195.6 ms and 34.6 ->
    26.9 GiB, and bf16 gradients stayed within 2.3e-3 of float64 (1.7e-3 with fp32 tiles; H100,
    kernels/BENCHMARKS.md, thirteenth session). (Level 2, the fourteenth session's default, also
    stored the adjoint pass's per-tile sums in bf16; since the fifteenth those are per segment and
    always fp32, so 2 now means 1.)
    """
    if cfg.get("tile_bf16", 0) >= 1 and u.dtype == torch.bfloat16:
        return torch.bfloat16
    return torch.float32


def _as_groups(X: torch.Tensor) -> torch.Tensor:
    X = X if X.stride(-1) == 1 else X.contiguous()
    return X.unsqueeze(1) if X.dim() == 3 else X


def _last_contig(x):
    return None if x is None else (x if x.stride(-1) == 1 else x.contiguous())


def selective_scan_triton_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, reverse=False, seq_idx=None, save_tile_states=False,
                              chunk_tiles=None, out_add=None, keep_chunk_states=False):
    """Forward on Triton. Returns (out, last_state, tile_states or None, config); out_add (like u)
    is added to out inside the output pass. keep_chunk_states (without save_tile_states): the
    third item is the ChunkStates instead, for a backward that rebuilds the tile states."""
    if keep_chunk_states and save_tile_states:
        raise ValueError("keep_chunk_states and save_tile_states exclude each other")
    u, delta, z, out_add = _last_contig(u), _last_contig(delta), _last_contig(z), _last_contig(out_add)
    Bg, Cg = _as_groups(B), _as_groups(C)
    batch, dim, L = u.shape
    nstate = A.shape[1]
    groups = Bg.shape[1]
    if dim % groups or Cg.shape[1] != groups:
        raise ValueError(f"dim={dim} must be divisible by the B/C groups ({groups}, {Cg.shape[1]})")
    dpg = dim // groups
    cfg = _tile_config(nstate, u.device)
    T, BN = cfg["T"], cfg["BN"]
    BD = _block_channels(cfg["BD"], dpg, groups)
    A_nd = A.float().t().contiguous()  # (N, dim): channels contiguous, like the state buffers
    n_tiles = triton.cdiv(L, T)
    n_dblk = triton.cdiv(dim, BD)
    if chunk_tiles is None:
        per_chunk = batch * n_dblk
        target = _target_programs(u.device)
        n_chunks = 1 if per_chunk >= target else min(n_tiles, triton.cdiv(target, per_chunk))
        chunk_tiles = triton.cdiv(n_tiles, n_chunks)
    n_chunks = triton.cdiv(n_tiles, chunk_tiles)
    if n_chunks > 65535:  # chunks sit on grid axis 2
        chunk_tiles = triton.cdiv(n_tiles, 65535)
        n_chunks = triton.cdiv(n_tiles, chunk_tiles)
    dev = u.device
    out = torch.empty_like(u)
    last = torch.empty(batch, dim, nstate, device=dev, dtype=torch.float32)
    # State buffers are (batch, tile or chunk, N, dim): a thread holds one channel's N states, and
    # neighbouring threads' channels are neighbours in memory (coalesced, no layout conversion).
    tiles = torch.empty(batch, n_tiles, nstate, dim, device=dev, dtype=_tile_dtype(cfg, u)) if save_tile_states \
        else last
    h0 = None if initial_state is None else initial_state.float().contiguous()
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    db = None if delta_bias is None else delta_bias.float().contiguous()
    Dv = None if D is None else D.float().contiguous()
    dummy = last
    flags = dict(HAS_DB=db is not None, SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq is not None,
                 REVERSE=bool(reverse), FAST=cfg["FAST"])
    seq_stride = seq.stride(0) if seq is not None else 0
    if n_chunks > 1:
        S = torch.empty(batch, n_chunks, nstate, dim, device=dev, dtype=torch.float32)
        SDT, RST = _decay_buffers(batch, n_chunks, dim, seq is not None, dev)
        K._chunk_state_kernel[(batch, n_dblk, n_chunks)](
            u, delta, A_nd, Bg, db if db is not None else dummy, seq if seq is not None else dummy, S, SDT, RST,
            S, SDT, L, dim, nstate, chunk_tiles, dpg, n_chunks,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
            Bg.stride(0), Bg.stride(1), Bg.stride(2), seq_stride,
            S.stride(0), S.stride(1), S.stride(2), SDT.stride(0), SDT.stride(1), RST.stride(0), 0, 0, 0, 0, 0,
            BD=BD, BN=BN, T=T, PER_TILE=False, num_warps=cfg["warps"], **flags,
            **_reg_cap(cfg.get("maxnreg_chunk", 0), dev))
        Hc = torch.empty_like(S)
        scratch = torch.empty_like(last)
        _pass_states(S, SDT, RST, A_nd, h0, Hc, scratch, seq is not None, False, cfg)
        del S, SDT, RST
        hc, hc_strides = Hc, (Hc.stride(0), Hc.stride(1), 1, Hc.stride(2))
    elif h0 is not None:
        hc, hc_strides = h0, (h0.stride(0), 0, h0.stride(1), 1)
    else:
        hc, hc_strides = dummy, (0, 0, 0, 0)
    zz = z if z is not None else u
    K._fwd_kernel[(batch, n_dblk, n_chunks)](
        u, delta, A_nd, Bg, Cg, Dv if Dv is not None else dummy, zz, db if db is not None else dummy,
        seq if seq is not None else dummy, hc, out, tiles, last, out_add if out_add is not None else dummy,
        L, dim, nstate, chunk_tiles, n_tiles, dpg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        Bg.stride(0), Bg.stride(1), Bg.stride(2), Cg.stride(0), Cg.stride(1), Cg.stride(2),
        zz.stride(0), zz.stride(1), out.stride(0), out.stride(1), seq_stride,
        out_add.stride(0) if out_add is not None else 0, out_add.stride(1) if out_add is not None else 0,
        *hc_strides, tiles.stride(0), tiles.stride(1) if save_tile_states else 0,
        tiles.stride(2) if save_tile_states else 0,
        last.stride(0), last.stride(1),
        BD=BD, BN=BN, T=T, HAS_D=Dv is not None, HAS_Z=z is not None,
        HAS_HCHUNK=(n_chunks > 1) or (h0 is not None), SAVE_TILES=bool(save_tile_states),
        HAS_ADD=out_add is not None, num_warps=cfg["warps"], **flags,
        **_reg_cap(cfg.get("maxnreg_fwdt" if save_tile_states else "maxnreg_fwd", 0), dev))
    if keep_chunk_states:
        if n_chunks > 1:
            entering = Hc
        elif h0 is not None:
            entering = h0.transpose(1, 2).unsqueeze(1).contiguous()     # (batch, 1, N, dim)
        else:
            entering = torch.zeros(batch, 1, nstate, dim, device=dev, dtype=torch.float32)
        return out, last, ChunkStates(entering, chunk_tiles), cfg
    return out, last, (tiles if save_tile_states else None), cfg


def _tile_entry_states(u, delta, A_nd, Bg, db, seq, initial_state, per: int, H, Hseg, PRE, BD: int, cfg: dict,
                       flags: dict, fixup: bool) -> None:
    """What the backward's main kernel needs of the forward states when the forward kept none,
    rebuilt per segment of `per` tiles (_chunk_state_kernel with PER_TILE): fills H (batch, tiles,
    N, dim; in the dtype of kept tile states), the state entering each tile from its segment's
    start, PRE (batch, tiles, dim), the sum of dt between, and Hseg (batch, segments, N, dim), the
    state entering each segment (state passing over segments). With `fixup`, _segment_fixup_kernel
    then adds exp(A * PRE) * Hseg to H, so H holds whole states; without, the main kernel adds it
    (HSEG). The memory lives only
    during this backward. (Before segments, the passing over every tile cost most of the +14 ms
    this rebuild added to the 44 ms forward+backward of (1, 512, 2^20) on an H100.)"""
    batch, dim, L = u.shape
    nstate, n_tiles, n_seg = A_nd.shape[0], H.shape[1], Hseg.shape[1]
    dev = u.device
    SDT, RST = _decay_buffers(batch, n_seg, dim, seq is not None, dev)
    dummy = H
    K._chunk_state_kernel[(batch, triton.cdiv(dim, BD), n_seg)](
        u, delta, A_nd, Bg, db if db is not None else dummy, seq if seq is not None else dummy, Hseg, SDT, RST,
        H, PRE, L, dim, nstate, per, dim // Bg.shape[1], n_tiles,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        Bg.stride(0), Bg.stride(1), Bg.stride(2), seq.stride(0) if seq is not None else 0,
        Hseg.stride(0), Hseg.stride(1), Hseg.stride(2), SDT.stride(0), SDT.stride(1), RST.stride(0),
        H.stride(0), H.stride(1), H.stride(2), PRE.stride(0), PRE.stride(1),
        BD=BD, BN=cfg["BN"], T=cfg["T"], PER_TILE=True, num_warps=cfg["warps"], **flags,
        **_reg_cap(cfg.get("maxnreg_chunk", 0), dev))
    h0 = None if initial_state is None else initial_state.float().contiguous()
    last = torch.empty(batch, dim, nstate, device=dev, dtype=torch.float32)
    _pass_states(Hseg, SDT, RST, A_nd, h0, Hseg, last, seq is not None, False, cfg)
    if fixup:   # H += exp(A * PRE) * Hseg here, once, rather than in the main kernel
        K._segment_fixup_kernel[(n_seg, batch, triton.cdiv(dim, BD))](
            H, Hseg, PRE, A_nd, dim, nstate, per, n_tiles, H.stride(0), H.stride(1), H.stride(2),
            Hseg.stride(0), Hseg.stride(1), Hseg.stride(2), PRE.stride(0), PRE.stride(1),
            BD=BD, BN=cfg["BN"], num_warps=cfg["warps"])


def _tile_states_from_chunks(u, delta, A_nd, Bg, db, seq, chunks: ChunkStates, H, BD: int, cfg: dict,
                             flags: dict) -> None:
    """The backward's tile-entry states when the forward kept only its ChunkStates: every forward
    chunk rescanned from the state entering it (_chunk_state_kernel with PER_TILE and H_IN),
    writing each tile's entering state, whole, into H. One pass: no state passing, no fix-up."""
    batch, dim, L = u.shape
    S = chunks.states
    n_tiles = H.shape[1]
    K._chunk_state_kernel[(batch, triton.cdiv(dim, BD), S.shape[1])](
        u, delta, A_nd, Bg, db if db is not None else H, seq if seq is not None else H, S, S, S, H, H,
        L, dim, A_nd.shape[0], chunks.chunk_tiles, dim // Bg.shape[1], n_tiles,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        Bg.stride(0), Bg.stride(1), Bg.stride(2), seq.stride(0) if seq is not None else 0,
        S.stride(0), S.stride(1), S.stride(2), 0, 0, 0, H.stride(0), H.stride(1), H.stride(2), 0, 0,
        BD=BD, BN=cfg["BN"], T=cfg["T"], PER_TILE=True, H_IN=True, num_warps=cfg["warps"], **flags)
    # No register cap here: this variant needs 250 registers (sm_90) and spills at the forward's 128.


def selective_scan_triton_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                              initial_state, reverse, seq_idx, tiles, cfg, nsplit=None, dz_out=None,
                              dz_accumulate=False, y_out=None, delta_pre_softplus=False):
    """Backward on Triton from the saved tile-entry states. Returns the input gradients.

    dz_out (like z, last dim contiguous): where dz is written (else a new tensor); with
    dz_accumulate the kernel adds dz to what dz_out holds (two scans gated by one z).
    y_out (like z, last dim contiguous; needs z): the forward's gated output is written there too
    (added to what it holds with dz_accumulate), from the states the backward recomputes anyway.
    tiles: the forward's kept tile states; or an empty tensor (the forward kept none: they are
    rebuilt per segment); or the forward's ChunkStates (rebuilt from them in one pass).
    delta_pre_softplus (delta_bias None, delta_softplus False): delta is softplus(raw + bias)
    computed outside (dt_proj_softplus); the returned ddelta is raw's gradient and the ddb slot
    holds the bias's."""
    if delta_pre_softplus and (delta_bias is not None or delta_softplus):
        raise ValueError("delta_pre_softplus: delta already holds softplus(raw + bias)")
    from_chunks = isinstance(tiles, ChunkStates)
    u, delta, z = _last_contig(u), _last_contig(delta), _last_contig(z)  # dout: any strides
    Bg, Cg = _as_groups(B), _as_groups(C)
    batch, dim, L = u.shape
    nstate = A.shape[1]
    groups = Bg.shape[1]
    dpg = dim // groups
    T, BN = cfg["T"], cfg["BN"]
    BD = _block_channels(cfg["BD"], dpg, groups)
    BDb = _block_channels(cfg["BD_BWD"], dpg, groups)
    n_tiles = triton.cdiv(L, T)
    dev = u.device
    A_nd = A.float().t().contiguous()
    seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    db = None if delta_bias is None else delta_bias.float().contiguous()
    Dv = None if D is None else D.float().contiguous()
    dummy = tiles.states if from_chunks else tiles
    seq_stride = seq.stride(0) if seq is not None else 0
    flags = dict(HAS_DB=db is not None, SOFTPLUS=bool(delta_softplus), HAS_SEQ=seq is not None,
                 REVERSE=bool(reverse), FAST=cfg["FAST"])
    zz = z if z is not None else u
    # Segments of TPP tiles (more when the tiles would put more than 65,535 segments on grid axis 2
    # of a rebuild below). Pass 1, per segment walked against the scan: per tile, the adjoint
    # entering it from within its segment (R) and the sum of dt between (SUF); per segment, the
    # adjoint it hands on (S), its sum of dt and restarts.
    tpp = max(cfg["TPP"], triton.cdiv(n_tiles, 65535))
    n_seg = triton.cdiv(n_tiles, tpp)
    rebuild = from_chunks or tiles.numel() == 0   # the forward kept no tile states
    per_segment = rebuild and not from_chunks
    fixup = per_segment and bool(cfg.get("seg_fixup"))
    halves = 2 if per_segment else 1   # that rebuild keeps its per-segment states and dt sums in the second halves
    R = torch.empty(batch, n_tiles, nstate, dim, device=dev, dtype=_tile_dtype(cfg, u))
    SUF = torch.empty(halves * batch, n_tiles, dim, device=dev, dtype=torch.float32)
    S = torch.empty(halves * batch, n_seg, nstate, dim, device=dev, dtype=torch.float32)
    if rebuild:
        H = torch.empty(batch, n_tiles, nstate, dim, device=dev, dtype=_tile_dtype(cfg, u))
        if from_chunks:
            _tile_states_from_chunks(u, delta, A_nd, Bg, db, seq, tiles, H, BD, cfg, flags)
        else:
            _tile_entry_states(u, delta, A_nd, Bg, db, seq, initial_state, tpp, H, S[batch:], SUF[batch:], BD,
                               cfg, flags, fixup)
        tiles = dummy = H
    SDT, RST = _decay_buffers(batch, n_seg, dim, seq is not None, dev)
    K._adjoint_tile_kernel[(n_seg, batch, triton.cdiv(dim, BD))](
        u, delta, A_nd, Cg, zz, dout, db if db is not None else dummy, seq if seq is not None else dummy,
        R, SUF, S, SDT, RST, L, dim, nstate, dpg, n_tiles, tpp,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), Cg.stride(0), Cg.stride(1), Cg.stride(2),
        zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1), dout.stride(2), seq_stride,
        R.stride(0), R.stride(1), R.stride(2), SUF.stride(0), SUF.stride(1),
        S.stride(0), S.stride(1), S.stride(2), SDT.stride(0), SDT.stride(1), RST.stride(0),
        BD=BD, BN=BN, T=T, HAS_Z=z is not None, num_warps=cfg["warps"], **flags,
        **_reg_cap(cfg.get("maxnreg_adj", 0), dev))
    # Pass 2: the adjoint entering every segment from the right (written over S), and the
    # initial-state gradient.
    dh0 = torch.empty(batch, dim, nstate, device=dev, dtype=torch.float32)
    dl = None if dlast is None else dlast.float().contiguous()
    _pass_states(S[:batch], SDT, RST, A_nd, dl, S[:batch], dh0, seq is not None, True, cfg)
    del SDT, RST
    # Pass 3: every gradient, one program per (batch, tile, channel split).
    if nsplit is None:
        target = _target_programs(dev)
        nsplit = max(1, min(triton.cdiv(target, batch * n_tiles * groups), triton.cdiv(dpg, BDb)))
    dps = triton.cdiv(dpg, nsplit)
    nsplit = triton.cdiv(dpg, dps)
    atomic_bc = nsplit > 1
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    if dz_out is not None and (z is None or dz_out.shape != z.shape or dz_out.stride(-1) != 1):
        raise ValueError("dz_out must be shaped like z with its last dim contiguous")
    if dz_accumulate and dz_out is None:
        raise ValueError("dz_accumulate needs dz_out")
    if y_out is not None and (z is None or y_out.shape != z.shape or y_out.stride(-1) != 1):
        raise ValueError("y_out needs z and must be shaped like it with its last dim contiguous")
    dz = (dz_out if dz_out is not None else torch.empty_like(z)) if z is not None else None
    alloc = torch.zeros if atomic_bc else torch.empty
    dB = alloc(Bg.shape, device=dev, dtype=torch.float32)
    dC = alloc(Cg.shape, device=dev, dtype=torch.float32)
    # dA, dD, d(delta_bias): per-tile partial sums, summed below. part_rows = R (the default on the
    # GPU): tiles add theirs atomically into R shared rows, so there is R x less to write and to
    # sum. part_rows = 0, and always under torch.use_deterministic_algorithms: one row per tile,
    # stored, so that these three sums do not depend on the order in which programs run.
    parts = batch * n_tiles
    part_rows = 0 if torch.are_deterministic_algorithms_enabled() else min(int(cfg.get("part_rows", 0)), parts)
    if part_rows:
        # One zeroed buffer, one sum: each row holds dA's partials, then dD's, then d(delta_bias)'s.
        has_ddb = db is not None or delta_pre_softplus
        n_cols = nstate + (Dv is not None) + has_ddb
        parts_buf = torch.zeros(part_rows, n_cols * dim, device=dev, dtype=torch.float32)
        dA_part = parts_buf[:, :nstate * dim].unflatten(1, (nstate, dim))
        dD_part = parts_buf[:, nstate * dim:(nstate + 1) * dim] if Dv is not None else None
        ddb_part = parts_buf[:, (n_cols - 1) * dim:] if has_ddb else None
    else:
        # dA's per-tile partials overwrite R when it is fp32: a program reads R for (its tile, a
        # channel block) before it writes the partials of the same (tile, channel block), and no other
        # program touches them.
        dA_part = R.view(parts, nstate, dim) if R.dtype == torch.float32 else \
            torch.empty(parts, nstate, dim, device=dev, dtype=torch.float32)
        dD_part = torch.empty(parts, dim, device=dev, dtype=torch.float32) if Dv is not None else None
        ddb_part = torch.empty(parts, dim, device=dev, dtype=torch.float32) \
            if db is not None or delta_pre_softplus else None
    dzz = dz if dz is not None else du
    K._bwd_kernel[(n_tiles, batch, groups * nsplit)](
        u, delta, A_nd, Bg, Cg, Dv if Dv is not None else dummy, zz, db if db is not None else dummy,
        seq if seq is not None else dummy, dout, tiles, R, S, SUF,
        du, ddelta, dzz, dB, dC, dA_part, dD_part if dD_part is not None else dA_part,
        ddb_part if ddb_part is not None else dA_part, y_out if y_out is not None else dzz,
        L, dim, nstate, dpg, dps, nsplit, tpp,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1),
        Bg.stride(0), Bg.stride(1), Bg.stride(2), Cg.stride(0), Cg.stride(1), Cg.stride(2),
        zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1), dout.stride(2), seq_stride,
        tiles.stride(0), tiles.stride(1), tiles.stride(2), S.stride(0), S.stride(1), SUF.stride(0), SUF.stride(1),
        du.stride(0), du.stride(1), ddelta.stride(0), ddelta.stride(1), dzz.stride(0), dzz.stride(1),
        dB.stride(0), dB.stride(1), dB.stride(2), dC.stride(0), dC.stride(1), dC.stride(2),
        dA_part.stride(0), (dD_part if dD_part is not None else ddb_part if ddb_part is not None else dA_part).stride(0),
        *((y_out.stride(0), y_out.stride(1)) if y_out is not None else (0, 0)),
        BD=BDb, BN=BN, T=T, HAS_D=Dv is not None, HAS_Z=z is not None, ATOMIC_BC=atomic_bc,
        LANE_RS=_lane_rs_mode(cfg, T, BDb, dev), RELOAD_BC=bool(cfg.get("reload_bc")), DZ_ACC=bool(dz_accumulate),
        PART_ROWS=part_rows, HSEG=per_segment and not fixup, Y_OUT=y_out is not None,
        DT_PRE=bool(delta_pre_softplus), num_warps=cfg["warps_bwd"],
        **flags,
        **_reg_cap(cfg.get("maxnreg_bwd", 0), dev))
    if part_rows:
        sums = parts_buf.sum(0)
        dA = sums[:nstate * dim].view(nstate, dim).t()
        dD = sums[nstate * dim:(nstate + 1) * dim] if Dv is not None else None
        ddb = sums[(n_cols - 1) * dim:] if has_ddb else None
    else:
        dA = dA_part.sum(0).t()
        dD = dD_part.sum(0) if dD_part is not None else None
        ddb = ddb_part.sum(0) if ddb_part is not None else None
    if B.dim() == 3:
        dB, dC = dB.squeeze(1), dC.squeeze(1)
    return du, ddelta, dA, dB.to(B.dtype), dC.to(C.dtype), dD, dz, ddb, dh0


# The Triton path as torch.library custom ops: opaque to torch.compile (no graph break), with
# fake implementations for shape propagation and a registered autograd formula.
Tensor = torch.Tensor


@torch.library.custom_op("genomamba::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                 delta_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None,
                 delta_softplus: bool, reverse: bool, save_tiles: bool,
                 out_add: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    out, last, tiles, _ = selective_scan_triton_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                    initial_state, reverse, seq_idx, save_tile_states=save_tiles,
                                                    out_add=out_add)
    return out, last, (tiles if tiles is not None else u.new_empty(0, dtype=torch.float32))


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, delta_softplus, reverse, save_tiles,
      out_add=None):
    batch, dim, L = u.shape
    nstate = A.shape[1]
    cfg = _tile_config(nstate, u.device)
    tiles = u.new_empty(batch, triton.cdiv(L, cfg["T"]), nstate, dim, dtype=_tile_dtype(cfg, u)) if save_tiles else \
        u.new_empty(0, dtype=torch.float32)
    return torch.empty_like(u), u.new_empty(batch, dim, nstate, dtype=torch.float32), tiles


@torch.library.custom_op("genomamba::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dout: Tensor, dlast: Tensor | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, initial_state: Tensor | None,
                 seq_idx: Tensor | None, tiles: Tensor, delta_softplus: bool, reverse: bool) -> list[Tensor]:
    cfg = _tile_config(A.shape[1], u.device)
    grads = list(selective_scan_triton_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                           initial_state, reverse, seq_idx, tiles, cfg))
    # custom ops return tensors only: an absent input's gradient travels as an empty tensor. dD and
    # d(delta_bias) may be slices of dA's sum (shared partial-sum rows); returns must not alias.
    grads[5], grads[7] = (g.clone() if g is not None and g._base is not None else g for g in (grads[5], grads[7]))
    return [g if g is not None else u.new_empty(0) for g in grads]


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, tiles, delta_softplus, reverse):
    like = lambda t, dtype=None: torch.empty_like(t, dtype=dtype) if t is not None else u.new_empty(0)  # noqa: E731
    batch, dim, _ = u.shape
    return [like(u), like(delta), like(A, torch.float32), like(B), like(C), like(D, torch.float32), like(z),
            like(delta_bias, torch.float32), u.new_empty(batch, dim, A.shape[1], dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse, _save = inputs[:13]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, output[2])
    ctx.softplus, ctx.reverse = softplus, reverse
    ctx.has_add = len(inputs) > 13 and inputs[13] is not None
    # Outputs nobody used (the tile states always, the last state mostly) get None, not a zero
    # gradient: autograd would fill one the size of the tile states (4 GiB at (1, 512, 2^20)).
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlast, _dtiles, bwd=None):
    u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, tiles = ctx.saved_tensors
    if dout is None:  # only the last state was used
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, ddb, dh0 = (bwd or _scan_bwd_op)(
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, tiles,
        ctx.softplus, ctx.reverse)
    keep = lambda g, t: g if t is not None else None  # noqa: E731
    # out = out_add + scan: out_add's gradient is dout itself
    return (du, ddelta, dA, dB, dC, keep(dD, D), keep(dz, z), keep(ddb, delta_bias),
            keep(dh0, initial_state), None, None, None, None, dout if ctx.has_add else None)


_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _scan_bwd_eager(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, tiles, softplus,
                    reverse):
    return selective_scan_triton_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, initial_state,
                                     reverse, seq_idx, tiles, _tile_config(A.shape[1], u.device))


class _EagerScan(torch.autograd.Function):
    """The custom op's forward and backward as a plain autograd.Function, for eager training: the
    torch.library dispatch costs more host time per call than the kernels take at small shapes
    (fwd+bwd at (8, 1536, 2048): the host needed 2.2-2.5 ms per call through the custom ops, the
    GPU 1.8 ms; H100, fourteenth session). torch.compile still sees the custom ops."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse, save, out_add):
        out, last, tiles, _ = selective_scan_triton_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state,
                                                        reverse, seq_idx, save_tile_states=save, out_add=out_add)
        tiles = tiles if tiles is not None else u.new_empty(0, dtype=torch.float32)
        _setup_context(ctx, (u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, softplus, reverse, save,
                             out_add), (out, last, tiles))
        ctx.mark_non_differentiable(tiles)
        return out, last, tiles

    @staticmethod
    def backward(ctx, dout, dlast, dtiles):
        return _backward(ctx, dout, dlast, dtiles, bwd=_scan_bwd_eager)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, initial_state=None, reverse=False, seq_idx=None,
                   cu_seqlens=None, backend=None, recompute_states=False, out_add=None):
    """Selective scan (S6), drop-in for `mamba_ssm.selective_scan_fn`, plus:

    initial_state (batch, dim, N): state before the first step (differentiable);
    reverse: scan right to left, reading the inputs in place (no flipped copies);
    seq_idx (batch, L) or cu_seqlens (groups+1,) for batch 1: reset the state at boundaries of
    packed sequences; backend: "triton", "torch" or None (see the module docstring);
    recompute_states (Triton path): the forward keeps no per-tile states for the backward (float32,
    N x 4 bytes per channel every 8 steps: 4 GiB for (1, 512, 2^20); bf16 and half that with bf16
    inputs); the backward rebuilds them, stored like the kept ones (~40% more backward time,
    measured at 131,072 and 2^20 before the rebuild went per segment). For memory-bound
    (checkpointed) training.
    Precision: the scan carries its state in float32. With bf16 inputs on a GPU, the states the
    Triton backward keeps per 8-step tile are stored in bf16 (GENOMAMBA_SCAN_TILES="tile_bf16=0" keeps
    them in float32): a 131 kb training step ~5% faster with ~24% less memory, gradients within
    ~3e-3 of float64 instead of ~1.7e-3 (the bf16 rounding of du itself).
    out_add (like u): returned out is out_add + the scan's output, added inside the output pass (a
    bidirectional block's second direction: no separate elementwise add, one rounding).
    Returns out (batch, dim, L) in u's dtype, and with return_last_state the float32 state after
    the last step (the leftmost one when reverse=True).
    """
    batch, dim, L = u.shape
    if A.shape[0] != dim:
        raise ValueError(f"A has {A.shape[0]} rows but u has {dim} channels")
    if cu_seqlens is not None:
        if seq_idx is not None or batch != 1:
            raise ValueError("cu_seqlens needs batch 1 and excludes seq_idx")
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, L)
    if seq_idx is not None and tuple(seq_idx.shape) != (batch, L):
        raise ValueError(f"seq_idx must be (batch, L) = {(batch, L)}, got {tuple(seq_idx.shape)}")
    if out_add is not None and out_add.shape != u.shape:
        raise ValueError(f"out_add must be shaped like u {tuple(u.shape)}, got {tuple(out_add.shape)}")
    if resolve_backend(backend, u) == "torch":
        res = selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state=initial_state, reverse=reverse, seq_idx=seq_idx)
        if out_add is None:
            return res
        return (out_add + res[0], res[1]) if return_last_state else out_add + res
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state, out_add)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    save = needs_grad and not recompute_states
    seq = seq_idx.to(torch.int32) if seq_idx is not None else None
    if not needs_grad and not torch.compiler.is_compiling():
        # Inference: launch the kernels directly. The custom op's first call imports much of
        # torch._dynamo (seconds per process) and every call pays the dispatcher.
        out, last, _, _ = selective_scan_triton_fwd(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus,
                                                    initial_state, reverse, seq, out_add=out_add)
        return (out, last) if return_last_state else out
    scan = _scan_fwd_op if torch.compiler.is_compiling() else _EagerScan.apply
    out, last, _tiles = scan(u, delta, A.float(), B, C, D, z, delta_bias, initial_state, seq,
                             bool(delta_softplus), bool(reverse), save, out_add)
    return (out, last) if return_last_state else out
