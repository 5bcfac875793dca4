"""Single-pass forward: GPU correctness, then timing against the chunked forward (session 18)."""
import importlib, sys, torch, triton
from triton.testing import do_bench
SS = importlib.import_module("genomamba_kernels.selective_scan")
from genomamba_kernels.reference import selective_scan_ref, selective_scan_chunked
from genomamba_kernels.scan_single_pass import single_pass_forward
dev = "cuda"
torch.manual_seed(0)
warps_list = [int(w) for w in (sys.argv[1] if len(sys.argv) > 1 else "1").split(",")]

def inputs(batch, dim, L, N=16, groups=1, dtype=torch.bfloat16, pre=True):
    u = torch.randn(batch, dim, L, device=dev, dtype=dtype)
    if pre:
        delta = (torch.rand(batch, dim, L, device=dev) * 0.1 + 0.001).to(dtype)
        db = None
    else:
        delta = (torch.randn(batch, dim, L, device=dev) * 0.5 - 2).to(dtype)
        db = torch.randn(dim, device=dev) * 0.3
    A = -torch.exp(torch.randn(dim, N, device=dev) * 0.5)
    B = torch.randn(batch, groups, N, L, device=dev, dtype=dtype)
    C = torch.randn(batch, groups, N, L, device=dev, dtype=dtype)
    D = torch.randn(dim, device=dev)
    z = torch.randn(batch, dim, L, device=dev, dtype=dtype)
    return u, delta, A, B, C, D, z, db

def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

print("== correctness (bf16 vs float64 reference)")
worst = 0
for (batch, dim, L, N, groups, rev, seq, h0, pre, add) in [
        (1, 64, 1000, 16, 1, False, False, False, True, False), (1, 64, 1000, 16, 1, True, False, False, True, True),
        (2, 64, 777, 16, 2, False, True, True, False, False), (2, 64, 777, 16, 2, True, True, True, False, True),
        (1, 32, 512, 8, 1, True, False, True, True, False), (1, 32, 333, 4, 1, False, True, False, False, True)]:
    u, delta, A, B, C, D, z, db = inputs(batch, dim, L, N, groups, pre=pre)
    s = None
    if seq:
        s = torch.zeros(batch, L, device=dev, dtype=torch.int32); s[:, L // 3:] = 1; s[:, L // 2:] = 2
    h0t = torch.randn(batch, dim, N, device=dev) if h0 else None
    ad = torch.randn_like(u) if add else None
    for w in warps_list:
        if dim % ((32 // N) * w):
            continue
        out, last = single_pass_forward(u, delta, A, B, C, D, z, db, not pre, h0t, rev, s, ad, w, True, 1)
        ref, rl = selective_scan_ref(u.cpu(), delta.cpu(), A.cpu(), B.cpu(), C.cpu(), D.cpu(), z.cpu(),
                                     None if db is None else db.cpu(), not pre, True,
                                     None if h0t is None else h0t.cpu(), rev, None if s is None else s.cpu())
        if ad is not None:
            ref = ref.double() + ad.cpu().double()
        e, el = rel(out.cpu(), ref), rel(last.cpu(), rl)
        worst = max(worst, e, el)
        print(f"  B={batch} D={dim} L={L} N={N} g={groups} rev={rev} seq={seq} h0={h0} softplus={not pre} add={add} "
              f"warps={w}: out {e:.2e} last {el:.2e}")
print(f"  worst {worst:.2e}")
assert worst < 1e-2

print("== 1 Mb: single pass vs the chunked Triton forward (both bf16 out)")
for dim in (512, 1536):
    u, delta, A, B, C, D, z, db = inputs(1, dim, 1 << 20, pre=False)
    for w in warps_list:
        out, last = single_pass_forward(u, delta, A, B, C, D, z, db, True, None, False, None, None, w, True, 1)
        sl = slice(dim - 128, dim)      # the last channels: offsets past 2^31 elements at D = 1536
        ref = selective_scan_chunked(u[:, sl], delta[:, sl], A[sl], B, C, D[sl], z[:, sl], db[sl], True,
                                     dtype=torch.float32)
        tri = SS.selective_scan_triton_fwd(u, delta, A, B, C, D, z, db, True)[0]
        print(f"  (1, {dim}, 2^20) softplus warps={w}: last 128 channels vs chunked fp32 torch {rel(out[:, sl], ref):.2e}, "
              f"last 4096 steps {rel(out[:, sl, -4096:], ref[..., -4096:]):.2e}; all vs chunked Triton {rel(out, tri):.2e}")
        del ref, tri
    del u, delta, B, C, z

print("== timing (do_bench median ms)")
rows = []
for (batch, dim, L) in [(1, 512, 131072), (1, 512, 1 << 20), (1, 1536, 1 << 20), (1, 1536, 131072), (8, 1536, 2048)]:
    for pre in (True, False):
        u, delta, A, B, C, D, z, db = inputs(batch, dim, L, pre=pre)
        u2, delta2, B2, C2 = torch.randn_like(u), delta.clone(), torch.randn_like(B), torch.randn_like(C)
        sp = not pre
        def chunked(rev=False, add=None, uu=u, dd=delta, BB=B, CC=C):
            return SS.selective_scan_triton_fwd(uu, dd, A, BB, CC, D, z, db, sp, None, rev, None, out_add=add)[0]
        t_ch = do_bench(lambda: chunked())
        t_ch2 = do_bench(lambda: chunked(True, chunked(), u2, delta2, B2, C2))
        rec = dict(shape=(batch, dim, L), pre=pre, chunked=t_ch, chunked_both=t_ch2)
        for w in warps_list:
            f = lambda rev=False, add=None, uu=u, dd=delta, BB=B, CC=C: single_pass_forward(
                uu, dd, A, BB, CC, D, z, db, sp, None, rev, None, add, w, True, 1)[0]
            t1 = do_bench(lambda: f())
            t1r = do_bench(lambda: f(True))
            t_seq2 = do_bench(lambda: f(True, f(), u2, delta2, B2, C2))
            s1 = torch.cuda.Stream()
            def both():
                cur = torch.cuda.current_stream()
                s1.wait_stream(cur)
                y1 = f()
                with torch.cuda.stream(s1):
                    y2 = f(True, None, u2, delta2, B2, C2)
                cur.wait_stream(s1)
                return y1.add_(y2)
            t_par = do_bench(both)
            rec[f"w{w}"] = (t1, t1r, t_seq2, t_par)
        rows.append(rec)
        print(rec, flush=True)
        del u, delta, B, C, z, u2, delta2, B2, C2
print("| shape | dt | chunked fwd | chunked both (out_add) | " + " | ".join(
    f"w{w}: fwd / rev / both serial / both 2 streams + add" for w in warps_list) + " |")
for r in rows:
    print(f"| {r['shape']} | {'pre' if r['pre'] else 'softplus+bias'} | {r['chunked']:.3f} | {r['chunked_both']:.3f} | " +
          " | ".join("%.3f / %.3f / %.3f / %.3f" % r[f"w{w}"] for w in warps_list) + " |")
