"""--kd-terms simkd for text recognition: SimKD (Chen et al., CVPR 2022) with an ONNX CTC recogniser as teacher.

The teacher's "penultimate features" are its sequence-encoder output (teachers.feature_tensors: PP-OCRv4's SVTR
neck, [N, T, 120]), the input of the graph's last MatMul, which with its bias (Add) and a Softmax gives the teacher's
per-step probabilities over its 6,625 classes. teacher_head() reads that MatMul's weight and bias out of the ONNX
file; attach() replaces the CRNN student's head (nn.Linear 2 hidden -> student classes) by a CTCSimKDHead:

    student encoder (BiLSTM) [B, T, 2 hidden] -> projector (nn.Linear, learned) -> [B, T, 120]
      -> teacher's linear head (frozen copy) -> softmax over the teacher's classes
      -> folded onto the student's charset (teachers.fold_matrix, as the teacher's own probabilities are folded)
      -> log: the student's per-step "logits", log-probabilities over blank + the student's charset.

Since they are log-probabilities already, log_softmax leaves them unchanged: CTC, kl and the other terms read them
as any CRNN logits. The head is heads.SimKDHead (the projector and the frozen teacher head of page
classification and word tagging) with the fold on top. Its description (widths, the teacher head's shape and the
fold: the student class of each teacher class) is the student config's `simkd_head`, so crnn.CRNN rebuilds the head
from the saved config alone: the saved student loads, predicts, evaluates and exports without the teacher.

The term (ctc_kd.simkd_mse): squared error between the projected student features and the teacher's encoder
features, averaged over the real time steps and the 120 channels. Not standardised (unlike feature_encoder): the
projected features are what the teacher's head reads, so they must match the teacher's features on the teacher's
own scale for the head's output to be the teacher's.
"""
import numpy as np
import torch
import torch.nn.functional as F

import heads
from config import UserError

LOG_FLOOR = 1e-12  # as the teacher's folded log-probabilities (teachers.OnnxRecognizer.forward)


def onnx_constants(graph):
    """{name: numpy array} of a graph's weights: its initialisers and its Constant nodes' values."""
    from onnx import numpy_helper  # heavy, only for --kd-terms simkd with an ONNX teacher
    found = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    found.update({n.output[0]: numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    return found


def teacher_head(graph):
    """(weight [teacher classes, encoder width], bias [teacher classes]) of a CTC recogniser's last linear layer:
    the MatMul (+ Add) or Gemm whose output reaches the graph's output through a Softmax; as nn.Linear stores them."""
    producer = {out: node for node in graph.node for out in node.output}
    constants = onnx_constants(graph)
    node, between = producer.get(graph.output[0].name), []
    while node is not None and node.op_type not in ("MatMul", "Gemm"):
        between.append(node)
        node = producer.get(node.input[0])
    ops = [n.op_type for n in between]
    if node is None or node.input[1] not in constants or ops not in (["Softmax"], ["Softmax", "Add"]):
        raise UserError(f"--kd-terms simkd reuses the teacher's last linear layer, which must be a MatMul (+ Add) or "
                        f"Gemm with constant weights followed by Softmax; this graph ends with {ops[::-1]} after "
                        f"{node.op_type if node is not None else 'no MatMul'}: use --kd-terms feature_encoder")
    weight = constants[node.input[1]]
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "transB" in attrs and attrs["transB"].i:
            weight = weight.T
        bias = constants.get(node.input[2]) if len(node.input) > 2 else None
    else:
        add = between[-1] if ops == ["Softmax", "Add"] else None
        bias = constants.get(next(i for i in add.input if i != node.output[0])) if add is not None else None
        if add is not None and bias is None:
            raise UserError("--kd-terms simkd: the teacher's head adds a bias that is not a constant of the graph")
    bias = np.zeros(weight.shape[1], np.float32) if bias is None else np.broadcast_to(bias, weight.shape[1:])
    return torch.tensor(np.ascontiguousarray(weight.T), dtype=torch.float32), torch.tensor(bias, dtype=torch.float32)


class CTCSimKDHead(heads.SimKDHead):
    """projector (learned) -> the teacher's linear head (frozen) -> softmax -> fold -> log.

    spec: heads.SimKDHead's {"student_width", "teacher_width", "teacher_head"} plus "fold" (the student class of
    each teacher class) and "student_classes"."""

    def __init__(self, spec):
        super().__init__(spec)
        fold = torch.zeros(len(spec["fold"]), spec["student_classes"])
        fold[torch.arange(len(spec["fold"])), torch.tensor(spec["fold"], dtype=torch.long)] = 1.0
        self.register_buffer("fold", fold, persistent=False)  # rebuilt from the config, not saved

    def forward(self, features, projected=False):
        """Log-probabilities [B, T, student classes] of encoder features [B, T, width]; with projected=True also the
        projected features [B, T, teacher width] (what the simkd term compares)."""
        z = self.projector(features)
        probs = F.softmax(self.teacher_head(z).float(), dim=-1) @ self.fold
        logp = probs.clamp_min(LOG_FLOOR).log()
        return (logp, z) if projected else logp


def attach(student, teacher):
    """Replace the CRNN student's head by a CTCSimKDHead copying the ONNX teacher's last linear layer; recorded in
    the student's config (simkd_head) so that the saved student rebuilds it."""
    weight, bias = teacher_head(teacher._model.graph)
    spec = {"student_width": student.head.in_features, "teacher_width": weight.shape[1],
            "teacher_head": [["linear", weight.shape[1], weight.shape[0]]],
            "fold": teacher.fold.argmax(1).tolist(), "student_classes": teacher.fold.shape[1]}
    if spec["student_classes"] != student.head.out_features:
        raise UserError(f"--kd-terms simkd: the teacher folds onto {spec['student_classes']} classes, the student "
                        f"has {student.head.out_features}")
    head = CTCSimKDHead(spec)
    with torch.no_grad():
        head.teacher_head[0].weight.copy_(weight)
        head.teacher_head[0].bias.copy_(bias)
    student.head = head
    student.config.simkd_head = spec
    return student
