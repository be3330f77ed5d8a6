"""Distillation terms for page classification and word tagging, chosen by name with --kd-terms.

    total = (1 - alpha) * CE(student, labels)
            + alpha * (kd + logit-mse + feature_weight * (feature + simkd + attention))

(only the terms named in --kd-terms, in the skeleton of losses.py; without a teacher, CE alone; `kd` alone is exactly
losses.DistillationLoss, the default). Each term is a mean over the positions the KL covers (DistillationLoss.rows: the
labelled positions and the real positions of unlabelled rows, those weighted by --unlabeled-weight):

kd         T^2 * KL(softmax(teacher / T) || softmax(student / T)).
logit-mse  squared difference of the raw logits, averaged over the classes.
feature    squared difference between P(student features) and the teacher's features, averaged over the
           channels; P is a learned nn.Linear from the student's width to the teacher's, a parameter of this
           loss: train.fit optimises it with the student and keeps it in the checkpoint (not in the saved student).
simkd      SimKD (Chen et al., CVPR 2022): the student's classification head is replaced by heads.SimKDHead, a learned
           nn.Linear projector to the teacher's width followed by a frozen copy of the teacher's classification
           head, so the student's logits are the teacher head's on its projected features; the term is the squared
           difference between the projected student features and the teacher's, averaged over the channels. The
           projector and the teacher head are part of the student (its config's `simkd_head` describes them), so
           the saved student loads and predicts without the teacher (heads.restore_head).
attention  attention-map transfer: each model's last-layer attention probabilities, averaged over the heads, kept at
           the matched positions (below) for rows and columns and renormalised over the real columns, so that each
           row a_i is a distribution over the positions; the term is KL(teacher a_i || student a_i), averaged over
           the real rows (a row of an unlabelled document weighted by --unlabeled-weight). Both models run with
           eager attention (output_attentions).

Which positions are matched between the models: the "features" of a model are what its classification head
reads, its last hidden layer's representation at
    documents  the pooled representation: LayoutLMv3's first token (<s>/[CLS]), DiT/BEiT's pooled patches;
    words      each word's first sub-token in each model's own tokenisation, the positions at which the token
               task already reads both models' logits (wordtags.at_words; words either model has no token for
               are out of every term).
The attention maps are matched between the same positions on both axes:
    words      word x word: each word's first sub-token in each model's tokenisation, as above; real words are
               those both models read (batch "positions"), padding and dropped words are out;
    documents  text token x text token, only when both models read the same tokens (a teacher that reads words, which
               must read them with the student's tokenizer and max_length): LayoutLMv3 appends its visual tokens
               after the text, so the text part is kept, over the real tokens (attention_mask); an image-only
               teacher (DiT) is refused (classification.DocumentClassification).
The teacher's features, and its word x word or text x text maps, are stored in the teacher cache (float16) beside
its logits when a term needs them.

Several teachers (--teacher A --teacher B, --teacher-weights): TeacherEnsemble averages their soft targets in
probability space at T; with them only the kd term is available (their features and raw logits do not combine).
"""
import contextlib
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import DistillationLoss, logits_of

FEATURE_TERMS = ("feature", "simkd")
WEIGHTED_TERMS = (*FEATURE_TERMS, "attention")  # weighed by --feature-weight


def chosen(cfg):
    """The terms of --kd-terms that are trained: none when the run does not use its teacher (Config.uses_teacher)."""
    return [t for t in cfg.kd_terms.split(",") if t] if cfg.uses_teacher else []


@contextlib.contextmanager
def captured(module, output=False):
    """Collects the input (or the output) of every forward of `module` while the context is open."""
    box = []
    handle = module.register_forward_hook(lambda _, args, result: box.append(result if output else args[0]))
    try:
        yield box
    finally:
        handle.remove()


@contextlib.contextmanager
def attention_maps(model):
    """Asks every forward of `model` (a Hugging Face model, possibly DDP-wrapped) for its attention maps while the
    context is open, and collects the last layer's, averaged over the heads: [B, S, S]."""
    inner, box = getattr(model, "module", model), []
    ask = inner.register_forward_pre_hook(lambda _, args, kwargs: (args, {**kwargs, "output_attentions": True}),
                                          with_kwargs=True)
    keep = inner.register_forward_hook(lambda _, args, result: box.append(result.attentions[-1].mean(1)))
    try:
        yield box
    finally:
        ask.remove()
        keep.remove()


