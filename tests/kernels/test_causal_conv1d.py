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


@pytest.mark.parametrize("reverse,packed,act,width,bias",
                         list(itertools.product([False, True], [False, True], [None, "silu"], [2, 4], [True, False])))
def test_conv_matches_reference(reverse, packed, act, width, bias):
    batch, dim, L = 2, 6, 29
    x = torch.randn(batch, dim, L)
    w = torch.randn(dim, width)
    b = torch.randn(dim) if bias else None
    seq = seq_ids(batch, L) if packed else None
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
