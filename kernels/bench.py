"""Selective-scan benchmark: check on the GPU first, then time with triton.testing.do_bench.

    python -m genomamba_kernels.bench            # correctness, then the DESIGN.md shapes
    python -m genomamba_kernels.bench --quick    # correctness and the two smallest shapes
    python -m genomamba_kernels.bench --conv     # correctness, then the conv1d timings
    python -m genomamba_kernels.bench --tile-states   # gradient accuracy of bf16 per-tile states

Prints one table: shape, forward ms, forward+backward ms, achieved GB/s of the minimal bytes,
exponentials per second, and the ratio to mamba_ssm (measured live when mamba_ssm is importable,
else against the numbers recorded in DESIGN.md section 4 for the same GPU kind).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

from .causal_conv1d import causal_conv1d
from .reference import causal_conv1d_ref, selective_scan_chunked, selective_scan_ref
from .selective_scan import selective_scan

SHAPES = [(8, 1536, 2048), (1, 512, 131072), (1, 1536, 131072), (1, 512, 1048576), (1, 1536, 1048576)]
# DESIGN.md section 4: mamba_ssm 2.3.2.post1, bf16, z, D, delta_bias, softplus, N=16 (fwd, fwd+bwd ms).
RECORDED = {
    "H100": {SHAPES[0]: (0.56, 2.52), SHAPES[1]: (1.53, 9.47), SHAPES[2]: (4.54, 21.4),
             SHAPES[3]: (11.8, 75.6), SHAPES[4]: (35.5, 171.0)},
    "H200": {SHAPES[0]: (0.48, 2.42), SHAPES[1]: (1.52, 9.30), SHAPES[2]: (4.40, 20.7),
             SHAPES[3]: (11.5, 75.1), SHAPES[4]: (34.8, 167.0)},
}
N = 16


def make_inputs(batch, dim, L, dtype, groups=None, device="cuda", grad=False):
    """Fresh random inputs shaped like a Mamba layer's (softplus'd dt around 0.001-0.1)."""
    g = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(4), "little"))
    r = lambda *s: torch.randn(*s, device=device, generator=g)
    bc = (batch, N, L) if groups is None else (batch, groups, N, L)
    t = dict(u=r(batch, dim, L).to(dtype), delta=(r(batch, dim, L) * 0.5 - 4).to(dtype),
             A=-torch.exp(r(dim, N) * 0.5), B=r(*bc).to(dtype), C=r(*bc).to(dtype),
             D=r(dim), z=r(batch, dim, L).to(dtype), delta_bias=r(dim) * 0.1)
    if grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_small(dtype, tol):
    """Forward (with and without autograd), last state and every gradient (from saved and from rebuilt
    tile states) vs float64 autograd, across options."""
    worst = 0.0
    # batch 2: several programs per tile (dB/dC by atomics); batch 8 x 4000: one program per tile.
    for kw in [dict(), dict(reverse=True), dict(groups=2), dict(seq=True), dict(seq=True, reverse=True),
               dict(batch=8, L=4000, reverse=True, seq=True), dict(batch=8, L=4000)]:
        batch, L = kw.get("batch", 2), kw.get("L", 1000)
        t = make_inputs(batch, 64, L, dtype, groups=kw.get("groups"), grad=True)
        seq = None
        if kw.get("seq"):
            seq = torch.zeros(batch, L, dtype=torch.int32, device="cuda")
            seq[:, 300:] = 1
            seq[:, 777:] = 2
        h0 = torch.randn(batch, 64, N, device="cuda", requires_grad=True)
        args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
        ref_args = [a.detach().double().requires_grad_() for a in args]
        h0r = h0.detach().double().requires_grad_()
        o, last = selective_scan(*args, delta_softplus=True, return_last_state=True, initial_state=h0,
                                 reverse=kw.get("reverse", False), seq_idx=seq)
        orf, lastr = selective_scan_ref(*ref_args, delta_softplus=True, return_last_state=True,
                                        initial_state=h0r, reverse=kw.get("reverse", False), seq_idx=seq)
        go = torch.randn_like(o)
        gl = torch.randn_like(last)
        ((o.float() * go.float()).sum() + (last * gl).sum()).backward()
        ((orf * go.double()).sum() + (lastr * gl.double()).sum()).backward()
        grads = [a.grad for a in args] + [h0.grad]
        for a in args + [h0]:
            a.grad = None
        # the same backward from tile states it rebuilds itself (the forward keeps none)
        o2, last2 = selective_scan(*args, delta_softplus=True, return_last_state=True, initial_state=h0,
                                   reverse=kw.get("reverse", False), seq_idx=seq, recompute_states=True)
        ((o2.float() * go.float()).sum() + (last2 * gl).sum()).backward()
        rebuilt = [a.grad for a in args] + [h0.grad]
        for a, gr in zip(args + [h0], grads):
            a.grad = gr
        with torch.no_grad():  # inference keeps no tile states: its own code path in the forward kernel
            o_inf, last_inf = selective_scan(*args, delta_softplus=True, return_last_state=True, initial_state=h0,
                                             reverse=kw.get("reverse", False), seq_idx=seq)
        errs = {"out": rel(o, orf), "last": rel(last, lastr), "out (no grad)": rel(o_inf, orf),
                "last (no grad)": rel(last_inf, lastr)}
        for name, a, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), args, ref_args):
            errs["d" + name] = rel(a.grad, b.grad)
        errs["dh0"] = rel(h0.grad, h0r.grad)
        for name, g, b in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"), rebuilt,
                              ref_args + [h0r]):
            errs[f"d{name} (rebuilt states)"] = rel(g, b.grad)
        bad = {k: v for k, v in errs.items() if not v < tol}
        worst = max(worst, max(errs.values()))
        print(f"  check {str(dtype):15s} {kw}: max rel err {max(errs.values()):.2e}" + (f"  FAIL {bad}" if bad else ""))
        if bad:
            sys.exit(f"correctness check failed for {dtype} {kw}: {bad}")
    return worst


def check_conv(dtype, tol, dim=256, L=3001, device="cuda"):
    """conv1d forward and every gradient (x, weight, bias) vs autograd through the float64
    reference: forward / reverse, packed sequences or not, widths 3 and 4; then both directions
    of a bidirectional block in one pass (_conv_fwd / conv_bwd with weight2)."""
    from .causal_conv1d import _conv_fwd, conv_bwd

    worst = 0.0
    for rev, packed, width in itertools.product((False, True), (False, True), (4, 3)):
        x = torch.randn(2, dim, L, device=device, dtype=dtype)
        w, b = torch.randn(dim, width, device=device), torch.randn(dim, device=device)
        seq = None
        if packed:  # boundaries inside and across tiles, one 2 positions before the end
            seq = torch.zeros(2, L, dtype=torch.int32, device=device)
            seq[:, L // 3:], seq[:, L // 3 + 3:], seq[1, L - 2:] = 1, 2, 3
        ours = [t.clone().requires_grad_() for t in (x, w, b)]
        ref = [t.double().requires_grad_() for t in (x, w, b)]
        out = causal_conv1d(*ours, seq_idx=seq, activation="silu", reverse=rev)
        out_ref = causal_conv1d_ref(*ref, activation="silu", seq_idx=seq, reverse=rev, dtype=torch.float64)
        g = torch.randn_like(out_ref)
        (out.double() * g).sum().backward()
        (out_ref * g).sum().backward()
        worst = max([worst, rel(out, out_ref)] + [rel(p.grad, q.grad) for p, q in zip(ours, ref)])
    for packed, width in itertools.product((False, True), (4, 3)):   # both directions in one pass
        x = torch.randn(2, dim, L, device=device, dtype=dtype)
        # causal weight, bias, then the anti-causal conv's
        p = [torch.randn(*shape, device=device) for shape in ((dim, width), (dim,), (dim, width), (dim,))]
        seq = None
        if packed:
            seq = torch.zeros(2, L, dtype=torch.int32, device=device)
            seq[:, L // 3:], seq[:, L // 3 + 3:], seq[1, L - 2:] = 1, 2, 3
        outs = _conv_fwd(x, p[0], p[1], seq, True, False, p[2], p[3])
        ref = [t.double().requires_grad_() for t in (x, *p)]
        refs = [causal_conv1d_ref(ref[0], ref[1 + 2 * r], ref[2 + 2 * r], activation="silu", seq_idx=seq,
                                  reverse=bool(r), dtype=torch.float64) for r in (0, 1)]
        gs = [torch.randn_like(o) for o in refs]
        sum((o * g).sum() for o, g in zip(refs, gs)).backward()
        grads = conv_bwd(gs[0].to(dtype), x, p[0], p[1], seq, True, False, dout2=gs[1].to(dtype), weight2=p[2],
                         bias2=p[3])
        worst = max([worst] + [rel(o, r) for o, r in zip(outs, refs)] + [rel(g, r.grad) for g, r in zip(grads, ref)])
    print(f"  check conv1d {str(dtype)} (out, dx, dw, dbias; reverse, packed, widths 3/4, both directions in one "
          f"pass): max rel err {worst:.2e}")
    if not worst < tol:
        sys.exit("conv1d correctness check failed")


CONV_SHAPES = [(8, 1536, 2048), (1, 512, 131072), (1, 1536, 131072), (1, 512, 1048576)]


def time_conv(do_bench, shapes=None, device="cuda"):
    """conv1d (width 4, SiLU, bias, bf16) forward and backward medians, each direction alone and
    both directions of a bidirectional block in one pass; GB/s of the minimal bytes (one
    direction: the forward reads x and writes out, the backward reads x and dout and writes dx;
    both: x read once, two outputs / two douts)."""
    from .causal_conv1d import _conv_fwd, conv_bwd

    print("\n| conv1d shape (B, D, L) | fwd us | fwd reverse us | bwd us | bwd reverse us | both fwd us "
          "| both bwd us | fwd GB/s | bwd GB/s | both fwd GB/s | both bwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch, dim, L in shapes or CONV_SHAPES:
        x = torch.randn(batch, dim, L, device=device, dtype=torch.bfloat16)
        dout, dout2 = torch.randn_like(x), torch.randn_like(x)
        w, b = torch.randn(dim, 4, device=device), torch.randn(dim, device=device)
        w2, b2 = torch.randn(dim, 4, device=device), torch.randn(dim, device=device)
        fwd = do_bench(lambda: _conv_fwd(x, w, b, None, True, False))
        fwd_rev = do_bench(lambda: _conv_fwd(x, w, b, None, True, True))
        bwd = do_bench(lambda: conv_bwd(dout, x, w, b, None, True, False))
        bwd_rev = do_bench(lambda: conv_bwd(dout, x, w, b, None, True, True))
        both_fwd = do_bench(lambda: _conv_fwd(x, w, b, None, True, False, w2, b2))
        both_bwd = do_bench(lambda: conv_bwd(dout, x, w, b, None, True, False, dout2=dout2, weight2=w2, bias2=b2))
        nbytes = x.numel() * x.element_size()
        print(f"| {(batch, dim, L)} | {fwd * 1e3:.1f} | {fwd_rev * 1e3:.1f} | {bwd * 1e3:.1f} | {bwd_rev * 1e3:.1f} | "
              f"{both_fwd * 1e3:.1f} | {both_bwd * 1e3:.1f} | {2 * nbytes / fwd / 1e6:.0f} | {3 * nbytes / bwd / 1e6:.0f} | "
              f"{3 * nbytes / both_fwd / 1e6:.0f} | {4 * nbytes / both_bwd / 1e6:.0f} |")
        del x, dout, dout2
        if device == "cuda":
            torch.cuda.empty_cache()


def check_long(dim=1536, L=1 << 20):
    """The 1 Mb shape (B*D*L > 2^31 elements) vs the chunked PyTorch path in fp32."""
    t = make_inputs(1, dim, L, torch.bfloat16)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    with torch.no_grad():
        out = selective_scan(*args, delta_softplus=True)
        ref = torch.empty(1, dim, L, device="cuda", dtype=torch.float32)
        for d0 in range(0, dim, 256):  # channel blocks keep the reference's memory small
            sl = slice(d0, d0 + 256)
            ref[:, sl] = selective_scan_chunked(t["u"][:, sl], t["delta"][:, sl], t["A"][sl], t["B"], t["C"],
                                                t["D"][sl], t["z"][:, sl], t["delta_bias"][sl], True,
                                                chunk_size=2048)
    e = rel(out, ref)
    tail = rel(out[..., -4096:], ref[..., -4096:])
    print(f"  check (1, {dim}, {L}) bf16 vs chunked fp32 reference: rel err {e:.2e} (last 4096 positions {tail:.2e})")
    if not (e < 1e-2 and tail < 1e-2):
        sys.exit("long-sequence correctness check failed")
    return e


def check_long_grad(dim=1536, L=1 << 20, seg=4096):
    """Backward at 1 Mb, (1, 1536, 2^20) bf16: 131,072 tiles (past the 65,535 grid-axis limit) and
    3.2e9-element state buffers (past 32-bit offsets). The sequence is one random 4,096-step
    segment repeated, with seq_idx restarting the state at every repeat, so every segment's
    gradients must equal those of the segment run alone (checked against float64 autograd by
    check_small's shapes), and the parameter gradients 256 times the segment's."""
    reps = L // seg
    t = make_inputs(1, dim, seg, torch.bfloat16)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    short = [t[k].detach().clone().requires_grad_() for k in names]
    per_pos = {"u", "delta", "B", "C", "z"}
    long = [(t[k].repeat(1, 1, reps) if k in per_pos else t[k]).detach().clone().requires_grad_() for k in names]
    seq = (torch.arange(L, device="cuda", dtype=torch.int32) // seg).unsqueeze(0)
    g = torch.randn(1, dim, seg, device="cuda", dtype=torch.bfloat16)
    selective_scan(*short, delta_softplus=True).backward(g)
    selective_scan(*long, delta_softplus=True, seq_idx=seq).backward(g.repeat(1, 1, reps))
    errs = {}
    for k, a, b in zip(names, long, short):
        expect = b.grad.repeat(1, 1, reps) if k in per_pos else b.grad * reps
        errs["d" + k] = rel(a.grad, expect)
    print(f"  check backward (1, {dim}, {L}) bf16, {reps} restarted copies of one segment vs the segment alone: "
          f"max rel err {max(errs.values()):.2e} ({', '.join(f'{k} {v:.1e}' for k, v in errs.items())})")
    if not max(errs.values()) < 1e-2:
        sys.exit("long-sequence gradient check failed")


def check_tile_states(dim=256, lengths=(32768, 262144), slow=0.01):
    """Gradient accuracy of the per-tile state buffers' precision (GENOMAMBA_SCAN_TILES tile_bf16
    0 = fp32, 1 = bf16, the GPU default): bf16 inputs, the benchmark's decays (~55 steps) and decays 1/slow
    times longer; against float64 autograd through the chunked PyTorch path up to 32,768 steps,
    beyond that against tile_bf16 = 0. Prints the relative error of every gradient."""
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    saved = os.environ.get("GENOMAMBA_SCAN_TILES")
    try:
        for scale, L in [(1.0, lengths[0])] + [(slow, n) for n in lengths]:
            t = make_inputs(1, dim, L, torch.bfloat16)
            t["A"] = t["A"] * scale
            g = torch.randn(1, dim, L, device="cuda", dtype=torch.bfloat16)
            ref = None
            if L <= 32768:
                ref = [t[k].detach().double().requires_grad_() for k in names]
                selective_scan_chunked(*ref, delta_softplus=True, dtype=torch.float64).backward(g.double())
                ref = [a.grad for a in ref]
            grads = {}
            for level in (0, 1):
                os.environ["GENOMAMBA_SCAN_TILES"] = f"tile_bf16={level}"
                x = [t[k].detach().clone().requires_grad_() for k in names]
                selective_scan(*x, delta_softplus=True).backward(g)
                grads[level] = [a.grad for a in x]
            for level in (0, 1):
                against, what = (ref, "float64") if ref is not None else (grads[0], "tile_bf16=0")
                errs = ", ".join(f"d{k} {rel(a, b):.1e}" for k, a, b in zip(names, grads[level], against))
                print(f"  tile states (1, {dim}, {L}) bf16, A x {scale:g}, tile_bf16={level} vs {what}: {errs}")
    finally:
        if saved is None:
            os.environ.pop("GENOMAMBA_SCAN_TILES", None)
        else:
            os.environ["GENOMAMBA_SCAN_TILES"] = saved


def time_shape(batch, dim, L, bench):
    t = make_inputs(batch, dim, L, torch.bfloat16, grad=True)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)

    def fwd(reverse=False):
        with torch.no_grad():
            return selective_scan(*args, delta_softplus=True, reverse=reverse)

    def fwd_bwd():
        selective_scan(*args, delta_softplus=True).backward(dout)

    f = bench(fwd, warmup=25, rep=100, return_mode="median")
    f_rev = bench(lambda: fwd(reverse=True), warmup=25, rep=100, return_mode="median")
    fb = bench(fwd_bwd, warmup=25, rep=100, grad_to_none=args, return_mode="median")
    e = 2  # bytes per bf16 element
    big = batch * dim * L * e
    bc = 2 * batch * N * L * e
    fwd_bytes = 3 * big + bc + big                      # u, delta, z, B, C in; out
    bwd_bytes = 4 * big + bc + 3 * big + bc             # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC
    exps = batch * dim * L * N
    return dict(shape=(batch, dim, L), fwd_ms=f, fwd_rev_ms=f_rev, fwd_bwd_ms=fb,
                fwd_gbs=fwd_bytes / f / 1e6, fwd_bwd_gbs=(fwd_bytes + bwd_bytes) / fb / 1e6,
                fwd_gexp=exps / f / 1e6, fwd_bwd_gexp=2 * exps / fb / 1e6)


def profile_shape(batch, dim, L):
    """Where the time goes: GPU time per kernel for one forward+backward (after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    t = make_inputs(batch, dim, L, torch.bfloat16, grad=True)
    args = [t[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn(batch, dim, L, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        selective_scan(*args, delta_softplus=True).backward(dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        selective_scan(*args, delta_softplus=True).backward(dout)
        torch.cuda.synchronize()
    print(f"profile {(batch, dim, L)}:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=40))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the two smallest shapes")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--shapes", default=None, help="e.g. '1,512,131072;8,1536,2048'")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="per-kernel GPU time of one forward+backward on each shape (torch.profiler)")
    ap.add_argument("--conv", action="store_true", help="instead of the scan table: the conv1d timings")
    ap.add_argument("--tile-states", action="store_true",
                    help="instead of the table: gradient accuracy with per-tile states in fp32 / bf16")
    ap.add_argument("--sweep", default=None,
                    help="tile configs 'T,BD,BD_BWD,warps,warps_bwd;...' timed on --shapes before the table")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    name = torch.cuda.get_device_name()
    kind = "H200" if "H200" in name else ("H100" if "H100" in name else None)
    print(f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; "
          f"{datetime.date.today().isoformat()}; tiles {os.environ.get('GENOMAMBA_SCAN_TILES', 'default')}")
    if args.tile_states:  # a check of its own: the others are not run first
        check_tile_states()
        return
    if not args.no_check:
        check_small(torch.float32, 1e-5)
        check_small(torch.bfloat16, 1e-2)
        check_conv(torch.float32, 1e-5)
        check_conv(torch.bfloat16, 1e-2)
        check_long()
        torch.cuda.empty_cache()
        check_long_grad()
        torch.cuda.empty_cache()
    if args.conv:
        time_conv(do_bench)
        return
    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    if args.profile:
        for shp in shapes:
            profile_shape(*shp)
        return
    if args.sweep:
        for tiles in args.sweep.split(";"):
            os.environ["GENOMAMBA_SCAN_TILES"] = tiles
            for shp in shapes:
                try:
                    r = time_shape(*shp, do_bench)
                    print(f"  sweep tiles={tiles} {shp}: fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms",
                          flush=True)
                except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                    print(f"  sweep tiles={tiles} {shp}: failed: {str(exc).splitlines()[0][:200]}", flush=True)
                torch.cuda.empty_cache()
        os.environ.pop("GENOMAMBA_SCAN_TILES")
        return
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn  # noqa: F401
        live = True
    except ImportError:
        live = False
    rows = []
    for shp in shapes:
        r = time_shape(*shp, do_bench)
        rec = RECORDED.get(kind, {}).get(tuple(shp))
        r["vs_mamba_fwd"] = rec[0] / r["fwd_ms"] if rec else None
        r["vs_mamba_fwd_bwd"] = rec[1] / r["fwd_bwd_ms"] if rec else None
        rows.append(r)
        torch.cuda.empty_cache()
    src = "live" if live else f"recorded ({kind}, DESIGN.md §4)"
    print(f"\n| shape (B, D, L) | fwd ms | fwd reverse=True ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s | fwd Gexp/s | "
          f"speed-up vs mamba_ssm fwd / fwd+bwd [{src}] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = (f"{r['vs_mamba_fwd']:.2f}x / {r['vs_mamba_fwd_bwd']:.2f}x" if r["vs_mamba_fwd"] else "n/a")
        print(f"| {r['shape']} | {r['fwd_ms']:.3f} | {r['fwd_rev_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['fwd_gbs']:.0f} | "
              f"{r['fwd_bwd_gbs']:.0f} | {r['fwd_gexp']:.0f} | {vs} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=name, rows=rows), fh, indent=1, default=str)


if __name__ == "__main__":
    main()
