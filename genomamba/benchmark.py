"""`genomamba benchmark`: how fast is this model on this machine?

For a model config and a list of window lengths: training step time (forward + masked-LM loss +
backward, batch 1), tokens/s and peak memory; inference (forward, no grad) time, tokens/s and
peak memory. Optionally the same for a Transformer encoder of the same width and depth built on
PyTorch's scaled_dot_product_attention (flash backend on GPU), skipped past --transformer-max-length
or where it runs out of memory. GPU: bf16 autocast, median of CUDA-event timings after warm-up, peak
= torch.cuda.max_memory_allocated. CPU: fp32, median wall time, peak = the process's max RSS.
Writes the table as Markdown (printed, and OUT.md) and JSON (OUT.json).
"""

from __future__ import annotations

import datetime
import json
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_open
from .model import BiMambaConfig, BiMambaForMaskedLM, load_model_config
from .model.graphs import CudaGraphed


class SDPATransformer(nn.Module):
    """Bidirectional pre-norm Transformer encoder (RMSNorm, SDPA attention, GELU MLP 4x) with a
    16-token embedding and tied LM head: the attention baseline at the same width and depth."""

    def __init__(self, d_model: int, n_layer: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, d_model // head_dim)
        self.embedding = nn.Embedding(16, d_model)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.RMSNorm(d_model), "qkv": nn.Linear(d_model, 3 * d_model), "proj": nn.Linear(d_model, d_model),
            "norm2": nn.RMSNorm(d_model), "fc1": nn.Linear(d_model, 4 * d_model), "fc2": nn.Linear(4 * d_model, d_model),
        }) for _ in range(n_layer))
        self.norm_f = nn.RMSNorm(d_model)

    def forward(self, ids):
        h = self.embedding(ids)
        b, L, d = h.shape
        for layer in self.layers:
            q, k, v = layer["qkv"](layer["norm1"](h)).view(b, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v)
            h = h + layer["proj"](a.transpose(1, 2).reshape(b, L, d))
            h = h + layer["fc2"](F.gelu(layer["fc1"](layer["norm2"](h))))
        return F.linear(self.norm_f(h), self.embedding.weight)


def _timer(device: str, warmup: int, repeat: int):
    def run(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return run


def _peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(model, L: int, *, train: bool, device: str, warmup: int = 2, repeat: int = 5, batch: int = 1,
            cuda_graphs: bool = False):
    """(ms per step, peak GiB) for one training step or one inference of `batch` x L tokens.
    cuda_graphs: inference replays a CUDA graph (captured during the warm-up)."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = _step(model, L, train=train, device=device, batch=batch, cuda_graphs=cuda_graphs)
    ms = _timer(device, warmup, repeat)(step)
    return ms, _peak_gib(device)


def _step(model, L: int, *, train: bool, device: str, batch: int = 1, cuda_graphs: bool = False):
    """One training step (forward, masked-LM loss on 15% of positions, backward) or one inference
    of `batch` x L random bases, as a function of no arguments."""
    gpu = device.startswith("cuda")
    ids = torch.randint(7, 11, (batch, L), device=device)
    mask = torch.rand(batch, L, device=device) < 0.15
    # The loss as MaskedLMModule computes it: unmasked positions ignored (-100, IGNORE_INDEX), not
    # selected by boolean indexing, whose output size stalls the host until the forward is done.
    labels = ids.masked_fill(~mask, -100)

    def forward(x):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
            return model(x)

    if train:
        model.train()

        def step():
            logits = forward(ids.masked_fill(mask, 3))
            F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
            model.zero_grad(set_to_none=True)
    else:
        model.eval()
        graphed = CudaGraphed(model) if cuda_graphs and gpu else None

        def step():
            with torch.no_grad():
                if graphed is not None:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        graphed(ids)
                else:
                    forward(ids)
    return step


def profile_step(model, L: int, device: str, *, train: bool, rows: int = 15, steps: int = 3):
    """Per-kernel time of a training step or an inference (torch.profiler, `steps` of them after a
    warm-up one): where the time goes. Prints the table and returns the GPU (or CPU) ms per step."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    step = _step(model, L, train=train, device=device)
    step()
    activities = [ProfilerActivity.CUDA] if gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if gpu:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    per_step = sum(getattr(e, key) for e in events) / steps / 1e3
    print(f"# {'training step' if train else 'inference'} at L={L:,}: {per_step:.1f} ms of "
          f"{'GPU' if gpu else 'CPU'} time per step, {steps} steps profiled")
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))
    return per_step


