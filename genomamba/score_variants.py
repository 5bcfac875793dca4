"""`genomamba score-variants`: model scores for every SNV and small indel of a VCF, written back as
INFO fields of a bgzipped, tabix-indexed VCF (every input record kept, in order).

Alleles that cannot be scored keep their record and get a FILTER reason: REF_MISMATCH (REF is
not the reference's sequence), CONTIG_MISSING (the FASTA has no such contig, in either naming
style), UNSUPPORTED_ALLELE (symbolic/breakend alleles, indels over --max-indel bp), N_IN_WINDOW
(more than --max-n of the window is N). A summary of the counts goes to stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pysam

from . import __version__, tokenizer
from .atomic import atomic_open, atomic_path
from .errors import InputError
from .io import Fasta, read_variants
from .io.text import open_text
from .io.vcf import OK
from .model import BiMambaForMaskedLM, from_pretrained
from .model.pretrained import WEIGHTS_NAME
from .variant_features import score_variants_in_batches, variant_windows
from .windows import MAX_WINDOW, MIN_WINDOW

N_IN_WINDOW = "N_IN_WINDOW"
FILTERS = {
    "REF_MISMATCH": "REF does not match the reference FASTA (not scored by genomamba)",
    "CONTIG_MISSING": "contig not in the reference FASTA (not scored by genomamba)",
    "UNSUPPORTED_ALLELE": "symbolic/breakend allele or indel too long to score (not scored by genomamba)",
    N_IN_WINDOW: "too much N in the model window around the variant (not scored by genomamba)",
}


def model_digest(model_dir) -> str:
    """sha256 of the model weights: ties a variant classifier to the backbone it was trained on."""
    h = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_NAME, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_window(window: int):
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise InputError(f"--window {window:,} is outside {MIN_WINDOW:,}..{MAX_WINDOW:,} bp")


def scorable(variants, fasta, window: int, max_n: float):
    """Set N_IN_WINDOW on PASS alleles whose reference window is too N-rich; return (variants, PASS list)."""
    out = []
    for v in variants:
        if v.status == OK:
            ref_ids, _ = variant_windows(fasta, v.fasta_contig, v.pos, v.ref, v.alt, window)
            if tokenizer.n_fraction(ref_ids) > max_n:
                v = dataclasses.replace(v, status=N_IN_WINDOW)
        out.append(v)
    return out, [v for v in out if v.status == OK]


INFO_FIELDS = {
    "GM_LLR": "Zero-shot masked-LM log-likelihood ratio log p(alt) - log p(ref) at the variant, averaged over "
              "both strands (SNVs: masked marginal; indels/MNVs: local pseudo-likelihood)",
    "GM_EMB_DIST": "1 - cosine similarity of ref and alt embeddings around the variant, strand-averaged",
    "GM_PROB": "Probability of the positive (pathogenic) class from the genomamba variant classifier",
}


def _meta_lines(existing_info, existing_filters, keys, window, model_dir) -> list[str]:
    lines = []
    for key in keys:
        if key in existing_info:
            raise InputError(f"the VCF already has an INFO field {key} (scored twice?)")
        lines.append(f'##INFO=<ID={key},Number=A,Type=Float,Description="{INFO_FIELDS[key]}">')
    lines += [f'##FILTER=<ID={k},Description="{v}">' for k, v in FILTERS.items() if k not in existing_filters]
    lines.append(f"##genomamba_score_variants=<Version={__version__},Model={model_dir},Window={window}>")
    return lines


def _per_record(variants, values):
    """{record_index: (info suffix, [filter reasons])} for records with something to add."""
    by_record: dict[int, list] = {}
    for v in variants:
        by_record.setdefault(v.record_index, []).append(v)
    out = {}
    for i, alleles in by_record.items():
        info = []
        for key, table in values.items():
            vals = [table.get((v.record_index, v.allele_index)) for v in alleles]
            if any(x is not None and not np.isnan(x) for x in vals):
                info.append(f"{key}=" + ",".join("." if x is None or np.isnan(x) else f"{x:.5g}" for x in vals))
        out[i] = (";".join(info), sorted({v.status for v in alleles if v.status != OK}))
    return out


def _edit_columns(cols: list[str], info: str, reasons: list[str]) -> list[str]:
    if info:
        cols[7] = info if cols[7] in (".", "") else f"{cols[7]};{info}"
    if reasons:
        cols[6] = ";".join(reasons) if cols[6] in (".", "PASS", "") else f"{cols[6]};{';'.join(reasons)}"
    return cols


def write_vcf(path: Path, vcf_in, variants, values: dict[str, dict], *, window: int, model_dir):
    """Every record of vcf_in, in order, with INFO values (Number=A) and FILTER reasons added.

    The VCF text is edited column-wise, so samples, undeclared tags and formatting pass through
    untouched (pysam cannot re-write records whose tags the header lacks). Bgzipped, then indexed.
    """
    if not path.name.endswith(".vcf.gz"):
        raise InputError(f"output must end in .vcf.gz (bgzipped, tabix-indexed), got {path.name!r}")
    edits = _per_record(variants, values)
    keys = [k for k in values if values[k]]
    with pysam.VariantFile(str(vcf_in)) as vin:
        is_bcf = vin.is_bcf
        info_known, filters_known = set(vin.header.info), set(vin.header.filters)
    meta = _meta_lines(info_known, filters_known, keys, window, model_dir)
    with atomic_path(path) as tmp:
        with pysam.BGZFile(str(tmp), "wb") as out:
            i = 0
            for line in _vcf_lines(vcf_in, is_bcf):
                if line.startswith("##"):
                    out.write(line.encode())
                elif line.startswith("#"):
                    out.write(("\n".join(meta) + "\n" + line).encode())
                elif line.strip():
                    if i in edits:
                        cols = line.rstrip("\n").split("\t")
                        line = "\t".join(_edit_columns(cols, *edits[i])) + "\n"
                    out.write(line.encode())
                    i += 1
        try:
            pysam.tabix_index(str(tmp), preset="vcf", force=True)
        except OSError as exc:
            raise InputError(f"cannot tabix-index the output ({exc}); is the input coordinate-sorted? "
                             "(bcftools sort)", path=vcf_in) from exc
        os.replace(f"{tmp}.tbi", f"{path}.tbi")


def _vcf_lines(path, is_bcf: bool):
    """The input as VCF text lines (BCF is decoded by pysam; its header defines every tag)."""
    if not is_bcf:
        with open_text(path) as fh:
            yield from fh
        return
    with pysam.VariantFile(str(path)) as vin:
        yield from str(vin.header).splitlines(keepends=True)
        for rec in vin.fetch():
            yield str(rec)


def write_tsv(path: Path, variants, values: dict[str, dict]):
    cols = list(values)
    with atomic_open(path) as fh:
        fh.write("chrom\tpos\tid\tref\talt\tstatus\t" + "\t".join(c.lower() for c in cols) + "\n")
        for v in variants:
            vals = [values[c].get((v.record_index, v.allele_index)) for c in cols]
            fh.write(f"{v.contig}\t{v.pos + 1}\t{v.id or '.'}\t{v.ref}\t{v.alt}\t{v.status}\t"
                     + "\t".join("." if x is None or np.isnan(x) else f"{x:.6g}" for x in vals) + "\n")


def run_score_variants(args) -> int:
    t0 = time.perf_counter()
    check_window(args.window)
    model = from_pretrained(args.model).to(args.device).eval()
    clf = None
    if args.classifier:
        from .variant_classifier import load_classifier

        clf, meta = load_classifier(args.classifier)
        if meta["model_sha256"] != model_digest(args.model):
            raise InputError("the classifier was trained on embeddings of another model "
                             f"({meta['model']}); pass that model with --model", path=args.classifier)
        if meta["window"] != args.window or meta["context"] != args.context:
            raise InputError(f"the classifier was trained with --window {meta['window']} --context "
                             f"{meta['context']}; score with the same settings", path=args.classifier)
    fasta = Fasta(args.fasta)
    variants, report = read_variants(args.vcf, fasta, max_indel=args.max_indel)
    variants, todo = scorable(variants, fasta, args.window, args.max_n)
    scores = score_variants_in_batches(model, fasta, todo, window=args.window, context=args.context,
                                       batch_size=args.batch_size, device=args.device)
    keys = [(v.record_index, v.allele_index) for v in todo]
    values = {"GM_LLR": dict(zip(keys, scores.llr)) if isinstance(model, BiMambaForMaskedLM) else {},
              "GM_EMB_DIST": dict(zip(keys, scores.emb_dist))}
    if clf is not None:
        values["GM_PROB"] = dict(zip(keys, clf.predict_proba(scores.features)[:, 1])) if len(todo) else {}
    out = Path(args.out)
    write_vcf(out, args.vcf, variants, values, window=args.window, model_dir=args.model)
    if args.tsv:
        write_tsv(Path(args.tsv), variants, values)
    counts = Counter(v.status for v in variants)
    kinds = Counter(v.kind for v in todo)
    print(f"score-variants: {report.records:,} records, {report.alleles:,} alleles; scored {counts[OK]:,} "
          f"({', '.join(f'{k} {n:,}' for k, n in sorted(kinds.items())) or 'none'}); not scored: "
          + (", ".join(f"{k} {n:,}" for k, n in sorted(counts.items()) if k != OK) or "none")
          + f"; {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if report.first_mismatch:
        print(f"score-variants: first REF mismatch at {report.first_mismatch}", file=sys.stderr)
    if not isinstance(model, BiMambaForMaskedLM):
        print("score-variants: the model has no masked-LM head, so GM_LLR is not written", file=sys.stderr)
    print(f"wrote {out} (+ .tbi)" + (f" and {args.tsv}" if args.tsv else ""))
    return 0
