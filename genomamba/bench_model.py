"""Model-level speed and memory on a GPU (not run in CI):

    python -m genomamba.bench_model                      # DESIGN.md §4 model shapes
    python -m genomamba.bench_model --lengths 131072 --d-model 256 --n-layer 16

Training step = forward + masked-LM loss + backward, batch 1, bf16 autocast, fp32 weights;
inference = forward under no_grad in bf16. Times are medians of CUDA-event timings after warm-up;
peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

import torch
import torch.nn.functional as F

from .model import BiMambaConfig, BiMambaForMaskedLM


def _time(fn, warmup=2, repeat=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(model, L, train: bool):
    ids = torch.randint(7, 11, (1, L), device="cuda")
    labels = ids.clone()
    mask = torch.rand(1, L, device="cuda") < 0.15
    torch.cuda.reset_peak_memory_stats()
    if train:
        model.train()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(ids.masked_fill(mask, 3))
            loss = F.cross_entropy(logits[mask].float(), labels[mask])
            loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(ids)
    ms = _time(step)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=16)
    ap.add_argument("--train-lengths", default="131072", help="comma-separated")
    ap.add_argument("--infer-lengths", default="131072,1048576", help="comma-separated")
    ap.add_argument("--checkpointing", action="store_true", help="per-layer gradient checkpointing")
    ap.add_argument("--profile", type=int, default=0, help="print per-kernel GPU time of one inference at this L")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_model needs a CUDA GPU")
    cfg = BiMambaConfig(d_model=args.d_model, n_layer=args.n_layer, gradient_checkpointing=args.checkpointing)
    model = BiMambaForMaskedLM(cfg).cuda()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        ids = torch.randint(7, 11, (1, args.profile), device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(ids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(ids)
                torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
        return
    n = sum(p.numel() for p in model.parameters())
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}; "
          f"d_model {args.d_model}, {args.n_layer} layers, {n / 1e6:.2f} M parameters, "
          f"checkpointing {'on' if args.checkpointing else 'off'}")
    print("| mode | L | ms | tokens/s | peak GiB |\n|---|---|---|---|---|")
    for mode, lengths in (("train step", args.train_lengths), ("inference", args.infer_lengths)):
        for L in (int(x) for x in lengths.split(",") if x):
            try:
                ms, gib = measure(model, L, mode == "train step")
                print(f"| {mode} | {L:,} | {ms:.1f} | {L / ms * 1e3 / 1e6:.2f} M | {gib:.1f} |", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"| {mode} | {L:,} | out of memory | | |", flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
