"""Ref/alt windows around variants, and what a model says about them.

For each allele the reference window has the variant's first REF base at index `window // 2`;
the alt window has the same left flank, then ALT, then the reference after REF, so both windows
are `window` long and the variant sits at the same index. Each window is scored on both strands.

- `llr`: zero-shot masked-LM log-likelihood ratio log p(alt) - log p(ref). SNVs: the variant base
  is masked in the reference window and the two log-probabilities read at that position (the
  masked-marginal score). MNVs and indels: the change in summed log-probability of the window's
  own bases over the allele and `context` bp either side (unmasked ref vs alt windows).
  Averaged over both strands. NaN for models without a masked-LM head.
- `emb_dist`: 1 - cosine similarity of the ref and alt embeddings, each the mean hidden state over
  the variant +- `context` bp, averaged over both strands.
- `features`: [ref embedding, alt - ref] (the variant classifier's input).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import tokenizer
from .inputs import pad_batch
from .model import BiMambaForMaskedLM, BiMambaModel
from .model.rcps import complement_index, rcps_lm_logits, rcps_strand_average


@dataclass
class VariantScores:
    llr: np.ndarray        # (n,) float32, NaN if the model has no LM head
    emb_dist: np.ndarray   # (n,) float32
    features: np.ndarray   # (n, 2 * width) float32


def variant_windows(fasta, contig: str, pos: int, ref: str, alt: str, window: int):
    """(ref_ids, alt_ids) of length `window`, variant at index window // 2; PAD beyond contig ends."""
    c = window // 2
    ref_ids = fasta.fetch_ids(contig, pos - c, pos - c + window, pad=True)
    alt_ids = tokenizer.encode(alt, record=f"{contig}:{pos + 1} ALT")
    right = window - c - len(alt_ids)
    if right < 0:
        raise ValueError(f"ALT allele of {len(alt)} bp does not fit a {window} bp window")
    tail = fasta.fetch_ids(contig, pos + len(ref), pos + len(ref) + right, pad=True)
    return ref_ids, np.concatenate([ref_ids[:c], alt_ids, tail]).astype(ref_ids.dtype)


def _parts(model):
    """(backbone, lm_weight or None, rc_equivariant) of any genomamba model."""
    backbone = model if isinstance(model, BiMambaModel) else model.backbone
    lm = model.lm_weight() if isinstance(model, BiMambaForMaskedLM) else None
    return backbone, lm, backbone.config.rc_equivariant


def _hidden_and_logprobs(model, ids, mask):
    backbone, lm, rcps = _parts(model)
    h = backbone(ids, mask).float()
    logp = None
    if lm is not None:
        logits = rcps_lm_logits(h, lm.float()) if rcps else F.linear(h, lm.float())
        logp = logits.log_softmax(-1)
    return (rcps_strand_average(h) if rcps else h), logp


def _span_mean(h, lo, hi):
    """Mean of h[b, lo[b]:hi[b]] for each row b."""
    pos = torch.arange(h.shape[1], device=h.device)[None, :]
    m = ((pos >= lo[:, None]) & (pos < hi[:, None])).to(h.dtype)
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)


def _own_logprob_sum(logp, ids, lo, hi):
    own = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    pos = torch.arange(ids.shape[1], device=ids.device)[None, :]
    real = (ids >= tokenizer.A_ID) & (ids <= tokenizer.N_ID)
    m = (pos >= lo[:, None]) & (pos < hi[:, None]) & real
    return (own * m).sum(1)


