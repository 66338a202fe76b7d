"""The fine-tune's training loss, one small object chosen by `finetune.loss` (`_target_`): the seam another loss
(soft-label distillation, ...) plugs into as one class plus its config.

A loss reads the classifier's logits and the batch's targets: `targets` names the fields it reads from each
training row (the collator stacks them; the model never sees them), `labels` always among them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TrainingLoss:
    """The interface: `targets` maps each row field the loss reads to its dtype; `__call__` returns the loss of one
    micro-batch. `num_items_in_batch` is the Trainer's count of rows in the whole accumulated batch (None when it
    gives none): a loss normalised by it is already scaled for gradient accumulation, as the Trainer assumes."""

    targets: dict[str, torch.dtype] = {"labels": torch.long}

    def __call__(self, logits: torch.Tensor, targets: dict[str, torch.Tensor],
                 num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        raise NotImplementedError


class HardLabelCrossEntropy(TrainingLoss):
    """Cross-entropy on the human verdict, with optional label smoothing: the numbers transformers computes for a
    sequence classifier, to the bit (its own loss without smoothing, its LabelSmoother with it)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = float(label_smoothing)

    def __call__(self, logits, targets, num_items_in_batch):
        labels = targets["labels"].to(logits.device).view(-1)
        logits = logits.view(labels.shape[0], -1)
        if not self.label_smoothing:
            # transformers' ForSequenceClassificationLoss: the micro-batch mean (it ignores num_items_in_batch).
            return F.cross_entropy(logits, labels)
        # transformers' LabelSmoother (trainer_pt_utils), for labels with no ignored rows.
        neg_log_probs = -F.log_softmax(logits, dim=-1)
        nll = neg_log_probs.gather(dim=-1, index=labels.unsqueeze(-1))
        smoothed = neg_log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
        denominator = labels.numel() if num_items_in_batch is None else (
            num_items_in_batch.to(nll.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
        return ((1 - self.label_smoothing) * (nll.sum() / denominator)
                + self.label_smoothing * (smoothed.sum() / (denominator * neg_log_probs.shape[-1])))
