"""Triton causal depthwise conv1d (under the interpreter) vs the float64 reference, all options."""

import itertools

import pytest
import torch

from genomamba_kernels import causal_conv1d, causal_conv1d_ref


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def seq_ids(batch, L):
    ids = torch.zeros(batch, L, dtype=torch.int32)
    ids[:, L // 3:] = 1
    ids[:, L // 3 + 2:] = 2
    return ids


def compare(x, w, b, seq, act, reverse):
    """Triton output and the gradients of x, w, b against autograd through the float64 reference."""
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, w, b)]
    o = causal_conv1d(*ours, seq_idx=seq, activation=act, reverse=reverse, backend="triton")
    o_ref = causal_conv1d_ref(*ref, activation=act, seq_idx=seq, reverse=reverse, dtype=torch.float64)
    g = torch.randn_like(o_ref)
    (o.double() * g).sum().backward()
    (o_ref * g).sum().backward()
    assert rel(o, o_ref) < 1e-5
    for p, q in zip(ours, ref):
        if p is not None:
            assert rel(p.grad, q.grad) < 1e-5


@pytest.mark.parametrize("reverse,packed,act,width,bias",
                         list(itertools.product([False, True], [False, True], [None, "silu"], [2, 4], [True, False])))
def test_conv_matches_reference(reverse, packed, act, width, bias):
    batch, dim, L = 2, 6, 29
    x = torch.randn(batch, dim, L)
    w = torch.randn(dim, width)
    b = torch.randn(dim) if bias else None
    seq = seq_ids(batch, L) if packed else None
    compare(x, w, b, seq, act, reverse)


@pytest.mark.parametrize("reverse,act,width", [(False, "silu", 4), (True, "silu", 4), (False, None, 3), (True, None, 2)])
def test_conv_backward_over_many_programs(reverse, act, width):
    """L = 83 is 6 time tiles of 16 (the CPU block), 2 per program of the backward: 3 programs,
    the last one half past the end; sequence boundaries fall inside and across tiles."""
    batch, dim, L = 2, 5, 83
    x, w, b = torch.randn(batch, dim, L), torch.randn(dim, width), torch.randn(dim)
    seq = torch.zeros(batch, L, dtype=torch.int32)
    seq[0, 15:] = 1
    seq[0, 33:] = 2
    seq[1, 47:] = 1
    compare(x, w, b, seq, act, reverse)


def test_conv_is_causal_and_reverse_is_mirror():
    x = torch.randn(1, 3, 20)
    w = torch.randn(3, 4)
    base = causal_conv1d(x, w, backend="triton")
    x2 = x.clone()
    x2[..., 10:] += 1.0  # the future must not change the past
    assert torch.equal(causal_conv1d(x2, w, backend="triton")[..., :10], base[..., :10])
    rev = causal_conv1d(x, w, reverse=True, backend="triton")
    mirror = causal_conv1d(x.flip(-1), w, backend="triton").flip(-1)
    assert rel(rev, mirror) < 1e-6


