"""Test setup. Triton kernels run under the interpreter on CPU (TRITON_INTERPRET must be set before
Triton is imported, hence here). Large data is read from ../shared/data and skipped when absent."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
SHARED = REPO.parent / "shared" / "data"
CHR20 = SHARED / "debian-vt-examples" / "hs37_chr20.fa.gz"


@pytest.fixture
def data():
    return DATA


@pytest.fixture
def chr20():
    if not CHR20.exists():
        pytest.skip(f"human chr20 not found at {CHR20} (the shared data folder is not beside the checkout)")
    return CHR20
