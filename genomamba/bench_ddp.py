"""Data-parallel scaling of the training step without Lightning, measured (not asserted in tests):

    python -m genomamba.bench_ddp [--length 131072] [--steps 30] [--gpus 2]

Times the masked-LM training step of the Caduceus-131k-sized BiMamba (d_model 256, 16 layers;
synthetic tokens, AdamW, bf16 autocast) on 1 GPU, then on `--gpus` GPUs under plain
`DistributedDataParallel` (NCCL), with default bucket options and with gradient_as_bucket_view +
static_graph. Prints the median step time (after 5 warm-up steps) and the throughput against
one GPU. `genomamba fit --trainer.devices=N` reports the same through Lightning as
train_batch_ms in metrics.json; this isolates what DDP itself costs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def _worker(rank: int, world: int, length: int, steps: int, port: int, ddp_kw: dict, queue) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    from .model import BiMambaConfig, BiMambaForMaskedLM

    torch.cuda.set_device(rank)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = BiMambaForMaskedLM(BiMambaConfig(d_model=256, n_layer=16)).cuda().train()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank], **ddp_kw)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(7, 11, (1, length), device="cuda", generator=gen)
        mask = torch.rand(1, length, device="cuda", generator=gen) < 0.15
        labels = ids.masked_fill(~mask, -100)  # the loss as MaskedLMModule computes it (no host sync)
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids.masked_fill(mask, 3))
        F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if rank == 0:
        queue.put(1e3 * statistics.median(times[5:]))
    if world > 1:
        dist.destroy_process_group()


def _median_step_ms(world: int, length: int, steps: int, ddp_kw: dict, port: int) -> float:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, length, steps, port, ddp_kw, queue)) for r in range(world)]
    for p in procs:
        p.start()
    ms = queue.get()
    for p in procs:
        p.join()
    return ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < args.gpus or args.steps < 8:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs (found {torch.cuda.device_count()}) and --steps >= 8")
    print(f"# {torch.cuda.get_device_name()} x {args.gpus}; torch {torch.__version__}; L = {args.length:,}")
    one = _median_step_ms(1, args.length, args.steps, {}, 29533)
    print(f"| setup | median step ms | throughput vs 1 GPU |\n|---|---|---|\n| 1 GPU | {one:.1f} | 1.00x |")
    for name, kw in (("DDP", {}), ("DDP, gradient_as_bucket_view + static_graph",
                                   {"gradient_as_bucket_view": True, "static_graph": True})):
        ms = _median_step_ms(args.gpus, args.length, args.steps, kw, 29534)
        print(f"| {args.gpus} GPUs, {name} | {ms:.1f} | {args.gpus * one / ms:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
