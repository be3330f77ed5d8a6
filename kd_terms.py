"""Distillation terms for page classification and word tagging, chosen by name with --kd-terms.

    total = (1 - alpha) * CE(student, labels)
            + alpha * (kd + logit-mse + feature_weight * (feature + simkd + attention))

(only the terms named in --kd-terms; without a teacher, CE alone; `kd` alone is exactly losses.DistillationLoss,
the default). Each term is a mean over the positions the KL covers (losses.DistillationLoss.kd_positions: the
labelled positions and the real positions of unlabelled rows, those weighted by --unlabeled-weight):

kd         T^2 * KL(softmax(teacher / T) || softmax(student / T)).
logit-mse  squared difference of the raw logits, averaged over the classes.
feature    squared difference between P(student features) and the teacher's features, averaged over the
           channels; P is a learned nn.Linear from the student's width to the teacher's, a parameter of this
           loss: train.fit optimises it with the student and keeps it in the checkpoint (not in the saved student).
simkd      SimKD (Chen et al., CVPR 2022): the student's classification head is replaced by SimKDHead, a learned
           nn.Linear projector to the teacher's width followed by a frozen copy of the teacher's classification
           head, so the student's logits are the teacher head's on its projected features; the term is the squared
           difference between the projected student features and the teacher's, averaged over the channels. The
           projector and the teacher head are part of the student (its config's `simkd_head` describes them), so
           the saved student loads and predicts without the teacher (restore_head).
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
               teacher (DiT) is refused (tasks.DocumentClassification).
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

import models
from config import UserError
from losses import DistillationLoss
from train import logits_of

FEATURE_TERMS = ("feature", "simkd")
WEIGHTED_TERMS = (*FEATURE_TERMS, "attention")  # weighed by --feature-weight


def chosen(cfg):
    """The terms of --kd-terms that are trained: none without a teacher (--mode teacher, alpha 0)."""
    return [t for t in cfg.kd_terms.split(",") if t] if cfg.mode == "train" and cfg.alpha > 0 else []


def head_of(model):
    """The classification head of a (possibly DDP-wrapped) classifier: the module whose input is its features."""
    return getattr(model, "module", model).classifier


def feature_width(head):
    """Width of the features a classification head reads (its first linear layer's input)."""
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


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


# ----------------------------------------------------------------------------- SimKD: the teacher's head reused

def teacher_head_layers(head):
    """The teacher head as (spec, its linear layers): an nn.Linear, or LayoutLMv3's dense-tanh-out_proj head (its
    dropout left out: the teacher's head is used as in eval)."""
    if isinstance(head, nn.Linear):
        linears = [head]
    elif type(head).__name__ == "LayoutLMv3ClassificationHead" and not head.pool_feature:
        linears = [head.dense, head.out_proj]
    else:
        raise UserError(f"--kd-terms simkd reuses the teacher's classification head, which must be a linear layer or "
                        f"LayoutLMv3's head; this teacher's is a {type(head).__name__}")
    spec = [["linear", m.in_features, m.out_features] for m in linears]
    return (spec if len(spec) == 1 else [spec[0], ["tanh"], spec[1]]), linears


class SimKDHead(nn.Module):
    """projector (student width -> teacher width, learned), then the teacher's head (frozen copy).

    spec: {"student_width", "teacher_width", "teacher_head": [["linear", in, out] | ["tanh"], ...]}."""

    def __init__(self, spec):
        super().__init__()
        self.projector = nn.Linear(spec["student_width"], spec["teacher_width"])
        self.teacher_head = nn.Sequential(*(nn.Linear(*layer[1:]) if layer[0] == "linear" else nn.Tanh()
                                            for layer in spec["teacher_head"]))
        self.teacher_head.requires_grad_(False)

    def forward(self, features):
        return self.teacher_head(self.projector(features))


def attach_simkd_head(student, teacher_head, order):
    """Replace the student's head by a SimKDHead whose teacher part copies `teacher_head`, its classes put in the
    dataset's order (order: the teacher's class index of each dataset class); recorded in the student's config."""
    spec, linears = teacher_head_layers(teacher_head)
    spec = {"student_width": feature_width(student.classifier), "teacher_width": feature_width(teacher_head),
            "teacher_head": spec}
    head = SimKDHead(spec)
    copies = [m for m in head.teacher_head if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for mine, theirs in zip(copies, linears):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
        copies[-1].weight.copy_(linears[-1].weight[order])
        copies[-1].bias.copy_(linears[-1].bias[order])
    student.classifier = head
    student.config.simkd_head = spec
    return student


def restore_head(model):
    """A model built from a saved config: with its SimKDHead (to be filled by the saved weights) where the config
    says it has one."""
    spec = getattr(model.config, "simkd_head", None)
    if spec:
        model.classifier = SimKDHead(spec)
    return model


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


class FeatureOutputs:
    """What a classification task feeds the loss: the logits, or when a term compares features or attention maps,
    the dict {"logits", "features", "attention"} (those the terms need, at the matched positions:
    task.matched(features, batch, role), task.matched_attention(maps, batch, role)); and its teacher as a
    TeacherEnsemble when there are several.

    The task provides load_teacher(source, trainable) -> (teacher, ...), teacher_input(loaded) (what its batches
    are made with) and one_teacher_logits(teacher, order, batch); it calls add_teachers(cfg, trainable, first) and
    init_kd_terms(cfg) once its teacher, student and teacher_order are built."""

    def add_teachers(self, cfg, trainable, first):
        """With --teacher given several times, self.teacher becomes their TeacherEnsemble. Each teacher must read
        the batches the first one's preprocessing makes (the same tokenizer and page)."""
        if not cfg.extra_teachers:
            return
        teachers, orders = [self.teacher], [self.teacher_order]
        for source in cfg.extra_teachers:
            loaded = self.load_teacher(source, trainable)
            if self.teacher_input(loaded) != self.teacher_input(first):
                raise UserError(f"--teacher {source} reads its input otherwise than --teacher {cfg.teacher} (tokenizer "
                                f"or page size and normalisation): several teachers must read the same inputs")
            teachers.append(loaded[0])
            orders.append(models.match_labels(models.label_names(loaded[0]), self.labels))
        weights = [float(w) for w in cfg.teacher_weights.split(",")] if cfg.teacher_weights else [1.0] * len(teachers)
        self.teacher = TeacherEnsemble(teachers, orders, weights, cfg.temperature, self.labels)

    def teacher_logits(self, teacher, batch):
        if isinstance(teacher, TeacherEnsemble):
            return teacher.combine([self.one_teacher_logits(t, order, batch)
                                    for t, order in zip(teacher.teachers, teacher.orders)])
        return self.one_teacher_logits(teacher, self.teacher_order, batch)

    def init_kd_terms(self, cfg):
        self.kd_terms = chosen(cfg)
        self.feature_terms = [t for t in self.kd_terms if t in FEATURE_TERMS]
        self.attention = "attention" in self.kd_terms
        # The cache's key covers what it stores: a cache of logits and features is another cache, and an ensemble's
        # targets depend on the temperature they are averaged at (its weights are in its weights' fingerprint).
        stored = ((["features (classification head input)"] if self.feature_terms else []) +
                  (["attention (last layer, mean over heads, matched positions)"] if self.attention else []))
        self.teacher_cache_extra = (([f"outputs: logits, {', '.join(stored)}"] if stored else []) +
                                    ([f"teachers averaged in probability at T={cfg.temperature}"]
                                     if isinstance(self.teacher, TeacherEnsemble) else []))
        if "simkd" in self.kd_terms:
            attach_simkd_head(self.student, head_of(self.teacher), self.teacher_order)
        if self.attention:  # sdpa attention returns no maps
            self.student.set_attn_implementation("eager")
            self.teacher.set_attn_implementation("eager")

    def outputs(self, model, batch, role, forward, head=None, head_output=False):
        """forward(model, batch) -> logits; with the terms' captures (features: the input, or the output, of
        `head`), the dict {"logits", "features", "attention"}."""
        if not self.feature_terms and not self.attention:
            return forward(model, batch)
        with contextlib.ExitStack() as stack:
            features = stack.enter_context(captured(head, head_output)) if self.feature_terms else None
            maps = stack.enter_context(attention_maps(model)) if self.attention else None
            out = {"logits": forward(model, batch)}
        if features is not None:
            out["features"] = self.matched(features[0], batch, role)
        if maps is not None:
            out["attention"] = self.matched_attention(maps[0], batch, role)
        return out

    def student_outputs(self, student, batch):
        simkd = "simkd" in self.feature_terms  # simkd: the projected features, else what the head reads
        head = head_of(student)
        return self.outputs(student, batch, "student", self.student_logits, head.projector if simkd else head, simkd)

    def teacher_outputs(self, teacher, batch):
        return self.outputs(teacher, batch, "teacher", self.teacher_logits,
                            head_of(teacher) if self.feature_terms else None)

    def make_loss(self, cfg, with_teacher):
        widths = (feature_width(head_of(self.student)), feature_width(head_of(self.teacher))) \
            if with_teacher and "feature" in self.kd_terms else None
        return TermsLoss(cfg.temperature, cfg.alpha if with_teacher else 0.0, cfg.unlabeled_weight,
                         self.kd_terms if with_teacher else ["kd"], cfg.feature_weight, widths)


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

    def __init__(self, temperature, alpha, unlabeled_weight, terms, feature_weight=1.0, widths=None):
        super().__init__(temperature, alpha, unlabeled_weight)
        self.terms, self.feature_weight = list(terms), feature_weight
        if "feature" in self.terms:
            self.projection = nn.Linear(*widths)

    def forward(self, student_out, teacher_out, batch):
        teacher_logits = logits_of(teacher_out) if teacher_out is not None and "kd" in self.terms else None
        out = super().forward(logits_of(student_out), teacher_logits, batch)
        if teacher_out is None or self.terms == ["kd"]:
            return out
        if "kd" not in self.terms:
            del out["kd"]
        _, _, teach, weight = self.kd_positions(batch)
        terms = {}
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
        extra = sum(value * (self.feature_weight if name in WEIGHTED_TERMS else 1.0) for name, value in terms.items())
        total = out["total"] + self.alpha * extra
        return {**out, "total": total, **{k: v.detach() for k, v in terms.items()}}
