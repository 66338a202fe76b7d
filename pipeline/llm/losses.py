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


TEACHER_PROBS = "teacher_probs"  # the row field holding a teacher's (n, 3) probabilities (finetune.teacher)


class Distillation(TrainingLoss):
    """Teacher -> student: the human verdict and a teacher's probabilities, as the LMSYS and WSDM Cup winners
    trained their students, (hard_label_weight * CE + kl_weight * T^2 * KL(teacher || student at T)
    + cosine_weight * (1 - cos(teacher, student))) / (sum of the weights). The defaults are WSDM 1st's
    (0.5 CE + KL + cosine) / 2.5 at T = 1. With only hard_label_weight set it is HardLabelCrossEntropy to the bit.

    The targets come from finetune.teacher (pipeline/teachers.py): for fold k only from teacher models that never
    saw fold k's labels."""

    targets = {"labels": torch.long, TEACHER_PROBS: torch.float32}

    def __init__(self, hard_label_weight: float = 0.5, kl_weight: float = 1.0, cosine_weight: float = 1.0,
                 temperature: float = 1.0, label_smoothing: float = 0.0):
        weights = {"hard_label_weight": hard_label_weight, "kl_weight": kl_weight, "cosine_weight": cosine_weight}
        bad = {k: w for k, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0}
        if bad or not sum(weights.values()) > 0:
            raise ValueError(f"weights must be numbers >= 0 with a positive sum, got {weights}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature}")
        self.hard_label_weight, self.kl_weight = float(hard_label_weight), float(kl_weight)
        self.cosine_weight, self.temperature = float(cosine_weight), float(temperature)
        self.hard_label = HardLabelCrossEntropy(label_smoothing)

    def __call__(self, logits, targets, num_items_in_batch):
        total = self.hard_label_weight + self.kl_weight + self.cosine_weight
        terms = []
        if self.hard_label_weight:
            terms.append(self.hard_label_weight * self.hard_label_term(logits, targets, num_items_in_batch))
        teacher = targets[TEACHER_PROBS].to(logits.device, torch.float32).view(logits.shape[0], -1)
        student = logits.float().view(teacher.shape)
        if self.kl_weight:
            t = self.temperature
            # Softened teacher at T (its probabilities' logs over T, renormalised), as in Hinton et al.; T^2 keeps
            # the gradient's scale comparable across temperatures.
            soft_teacher = F.softmax(torch.log(teacher.clamp_min(1e-12)) / t, dim=-1)
            kl = F.kl_div(F.log_softmax(student / t, dim=-1), soft_teacher, reduction="batchmean")
            terms.append(self.kl_weight * t * t * kl)
        if self.cosine_weight:
            cosine = F.cosine_similarity(F.softmax(student, dim=-1), teacher, dim=-1)
            terms.append(self.cosine_weight * (1 - cosine).mean())
        loss = terms[0]
        for term in terms[1:]:
            loss = loss + term
        return loss if total == 1 else loss / total

    def hard_label_term(self, logits, targets, num_items_in_batch):
        """The cross-entropy on the verdict; pseudo-labelled rows (label NO_LABEL: data.unlabeled) add nothing to
        it but still count in the batch mean, so every row weighs the same in every term."""
        labels = targets["labels"].to(logits.device).view(-1)
        labelled = labels >= 0
        if bool(labelled.all()):
            return self.hard_label(logits, targets, num_items_in_batch)  # the exact numbers of a plain batch
        if not bool(labelled.any()):
            return logits.sum() * 0.0
        part = self.hard_label(logits.view(labels.shape[0], -1)[labelled], {"labels": labels[labelled]}, None)
        return part * labelled.sum() / labels.shape[0]