# ----------------------------------------------------------------------------- the tasks' side

class TeacherEnsemble(nn.Module):
    """Several frozen teachers as one (--teacher A --teacher B): their soft targets averaged in probability space at
    the run's temperature T, with weights w_k (--teacher-weights, normalised to sum 1):

        p_T = sum_k w_k softmax(z_k / T),   given as the logits T * log p_T   (whose softmax at T is p_T),

    each teacher's logits z_k first put in the dataset's class order (orders). Its outputs are in the dataset's
    order, as its config's labels say."""

    def __init__(self, teachers, orders, weights, temperature, labels):
        super().__init__()
        self.teachers, self.orders, self.temperature = nn.ModuleList(teachers), orders, temperature
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32) / sum(weights))  # in the cache key
        self.config = types.SimpleNamespace(id2label=dict(enumerate(labels)))  # models.label_names reads it

    def combine(self, logits):
        """[teacher logits] in the dataset's order -> T * log(sum_k w_k softmax(z_k / T)), float32."""
        probs = sum(w * F.softmax(z.float() / self.temperature, dim=-1) for w, z in zip(self.weights, logits))
        return self.temperature * probs.clamp_min(torch.finfo(torch.float32).tiny).log()


# ----------------------------------------------------------------------------- the loss

def position_mse(student, teacher, teach, weight):
    """Squared difference averaged over the last axis, then over the positions `teach` (weighted)."""
    width = student.shape[-1]
    diff = student.float().reshape(-1, width)[teach] - teacher.float().reshape(-1, width)[teach]
    return DistillationLoss.position_mean((diff ** 2).mean(-1), weight)


def attention_rows(batch):
    """The real positions of a batch's attention maps [B, R]: its words (word tagging: "positions"), else its text
    tokens (page classification: "attention_mask")."""
    return (batch["positions"] if "positions" in batch else batch["attention_mask"]).bool()


def attention_kl(student, teacher, real, weight):
    """KL(teacher row || student row) of attention maps [B, >=R, >=R] cut to the R positions of real [B, R], each
    row renormalised over its real columns; averaged over the real rows (weighted)."""
    n, tiny = real.shape[1], torch.finfo(torch.float32).tiny

    def rows(maps):
        maps = maps.float()[:, :n, :n] * real[:, None, :]
        return maps / maps.sum(-1, keepdim=True).clamp_min(tiny)
    t, s = rows(teacher), rows(student)
    kl = (torch.xlogy(t, t) - t * s.clamp_min(tiny).log()).sum(-1)
    return DistillationLoss.position_mean(kl[real], weight)


class TermsLoss(DistillationLoss):
    """criterion(student outputs, teacher outputs, batch) -> {"total", "ce", <terms>} (see the module's docstring).

    widths: (student width, teacher width) of the `feature` term's projection."""
    WEIGHTED = WEIGHTED_TERMS

    def __init__(self, temperature, alpha, unlabeled_weight, terms, feature_weight=1.0, widths=None):
        super().__init__(temperature, alpha, unlabeled_weight, terms, feature_weight)
        if "feature" in self.terms:
            self.projection = nn.Linear(*widths)

    def teacher_terms(self, student_out, teacher_out, batch, rows):
        _, _, teach, weight = rows
        terms = {}
        if "kd" in self.terms:
            terms["kd"] = self.kd(logits_of(student_out), logits_of(teacher_out), rows)
        if "logit-mse" in self.terms:
            terms["logit-mse"] = position_mse(logits_of(student_out), logits_of(teacher_out), teach, weight)
        if "feature" in self.terms:
            student = self.projection(student_out["features"].float())
            terms["feature"] = position_mse(student, teacher_out["features"], teach, weight)
        if "simkd" in self.terms:
            terms["simkd"] = position_mse(student_out["features"], teacher_out["features"], teach, weight)
        if "attention" in self.terms:
            real = attention_rows(batch)
            labeled = batch.get("labeled")
            rows_weight = None if labeled is None or bool(labeled.all()) else \
                torch.where(labeled.bool(), 1.0, self.unlabeled_weight)[:, None].expand_as(real)[real]
            terms["attention"] = attention_kl(student_out["attention"], teacher_out["attention"], real, rows_weight)
        return terms
