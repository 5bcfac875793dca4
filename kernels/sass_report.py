"""What the compiler makes of the scan kernels, without a GPU.

Compiles the selective-scan kernels for sm_90 (H100/H200) with the installed Triton, with the
specialisations a real launch gets (16-byte aligned pointers, strides and sizes divisible by 16,
unit strides as constants), disassembles the cubin with the `cuobjdump` that ships inside Triton,
and reports per kernel: registers, stack (spill) bytes, and for its main loop the instructions per
time step of a thread, barriers, and local-memory loads and stores. This is how the ninth session
found the forward's 16 extra barriers per tile (kernels/BENCHMARKS.md); the GPU still decides.

    python -m genomamba_kernels.sass_report                      # every kernel
    python -m genomamba_kernels.sass_report --kernels fwd,bwd --opcodes
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

# name: (kernel, warps, constexprs; T is the time steps per loop iteration). Default GPU tiles (_tile_config),
# bf16 inputs, z, D, delta_bias and softplus, as in the benchmark.
_FLAGS = dict(HAS_DB=True, SOFTPLUS=True, HAS_SEQ=False, REVERSE=False, FAST=True)
_PRE = dict(_FLAGS, HAS_DB=False, SOFTPLUS=False)
KERNELS = {
    "fwd": ("_fwd_kernel", 4, dict(BD=128, BN=16, T=8, HAS_D=True, HAS_Z=True, HAS_HCHUNK=True,
                                   SAVE_TILES=False, HAS_ADD=False, **_FLAGS)),
    "fwd_add": ("_fwd_kernel", 4, dict(BD=128, BN=16, T=8, HAS_D=True, HAS_Z=True, HAS_HCHUNK=True,
                                       SAVE_TILES=False, HAS_ADD=True, **_FLAGS)),
    "fwd_train": ("_fwd_kernel", 4, dict(BD=128, BN=16, T=8, HAS_D=True, HAS_Z=True, HAS_HCHUNK=True,
                                         SAVE_TILES=True, HAS_ADD=False, **_FLAGS)),
    "chunk": ("_chunk_state_kernel", 4, dict(BD=128, BN=16, T=8, PER_TILE=False, H_IN=False, **_FLAGS)),
    "adjoint": ("_adjoint_tile_kernel", 4, dict(BD=128, BN=16, T=8, HAS_Z=True, **_FLAGS)),
    "bwd": ("_bwd_kernel", 1, dict(BD=8, BN=16, T=8, HAS_D=True, HAS_Z=True, ATOMIC_BC=False, LANE_RS=1,
                                   RELOAD_BC=1, DZ_ACC=False, PART_ROWS=64, HSEG=False, Y_OUT=False,
                                   DT_PRE=False, **_FLAGS)),
    # A checkpointed layer's backward (bimamba_inner_backward_rebuilt): rebuilt tile states made
    # whole by _segment_fixup_kernel, the gated output written, the second direction adding dz and y.
    "bwd_y": ("_bwd_kernel", 1, dict(BD=8, BN=16, T=8, HAS_D=True, HAS_Z=True, ATOMIC_BC=False, LANE_RS=1,
                                     RELOAD_BC=1, DZ_ACC=True, PART_ROWS=64, HSEG=False, Y_OUT=True, DT_PRE=False,
                                     **_FLAGS)),
    # The same with dt made outside the scan (bimamba_inner: dt_proj_softplus), as the model runs
    # it: no softplus in the scan kernels; the backward turns ddelta into raw's gradient.
    "bwd_pre": ("_bwd_kernel", 1, dict(BD=8, BN=16, T=8, HAS_D=True, HAS_Z=True, ATOMIC_BC=False, LANE_RS=1,
                                       RELOAD_BC=1, DZ_ACC=True, PART_ROWS=64, HSEG=False, Y_OUT=True, DT_PRE=True,
                                       **_PRE)),
    "chunk_pre": ("_chunk_state_kernel", 4, dict(BD=128, BN=16, T=8, PER_TILE=False, H_IN=False, **_PRE)),
    "fwd_pre": ("_fwd_kernel", 4, dict(BD=128, BN=16, T=8, HAS_D=True, HAS_Z=True, HAS_HCHUNK=True,
                                       SAVE_TILES=False, HAS_ADD=False, **_PRE)),
    "adjoint_pre": ("_adjoint_tile_kernel", 4, dict(BD=128, BN=16, T=8, HAS_Z=True, **_PRE)),
    # The passing over chunks / segments as launched at D = 512, batch 1 (its "step" is one row
    # of the BC / warps each warp holds).
    "pass": ("_state_passing_kernel", 4, dict(BC=128, BD=32, HAS_H0=False, HAS_SEQ=False, REVERSE=True)),
}
# Launch options other than num_warps, as _tile_config's defaults give them (register caps).
OPTIONS = {"chunk": dict(maxnreg=128), "chunk_pre": dict(maxnreg=128)}
# Strides that are 1 in a real launch (Triton then compiles them as the constant 1).
_UNIT = {"s_hc_d", "s_do_l"}
_HALF = {"u_ptr", "delta_ptr", "z_ptr", "B_ptr", "C_ptr", "out_ptr", "add_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
         "dz_ptr", "y_ptr"}
# Per-tile state buffers that are bf16 with bf16 inputs at tile_bf16 = 1, the GPU default.
_TILE_BF16 = {"fwd_train": {"Htile_ptr"}, "bwd": {"Htile_ptr", "Rtile_ptr"}, "bwd_y": {"Htile_ptr", "Rtile_ptr"},
              "bwd_pre": {"Htile_ptr", "Rtile_ptr"}, "adjoint": {"R_ptr"}, "adjoint_pre": {"R_ptr"}}


def compile_constants(fn, consts: dict) -> dict:
    """The constexpr values a compile of jitted kernel `fn` gets: the entry's, the unit strides,
    and the defaults of parameters the entry leaves out (a constexpr flag left out would otherwise
    be compiled as a runtime i32 argument, every branch it selects kept, and the report would
    describe a kernel no launch runs)."""
    defaults = {p.name: p.default for p in inspect.signature(fn.fn).parameters.values()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **consts, **{s: 1 for s in _UNIT if s in fn.arg_names}}


def compile_sm90(name: str):
    """The Triton CompiledKernel of KERNELS[name] for sm_90 (CUDA not needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import selective_scan_triton as K

    kname, warps, consts = KERNELS[name]
    fn = getattr(K, kname)
    consts = compile_constants(fn, consts)
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
            continue
        if arg.endswith("_ptr"):
            half = _HALF | _TILE_BF16.get(name, set())
            sig[arg] = "*bf16" if arg in half else ("*i32" if arg == "seq_ptr" else "*fp32")
        else:
            sig[arg] = "i32"
        attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    options = dict(num_warps=warps, **OPTIONS.get(name, {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def report(name: str) -> dict:
    """Registers, stack bytes and main-loop counts of KERNELS[name] (the loop: the longest backward branch)."""
    kernel = compile_sm90(name)
    steps = KERNELS[name][2].get("T") or KERNELS[name][2]["BC"] // KERNELS[name][1]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    code = [(int(m.group(1), 16), m.group(2)) for m in
            re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass, re.M)]
    loop = None
    for addr, ins in code:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            if loop is None or addr - start > loop[1] - loop[0]:
                loop = (start, addr)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0]
                              for addr, ins in code if loop and loop[0] <= addr <= loop[1])
    n = sum(ops.values())
    return dict(kernel=name, registers=regs, stack_bytes=stack, loop_instructions=n,
                per_step=n / steps, barriers=ops["BAR.SYNC.DEFER_BLOCKING"] + ops["BAR.SYNC"],
                local_loads=sum(v for k, v in ops.items() if k.startswith("LDL")),
                local_stores=sum(v for k, v in ops.items() if k.startswith("STL")), opcodes=ops)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, from {', '.join(KERNELS)}")
    ap.add_argument("--opcodes", action="store_true", help="also the loop's 20 commonest opcodes")
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    print(f"sm_90, triton {triton.__version__}")
    print("| kernel | registers | stack bytes | loop instructions per step | barriers per loop | local loads / stores |")
    print("|---|---|---|---|---|---|")
    for name in args.kernels.split(","):
        r = report(name)
        print(f"| {name} | {r['registers']} | {r['stack_bytes']} | {r['per_step']:.1f} | {r['barriers']} | "
              f"{r['local_loads']} / {r['local_stores']} |")
        if args.opcodes:
            print("    " + ", ".join(f"{k} {v}" for k, v in r["opcodes"].most_common(20)))


if __name__ == "__main__":
    main()
