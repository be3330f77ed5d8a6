"""Losses for distilling a CTC recogniser: returned as {total, <term>: ...} for the training loop.

    total = (1 - alpha) * ctc + alpha * (kl + seq)      (only the terms named in --kd-terms)

ctc   CTC on the labels, crops with a transcript only (mean over crops of the loss / target length).
kl    per time step, T^2 * KL(teacher_T || student_T) on the CTC distributions, teacher folded onto the student's
      charset (ocr_teacher.fold_matrix) and pooled to the student's step count if it differs; steps where the
      teacher's best class is blank weigh --blank-weight (most steps are blank: unweighted, they drown the few
      that carry characters); a weighted mean over the real steps of all crops.
seq   sequence-level KD: CTC on the teacher's greedy transcript (its folded distribution's best path), any crop.
(Not built: a feature-MSE term on backbone / encoder features through learned projections, which needs the
teacher's intermediate ONNX tensors as extra graph outputs.)
Unlabelled crops (no transcript) only enter the teacher's terms.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import textrec

KD_TERMS = ("kl", "seq")


def ctc(log_probs, lengths, targets, target_lengths):
    """Mean over crops of CTC / target length (torch's reduction='mean'); log_probs [B, T, C]."""
    if len(targets) == 0:
        return log_probs.sum() * 0
    return F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=textrec.BLANK,
                      reduction="mean", zero_infinity=True)


def align_steps(teacher_logp, steps):
    """Teacher log-probabilities [B, T_t, C] on `steps` time steps: probabilities averaged over equal spans."""
    if teacher_logp.shape[1] == steps:
        return teacher_logp
    probs = F.adaptive_avg_pool1d(teacher_logp.exp().transpose(1, 2), steps).transpose(1, 2)
    return probs.clamp_min(1e-12).log()


def step_kl(student_logits, teacher_logp, mask, temperature, blank_weight):
    """T^2 * sum_t w_t KL(p_t^T || q_t^T) / sum_t w_t over real steps (mask), w_t = blank_weight on blank steps."""
    T = temperature
    teacher = F.log_softmax(teacher_logp / T, dim=-1)
    student = F.log_softmax(student_logits / T, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    weight = mask.float() * torch.where(teacher_logp.argmax(-1) == textrec.BLANK, blank_weight, 1.0)
    return (kl * weight).sum() / weight.sum().clamp_min(1e-8) * T * T


def greedy_targets(logp, lengths):
    """Best-path transcripts of [B, T, C] log-probabilities as CTC targets (concatenated ids, lengths)."""
    best = logp.argmax(-1).tolist()
    paths = [textrec.ctc_greedy(b, int(n)) for b, n in zip(best, lengths)]
    ids = torch.tensor([c for p in paths for c in p], dtype=torch.long, device=logp.device)
    return ids, torch.tensor([len(p) for p in paths], dtype=torch.long, device=logp.device), paths


class CTCDistillationLoss(nn.Module):
    def __init__(self, alpha, temperature, terms, blank_weight, with_teacher):
        super().__init__()
        self.alpha = alpha if with_teacher else 0.0
        self.temperature, self.blank_weight = temperature, blank_weight
        self.terms = [t for t in terms if t] if with_teacher and alpha > 0 else []

    def forward(self, student_logits, teacher_logp, batch):
        logp = F.log_softmax(student_logits.float(), dim=-1)
        mask = batch["step_mask"]
        lengths = mask.sum(1)
        labelled = batch["has_label"].bool()
        labels = batch["labels"][labelled]
        target_lengths = (labels != textrec.IGNORE_INDEX).sum(1)
        out = {"ctc": ctc(logp[labelled], lengths[labelled], labels[labels != textrec.IGNORE_INDEX], target_lengths)}
        if "kl" in self.terms:
            teacher = align_steps(teacher_logp.float(), logp.shape[1])
            out["kl"] = step_kl(student_logits.float(), teacher, mask, self.temperature, self.blank_weight)
        if "seq" in self.terms:
            teacher = align_steps(teacher_logp.float(), logp.shape[1])
            targets, target_lengths, _ = greedy_targets(teacher, lengths)
            out["seq"] = ctc(logp, lengths, targets, target_lengths)
        kd = sum((out[t] for t in self.terms), torch.zeros((), device=logp.device))
        has_ctc = bool(labelled.any())
        total = (1.0 - self.alpha) * out["ctc"] + self.alpha * kd if has_ctc else self.alpha * kd + 0 * out["ctc"]
        return {"total": total, **{k: v.detach() for k, v in out.items()}}
