"""The low-rank projections (Triton under the interpreter) vs their references, and the scan
backward that takes dt made outside it (delta_pre_softplus) vs the scan applying bias and
softplus itself."""

import pytest
import torch
from genomamba_kernels.projections import (add_projection_, dt_proj_backward, dt_proj_backward_ref,
                                          dt_proj_softplus, dt_proj_softplus_ref)


def rel_max(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("batch,dim,rank,L", [(1, 32, 16, 37), (2, 24, 8, 50), (1, 40, 70, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dt_proj_softplus_matches_reference(batch, dim, rank, L, dtype):
    """Ranks below, at and above the 16-wide dot (70: several steps of its loop), channel and
    length counts that are not block multiples, dt_low a strided row slice of x_proj's output
    (as the mixer passes it), raw values from -12 (dt ~ 6e-6) past the softplus threshold 20."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = (torch.randn(dim, rank, generator=g) * rank ** -0.5).to(dtype)
    x_dbl = torch.randn(batch, rank + 9, L, generator=g).to(dtype)
    dt_low = x_dbl[:, 1:1 + rank]
    bias = torch.linspace(-12.0, 24.0, dim)
    dt = dt_proj_softplus(w, dt_low, bias, backend="triton")
    ref = dt_proj_softplus_ref(w.double(), dt_low.double(), bias.double())
    assert dt.dtype == dtype and dt.shape == (batch, dim, L)
    # relative, everywhere: small dt keep their digits (no log(1 + e) cancellation). bf16: one
    # rounding (the interpreter truncates: up to one ulp)
    assert rel_max(dt, ref) < (1e-5 if dtype == torch.float32 else 8e-3)
    assert ref.min() < 1e-4 and ref.max() > 20


@pytest.mark.parametrize("batch,dim,rank,L", [(1, 32, 16, 100), (2, 24, 8, 50), (1, 40, 48, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dt_proj_backward_matches_reference(batch, dim, rank, L, dtype):
    """Both gradients of dt_proj from one pass: the input's (weight^T @ g) and the weight's, summed
    over the batch and over programs that each took a run of position blocks."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(dim, rank, generator=g).to(dtype)
    x_dbl = torch.randn(batch, rank + 9, L, generator=g).to(dtype)
    dt_low = x_dbl[:, 2:2 + rank]
    grad = torch.randn(batch, dim, L, generator=g).to(dtype)
    d_low, d_w = dt_proj_backward(grad, dt_low, w, backend="triton")
    ref_low, ref_w = dt_proj_backward_ref(grad.double(), dt_low.double(), w.double())
    assert d_low.dtype == dtype and d_low.shape == (batch, rank, L) and d_w.shape == (dim, rank)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert rel(d_low, ref_low) < tol and rel(d_w, ref_w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_projection_adds_in_place(dtype):
    """out += W @ x with W a transposed view (x_proj's weight) and out a strided slice: the rest of
    the buffer is untouched."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(48, 40, generator=g).to(dtype)          # x_proj's weight, (R + 2N, D)
    x = torch.randn(2, 48, 53, generator=g).to(dtype)
    buf = torch.randn(2, 80, 53, generator=g).to(dtype)
    before = buf.clone()
    out = add_projection_(buf[:, 20:60], w.t(), x, backend="triton")
    ref = before[:, 20:60].double() + torch.matmul(w.t().double(), x.double())
    assert out.data_ptr() == buf[:, 20:60].data_ptr()
    assert rel(buf[:, 20:60], ref) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(buf[:, :20], before[:, :20]) and torch.equal(buf[:, 60:], before[:, 60:])
    with pytest.raises(ValueError, match="must be"):
        add_projection_(buf[:, :10], w.t(), x, backend="triton")


def test_projection_kernels_with_the_gpu_blocks(monkeypatch):
    """The GPU's program shape (64 channels x 128 positions) over channel and position counts that
    leave partial blocks on both axes: masked loads, masked stores, nothing written outside."""
    from genomamba_kernels import projections

    monkeypatch.setenv("GENOMAMBA_PROJ_BLOCKS", ",".join(map(str, projections._GPU_BLOCKS)))
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    w = torch.randn(70, 16, generator=g) * 0.25
    x = torch.randn(1, 16, 300, generator=g)
    bias = torch.linspace(-9.0, 3.0, 70)
    dt = dt_proj_softplus(w, x, bias, backend="triton")
    assert rel_max(dt, dt_proj_softplus_ref(w.double(), x.double(), bias.double())) < 1e-5
    buf = torch.randn(1, 80, 300, generator=g)
    before = buf.clone()
    add_projection_(buf[:, :70], w, x, backend="triton")
    assert rel(buf[:, :70], before[:, :70].double() + torch.matmul(w.double(), x.double())) < 1e-6
    assert torch.equal(buf[:, 70:], before[:, 70:])


def test_dt_proj_softplus_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not make"):
        dt_proj_softplus(torch.randn(8, 4), torch.randn(1, 5, 10), torch.randn(8), backend="triton")
    with pytest.raises(ValueError, match="does not match"):
        dt_proj_softplus(torch.randn(8, 4), torch.randn(1, 4, 10), torch.randn(7), backend="triton")


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_backward_from_dt_made_outside(reverse):
    """selective_scan_triton_bwd(delta_pre_softplus=True) on dt = softplus(raw + bias): ddelta is
    raw's gradient and the ddb slot the bias's, as when the scan applies bias and softplus itself
    (float32; raw from -11 to 22, so small dt and the linear part are both there)."""
    from genomamba_kernels.selective_scan import _tile_config, selective_scan_triton_bwd, selective_scan_triton_fwd

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    batch, dim, n, L = 2, 8, 4, 29
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    u, z, B, C = r(batch, dim, L), r(batch, dim, L), r(batch, n, L), r(batch, n, L)
    A, D = -torch.rand(dim, n, generator=g) * 2 - 0.1, r(dim)
    bias = torch.linspace(-10.0, 20.0, dim)
    raw = r(batch, dim, L)
    dt = torch.nn.functional.softplus(raw + bias[:, None])
    dout = r(batch, dim, L)
    cfg = _tile_config(n, u.device)
    out_in, _, tiles_in, _ = selective_scan_triton_fwd(u, raw, A, B, C, D, z, bias, True, reverse=reverse,
                                                       save_tile_states=True)
    out_pre, _, tiles_pre, _ = selective_scan_triton_fwd(u, dt, A, B, C, D, z, None, False, reverse=reverse,
                                                         save_tile_states=True)
    assert torch.allclose(out_pre, out_in, atol=1e-5, rtol=1e-5)
    inside = selective_scan_triton_bwd(dout, None, u, raw, A, B, C, D, z, bias, True, None, reverse, None,
                                       tiles_in, cfg)
    outside = selective_scan_triton_bwd(dout, None, u, dt, A, B, C, D, z, None, False, None, reverse, None,
                                        tiles_pre, cfg, delta_pre_softplus=True)
    names = ("du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
    for name, a, b in zip(names, outside, inside):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
    assert inside[1].abs().max() > 1e-3 and inside[7].abs().max() > 1e-3
    # channel 0 (bias -10, dt ~ 5e-5): softplus' = 1 - exp(-dt) keeps its digits there too
    small = lambda t: t[:, 0].double()  # noqa: E731
    assert (small(outside[1]) - small(inside[1])).norm() < 1e-5 * small(inside[1]).norm()
    with pytest.raises(ValueError, match="delta_pre_softplus"):
        selective_scan_triton_bwd(dout, None, u, dt, A, B, C, D, z, bias, False, None, reverse, None,
                                  tiles_pre, cfg, delta_pre_softplus=True)
