"""CUDA-graph replay of an inference function, one graph per input shape.

At short windows a BiMamba forward is bound by kernel launches, not by the GPU: 16 layers of
norm, projections, two convs and two scans are ~400 launches, ~25 ms of CPU time at batch 1
whatever the length up to ~16 kb. A CUDA graph records the launches once per input shape and
replays them with one call. Used by `predict` (per-base tracks in short windows) and
`genomamba benchmark --cuda-graphs`; on CPU tensors the function is simply called.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class CudaGraphed:
    """`fn(*tensors) -> tensor` replayed from a CUDA graph captured at the first call with each
    (shapes, dtypes, autocast dtype). Inputs are copied into the graph's static buffers and the
    output is returned as a fresh copy, so callers may keep it. No gradients (inference only).

    Each captured shape keeps its own activation memory until evicted (at most `max_graphs`).
    """

    def __init__(self, fn, max_graphs: int = 4, warmup: int = 2):
        self.fn, self.max_graphs, self.warmup = fn, max_graphs, warmup
        self._graphs: OrderedDict = OrderedDict()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            with torch.no_grad():
                return self.fn(*args)
        amp = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (tuple((tuple(a.shape), a.dtype, a.device) for a in args), amp)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(args, amp)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for buf, a in zip(static_in, args):
            buf.copy_(a, non_blocking=True)
        graph.replay()
        return static_out.clone()

    def _capture(self, args, amp):
        static_in = [a.clone() for a in args]

        def run():
            # cache_enabled=False: autocast's weight-cast cache must not hand the graph tensors
            # that are freed when the autocast region closes.
            with torch.no_grad(), torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None,
                                                 cache_enabled=False):
                return self.fn(*static_in)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile the Triton kernels and warm the allocator first
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = run()
        return graph, static_in, static_out