def test_conv_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.zeros(1, 2, 5), torch.zeros(2, 4), activation="relu")
    with pytest.raises(ValueError, match="weight must be"):
        causal_conv1d(torch.zeros(1, 2, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="width must be 1 to 4"):
        causal_conv1d(torch.zeros(1, 2, 5), torch.zeros(2, 5))


def test_both_ops_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) traces conv + scan (Triton custom ops): same values and gradients."""
    from genomamba_kernels import selective_scan

    torch.manual_seed(0)
    b, d, L, n = 1, 4, 20, 4
    x = torch.randn(b, d, L, requires_grad=True)
    w, dt, A = torch.randn(d, 4), torch.randn(b, d, L), -torch.rand(d, n)
    B, C, z = torch.randn(b, n, L), torch.randn(b, n, L), torch.randn(b, d, L)

    def f(x):
        h = causal_conv1d(x, w, None, activation="silu", reverse=True, backend="triton")
        return selective_scan(h, dt, A, B, C, torch.ones(d), z, None, True, reverse=True, backend="triton").square().sum()

    eager = f(x)
    eager.backward()
    g0, x.grad = x.grad.clone(), None
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    out.backward()
    assert torch.allclose(out, eager, atol=1e-6) and torch.allclose(x.grad, g0, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_conv_backward_on_a_channel_slice(reverse):
    """x as the model passes it: half of an in_proj output (batch stride twice the slice's size).
    The SiLU backward's scratch gradient has its own strides; batch 1 must not land on batch 0."""
    batch, dim, L = 3, 6, 33
    xz = torch.randn(batch, 2 * dim, L)
    w, b = torch.randn(dim, 4), torch.randn(dim)
    x = xz[:, dim:].clone().requires_grad_()
    x_view = xz.clone().requires_grad_()
    ref = [t.double().requires_grad_() for t in (x.detach(), w, b)]
    o = causal_conv1d(x_view[:, dim:], w, b, activation="silu", reverse=reverse, backend="triton")
    o_ref = causal_conv1d_ref(*ref, activation="silu", reverse=reverse, dtype=torch.float64)
    g = torch.randn_like(o_ref)
    (o.double() * g).sum().backward()
    (o_ref * g).sum().backward()
    assert rel(x_view.grad[:, dim:], ref[0].grad) < 1e-5
    assert x_view.grad[:, :dim].abs().max() == 0


@pytest.mark.parametrize("reverse,packed", [(False, True), (True, False)])
def test_conv_backward_writes_or_adds_into_a_given_buffer(reverse, packed):
    """conv_bwd(dx_out=, accumulate=): dx lands in a strided slice of a larger buffer (the x half of
    a bidirectional block's in_proj gradient), replacing or adding to what is there."""
    from genomamba_kernels.causal_conv1d import conv_bwd

    batch, dim, L = 2, 5, 40
    x, w, b, dout = torch.randn(batch, dim, L), torch.randn(dim, 4), torch.randn(dim), torch.randn(batch, dim, L)
    seq = seq_ids(batch, L) if packed else None
    dx, dw, db = conv_bwd(dout, x, w, b, seq, True, reverse)
    buf = torch.randn(batch, 2 * dim, L)
    before = buf.clone()
    conv_bwd(dout, x, w, b, seq, True, reverse, dx_out=buf[:, :dim])
    assert torch.equal(buf[:, :dim], dx) and torch.equal(buf[:, dim:], before[:, dim:])
    _, dw2, db2 = conv_bwd(dout, x, w, b, seq, True, reverse, dx_out=buf[:, :dim], accumulate=True)
    assert torch.allclose(buf[:, :dim], 2 * dx, atol=1e-6) and torch.equal(buf[:, dim:], before[:, dim:])
    assert torch.equal(dw2, dw) and torch.equal(db2, db)
    with pytest.raises(ValueError, match="accumulate needs dx_out"):
        conv_bwd(dout, x, w, b, seq, True, reverse, accumulate=True)


@pytest.mark.parametrize("packed,width,bias,L", [(True, 4, True, 83), (False, 3, False, 29), (True, 2, True, 40)])
def test_both_directions_in_one_pass_match_the_reference(packed, width, bias, L):
    """_conv_fwd / conv_bwd with weight2 (the bidirectional block's form): the causal conv and the
    anti-causal one of the same x from one read, and dx the sum of both shares, written into a
    strided slice of a larger buffer; against autograd through the float64 reference (L = 83 runs
    the backward over several programs)."""
    from genomamba_kernels.causal_conv1d import _conv_fwd, conv_bwd

    batch, dim = 2, 5
    x = torch.randn(batch, dim, L)
    wf, wr = torch.randn(dim, width), torch.randn(dim, width)
    bf, br = (torch.randn(dim), torch.randn(dim)) if bias else (None, None)
    seq = seq_ids(batch, L) if packed else None
    out_f, out_r = _conv_fwd(x, wf, bf, seq, True, False, wr, br)
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, wf, bf, wr, br)]
    rf = causal_conv1d_ref(ref[0], ref[1], ref[2], activation="silu", seq_idx=seq, dtype=torch.float64)
    rr = causal_conv1d_ref(ref[0], ref[3], ref[4], activation="silu", seq_idx=seq, reverse=True, dtype=torch.float64)
    assert rel(out_f, rf) < 1e-5 and rel(out_r, rr) < 1e-5
    gf, gr = torch.randn_like(rf), torch.randn_like(rr)
    ((rf * gf).sum() + (rr * gr).sum()).backward()
    buf = torch.randn(batch, 2 * dim, L)
    before = buf.clone()
    dx, dwf, dbf, dwr, dbr = conv_bwd(gf.float(), x, wf, bf, seq, True, False, dx_out=buf[:, :dim],
                                      dout2=gr.float(), weight2=wr, bias2=br)
    assert dx.data_ptr() == buf.data_ptr() and torch.equal(buf[:, dim:], before[:, dim:])
    assert rel(dx, ref[0].grad) < 1e-5 and rel(dwf, ref[1].grad) < 1e-5 and rel(dwr, ref[3].grad) < 1e-5
    if bias:
        assert rel(dbf, ref[2].grad) < 1e-5 and rel(dbr, ref[4].grad) < 1e-5
    else:
        assert dbf.numel() == 0 and dbr.numel() == 0
    with pytest.raises(ValueError, match="both directions"):
        _conv_fwd(x, wf, bf, seq, True, True, wr, br)
    with pytest.raises(ValueError, match="both directions"):
        conv_bwd(gf.float(), x, wf, bf, seq, True, False, dout2=gr.float(), weight2=wr,
                 bias2=None if bias else torch.randn(dim))   # bias2 only with a bias


def test_gpu_block_override(monkeypatch):
    """GENOMAMBA_CONV_BLOCKS: one triple for both kernels, or the forward's and the backward's."""
    from types import SimpleNamespace

    from genomamba_kernels.causal_conv1d import _GPU_BLOCKS, _blocks

    gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    monkeypatch.delenv("GENOMAMBA_CONV_BLOCKS", raising=False)
    assert _blocks(gpu) == _GPU_BLOCKS["forward"] and _blocks(gpu, True) == _GPU_BLOCKS["backward"]
    monkeypatch.setenv("GENOMAMBA_CONV_BLOCKS", "8,64,2")
    assert _blocks(gpu) == _blocks(gpu, True) == (8, 64, 2)
    monkeypatch.setenv("GENOMAMBA_CONV_BLOCKS", "8,64,2;1,256,4")
    assert _blocks(gpu) == (8, 64, 2) and _blocks(gpu, True) == (1, 256, 4)
    for bad in ("8,64", "3,64,2", "8,64,2;1,256,4;1,1,1"):
        monkeypatch.setenv("GENOMAMBA_CONV_BLOCKS", bad)
        with pytest.raises(ValueError, match="GENOMAMBA_CONV_BLOCKS"):
            _blocks(gpu, True)
