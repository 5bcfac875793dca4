"""Lightning modules: masked-LM pretraining and sequence classification (one small class each)."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from ..model import (BiMambaConfig, BiMambaForMaskedLM, BiMambaForSequenceClassification,
                     BiMambaForTokenClassification, from_pretrained)
from .masking import IGNORE_INDEX, mask_tokens


def _horizon(cfg: dict) -> int:
    return cfg["optim"]["schedule_steps"] or cfg["trainer"]["max_steps"] or 1000


def _optimizers(module, optim: dict, max_steps: int):
    """AdamW (no weight decay on norms, biases, A_log, D) + linear warmup and cosine decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(("A_log", ".D")) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=optim["lr"], betas=tuple(optim["betas"]))
    warm = max(1, optim["warmup_steps"])

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, max_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MaskedLMModule(L.LightningModule):
    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        self.model = from_pretrained(cfg["pretrained"]) if cfg["pretrained"] else \
            BiMambaForMaskedLM(BiMambaConfig.from_dict(cfg["model"]))
        self.gen = torch.Generator().manual_seed(cfg["seed"])

    def _step(self, batch, split):
        inputs, labels = mask_tokens(batch["input_ids"], generator=self.gen if split == "train" else
                                     torch.Generator().manual_seed(hash(split) % 2**31))
        logits = self.model(inputs, batch["attention_mask"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        sel = labels != IGNORE_INDEX  # masked sums, not boolean indexing: no device synchronisation
        acc = ((logits.argmax(-1) == labels) & sel).sum() / sel.sum().clamp_min(1)
        self.log(f"{split}_loss", loss, prog_bar=True, batch_size=len(labels), sync_dist=split != "train")
        self.log(f"{split}_masked_acc", acc, batch_size=len(labels), sync_dist=split != "train")
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def test_step(self, batch, _):
        self._step(batch, "test")

    def on_save_checkpoint(self, checkpoint):
        checkpoint["mask_generator"] = self.gen.get_state()

    def on_load_checkpoint(self, checkpoint):
        if "mask_generator" in checkpoint:
            self.gen.set_state(checkpoint["mask_generator"])

    def configure_optimizers(self):
        return _optimizers(self, self.cfg["optim"], _horizon(self.cfg))


def _head_model(cfg: dict, head_cls, **head_kw):
    """A head model on a backbone taken from a from_pretrained directory, or a fresh one."""
    if cfg["pretrained"]:
        source = from_pretrained(cfg["pretrained"])
        model = head_cls(source.config, **head_kw)
        model.backbone.load_state_dict(source.backbone.state_dict())
    else:
        model = head_cls(BiMambaConfig.from_dict(cfg["model"]), **head_kw)
    if cfg["classify"]["freeze_backbone"]:
        model.backbone.requires_grad_(False)
    return model


def _metric_sets(num_classes: int):
    task = "binary" if num_classes == 2 else "multiclass"
    kw = {"task": task} if task == "binary" else {"task": task, "num_classes": num_classes}
    return torch.nn.ModuleDict({
        split: torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy(**kw), "mcc": torchmetrics.MatthewsCorrCoef(**kw),
            "auroc": torchmetrics.AUROC(**kw), "f1": torchmetrics.F1Score(**kw)}, prefix=f"{split}_")
        for split in ("val", "test")})


class SequenceClassificationModule(L.LightningModule):
    def __init__(self, cfg: dict):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        c = cfg["classify"]
        self.model = _head_model(cfg, BiMambaForSequenceClassification, num_classes=c["num_classes"],
                                 pooling=c["pooling"])
        self.metrics = _metric_sets(c["num_classes"])
        self.test_scores = []

    def forward(self, batch, conjoin=False):
        return self.model(batch["input_ids"], batch["attention_mask"], conjoin=conjoin)

    def _probs(self, logits):
        p = logits.float().softmax(-1)
        return p[:, 1] if self.cfg["classify"]["num_classes"] == 2 else p

    def training_step(self, batch, _):
        loss = F.cross_entropy(self(batch).float(), batch["label"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def _eval(self, batch, split):
        logits = self(batch, conjoin=self.cfg["classify"]["conjoin_eval"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.log(f"{split}_loss", loss, batch_size=len(batch["label"]), sync_dist=True)
        probs = self._probs(logits)
        self.metrics[split].update(probs, batch["label"])
        if split == "test":
            self.test_scores.append((probs.detach().cpu(), batch["label"].cpu()))

    def validation_step(self, batch, _):
        self._eval(batch, "val")

    def test_step(self, batch, _):
        self._eval(batch, "test")

    def on_validation_epoch_end(self):
        self.log_dict(self.metrics["val"].compute(), sync_dist=True)
        self.metrics["val"].reset()

    def on_test_epoch_end(self):
        self.log_dict(self.metrics["test"].compute(), sync_dist=True)
        self.metrics["test"].reset()

    def predict_step(self, batch, _):
        """(probabilities of every class, labels or -1): `genomamba predict -c` on the test split."""
        probs = self(batch, conjoin=self.cfg["classify"]["conjoin_eval"]).float().softmax(-1)
        labels = batch.get("label", torch.full((len(probs),), -1, dtype=torch.long))
        return probs.cpu(), labels.cpu()

    def configure_optimizers(self):
        return _optimizers(self, self.cfg["optim"], _horizon(self.cfg))


class TokenClassificationModule(SequenceClassificationModule):
    """Per-position classification (labels from a BED track); metrics over labelled positions."""

    def __init__(self, cfg: dict):
        L.LightningModule.__init__(self)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg = cfg
        c = cfg["classify"]
        self.model = _head_model(cfg, BiMambaForTokenClassification, num_classes=c["num_classes"])
        self.metrics = _metric_sets(c["num_classes"])
        self.test_scores = []

    def _flat(self, batch, conjoin):
        logits = self.model(batch["input_ids"], batch["attention_mask"], conjoin=conjoin)
        labels = batch["token_labels"]
        keep = labels != -100
        return logits[keep], labels[keep]

    def training_step(self, batch, _):
        logits, labels = self._flat(batch, False)
        loss = F.cross_entropy(logits.float(), labels)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _eval(self, batch, split):
        logits, labels = self._flat(batch, self.cfg["classify"]["conjoin_eval"])
        loss = F.cross_entropy(logits.float(), labels)
        self.log(f"{split}_loss", loss, batch_size=len(batch["input_ids"]), sync_dist=True)
        probs = self._probs(logits)
        self.metrics[split].update(probs, labels)
        if split == "test":
            self.test_scores.append((probs.detach().cpu(), labels.cpu()))