@torch.no_grad()
def score_windows(model, ref_ids: list, alt_ids: list, ref_lens, alt_lens, *, context: int = 8,
                  device: str = "cpu") -> VariantScores:
    """Score one batch of variants (all windows the same length). See the module docstring."""
    n, W = len(ref_ids), len(ref_ids[0])
    c = W // 2
    ref, ref_mask = pad_batch(ref_ids)
    alt, alt_mask = pad_batch(alt_ids)
    rref, ralt = tokenizer.reverse_complement(ref), tokenizer.reverse_complement(alt)
    ref_lens = torch.as_tensor(ref_lens)
    alt_lens = torch.as_tensor(alt_lens)
    snv = (ref_lens == 1) & (alt_lens == 1)
    _, lm, _ = _parts(model)
    batch = [ref, alt, rref, ralt]
    if lm is not None:
        masked = ref.clone()
        masked[:, c] = tokenizer.MASK_ID
        batch += [masked, tokenizer.reverse_complement(masked)]
    ids = torch.cat(batch).to(device)
    mask = ids != tokenizer.PAD_ID
    use_amp = str(device).startswith("cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        h, logp = _hidden_and_logprobs(model, ids, mask)
    h, ids = h.cpu(), ids.cpu()
    logp = logp.cpu() if logp is not None else None
    k = torch.full((n,), context)
    # embeddings: the variant +- context on each strand; the RC window's region is mirrored
    lo, hi = c - k, c + k + 1
    rlo, rhi = W - hi, W - lo
    e_ref = (_span_mean(h[:n], lo, hi) + _span_mean(h[2 * n:3 * n], rlo, rhi)) / 2
    e_alt = (_span_mean(h[n:2 * n], lo, hi) + _span_mean(h[3 * n:4 * n], rlo, rhi)) / 2
    dist = 1 - F.cosine_similarity(e_ref, e_alt, dim=-1)
    llr = torch.full((n,), float("nan"))
    if logp is not None:
        # SNVs: masked marginal at the centre (forward) and at its mirror (reverse complement)
        lp_f, lp_r = logp[4 * n:5 * n, c], logp[5 * n:6 * n, W - 1 - c]
        r_id = ref[:, c]
        a_id = alt[:, c]
        comp = complement_index()
        snv_llr = ((lp_f.gather(1, a_id[:, None]) - lp_f.gather(1, r_id[:, None])).squeeze(1)
                   + (lp_r.gather(1, comp[a_id][:, None]) - lp_r.gather(1, comp[r_id][:, None])).squeeze(1)) / 2
        # others: local pseudo-log-likelihood change over the allele +- context
        ref_hi, alt_hi = c + ref_lens + k, c + alt_lens + k
        fwd = _own_logprob_sum(logp[n:2 * n], ids[n:2 * n], lo, alt_hi) - \
            _own_logprob_sum(logp[:n], ids[:n], lo, ref_hi)
        rev = _own_logprob_sum(logp[3 * n:4 * n], ids[3 * n:4 * n], W - alt_hi, W - lo) - \
            _own_logprob_sum(logp[2 * n:3 * n], ids[2 * n:3 * n], W - ref_hi, W - lo)
        llr = torch.where(snv, snv_llr, (fwd + rev) / 2)
    features = torch.cat([e_ref, e_alt - e_ref], dim=-1)
    return VariantScores(llr.numpy().astype(np.float32), dist.numpy().astype(np.float32),
                         features.numpy().astype(np.float32))


def score_variants_in_batches(model, fasta, variants, *, window: int, context: int = 8, batch_size: int = 8,
                              device: str = "cpu", progress: bool = True) -> VariantScores:
    """Scores for a list of scorable `Variant`s (status PASS, contig in the FASTA), in order."""
    from tqdm import tqdm

    parts = []
    for b in tqdm(range(0, len(variants), batch_size), desc="score", unit="batch",
                  disable=not progress or len(variants) <= batch_size):
        chunk = variants[b: b + batch_size]
        pairs = [variant_windows(fasta, v.fasta_contig, v.pos, v.ref, v.alt, window) for v in chunk]
        parts.append(score_windows(model, [p[0] for p in pairs], [p[1] for p in pairs],
                                   [len(v.ref) for v in chunk], [len(v.alt) for v in chunk],
                                   context=context, device=device))
    if not parts:
        return VariantScores(np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 0), np.float32))
    return VariantScores(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("llr", "emb_dist", "features")))
