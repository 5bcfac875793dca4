"""Triton selective scan (under TRITON_INTERPRET=1) and the CPU fast path vs the float64 reference."""

import itertools
import os
import sys

import pytest
import torch

from genomamba_kernels import (seq_idx_from_cu_seqlens, selective_scan, selective_scan_chunked,
                               selective_scan_ref)
from genomamba_kernels.selective_scan import resolve_backend, selective_scan_triton_fwd

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make(batch=2, dim=8, L=37, n=4, groups=None, dtype=torch.float32, z=True, D=True, bias=True, h0=True,
         seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, n, L) if groups is None else (batch, groups, n, L)
    return dict(u=r(batch, dim, L).to(dtype), delta=(r(batch, dim, L) * 0.5).to(dtype),
                A=-torch.rand(dim, n, generator=g) * 2 - 0.1, B=r(*bc).to(dtype), C=r(*bc).to(dtype),
                D=r(dim) if D else None, z=r(batch, dim, L).to(dtype) if z else None,
                delta_bias=r(dim) * 0.1 if bias else None, initial_state=r(batch, dim, n) if h0 else None)


def packed_seq_idx(batch, L):
    cuts = sorted({0, L // 3, L // 3 + 1, (2 * L) // 3, L})
    ids = torch.zeros(batch, L, dtype=torch.int32)
    for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        ids[:, a:b] = k
    return ids


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compare(inputs, tol, softplus=True, reverse=False, seq_idx=None, backend="triton", recompute_states=False):
    """Forward, last state and every gradient of `backend` vs autograd through the float64 reference."""
    ours = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    args = lambda d: [d[k] for k in NAMES[:8]]  # noqa: E731
    o, last = selective_scan(*args(ours), delta_softplus=softplus, return_last_state=True,
                             initial_state=ours["initial_state"], reverse=reverse, seq_idx=seq_idx, backend=backend,
                             recompute_states=recompute_states)
    o_ref, last_ref = selective_scan_ref(*args(ref), delta_softplus=softplus, return_last_state=True,
                                         initial_state=ref["initial_state"], reverse=reverse, seq_idx=seq_idx)
    assert o.dtype == inputs["u"].dtype and last.dtype == torch.float32
    # The output's gradient in o's dtype for both: the kernel receives it rounded, so the reference
    # must too (else a bf16 rounding of dout shows in the sums over L, dA, dD, d(delta_bias), as
    # errors up to ~1e-2 when they cancel).
    go, gl = torch.randn_like(o_ref).to(o.dtype).double(), torch.randn_like(last_ref)
    ((o.double() * go).sum() + (last.double() * gl).sum()).backward()
    ((o_ref * go).sum() + (last_ref * gl).sum()).backward()
    errs = {"out": rel(o, o_ref), "last_state": rel(last, last_ref)}
    for k in NAMES:
        if ours[k] is not None:
            assert ours[k].grad is not None, f"no gradient for {k}"
            errs["d" + k] = rel(ours[k].grad, ref[k].grad)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


OPTIONS = [dict(z=z, D=D, bias=b, h0=h) for z, D, b, h in itertools.product([True, False], repeat=4)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(k for k, v in o.items() if v) or "bare")
def test_triton_options_fp32(opts):
    compare(make(**opts), 1e-5, softplus=opts["bias"])


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("groups", [None, 2])
def test_triton_reverse_seq_idx_groups(reverse, packed, groups):
    x = make(groups=groups)
    compare(x, 1e-5, reverse=reverse, seq_idx=packed_seq_idx(2, 37) if packed else None)


@pytest.mark.parametrize("L", [1, 2, 16, 17, 50])
def test_triton_lengths(L):
    compare(make(L=L, dim=4, batch=1), 1e-5, reverse=L % 2 == 0)


def test_triton_state_not_power_of_two():
    compare(make(n=3, dim=6, L=20, batch=1), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    compare(make(dtype=dtype, L=40), 1e-2)


@pytest.mark.parametrize("chunk_tiles", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_multi_chunk_forward_matches_reference(chunk_tiles, reverse):
    """The three-pass forward (chunk states, state passing, rescan) at several chunk sizes."""
    x = make(L=70)
    seq = packed_seq_idx(2, 70)
    args = [x[k] for k in NAMES[:8]]
    out, last, _, _ = selective_scan_triton_fwd(*args, True, x["initial_state"], reverse, seq,
                                                chunk_tiles=chunk_tiles)
    ref, ref_last = selective_scan_ref(*args, True, True, initial_state=x["initial_state"], reverse=reverse,
                                       seq_idx=seq)
    assert rel(out, ref) < 1e-5 and rel(last, ref_last) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_cpu_fast_path_matches_reference_larger(reverse, packed):
    x = make(batch=2, dim=16, L=1500, n=16, groups=2)
    compare(x, 1e-5, reverse=reverse, seq_idx=packed_seq_idx(2, 1500) if packed else None, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_reverse_equals_flip_scan_flip(backend):
    x = make(h0=False)
    args = [x[k] for k in NAMES[:8]]
    flip = lambda t: t.flip(-1) if t is not None else None  # noqa: E731
    rev = selective_scan(*args, delta_softplus=True, reverse=True, backend=backend)
    fl = [flip(args[0]), flip(args[1]), args[2], flip(args[3]), flip(args[4]), args[5], flip(args[6]), args[7]]
    ref = flip(selective_scan(*fl, delta_softplus=True, backend=backend))
    assert rel(rev, ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_sequences_equal_separate_scans(backend):
    x = make(batch=1, h0=False, L=45)
    args = [x[k] for k in NAMES[:8]]
    cu = torch.tensor([0, 10, 30, 45])
    packed = selective_scan(*args, delta_softplus=True, cu_seqlens=cu, backend=backend)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = [t[..., a:b] if t is not None and t.dim() == 3 else t for t in args]
        alone = selective_scan(*part, delta_softplus=True, backend=backend)
        assert rel(packed[..., a:b], alone) < 1e-5


def test_forward_then_reverse_composes_with_states():
    """Scanning [0, k) then [k, L) from the carried state equals one scan; same right to left."""
    x = make(batch=1, h0=False, L=40)
    args = [x[k] for k in NAMES[:8]]
    k = 23
    cut = lambda lo, hi: [t[..., lo:hi] if t is not None and t.dim() == 3 else t for t in args]  # noqa: E731
    for reverse in (False, True):
        full = selective_scan(*args, delta_softplus=True, reverse=reverse, backend="triton")
        first, second = ((0, k), (k, 40)) if not reverse else ((k, 40), (0, k))
        o1, h = selective_scan(*cut(*first), delta_softplus=True, return_last_state=True, reverse=reverse,
                               backend="triton")
        o2 = selective_scan(*cut(*second), delta_softplus=True, initial_state=h, reverse=reverse, backend="triton")
        joined = torch.cat([o1, o2], -1) if not reverse else torch.cat([o2, o1], -1)
        assert rel(joined, full) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed,groups,bf16", [(False, None, False), (True, 2, False), (True, None, True)])
def test_cpu_inference_path_matches_reference(reverse, packed, groups, bf16, monkeypatch):
    """Without autograd the CPU path takes its in-place form (one multiply-add per step into the
    chunk's state history, outputs read out by one product): the same outputs and last state as
    the sequential reference, over several chunks and a short last one, and it is the form taken."""
    ref_mod = sys.modules["genomamba_kernels.reference"]
    calls = []
    inner = ref_mod._chunk_inference
    monkeypatch.setattr(ref_mod, "_chunk_inference", lambda *a: calls.append(1) or inner(*a))
    x = make(batch=2, dim=16, L=301, n=16, groups=groups, dtype=torch.bfloat16 if bf16 else torch.float32)
    args = [x[k] for k in NAMES[:8]]
    seq = packed_seq_idx(2, 301) if packed else None
    with torch.no_grad():
        out, last = selective_scan_chunked(*args, True, True, initial_state=x["initial_state"], reverse=reverse,
                                           seq_idx=seq, chunk_size=64)
    ref, ref_last = selective_scan_ref(*args, True, True, initial_state=x["initial_state"], reverse=reverse,
                                       seq_idx=seq)
    assert len(calls) == 5                                        # ceil(301 / 64) chunks
    assert out.dtype == args[0].dtype and last.dtype == torch.float32
    tol = 1e-2 if bf16 else 1e-5
    assert rel(out, ref) < tol and rel(last, ref_last) < 1e-5


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("packed,groups,bf16,h0", [(False, None, False, True), (True, 2, False, True),
                                                   (True, None, True, False)])
def test_cpu_training_path_matches_reference(reverse, packed, groups, bf16, h0, monkeypatch):
    """With autograd the CPU path runs its chunk-by-chunk backward (_ChunkedScan): output, last
    state and every gradient (initial state included) equal the float64 reference's, over several
    chunks and a short last one, and it is the form taken."""
    ref_mod = sys.modules["genomamba_kernels.reference"]
    real = ref_mod._ChunkedScan
    calls = []
    spy = type("Spy", (), {"apply": staticmethod(lambda *a: calls.append(1) or real.apply(*a))})
    monkeypatch.setattr(ref_mod, "_ChunkedScan", spy)
    x = make(batch=2, dim=8, L=70, n=4, groups=groups, h0=h0, dtype=torch.bfloat16 if bf16 else torch.float32)
    ours = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in x.items()}
    seq = packed_seq_idx(2, 70) if packed else None
    out, last = selective_scan_chunked(*[ours[k] for k in NAMES[:8]], True, True, initial_state=ours["initial_state"],
                                       reverse=reverse, seq_idx=seq, chunk_size=16)     # 5 chunks, the last of 6
    out_ref, last_ref = selective_scan_ref(*[ref[k] for k in NAMES[:8]], True, True,
                                           initial_state=ref["initial_state"], reverse=reverse, seq_idx=seq)
    assert calls == [1]
    go, gl = torch.randn_like(out_ref).to(out.dtype).double(), torch.randn_like(last_ref)   # as in compare()
    ((out.double() * go).sum() + (last.double() * gl).sum()).backward()
    ((out_ref * go).sum() + (last_ref * gl).sum()).backward()
    tol = 1e-2 if bf16 else 1e-5
    errs = {"out": rel(out, out_ref), "last": rel(last, last_ref)}
    errs.update({"d" + k: rel(ours[k].grad, ref[k].grad) for k in NAMES if ours[k] is not None})
    assert all(v < tol for v in errs.values()), errs


def test_chunked_reference_memory_is_chunk_sized():
    """The CPU path never builds a (batch, dim, N, L) tensor: a long input at tiny chunks still works."""
    x = make(batch=1, dim=2, L=5000, n=2, h0=False)
    args = [x[k] for k in NAMES[:8]]
    a = selective_scan_chunked(*args, delta_softplus=True, chunk_size=64)
    b = selective_scan_chunked(*args, delta_softplus=True, chunk_size=4096)
    assert rel(a, b) < 1e-5


def test_backend_resolution(monkeypatch):
    t = torch.zeros(1)
    assert resolve_backend(None, t) == "torch"
    monkeypatch.setenv("GENOMAMBA_SCAN_BACKEND", "triton")
    assert resolve_backend(None, t) == "triton"
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_backend("cuda-magic", t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_backend("triton", t)


def test_bad_arguments():
    x = make()
    args = [x[k] for k in NAMES[:8]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan(*args, cu_seqlens=torch.tensor([0, 10, 37]))
    with pytest.raises(ValueError, match="seq_idx must be"):
        selective_scan(*args, seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match="rise from 0"):
        seq_idx_from_cu_seqlens(torch.tensor([0, 50, 40]), 40)


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_many_tiles_in_place_state_passing(reverse):
    """25 tiles (13 segments of 2): the backward's state passing runs over several blocks, writing
    over its input."""
    L = 200
    ids = torch.zeros(1, L, dtype=torch.int32)
    ids[:, 70:] = 1
    ids[:, 133:] = 2
    compare(make(batch=1, dim=4, L=L), 1e-5, reverse=reverse, seq_idx=ids)


@pytest.mark.parametrize("tpp,reverse", [(1, False), (3, True), (4, False), (16, True)])
def test_backward_segments_of_any_length(tpp, reverse, monkeypatch):
    """The backward's adjoint pass walks segments of TPP tiles and the passing runs over segments;
    the main kernel adds to each tile's in-segment adjoint the one entering its segment, decayed
    over the tiles between (or cut by a restart between them); tile states the backward rebuilds
    (recompute_states) are made per segment the same way. 11 tiles: segments of one tile, a short
    last segment, one segment for all; restarts inside tiles, on a tile boundary and in the
    segment after a tile; gradients of the initial and the last state too. The rebuilt states get
    the segment's entering state in the main kernel, or (seg_fixup) from a kernel of their own."""
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", f"TPP={tpp}")
    L = 85
    ids = torch.zeros(2, L, dtype=torch.int32)
    ids[0, 13:] = 1
    ids[0, 40:] = 2       # a tile boundary (T = 8)
    ids[0, 61:] = 3
    ids[1, 77:] = 1
    compare(make(batch=2, dim=4, L=L), 1e-5, reverse=reverse, seq_idx=ids)
    compare(make(batch=1, dim=4, L=L), 1e-5, reverse=reverse)
    # the forward kept no tile states: the backward rebuilds them per segment as well
    for fixup in (0, 1) if tpp == 3 else (1,):   # 1: the default
        monkeypatch.setenv("GENOMAMBA_SCAN_TILES", f"TPP={tpp},seg_fixup={fixup}")
        compare(make(batch=2, dim=4, L=L), 1e-5, reverse=reverse, seq_idx=ids, recompute_states=True)


@pytest.mark.parametrize("reverse,packed,h0,batch", [(False, False, True, 2), (True, True, True, 1),
                                                     (False, True, False, 2)])
def test_backward_rebuilds_tile_states_when_the_forward_kept_none(reverse, packed, h0, batch, monkeypatch):
    """recompute_states=True: the forward saves no per-tile states and the backward rebuilds them
    (per-tile end states, then state passing in place); 15 tiles, so several programs and a partial one."""
    ss = sys.modules["genomamba_kernels.selective_scan"]  # the package exports a function of the same name
    calls = []
    rebuild = ss._tile_entry_states
    monkeypatch.setattr(ss, "_tile_entry_states", lambda *a, **k: calls.append(1) or rebuild(*a, **k))
    L = 120
    ids = packed_seq_idx(batch, L) if packed else None
    compare(make(batch=batch, dim=4, L=L, h0=h0), 1e-5, reverse=reverse, seq_idx=ids, recompute_states=True)
    assert calls == [1]


@pytest.mark.parametrize("reverse", [False, True])
def test_backward_takes_channels_contiguous_and_expanded_gradients(reverse):
    """The incoming gradient is read with its own strides (a transposed out-projection hands back a
    channels-contiguous one; a sum hands back an expanded one): same gradients as a contiguous copy."""
    t = make(batch=1, dim=4, L=19, h0=False)
    args = [t[k] for k in NAMES[:8]]
    cases = {"transposed": torch.randn(1, 19, 4).transpose(1, 2), "expanded": torch.ones(1, 1, 1).expand(1, 4, 19)}
    for name, g in cases.items():
        grads = []
        for go in (g, g.contiguous()):
            leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
            selective_scan(*leaves, delta_softplus=True, reverse=reverse, backend="triton").backward(go)
            grads.append([leaf.grad for leaf in leaves if leaf is not None])
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize("reverse,packed", [(False, True), (True, False)])
def test_backward_writes_or_adds_dz_into_a_given_buffer(reverse, packed):
    """selective_scan_triton_bwd(dz_out=, dz_accumulate=): dz lands in a strided slice of a larger
    buffer (the z half of a bidirectional block's in_proj gradient), replacing or adding to what
    is there (the prefetched load of the kernel's DZ_ACC path); the other gradients do not change."""
    from genomamba_kernels.selective_scan import _tile_config, selective_scan_triton_bwd, selective_scan_triton_fwd

    t = make(batch=2, dim=8, L=40, h0=False)
    seq = packed_seq_idx(2, 40) if packed else None
    args = [t[k] for k in NAMES[:8]]
    _, _, tiles, cfg = selective_scan_triton_fwd(*args, delta_softplus=True, reverse=reverse, seq_idx=seq,
                                                 save_tile_states=True)
    dout = torch.randn_like(t["u"])
    run = lambda **kw: selective_scan_triton_bwd(dout, None, *args, True, None, reverse, seq, tiles, cfg, **kw)  # noqa: E731
    plain = run()
    buf = torch.randn(2, 16, 40)
    before = buf.clone()
    run(dz_out=buf[:, 8:])
    assert torch.equal(buf[:, 8:], plain[6]) and torch.equal(buf[:, :8], before[:, :8])
    added = run(dz_out=buf[:, 8:], dz_accumulate=True)
    assert torch.allclose(buf[:, 8:], 2 * plain[6], atol=1e-6) and torch.equal(buf[:, :8], before[:, :8])
    for a, b in zip(added, plain):
        if a is not None and a is not added[6]:
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dz_accumulate needs dz_out"):
        run(dz_accumulate=True)


@pytest.mark.parametrize("reverse,packed,rebuild", [(False, True, True), (True, False, False)])
def test_backward_writes_the_gated_output(reverse, packed, rebuild):
    """selective_scan_triton_bwd(y_out=): the backward also writes the forward's output (gated by
    silu(z), D included) into a strided slice, or adds it there with dz_accumulate, from kept or
    rebuilt tile states; the gradients do not change."""
    from genomamba_kernels.selective_scan import _tile_config, selective_scan_triton_bwd, selective_scan_triton_fwd

    t = make(batch=2, dim=8, L=45, h0=False)
    seq = packed_seq_idx(2, 45) if packed else None
    args = [t[k] for k in NAMES[:8]]
    out, _, tiles, cfg = selective_scan_triton_fwd(*args, delta_softplus=True, reverse=reverse, seq_idx=seq,
                                                   save_tile_states=not rebuild)
    tiles = torch.empty(0) if rebuild else tiles
    dout = torch.randn_like(t["u"])
    run = lambda **kw: selective_scan_triton_bwd(dout, None, *args, True, None, reverse, seq, tiles, cfg, **kw)  # noqa: E731
    plain = run()
    buf = torch.randn(2, 16, 45)
    before = buf.clone()
    dz = torch.zeros(2, 8, 45)
    with_y = run(y_out=buf[:, :8], dz_out=dz)
    assert torch.allclose(buf[:, :8], out, atol=1e-5, rtol=1e-5) and torch.equal(buf[:, 8:], before[:, 8:])
    assert out.abs().max() > 0.1
    for a, b in zip(with_y, plain):
        if a is not None:
            assert torch.equal(a, b)
    run(y_out=buf[:, :8], dz_out=dz, dz_accumulate=True)
    assert torch.allclose(buf[:, :8], 2 * out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="y_out needs z"):
        run(y_out=buf[:, :8, :40])


@pytest.mark.parametrize("reverse,packed,h0,chunk_tiles", [(False, True, True, 3), (True, False, False, 2),
                                                          (False, False, True, None), (True, True, False, None)])
def test_backward_rebuilds_tile_states_from_the_forward_chunk_states(reverse, packed, h0, chunk_tiles):
    """selective_scan_triton_fwd(keep_chunk_states=True) keeps only the state entering each forward
    chunk; the backward given those rebuilds every tile's state in one pass and returns the
    gradients of the kept-states backward. Several chunks (chunk_tiles 2 / 3, the last one short)
    and one chunk (the default on CPU here: from the initial state or from zeros)."""
    from genomamba_kernels.selective_scan import (ChunkStates, _tile_config, selective_scan_triton_bwd,
                                                  selective_scan_triton_fwd)

    t = make(batch=2, dim=8, L=61, h0=h0)
    seq = packed_seq_idx(2, 61) if packed else None
    args = [t[k] for k in NAMES[:8]]
    init = t["initial_state"]
    kw = dict(delta_softplus=True, reverse=reverse, seq_idx=seq, initial_state=init, chunk_tiles=chunk_tiles)
    out, last, tiles, cfg = selective_scan_triton_fwd(*args, save_tile_states=True, **kw)
    out2, last2, chunks, _ = selective_scan_triton_fwd(*args, keep_chunk_states=True, **kw)
    assert isinstance(chunks, ChunkStates) and torch.equal(out2, out) and torch.equal(last2, last)
    assert chunks.states.shape[1] == (-(-8 // chunk_tiles) if chunk_tiles else 1)   # 61 steps: 8 tiles
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    run = lambda kept: selective_scan_triton_bwd(dout, dlast, *args, True, init, reverse, seq, kept,  # noqa: E731
                                                 _tile_config(4, out.device))
    for a, b in zip(run(chunks), run(tiles)):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exclude each other"):
        selective_scan_triton_fwd(*args, save_tile_states=True, keep_chunk_states=True)


def test_inference_launches_kernels_without_the_custom_op(tmp_path):
    """Under no_grad the scan and the conv skip the torch.library custom ops (whose first call
    imports torch._dynamo: seconds per process) and give the same outputs as the op path."""
    import subprocess

    script = tmp_path / "infer.py"
    script.write_text(
        "import os, sys, torch\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from genomamba_kernels import causal_conv1d, selective_scan\n"
        "g = torch.Generator().manual_seed(0)\n"
        "u, dt, z = (torch.randn(1, 4, 20, generator=g) for _ in range(3))\n"
        "B, C = (torch.randn(1, 2, 20, generator=g) for _ in range(2))\n"
        "A, w = -torch.rand(4, 2, generator=g), torch.randn(4, 3, generator=g)\n"
        "with torch.no_grad():\n"
        "    y = selective_scan(causal_conv1d(u, w, activation='silu', backend='triton'), dt, A, B, C, z=z,\n"
        "                       delta_softplus=True, backend='triton')\n"
        "print('dynamo', 'torch._dynamo' in sys.modules)\n"
        "u.requires_grad_()\n"
        "y2 = selective_scan(causal_conv1d(u, w, activation='silu', backend='triton'), dt, A, B, C, z=z,\n"
        "                    delta_softplus=True, backend='triton')\n"
        "print('same', torch.equal(y, y2.detach()))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo False" in out.stdout and "same True" in out.stdout, out.stdout


@pytest.mark.parametrize("use", ["out", "last"])
def test_gradient_through_one_output_alone(use):
    """Autograd hands the backward None for an output nobody used (no zero gradient is filled):
    the output alone, or the last state alone, still gives the reference's gradients."""
    t = make(batch=2, dim=4, L=21)
    leaves = {k: v.clone().requires_grad_() if v is not None else None for k, v in t.items()}
    ref = {k: v.double().requires_grad_() if v is not None else None for k, v in t.items()}
    for d, fn, kw in ((leaves, selective_scan, dict(backend="triton")), (ref, selective_scan_ref, {})):
        o, last = fn(*[d[k] for k in NAMES[:8]], delta_softplus=True, return_last_state=True,
                     initial_state=d["initial_state"], **kw)
        (o if use == "out" else last).double().square().sum().backward()
    for k in NAMES:
        if ref[k] is not None and ref[k].grad is None:  # z and D do not reach the last state
            assert leaves[k].grad is None or not leaves[k].grad.any(), k
        elif leaves[k] is not None:
            assert rel(leaves[k].grad, ref[k].grad) < 1e-5, k


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_add_is_added_inside_the_scan(backend):
    """out_add: the output is out_add + the scan's output (forward, and out_add's gradient is the
    incoming one); with grad and without (inference launches the kernels directly)."""
    t = make(batch=2, dim=4, L=23, h0=False)
    args = [t[k] for k in NAMES[:8]]
    extra = torch.randn(2, 4, 23)
    plain = selective_scan(*args, delta_softplus=True, reverse=True, backend=backend)
    with torch.no_grad():
        fused = selective_scan(*args, delta_softplus=True, reverse=True, backend=backend, out_add=extra)
    assert torch.allclose(fused, plain + extra, atol=1e-6)
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    add = extra.clone().requires_grad_()
    g = torch.randn(2, 4, 23)
    selective_scan(*leaves, delta_softplus=True, reverse=True, backend=backend, out_add=add).backward(g)
    assert torch.equal(add.grad, g)
    ref = [a.clone().requires_grad_() if a is not None else None for a in args]
    selective_scan(*ref, delta_softplus=True, reverse=True, backend=backend).backward(g)
    for a, b in zip(leaves, ref):
        if a is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="out_add must be shaped like u"):
        selective_scan(*args, backend=backend, out_add=extra[:, :2])


@pytest.mark.parametrize("reverse,packed,groups,batch,L,reload_bc", [
    (False, True, None, 2, 37, 1),    # one program per tile: dB/dC stored
    (True, False, 2, 2, 37, 0),       # groups
    (True, True, None, 1, 8, 1),      # one tile, two channel splits: dB/dC by atomics
])
def test_backward_lane_reduce_scatter(reverse, packed, groups, batch, L, reload_bc, monkeypatch):
    """The backward main kernel with one time step per channel lane (T == BD_BWD = 8): dB and dC
    reduced over channels by the lane reduce-scatter (here its plain-Triton form, the same index
    arithmetic as the GPU's shuffles), with B/C reloaded per channel block or held."""
    ss = sys.modules["genomamba_kernels.selective_scan"]
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", f"8,4,8,1,1,0,2,8,64,1,1,{reload_bc}")
    cfg = ss._tile_config(4, torch.device("cpu"))
    assert ss._lane_rs_mode(cfg, cfg["T"], cfg["BD_BWD"], torch.device("cpu")) == 2
    ids = packed_seq_idx(batch, L) if packed else None
    compare(make(batch=batch, dim=16, L=L, groups=groups), 1e-5, reverse=reverse, seq_idx=ids)


@pytest.mark.parametrize("rows,deterministic", [(0, False), (2, False), (2, True), (64, False)])
def test_backward_partial_sums_in_shared_rows_or_one_per_tile(rows, deterministic, monkeypatch):
    """dA, dD and d(delta_bias) from per-tile partial sums: added atomically into `part_rows` shared
    rows (2: every row gets several tiles; 64: more rows than tiles), or stored one row per tile
    (0, and always under torch.use_deterministic_algorithms, where two runs agree bit for bit)."""
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", f"8,4,8,1,1,0,2,8,64,1,1,1,0,0,0,0,{rows}")
    ss = sys.modules["genomamba_kernels.selective_scan"]
    launched = []
    real = ss.K._bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launched.append(kw["PART_ROWS"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(ss.K, "_bwd_kernel", Spy())
    x = make(batch=2, dim=16, L=45, groups=2)
    ids = packed_seq_idx(2, 45)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        compare(x, 1e-5, reverse=True, seq_idx=ids)
        if deterministic:
            def grads():
                leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
                out = selective_scan(*[leaves.get(k) for k in NAMES[:8]], delta_softplus=True, backend="triton",
                                     initial_state=leaves["initial_state"])
                out.backward(torch.ones_like(out))
                return [leaves[k].grad for k in ("A", "D", "delta_bias")]
            assert all(torch.equal(a, b) for a, b in zip(grads(), grads()))
    finally:
        torch.use_deterministic_algorithms(was)
    expected = 0 if deterministic else min(rows, 2 * 6)     # 2 x 6 tiles of 8 steps
    assert launched and set(launched) == {expected}


def test_lane_reduce_scatter_mode():
    ss = sys.modules["genomamba_kernels.selective_scan"]
    cpu = torch.device("cpu")
    assert ss._lane_rs_mode(dict(lane_rs=1), 8, 4, cpu) == 0      # needs T == BD
    assert ss._lane_rs_mode(dict(lane_rs=0), 8, 8, cpu) == 0
    assert ss._lane_rs_mode(dict(lane_rs=1), 6, 6, cpu) == 0      # and a power of two
    assert ss._lane_rs_mode(dict(lane_rs=1), 32, 32, cpu) == 0    # up to 16 lanes
    assert ss._lane_rs_mode(dict(lane_rs=1), 8, 8, cpu) == 2      # the interpreter's form on CPU


_LAYOUT_PROBE = """
import sys
from genomamba_kernels.sass_report import compile_sm90
sys.stdout.write(compile_sm90("bwd").asm["ttgir"])
"""


def test_lane_reduce_scatter_gets_the_lane_layout_it_assumes():
    """The GPU reduce-scatter exchanges values between lanes j and j ^ H and reads the result of
    lane j as time step j: that holds only if the channel axis of its operands sits on the low 3
    lane bits (threadsPerWarp [1, 4, 8], channels fastest). Compiled for sm_90 with the installed
    Triton (no GPU needed; in a subprocess, outside the interpreter), the layout of every
    shuffle's operands is checked."""
    import re
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", _LAYOUT_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ttgir = run.stdout
    shuffles = [line for line in ttgir.splitlines() if "shfl.sync.bfly" in line]
    assert len(shuffles) == 6, "expected 3 rounds x (dB, dC)"
    layouts = {name for line in shuffles for name in re.findall(r"tensor<[^>]*, (#\w+)>", line)}
    assert layouts
    for name in layouts:
        definition = re.search(rf"^{name} = (.*)$", ttgir, re.M).group(1)
        assert "threadsPerWarp = [1, 4, 8]" in definition and "order = [2, 1, 0]" in definition, definition
        assert "warpsPerCTA = [1, 1, 1]" in definition, definition


_SASS_PROBE = """
import json
from genomamba_kernels.sass_report import report
rows = {k: report(k) for k in ("fwd", "fwd_add", "chunk")}
print(json.dumps({k: {f: r[f] for f in ("registers", "barriers", "stack_bytes", "local_loads", "local_stores")}
                  for k, r in rows.items()}))
"""


def test_sass_report_compiles_left_out_flags_at_their_defaults():
    """A constexpr flag with a default that a sass_report entry does not list (H_IN of the
    chunk-state kernel here) is compiled at its default, not as a runtime argument with both of
    its branches kept; what an entry lists wins."""
    from genomamba_kernels.sass_report import compile_constants

    fn = sys.modules["genomamba_kernels.selective_scan_triton"]._chunk_state_kernel
    consts = compile_constants(fn, dict(T=8, PER_TILE=True))
    assert consts["H_IN"] is False and consts["T"] == 8 and consts["PER_TILE"] is True
    assert compile_constants(fn, dict(H_IN=True))["H_IN"] is True


def test_inference_forward_keeps_its_state_in_the_compute_layout():
    """The inference forward's output pass (with and without the other direction's output added)
    compiled for sm_90 with the installed Triton (no GPU; outside the interpreter): its tile loop
    has the 4 barriers of the B and C broadcasts, not the 20 it had while the loop-carried state
    went through shared memory twice per tile (kernels/BENCHMARKS.md, ninth session), and no spills.
    The chunk-state pass, launched with a 128-register cap (4 programs per SM), spills nothing in
    its loop (a spilling cap made the forward 1.5-4.5x slower: kernels/BENCHMARKS.md, eleventh session)."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", _SASS_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    chunk = rows.pop("chunk")
    assert chunk["registers"] <= 128 and chunk["local_loads"] == chunk["local_stores"] == 0, chunk
    for name, r in rows.items():
        assert r["barriers"] <= 4, (name, r)
        assert r["stack_bytes"] == 0 and r["local_loads"] == 0, (name, r)


def test_register_caps_are_tuning_keys_and_cuda_only(monkeypatch):
    """GENOMAMBA_SCAN_TILES fields 13-16 set the register caps of the forward (inference /
    training), chunk-state and adjoint kernels; a cap becomes a launch option only on CUDA."""
    ss = sys.modules["genomamba_kernels.selective_scan"]
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", "8,4,8,1,1,0,2,8,64,1,1,0,168,0,96,0")
    cfg = ss._tile_config(4, torch.device("cpu"))
    assert (cfg["maxnreg_fwd"], cfg["maxnreg_fwdt"], cfg["maxnreg_chunk"], cfg["maxnreg_adj"]) == (168, 0, 96, 0)
    assert ss._reg_cap(cfg["maxnreg_chunk"], torch.device("cpu")) == {}
    assert ss._reg_cap(cfg["maxnreg_chunk"], torch.device("cuda")) == {"maxnreg": 96}
    assert ss._reg_cap(0, torch.device("cuda")) == {}


def test_tuning_fields_by_name(monkeypatch):
    """GENOMAMBA_SCAN_TILES also takes named fields, and names an unknown one in its error."""
    ss = sys.modules["genomamba_kernels.selective_scan"]
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", "tile_bf16=0, part_rows=5")
    cfg = ss._tile_config(4, torch.device("cpu"))
    assert (cfg["tile_bf16"], cfg["part_rows"], cfg["T"]) == (0, 5, 8)
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", "tile_bf16=1,tiles=3")
    with pytest.raises(ValueError, match="unknown field 'tiles'"):
        ss._tile_config(4, torch.device("cpu"))


def test_tile_states_default_to_bf16_on_the_gpu_only(monkeypatch):
    """tile_bf16 is 1 on the GPU and 0 under the interpreter (see _tile_config)."""
    ss = sys.modules["genomamba_kernels.selective_scan"]
    monkeypatch.delenv("GENOMAMBA_SCAN_TILES", raising=False)
    assert ss._tile_config(16, torch.device("cpu"))["tile_bf16"] == 0
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ss._tile_config(16, torch.device("cuda"))["tile_bf16"] == 1


@pytest.mark.parametrize("level", [0, 1])
def test_tile_states_in_bf16_for_bf16_inputs(level, monkeypatch):
    """With bf16 inputs and tile_bf16 = 1 (the GPU default) the training path keeps its per-tile
    state buffers in bf16 (the forward's tile-entry states, the adjoints entering each tile from
    within its segment); the adjoint pass's per-segment sums stay float32. Gradients stay within
    the bf16 tolerance of float64; float32 inputs keep float32 buffers and their accuracy."""
    monkeypatch.setenv("GENOMAMBA_SCAN_TILES", f"tile_bf16={level}")
    ss = sys.modules["genomamba_kernels.selective_scan"]
    seen = []

    def spy(name, positions):
        real = getattr(ss.K, name)

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append({p: args[i].dtype for p, i in positions.items()})
                    return real[grid](*args, **kw)
                return launch
        monkeypatch.setattr(ss.K, name, Spy())

    spy("_adjoint_tile_kernel", {"R": 8, "S": 10})
    spy("_bwd_kernel", {"H": 10, "R": 11, "Rseg": 12})
    bf, f32 = torch.bfloat16, torch.float32
    compare(make(batch=2, dim=16, L=45, groups=2, dtype=bf), 1e-2, reverse=True, seq_idx=packed_seq_idx(2, 45))
    tile = bf if level >= 1 else f32
    assert seen == [{"R": tile, "S": f32}, {"H": tile, "R": tile, "Rseg": f32}]
    seen.clear()
    # tile states the backward rebuilds (recompute_states) are stored like the kept ones
    compare(make(batch=2, dim=16, L=45, dtype=bf), 1e-2, seq_idx=packed_seq_idx(2, 45), recompute_states=True)
    assert seen == [{"R": tile, "S": f32}, {"H": tile, "R": tile, "Rseg": f32}]
    seen.clear()
    compare(make(batch=2, dim=16, L=45), 1e-5)
    assert seen == [{"R": f32, "S": f32}, {"H": f32, "R": f32, "Rseg": f32}]


@pytest.mark.parametrize("out_add,save", [(False, True), (True, False)])
def test_eager_function_equals_the_custom_op(out_add, save):
    """selective_scan trains through a plain autograd.Function in eager mode (less host time per
    call) and through the torch.library custom op under torch.compile: same outputs and gradients."""
    ss = sys.modules["genomamba_kernels.selective_scan"]
    x = make(batch=2, dim=8, L=30)
    seq = packed_seq_idx(2, 30)
    add = torch.randn(2, 8, 30) if out_add else None
    results = []
    for op in (ss._EagerScan.apply, ss._scan_fwd_op):
        leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
        a = add.clone().requires_grad_() if add is not None else None
        out, last, _ = op(*[leaves[k] for k in NAMES[:8]], leaves["initial_state"], seq, True, True, save, a)
        g = torch.Generator().manual_seed(0)
        ((out * torch.randn(out.shape, generator=g)).sum() + (last * torch.randn(last.shape, generator=g)).sum()).backward()
        results.append([out, last] + [leaves[k].grad for k in NAMES] + ([a.grad] if a is not None else []))
    for p, q in zip(*results):
        assert torch.equal(p, q)
