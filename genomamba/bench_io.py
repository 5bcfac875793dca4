"""Reader and tokenizer speed, measured (not asserted in tests):

    python -m genomamba.bench_io [--chr20 PATH]

Times (median of 20) tokenizing 1,048,576 bases, and reading + tokenizing a 1,048,576 bp window
from the bgzip human chr20 (default: ../shared/data/debian-vt-examples/hs37_chr20.fa.gz).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from . import tokenizer
from .io import Fasta

DEFAULT_CHR20 = Path(__file__).resolve().parents[1].parent / "shared/data/debian-vt-examples/hs37_chr20.fa.gz"


def median_ms(fn, repeat=20):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chr20", default=str(DEFAULT_CHR20))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    seq = "".join(rng.choice(list("ACGTacgtN"), size=1 << 20))
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}")
    print(f"tokenize 1,048,576 bases (str -> ids):            {median_ms(lambda: tokenizer.encode(seq)):.2f} ms")
    ids = tokenizer.encode(seq)
    print(f"reverse complement 1,048,576 ids:                  {median_ms(lambda: tokenizer.reverse_complement(ids)):.2f} ms")
    if Path(args.chr20).exists():
        fa = Fasta(args.chr20)
        starts = iter(range(10_000_000, 60_000_000, 1 << 20))

        def new_region():
            s = next(starts)
            return fa.fetch_ids("20", s, s + (1 << 20))

        cold = median_ms(new_region, repeat=20)
        warm = median_ms(lambda: fa.fetch_ids("20", 30_000_000, 30_000_000 + (1 << 20)))
        print(f"read + tokenize 1,048,576 bp of bgzip chr20, new region each time: {cold:.2f} ms")
        print(f"read + tokenize 1,048,576 bp of bgzip chr20, same region:          {warm:.2f} ms")
    else:
        print(f"chr20 not found at {args.chr20}: skipped the window read")


if __name__ == "__main__":
    main()