def run_benchmark(args) -> int:
    device = args.device
    gpu = device.startswith("cuda")
    cfg = load_model_config(args.config) if args.config else BiMambaConfig(d_model=args.d_model, n_layer=args.n_layer)
    if args.checkpointing:
        cfg = BiMambaConfig.from_dict({**cfg.to_dict(), "gradient_checkpointing": True})
    lengths = [int(x) for x in args.lengths.split(",") if x]
    model = BiMambaForMaskedLM(cfg).to(device)
    if args.profile:
        for mode in [m for m in ("train", "infer") if m in args.modes.split(",")]:
            profile_step(model, args.profile, device, train=mode == "train")
        return 0
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    candidates = [("genomamba BiMamba", model, n_params)]
    if args.transformer:
        tf = SDPATransformer(cfg.d_model, cfg.n_layer).to(device)
        candidates.append(("SDPA Transformer", tf, sum(p.numel() for p in tf.parameters())))
    modes = [m for m in ("train", "infer") if m in args.modes.split(",")]
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    header = (f"{machine}; torch {torch.__version__}; {when}; d_model {cfg.d_model}, {cfg.n_layer} layers, "
              f"RCPS {'on' if cfg.rc_equivariant else 'off'}, checkpointing {'on' if args.checkpointing else 'off'}, "
              f"CUDA graphs {'on' if args.cuda_graphs else 'off'}, "
              f"batch {args.batch}, {'bf16 autocast' if gpu else 'fp32'}")
    print(f"# {header}")
    print("| model | parameters | mode | L | ms | tokens/s | peak GiB |\n|---|---|---|---|---|---|---|", flush=True)
    for name, m, params in candidates:
        for mode in modes:
            for L in lengths:
                row = {"model": name, "parameters": params, "mode": mode, "length": L, "batch": args.batch}
                if name.startswith("SDPA") and L > args.transformer_max_length:
                    row["skipped"] = f"longer than --transformer-max-length {args.transformer_max_length}"
                else:
                    try:
                        ms, gib = measure(m, L, train=mode == "train", device=device, warmup=args.warmup,
                                          repeat=args.repeat, batch=args.batch,
                                          cuda_graphs=args.cuda_graphs and name.startswith("genomamba"))
                        row.update(ms=round(ms, 2), tokens_per_s=round(args.batch * L / ms * 1e3),
                                   peak_gib=round(gib, 2))
                    except torch.OutOfMemoryError:
                        row["skipped"] = "out of memory"
                    finally:
                        if gpu:
                            torch.cuda.empty_cache()
                rows.append(row)
                cells = [f"{row['ms']:.1f}", f"{row['tokens_per_s'] / 1e6:.3f} M", f"{row['peak_gib']:.2f}"] \
                    if "ms" in row else [row["skipped"], "", ""]
                print(f"| {name} | {params / 1e6:.2f} M | {mode} | {L:,} | " + " | ".join(cells) + " |", flush=True)
    if args.transformer:  # speed-up of BiMamba over attention where both ran
        by = {(r["model"], r["mode"], r["length"]): r for r in rows if "ms" in r}
        for (name, mode, L), r in sorted(by.items()):
            other = by.get(("SDPA Transformer", mode, L))
            if name.startswith("genomamba") and other:
                print(f"speed-up over SDPA Transformer, {mode} at L={L:,}: {other['ms'] / r['ms']:.1f}x")
    if args.out:
        out = Path(args.out)
        with atomic_open(out.with_suffix(".json")) as fh:
            json.dump({"header": header, "config": cfg.to_dict(), "rows": rows}, fh, indent=2)
        with atomic_open(out.with_suffix(".md")) as fh:
            fh.write(f"{header}\n\n| model | mode | L | ms | tokens/s | peak GiB |\n|---|---|---|---|---|---|\n")
            for r in rows:
                cells = [f"{r['ms']:.1f}", f"{r['tokens_per_s']:,}", f"{r['peak_gib']:.2f}"] if "ms" in r \
                    else [r["skipped"], "", ""]
                fh.write(f"| {r['model']} | {r['mode']} | {r['length']:,} | " + " | ".join(cells) + " |\n")
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0
