"""Distillation loss: soft targets from the teacher plus hard labels.

total = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels)

Works for one label per document (logits [B, C], labels [B]) and one label per word (logits [B, W, C],
labels [B, W]); positions whose label is IGNORE_INDEX (padding, special tokens) are left out of both terms,
and the KL is averaged over the positions that remain ("batchmean" over documents or words). With no
position left, both terms are 0.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


class DistillationLoss(nn.Module):
    def __init__(self, temperature=4.0, alpha=0.7):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits, teacher_logits, batch):
        """batch: the batch (its "labels" are used) or the labels themselves."""
        labels = batch["labels"] if isinstance(batch, dict) else batch
        num_classes = student_logits.shape[-1]
        # float32 even under autocast: a bf16/fp16 softmax at T=4 loses the small probabilities KD lives on.
        student = student_logits.float().reshape(-1, num_classes)
        labels = labels.reshape(-1)
        keep = labels != IGNORE_INDEX
        student, labels = student[keep], labels[keep]
        if not len(labels):  # nothing to score (e.g. a batch of forms without words): both terms are 0, not 0/0
            zero = student.sum() * 0  # keeps the graph, so backward() works as for any other batch
            return {"total": zero, "kd": zero.detach(), "ce": zero.detach()}
        ce = F.cross_entropy(student, labels)
        if teacher_logits is None:  # no teacher (plain fine-tuning): the KL term is absent
            kd = torch.zeros((), device=student.device)
        else:
            teacher = teacher_logits.float().reshape(-1, num_classes)[keep]
            T = self.temperature
            # batchmean = sum over classes and positions / positions: the true KL per position.
            # The T^2 factor keeps soft-target gradients on the same scale as the hard-label ones.
            kd = F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                          reduction="batchmean", log_target=True) * T * T
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"total": total, "kd": kd.detach(), "ce": ce.detach()}
