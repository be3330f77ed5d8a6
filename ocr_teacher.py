"""Frozen OCR teachers for text recognition.

OnnxRecognizer: a CTC recogniser in ONNX with its charset in the model's metadata (key `character`, one entry a
line), as PaddleOCR exports them; `ppocrv4` is PP-OCRv4's recogniser shipped in the rapidocr-onnxruntime wheel
(SVTR-LCNet, 6,623 characters + blank at 0 + a space at the end = 6,625 classes). Input: BGR crops at height 48,
normalised to [-1, 1], width a multiple of 8 (>= 320); output: a softmax per time step (width / 8 steps).
It runs in onnxruntime, never needs gradients, and has no torch parameters: it is an nn.Module only so the loop
can freeze it and the cache can fingerprint it (a buffer holds the sha256 of the ONNX file).

TranscriptTeacher: transcripts from any engine, as JSONL rows {"key": crop key, "text": ...}: its "distribution"
is a one-hot CTC path spelling the transcript, so only sequence-level KD (--kd-terms seq) makes sense with it.
"""
import hashlib
import json
import os
import types

import numpy as np
import torch
import torch.nn as nn

import textrec
from config import UserError


def ppocrv4_path():
    try:
        import rapidocr_onnxruntime
    except ImportError as e:
        raise UserError("--teacher ppocrv4 needs the rapidocr-onnxruntime wheel (pip install "
                        "rapidocr-onnxruntime), or give the path of a CTC recogniser .onnx") from e
    return os.path.join(os.path.dirname(rapidocr_onnxruntime.__file__), "models", "ch_PP-OCRv4_rec_infer.onnx")


def fold_matrix(classes):
    """[teacher classes, student classes] 0/1: teacher class c adds its probability to student class fold(c).

    Blank stays blank; a character that folds to exactly one ASCII character goes there (`，` -> `,`, `Ａ` -> `A`);
    every other character (CJK, symbols, ligatures that fold to several characters) goes to blank, so the
    student learns to emit nothing where the teacher read a character it cannot write.
    """
    matrix = np.zeros((len(classes), len(textrec.STUDENT_CHARS) + 1), np.float32)
    for c, char in enumerate(classes):
        matrix[c, textrec.BLANK if c == 0 else textrec.fold_char(char)] = 1.0
    return matrix


class OnnxRecognizer(nn.Module):
    def __init__(self, path, threads=None):
        super().__init__()
        import onnx
        import onnxruntime as ort
        if path == "ppocrv4":
            path = ppocrv4_path()
        if not os.path.isfile(path):
            raise UserError(f"--teacher {path}: no such ONNX file (text recognition takes 'ppocrv4', a CTC "
                            f"recogniser .onnx with a `character` metadata entry, or a transcripts .jsonl)")
        with open(path, "rb") as f:
            blob = f.read()
        model = onnx.load_from_string(blob)
        meta = {p.key: p.value for p in model.metadata_props}
        if "character" not in meta:
            raise UserError(f"{path} has no `character` metadata: export the recogniser with its charset")
        self.classes = ["<blank>"] + meta["character"].splitlines() + [" "]
        self.register_buffer("onnx_sha256", torch.tensor(list(hashlib.sha256(blob).digest()), dtype=torch.uint8))
        self.config = types.SimpleNamespace(id2label=dict(enumerate(self.classes)), model_type="onnx-ctc")
        # Weights are initialisers or Constant nodes, depending on the exporter.
        constants = [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        self.onnx_parameters = int(sum(np.prod(t.dims) for t in list(model.graph.initializer) + constants))
        self.onnx_mb = len(blob) / 1e6
        options = ort.SessionOptions()
        threads = threads if threads is not None else int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.fold = torch.from_numpy(fold_matrix(self.classes))
        self.path = path

    def probs(self, pixels):
        """Softmax per time step [N, P / 8, classes] for crops [N, 3, 48, P] of one width (numpy float32)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(pixels, np.float32)})[0]

    def forward(self, pixels, widths):
        """Folded log-probabilities [B, T, student classes]; crops of the same width run as one batch.

        Each crop runs at its own width P_i (so its output does not depend on the batch it is in); steps past
        P_i / 8 are 0 and masked by the loss.
        """
        pixels = pixels.cpu().numpy()
        out = torch.zeros(len(widths), pixels.shape[-1] // textrec.STEP, self.fold.shape[1])
        widths = [int(w) for w in widths]
        for width in sorted(set(widths)):
            rows = [i for i, w in enumerate(widths) if w == width]
            probs = torch.from_numpy(self.probs(pixels[rows, :, :, :width]))
            folded = probs.float() @ self.fold
            out[rows, :folded.shape[1]] = folded.clamp_min(1e-12).log()
        return out

    def read(self, pixels, widths):
        """The teacher's own transcripts: greedy CTC in its charset, then folded onto ASCII."""
        pixels, texts = pixels.cpu().numpy(), []
        for i, width in enumerate(int(w) for w in widths):
            best = self.probs(pixels[i:i + 1, :, :, :width])[0].argmax(-1)
            texts.append(textrec.fold("".join(self.classes[c] for c in textrec.ctc_greedy(best))))
        return texts


class TranscriptTeacher(nn.Module):
    """Transcripts from another engine, looked up by crop key; a one-hot CTC path per crop."""

    def __init__(self, path):
        super().__init__()
        with open(path, "rb") as f:
            blob = f.read()
        self.texts = {}
        for k, line in enumerate(blob.decode("utf-8").splitlines()):
            if line.strip():
                row = json.loads(line)
                if not {"key", "text"} <= set(row):
                    raise UserError(f"{path} line {k + 1}: each row needs 'key' (the crop's key) and 'text'")
                self.texts[row["key"]] = textrec.fold(row["text"])
        self.register_buffer("sha256", torch.tensor(list(hashlib.sha256(blob).digest()), dtype=torch.uint8))
        self.classes = textrec.student_labels()
        self.config = types.SimpleNamespace(id2label=dict(enumerate(self.classes)), model_type="transcripts")
        self.onnx_parameters, self.onnx_mb, self.path = 0, 0.0, path

    def path_of(self, text, steps):
        """One-hot log-probabilities spelling `text` as c1 blank c2 blank ... (blank-padded) over `steps` steps."""
        ids = []
        for c in textrec.encode(text):
            ids += [c, textrec.BLANK]
        ids = (ids + [textrec.BLANK] * steps)[:steps]
        logp = torch.full((steps, len(self.classes)), -1e4)
        logp[torch.arange(steps), torch.tensor(ids, dtype=torch.long)] = 0.0
        return logp

    def forward_keys(self, keys, steps):
        missing = [k for k in keys if k not in self.texts]
        if missing:
            raise UserError(f"{self.path} has no transcript for crop {missing[0]!r} ({len(missing)} in this batch)")
        return torch.stack([self.path_of(self.texts[k], steps) for k in keys])
