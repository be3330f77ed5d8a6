"""A student's classification head other than its architecture's: SimKD's (Chen et al., CVPR 2022), a learned
projector to the teacher's width followed by a frozen copy of the teacher's own head. It is part of the student,
described in its config (`simkd_head`), so a saved student rebuilds it (restore_head) and predicts without its
teacher. Text recognition's version adds the fold onto the student's charset (textrec/simkd.py)."""
import torch
import torch.nn as nn

from config import UserError


def head_of(model):
    """The classification head of a (possibly DDP-wrapped) classifier: the module whose input is its features."""
    return getattr(model, "module", model).classifier


def feature_width(head):
    """Width of the features a classification head reads (its first linear layer's input)."""
    return next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features


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
    """SimKD (Chen et al., CVPR 2022): projector (student width -> teacher width, learned), then the teacher's head
    (a frozen copy), so the student's logits are the teacher head's on its projected features.

    spec: {"student_width", "teacher_width", "teacher_head": [["linear", in, out] | ["tanh"], ...]}, kept in the
    student's config (`simkd_head`) so that a saved student rebuilds its head without the teacher."""

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
