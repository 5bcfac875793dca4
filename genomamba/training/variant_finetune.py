"""Fine-tuning the backbone on labelled variants (the Lightning path of train-variant-classifier).

BiMambaForVariantClassification (ref and alt windows -> local features around the variant -> MLP)
starts from the backbone of a pretrained model and is trained end to end with cross-entropy,
each example on a random strand (both windows reverse-complemented together, the variant index
mirrored). Evaluation averages the two strands' probabilities.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import tokenizer
from ..model import BiMambaForVariantClassification
from .modules import _optimizers


class VariantWindows(Dataset):
    """(ref_ids, alt_ids, label) with the variant at index window // 2 of both windows."""

    def __init__(self, ref, alt, labels):
        self.ref, self.alt, self.labels = ref, alt, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (torch.as_tensor(self.ref[i]), torch.as_tensor(self.alt[i]),
                torch.tensor(int(self.labels[i]) if self.labels is not None else -1))


def _strand(ref, alt, flip: torch.Tensor):
    """Reverse-complement the rows where `flip`; return windows, masks and the variant's index."""
    W = ref.shape[1]
    ref = torch.where(flip[:, None], tokenizer.reverse_complement(ref), ref)
    alt = torch.where(flip[:, None], tokenizer.reverse_complement(alt), alt)
    pos = torch.where(flip, torch.full_like(flip, W - 1 - W // 2, dtype=torch.long),
                      torch.full_like(flip, W // 2, dtype=torch.long))
    return ref, alt, pos, ref != tokenizer.PAD_ID, alt != tokenizer.PAD_ID


class VariantFinetuneModule(L.LightningModule):
    def __init__(self, source_model, *, context: int, lr: float, steps: int, seed: int):
        super().__init__()
        self.model = BiMambaForVariantClassification(source_model.backbone.config, num_classes=2, context=context)
        self.model.backbone.load_state_dict(source_model.backbone.state_dict())
        self.optim = {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.95], "warmup_steps": max(1, steps // 10)}
        self.steps = steps
        self.gen = torch.Generator().manual_seed(seed)

    def _logits(self, ref, alt, flip):
        r, a, pos, rm, am = _strand(ref, alt, flip)
        return self.model(r, a, pos, rm, am)

    def training_step(self, batch, _):
        ref, alt, y = batch
        flip = (torch.rand(len(y), generator=self.gen) < 0.5).to(ref.device)
        loss = F.cross_entropy(self._logits(ref, alt, flip).float(), y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def predict_step(self, batch, _):
        ref, alt, _ = batch
        probs = [self._logits(ref, alt, torch.full((len(ref),), f, device=ref.device)).float().softmax(-1)[:, 1]
                 for f in (False, True)]
        return (probs[0] + probs[1]) / 2

    def configure_optimizers(self):
        return _optimizers(self, self.optim, self.steps)


def finetune_and_score(source_model, train, test, *, context: int, steps: int, batch_size: int, lr: float,
                       seed: int, device: str) -> tuple[np.ndarray, BiMambaForVariantClassification]:
    """Fine-tune on `train` = (ref, alt, labels) for `steps` steps; probabilities on `test`."""
    L.seed_everything(seed, verbose=False)
    module = VariantFinetuneModule(source_model, context=context, lr=lr, steps=steps, seed=seed)
    gpu = device.startswith("cuda")
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if gpu else "cpu", devices=1,
                        precision="bf16-mixed" if gpu else "32-true", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0)
    loader = DataLoader(VariantWindows(*train), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer.fit(module, loader)
    probs = trainer.predict(module, DataLoader(VariantWindows(*test), batch_size=batch_size))
    return torch.cat(probs).numpy(), module.model.eval()
