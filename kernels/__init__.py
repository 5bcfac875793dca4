"""genomamba_kernels: fused selective scan, causal conv1d, residual add + RMSNorm, the
bidirectional mixer core (bimamba_inner) and the low-rank projections around its scans
(`genomamba_kernels.projections`) in Triton, with PyTorch references.

Installed from the repository folder `kernels/` under the import name `genomamba_kernels` (a
top-level `kernels` module belongs to another package). It imports nothing from `genomamba`.
"""

from .add_rms_norm import add_rms_norm, add_rms_norm_ref
from .bimamba_inner import bimamba_inner
from .causal_conv1d import causal_conv1d
from .reference import causal_conv1d_ref, selective_scan_chunked, selective_scan_ref
from .selective_scan import selective_scan, seq_idx_from_cu_seqlens

__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "bimamba_inner",
    "causal_conv1d",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_chunked",
    "seq_idx_from_cu_seqlens",
    "causal_conv1d_ref",
]
