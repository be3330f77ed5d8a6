"""The CRNN student behind PaddleOCR's recogniser contract: a drop-in replacement for PP-OCR's rec model.

PaddleOCR and RapidOCR feed a recogniser float crops [N, 3, 48, W]: BGR, (x / 255 - 0.5) / 0.5, resized to height
48 and width ceil(48 w / h), right-padded with 0 to the widest crop of the batch (at least 320); they read per-step
probabilities [N, T, C] with the CTC blank at index 0, decoded by greedy CTC over `["blank"] + character + [" "]`,
where `character` is the model's metadata (one character a line: RapidOCR adds the blank first and the space last
itself). PPOCRStudent puts everything the student needs between the two, inside the graph:

    BGR [-1, 1] -> grey (ITU-R 601 luma, as PIL's convert("L"): 0.299 R + 0.587 G + 0.114 B)
      -> height 48 -> the student's height (a fixed [h, 48] matrix: PIL's bilinear resize, data.height_matrix)
      -> width W -> ceil(W / 2) (the student reads half the teacher's width: PIL's bilinear at scale 2, the kernel
         [1, 3, 3, 1] / 8 at stride 2, renormalised at the edges: data.half_width)
      -> the CRNN -> softmax -> the classes reordered: blank, the student's characters without the space, the space.

This is the arithmetic of the student's own preprocessing (data.student_pixels, read by training and predict), so
the graph gives the PyTorch student's probabilities on the same crop up to float rounding and the 8-bit grey
(PIL's convert("L") rounds; the graph does not) and the columns at a crop's right edge, where RapidOCR's padding
of a batch meets the crop. No code of ours runs at inference: `RapidOCR(rec_model_path=...)` reads the file.
"""
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from textrec import data

LUMA_BGR = (0.114, 0.587, 0.299)  # PIL's convert("L") weights (ITU-R 601-2), in BGR channel order


def character_list(chars):
    """The `character` metadata: the student's characters without the space, in its order (RapidOCR and
    PaddleOCR append the space, and prepend the blank, themselves)."""
    return [c for c in chars if c != " "]


def class_order(chars):
    """Student class ids in PP-OCR's output order: blank, the characters of character_list(), the space."""
    return [data.BLANK] + [k + 1 for k, c in enumerate(chars) if c != " "] + \
        [chars.index(" ") + 1 if " " in chars else data.BLANK]


class PPOCRStudent(nn.Module):
    """PP-OCR's recogniser contract around a CRNN student: [N, 3, 48, W] BGR in [-1, 1] -> probabilities
    [N, W / 8, len(chars) + 1] in PP-OCR's class order (class_order)."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        chars = student.config.chars
        self.register_buffer("luma", torch.tensor(LUMA_BGR).view(1, 3, 1, 1))
        self.register_buffer("rows", torch.from_numpy(data.height_matrix(data.TEACHER_HEIGHT, student.config.height)))
        self.register_buffer("kernel", torch.tensor(data.HALF_WIDTH_KERNEL).view(1, 1, 1, 4))
        self.register_buffer("order", torch.tensor(class_order(chars), dtype=torch.long))

    def student_pixels(self, pixels):
        """The student's grey crop [N, 1, height, W / 2] of PP-OCR's input [N, 3, 48, W]."""
        grey = (pixels * self.luma).sum(1, keepdim=True)
        grey = torch.matmul(self.rows, grey)  # [h, 48] @ [N, 1, 48, W]
        # data.half_width: one pad on the left, two on the right, ceil(W / 2) outputs, renormalised at the edges
        weight = F.conv2d(F.pad(torch.ones_like(grey[:1]), (1, 2)), self.kernel, stride=(1, 2))
        return F.conv2d(F.pad(grey, (1, 2)), self.kernel, stride=(1, 2)) / weight

    def forward(self, pixels):
        logits = self.student(self.student_pixels(pixels))
        return torch.softmax(logits.float(), dim=-1).index_select(-1, self.order)


def export(student, path, sample, opset):
    """Write the PP-OCR-contract recogniser of `student` to `path` (dynamic batch and width; the `character`
    metadata), traced on `sample` [N, 3, 48, W]."""
    import onnx  # heavy: only when exporting
    wrapper = PPOCRStudent(student).eval()
    with warnings.catch_warnings():  # the stride-2 slices of the LSTM export cannot be constant-folded: harmless
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(wrapper, (sample,), path, input_names=["x"], output_names=["softmax"],
                          dynamic_axes={"x": {0: "batch", 3: "width"}, "softmax": {0: "batch", 1: "steps"}},
                          opset_version=opset, dynamo=False)
    student.eval()
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {"character": "\n".join(character_list(student.config.chars)),
                                        "producer": "docdistill CRNN student (textrec/dropin.py)"})
    onnx.save(model, path)
    return wrapper


def ppocr_batch(crops, max_width):
    """PP-OCR's recogniser input for RGB crops, as RapidOCR builds it (textrec.data's teacher preprocessing: height 48,
    cv2 resize, BGR, normalised), right-padded with 0 to the widest (at least 320): [N, 3, 48, P] float32."""
    arrays = [data.teacher_array(data.resize_for_teacher(crop, max_width)) for crop in crops]
    batch = np.zeros((len(arrays), 3, data.TEACHER_HEIGHT, data.padded_width(max(a.shape[2] for a in arrays))),
                     np.float32)
    for i, array in enumerate(arrays):
        batch[i, :, :, :array.shape[2]] = array
    return batch


def greedy_texts(probs, chars):
    """Greedy CTC transcripts of PP-OCR-ordered probabilities [N, T, C], as RapidOCR decodes them."""
    labels = ["<blank>"] + character_list(chars) + [" "]
    return ["".join(labels[c] for c in data.ctc_greedy(row.argmax(-1).tolist())) for row in np.asarray(probs)]
