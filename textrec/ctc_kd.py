"""The loss for distilling a CTC recogniser, on the skeleton of losses.py: {total, ctc, <term>: ...}.

    total = (1 - alpha) * ctc + alpha * (kl + seq + feature_weight * (feature_backbone + feature_encoder
                                                                        + feature_logits + simkd))
    (only the terms named in --kd-terms; with only feature terms and alpha 0.5 this is (ctc + lambda * sum of
    MSEs) / 2, the issue's L = L_CTC + lambda * (...) at half the scale, which Adam does not see)

ctc   CTC on the labels, crops with a transcript only (mean over crops of the loss / target length).
kl    per time step, T^2 * KL(teacher_T || student_T) on the CTC distributions, teacher folded onto the student's
      charset (teachers.fold_matrix) and pooled to the student's step count if it differs; steps where the
      teacher's best class is blank weigh --blank-weight (most steps are blank: unweighted, they drown the few
      that carry characters); a weighted mean over the real steps of all crops. With label_gaps (--label-conventions
      found that the labels keep spaces or trailing punctuation the teacher drops; --mute-teacher-disagreements: every
      character) the steps around such a character of a labelled crop are left out (conventions.label_gaps).
seq   sequence-level KD: CTC on the teacher's greedy transcript (its folded distribution's best path), any crop.
feature_backbone, feature_encoder   feature distillation (FitNets-style): the student's backbone features [B, T, c4]
      and BiLSTM outputs [B, T, 2 hidden] through a learned linear projection to the teacher's width (identity
      where the widths agree), against the teacher's backbone output and SVTR-neck output (teachers.
      feature_tensors), each standardised per time step over its channels (layer norm without weights: PP-OCRv4's
      backbone activations are ~3x the neck's, so the raw MSEs would not be on one scale); squared error averaged
      over the real steps and the channels. The teacher's features are pooled to the student's step count like its
      probabilities (align_steps) if they differ.
feature_logits   MSE between the per-step log-probabilities of student and folded teacher, each computed as
      log(p + 1e-4) (logits up to a per-step constant, softly floored so that classes both models give ~0 do not
      dominate), averaged over real steps and classes.
simkd   SimKD (ctc_simkd): the student's head is a learned projector to the teacher's encoder width followed by the
      teacher's own frozen head (its output folded onto the student's charset: the student's logits); the term is the
      squared error between the projected student encoder features [B, T, 120] and the teacher's SVTR-neck output
      (the head's input), averaged over the real steps and the channels, NOT standardised (the teacher's head must
      read them on its own scale); teacher features pooled to the student's step count as above. The projector and
      the head belong to the student (saved with it), not to this module.
The projections are parameters of this module: train.fit optimises them with the student and keeps them in the
checkpoint (not in student_model.pth: they are only needed for training).
Unlabelled crops (no transcript) only enter the teacher's terms.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import DistillationLoss, logits_of
from textrec import conventions, data

KD_TERMS = ("kl", "seq", "feature_backbone", "feature_encoder", "feature_logits", "simkd")
WEIGHTED = ("feature_backbone", "feature_encoder", "feature_logits", "simkd")  # weighed by --feature-weight
FEATURES = {"feature_backbone": "backbone", "feature_encoder": "encoder"}  # term -> the features it compares
LOGP_FLOOR = 1e-4


def ctc(log_probs, lengths, targets, target_lengths):
    """Mean over crops of CTC / target length (torch's reduction='mean'); log_probs [B, T, C]."""
    if len(targets) == 0:
        return log_probs.sum() * 0
    return F.ctc_loss(log_probs.transpose(0, 1), targets, lengths, target_lengths, blank=data.BLANK,
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
    weight = mask.float() * torch.where(teacher_logp.argmax(-1) == data.BLANK, blank_weight, 1.0)
    return (kl * weight).sum() / weight.sum().clamp_min(1e-8) * T * T


def align_features(features, steps):
    """Teacher features [B, T_t, C] on `steps` time steps: averaged over equal spans (as align_steps)."""
    if features.shape[1] == steps:
        return features
    return F.adaptive_avg_pool1d(features.transpose(1, 2), steps).transpose(1, 2)


def masked_mse(student, target, mask):
    """Squared error averaged over the real steps (mask [B, T]) and the channels."""
    weight = mask.float().unsqueeze(-1)
    return ((student - target) ** 2 * weight).sum() / (weight.sum() * student.shape[-1]).clamp_min(1e-8)


def feature_mse(student, teacher, mask, projection):
    """MSE(projection(student features), teacher features standardised per step), both [B, T, C]."""
    target = align_features(teacher.float(), student.shape[1])
    target = F.layer_norm(target, target.shape[-1:])
    return masked_mse(projection(student.float()), target, mask)


def simkd_mse(projected, teacher, mask):
    """MSE(projected student encoder features, the teacher's encoder features), raw (not standardised)."""
    return masked_mse(projected.float(), align_features(teacher.float(), projected.shape[1]), mask)


def logit_mse(student_logits, teacher_logp, mask):
    """MSE of log(p + 1e-4) between the student's and the teacher's per-step distributions."""
    student = torch.log(F.softmax(student_logits.float(), dim=-1) + LOGP_FLOOR)
    teacher = torch.log(align_steps(teacher_logp.float(), student.shape[1]).exp() + LOGP_FLOOR)
    return masked_mse(student, teacher, mask)


def greedy_targets(logp, lengths):
    """Best-path transcripts of [B, T, C] log-probabilities as CTC targets (concatenated ids, lengths)."""
    best = logp.argmax(-1).tolist()
    paths = [data.ctc_greedy(b, int(n)) for b, n in zip(best, lengths)]
    ids = torch.tensor([c for p in paths for c in p], dtype=torch.long, device=logp.device)
    return ids, torch.tensor([len(p) for p in paths], dtype=torch.long, device=logp.device), paths


class CTCDistillationLoss(DistillationLoss):
    """criterion(student, teacher, batch) -> {"total", "ctc", <terms>}: the skeleton of losses.py with CTC as the
    labels' term (crops with a transcript) and the terms above as the teacher's (every crop's real steps).

    student: logits [B, T, C], or with feature terms the dict {"logits", "backbone", "encoder"} of
    crnn.CRNN(..., features=True) ("projected" too for simkd); teacher: folded log-probabilities [B, T, C] or the
    dict of OnnxRecognizer.features(). feature_dims {"backbone": (student width, teacher width), "encoder": (...)} sizes
    the projections (needed only for the feature_backbone / feature_encoder terms).
    """
    HARD = "ctc"
    WEIGHTED = WEIGHTED

    def __init__(self, alpha, temperature, terms, blank_weight, with_teacher, feature_weight=1.0,
                 feature_dims=None, label_gaps=()):
        super().__init__(temperature, alpha if with_teacher else 0.0,
                         terms=terms if with_teacher and alpha > 0 else (), feature_weight=feature_weight)
        self.blank_weight, self.label_gaps = blank_weight, tuple(label_gaps)
        self.projections = nn.ModuleDict()
        for term in self.terms:
            if term in FEATURES:
                width, teacher_width = feature_dims[FEATURES[term]]
                self.projections[FEATURES[term]] = (nn.Identity() if width == teacher_width else
                                                    nn.Linear(width, teacher_width))

    def rows(self, batch):
        """(real steps [B, T], steps per crop [B], crops with a transcript [B])."""
        mask = batch["step_mask"]
        return mask, mask.sum(1), batch["has_label"].bool()

    def hard_term(self, student_out, batch, rows):
        _, lengths, labelled = rows
        logp = F.log_softmax(logits_of(student_out).float(), dim=-1)
        labels = batch["labels"][labelled]
        target_lengths = (labels != data.IGNORE_INDEX).sum(1)
        return ctc(logp[labelled], lengths[labelled], labels[labels != data.IGNORE_INDEX], target_lengths)

    def teacher_terms(self, student_out, teacher_out, batch, rows):
        mask, lengths, _ = rows
        student_logits, teacher_logp = logits_of(student_out).float(), logits_of(teacher_out)
        device, steps = student_logits.device, student_logits.shape[1]
        out = {}
        if "kl" in self.terms:
            aligned, kl_mask = align_steps(teacher_logp.float(), steps), mask
            if self.label_gaps:  # not "nothing here" where a label has a character the teacher does not read
                kl_mask = mask & ~conventions.label_gaps(aligned, batch["labels"], batch["has_label"], mask,
                                                         self.label_gaps)
            out["kl"] = step_kl(student_logits, aligned, kl_mask, self.temperature, self.blank_weight)
        if "seq" in self.terms:
            targets, target_lengths, _ = greedy_targets(align_steps(teacher_logp.float(), steps), lengths)
            out["seq"] = ctc(F.log_softmax(student_logits, dim=-1), lengths, targets, target_lengths)
        for term, name in FEATURES.items():
            if term in self.terms:
                out[term] = feature_mse(student_out[name], teacher_out[name].to(device), mask, self.projections[name])
        if "feature_logits" in self.terms:
            out["feature_logits"] = logit_mse(student_logits, teacher_logp, mask)
        if "simkd" in self.terms:
            out["simkd"] = simkd_mse(student_out["projected"], teacher_out["encoder"].to(device), mask)
        return out
