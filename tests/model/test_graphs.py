"""CudaGraphed: replay equals eager. The capture itself needs a GPU; on CPU the function is called."""

import pytest
import torch

from genomamba.model import BiMambaConfig, BiMambaForMaskedLM
from genomamba.model.graphs import CudaGraphed
from genomamba.predict import per_base_scores


def _scorer(device):
    torch.manual_seed(0)
    m = BiMambaForMaskedLM(BiMambaConfig(d_model=32, n_layer=2, rc_equivariant=True)).to(device).eval()
    return lambda ids, mask: per_base_scores(m, ids, mask, target_class=1, rc_average=True)


def _inputs(device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 12, (2, 96), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 70:] = False
    return ids.to(device), mask.to(device)


def test_cpu_tensors_call_the_function():
    fn = _scorer("cpu")
    ids, mask = _inputs("cpu", 1)
    torch.testing.assert_close(CudaGraphed(fn)(ids, mask), fn(ids, mask), equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replay_matches_eager_for_new_inputs():
    fn = _scorer("cuda")
    graphed = CudaGraphed(fn)
    for seed in (1, 2):  # the second call replays the graph captured by the first
        ids, mask = _inputs("cuda", seed)
        with torch.no_grad():
            torch.testing.assert_close(graphed(ids, mask), fn(ids, mask), equal_nan=True, rtol=0, atol=0)
