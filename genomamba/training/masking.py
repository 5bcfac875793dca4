"""BERT-style masking for masked-LM pretraining (as Caduceus / HyenaDNA do it).

15% of the maskable positions (A, C, G, T) are chosen; of those 80% become [MASK], 10% a random
base, 10% stay. N, PAD and special tokens are never chosen, so they never enter the loss.
"""

from __future__ import annotations

import torch

from .. import tokenizer

IGNORE_INDEX = -100


def mask_tokens(ids: torch.Tensor, prob: float = 0.15, generator: torch.Generator | None = None):
    """Returns (inputs, labels); labels are IGNORE_INDEX where nothing is predicted."""
    maskable = (ids >= tokenizer.A_ID) & (ids <= tokenizer.T_ID)
    r = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    chosen = maskable & (r < prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    how = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    random_sel = chosen & (how >= 0.8) & (how < 0.9)
    bases = torch.randint(tokenizer.A_ID, tokenizer.T_ID + 1, ids.shape, generator=generator).to(ids.device)
    # torch.where rather than boolean-mask assignment: no device synchronisation on a GPU batch
    inputs = torch.where(chosen & (how < 0.8), tokenizer.MASK_ID, ids)
    return torch.where(random_sel, bases, inputs), labels
