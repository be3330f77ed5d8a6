"""Distillation loss: soft targets from the teacher plus hard labels.

total = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)

Works for one label per document (logits [B, C], labels [B]) and one label per word (logits [B, W, C],
labels [B, W]); positions whose label is IGNORE_INDEX (padding, special tokens) are left out of both terms,
and the KL is averaged over the positions that remain ("batchmean" over documents or words). With no
position left, both terms are 0.

Unlabelled documents (--unlabeled): rows with labeled False [B]. Their labels are IGNORE_INDEX, so they are out
of the CE, which is averaged over labelled positions only; they stay in the KL term, which is averaged over the
positions of all rows, an unlabelled row's KL weighted by `unlabeled_weight`:
    KD = (sum of KL over labelled positions + unlabeled_weight * sum of KL over unlabelled positions)
         / (number of labelled positions + number of unlabelled positions)
The positions of an unlabelled row are all of its positions (one per document), or, for per-word tasks, those
given by `positions` [B, W] (its real words; padding excluded).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


class DistillationLoss(nn.Module):
    def __init__(self, temperature=4.0, alpha=0.7, unlabeled_weight=1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if unlabeled_weight < 0:
            raise ValueError(f"unlabeled_weight must be >= 0, got {unlabeled_weight}")
        self.temperature = temperature
        self.alpha = alpha
        self.unlabeled_weight = unlabeled_weight

    def kd_positions(self, batch):
        """(labels, keep, teach, weight) of a batch: keep [N] the labelled positions (the CE term), teach [N] the
        positions of the teacher's terms, weight their weights (None: all 1; else [teach.sum()])."""
        labels, labeled, positions = ((batch["labels"], batch.get("labeled"), batch.get("positions"))
                                      if isinstance(batch, dict) else (batch, None, None))
        keep = labels.reshape(-1) != IGNORE_INDEX  # labelled positions: the CE term
        teach, weight = keep, None  # positions of the KL term and their weights
        if labeled is not None and not bool(labeled.all()):
            unlabeled = (~labeled.bool()).view(-1, *[1] * (labels.dim() - 1)).expand_as(labels)
            extra = unlabeled if positions is None else unlabeled & positions.bool()
            teach = keep | extra.reshape(-1)
            weight = torch.where(extra.reshape(-1), self.unlabeled_weight, 1.0)[teach].to(labels.device)
        return labels, keep, teach, weight

    @staticmethod
    def position_mean(values, weight):
        """sum of values [N] (times their weights) / N: the mean per position of a teacher term."""
        if weight is not None:
            values = values * weight
        return values.sum() / max(len(values), 1)

    def forward(self, student_logits, teacher_logits, batch):
        """batch: the batch (its "labels", and "labeled"/"positions" when it holds unlabelled rows) or the labels."""
        labels, keep, teach, weight = self.kd_positions(batch)
        num_classes = student_logits.shape[-1]
        # float32 even under autocast: a bf16/fp16 softmax at T=4 loses the small probabilities KD lives on.
        student = student_logits.float().reshape(-1, num_classes)
        targets = labels.reshape(-1)[keep]
        ce = F.cross_entropy(student[keep], targets) if len(targets) else student.sum() * 0
        if teacher_logits is None:  # no teacher (plain fine-tuning): the KL term is absent
            kd = torch.zeros((), device=student.device)
        else:
            teacher = teacher_logits.float().reshape(-1, num_classes)[teach]
            T = self.temperature
            # batchmean = sum over classes and positions / positions: the true KL per position.
            # The T^2 factor keeps soft-target gradients on the same scale as the hard-label ones.
            kl = F.kl_div(F.log_softmax(student[teach] / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                          reduction="none", log_target=True).sum(-1)
            kd = self.position_mean(kl, weight) * T * T
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"total": total, "kd": kd.detach(), "ce": ce.detach()}
