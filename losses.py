"""The loss skeleton every task's loss is built on, and page and word classification's loss (CE and KL at T).

    total = (1 - alpha) * hard + alpha * (sum of the teacher's named terms, those in WEIGHTED times feature_weight)

`hard` is the labels' term (CE here; CTC for a CRNN student, textrec/losses.py; token CE for a sequence-to-sequence
student, textrec/trocr_student.py), over the labelled rows only, and 0 when a batch has none. The teacher's terms
cover every row, labelled or not (--unlabeled documents, --labeled-fraction, crops without a transcript). Without a
teacher (teacher outputs None) the terms are not computed and count 0; alpha 0 makes total the hard term alone.
Whether a run has a teacher is decided once, by Config.uses_teacher: a task's make_loss then gives alpha 0.
A task's loss subclasses DistillationLoss and computes only its own terms:

    rows(batch)                                              what both hooks need to know of the batch's rows
    hard_term(student_out, batch, rows)                      -> scalar
    teacher_terms(student_out, teacher_out, batch, rows)     -> {name: scalar}, a value for every name in self.terms

Classification (this class): logits [B, C] and labels [B] (one per page), or [B, W, C] and [B, W] (one per word);
positions whose label is IGNORE_INDEX (padding, special tokens) are out of both terms, and

    kd = T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the positions ("batchmean"),

in float32 even under autocast. Unlabelled rows (batch "labeled" False [B]) carry IGNORE_INDEX labels, so they are
out of the CE, averaged over labelled positions only, and in the KL term, averaged over all rows' positions, an
unlabelled row's KL weighted by `unlabeled_weight`:
    KD = (sum of KL over labelled positions + unlabeled_weight * sum of KL over unlabelled positions)
         / (number of labelled positions + number of unlabelled positions)
An unlabelled row's positions are all of them (one per document) or, for per-word tasks, those in `positions`
[B, W] (its real words; padding excluded). With no position left, both terms are 0.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def logits_of(outputs):
    """The logits of a forward pass: the tensor itself, or the "logits" of a dict of outputs."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs


class DistillationLoss(nn.Module):
    """criterion(student outputs, teacher outputs or None, batch or labels) -> {"total", HARD, <terms>}."""
    HARD = "ce"  # the name of the labels' term in the returned dict (and in the metrics rows: train_ce)
    WEIGHTED = ()  # terms weighed by feature_weight inside the teacher's part

    def __init__(self, temperature=4.0, alpha=0.7, unlabeled_weight=1.0, terms=("kd",), feature_weight=1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if unlabeled_weight < 0:
            raise ValueError(f"unlabeled_weight must be >= 0, got {unlabeled_weight}")
        self.temperature, self.alpha, self.unlabeled_weight = temperature, alpha, unlabeled_weight
        self.terms, self.feature_weight = [t for t in terms if t], feature_weight

    def forward(self, student_out, teacher_out, batch):
        rows = self.rows(batch)
        hard = self.hard_term(student_out, batch, rows)
        if teacher_out is None:  # no teacher (plain fine-tuning): its terms are absent
            terms = {name: torch.zeros((), device=hard.device) for name in self.terms}
        else:
            terms = self.teacher_terms(student_out, teacher_out, batch, rows)
        teacher_part = sum((terms[name] * (self.feature_weight if name in self.WEIGHTED else 1.0)
                            for name in self.terms), torch.zeros((), device=hard.device))
        total = self.alpha * teacher_part + (1.0 - self.alpha) * hard
        return {"total": total, **{name: value.detach() for name, value in terms.items()}, self.HARD: hard.detach()}

    # ------------------------------------------------------------------ classification's rows and terms
    def rows(self, batch):
        """(labels, keep, teach, weight) of a batch: keep [N] the labelled positions (the CE term), teach [N] the
        positions of the teacher's terms, weight their weights (None: all 1; else [teach.sum()])."""
        labels, labeled, positions = ((batch["labels"], batch.get("labeled"), batch.get("positions"))
                                      if isinstance(batch, dict) else (batch, None, None))
        keep = labels.reshape(-1) != IGNORE_INDEX  # labelled positions: the CE term
        teach, weight = keep, None  # positions of the teacher's terms and their weights
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

    def hard_term(self, student_out, batch, rows):
        labels, keep, _, _ = rows
        # float32 even under autocast: a bf16/fp16 softmax at T=4 loses the small probabilities KD lives on.
        student = logits_of(student_out).float()
        student = student.reshape(-1, student.shape[-1])
        targets = labels.reshape(-1)[keep]
        return F.cross_entropy(student[keep], targets) if len(targets) else student.sum() * 0

    def teacher_terms(self, student_out, teacher_out, batch, rows):
        return {"kd": self.kd(logits_of(student_out), logits_of(teacher_out), rows)}

    def kd(self, student_logits, teacher_logits, rows):
        """T^2 * KL(teacher_T || student_T), batchmean over the teacher's positions (weighted)."""
        _, _, teach, weight = rows
        classes = student_logits.shape[-1]
        student = student_logits.float().reshape(-1, classes)[teach]
        teacher = teacher_logits.float().reshape(-1, classes)[teach]
        T = self.temperature
        # batchmean = sum over classes and positions / positions: the true KL per position.
        # The T^2 factor keeps soft-target gradients on the same scale as the hard-label ones.
        kl = F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                      reduction="none", log_target=True).sum(-1)
        return self.position_mean(kl, weight) * T * T
