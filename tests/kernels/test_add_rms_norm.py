"""Fused residual add + RMSNorm (Triton under the interpreter) vs the float64 reference."""

import itertools

import pytest
import torch
from genomamba_kernels import add_rms_norm, add_rms_norm_ref


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("has_res,res_dtype,out_dtype,grad_res_out,x_dtype",
                         list(itertools.product([True, False], [torch.float32, torch.bfloat16],
                                                [torch.float32, torch.bfloat16], [True, False],
                                                [torch.float32, torch.bfloat16])))
def test_add_rms_norm_matches_reference(has_res, res_dtype, out_dtype, grad_res_out, x_dtype):
    torch.manual_seed(0)
    d = 48 if x_dtype == torch.float32 else 37  # a width that is not a power of two
    shape = (3, 7, d)  # 21 rows: not a multiple of the row block
    x = torch.randn(shape).to(x_dtype)
    res = torch.randn(shape) if has_res else None
    w = torch.rand(d) + 0.5
    ours = [t.clone().requires_grad_() if t is not None else None for t in (x, res, w)]
    ref = [t.double().requires_grad_() if t is not None else None for t in (x, res, w)]
    y, r = add_rms_norm(ours[0], ours[1], ours[2], 1e-5, out_dtype=out_dtype, residual_dtype=res_dtype,
                        backend="triton")
    y_ref, r_ref = add_rms_norm_ref(ref[0], ref[1], ref[2], 1e-5, torch.float64, torch.float64)
    assert y.dtype == out_dtype and r.dtype == res_dtype and y.shape == shape
    tol = 1e-2 if torch.bfloat16 in (res_dtype, out_dtype, x_dtype) else 1e-5
    assert rel(r, r_ref) < tol and rel(y, y_ref) < tol
    gy = torch.randn(shape, dtype=torch.float64)
    gr = torch.randn(shape, dtype=torch.float64) if grad_res_out else torch.zeros(shape, dtype=torch.float64)
    loss = (y.double() * gy).sum() + ((r.double() * gr).sum() if grad_res_out else 0)
    loss.backward()
    ((y_ref * gy).sum() + (r_ref * gr).sum()).backward()
    for p, q in zip(ours, ref):
        if p is not None:
            assert p.grad.dtype == p.dtype
            assert rel(p.grad, q.grad) < tol, (p.shape, rel(p.grad, q.grad))


def test_add_rms_norm_dispatch_and_errors():
    x = torch.randn(4, 16)
    w = torch.ones(16)
    y, r = add_rms_norm(x, None, w, 1e-6)  # CPU tensors: the PyTorch path
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (16,), w, 1e-6))
    torch.testing.assert_close(r, x)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, None, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        add_rms_norm(x, torch.randn(4, 8), w, 1e-6)


def test_add_rms_norm_gradient_through_the_residual_output_alone():
    """Only the summed residual is used (no gradient reaches the normed output): x and residual
    get that gradient, the weight none."""
    x, res, w = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True), torch.ones(16)
    w.requires_grad_()
    y, r = add_rms_norm(x, res, w, 1e-6, residual_dtype=torch.float32, backend="triton")
    g = torch.randn(5, 16)
    (r * g).sum().backward()
    assert torch.equal(x.grad, g) and torch.equal(res.grad, g) and w.grad is None
