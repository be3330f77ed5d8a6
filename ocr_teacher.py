"""Frozen OCR teachers for text recognition.

OnnxRecognizer: a CTC recogniser in ONNX with its charset in the model's metadata (key `character`, one entry a
line), as PaddleOCR exports them; `ppocrv4` is PP-OCRv4's recogniser shipped in the rapidocr-onnxruntime wheel
(SVTR-LCNet, 6,623 characters + blank at 0 + a space at the end = 6,625 classes). Input: BGR crops at height 48,
normalised to [-1, 1], width a multiple of 8 (>= 320); output: a softmax per time step (width / 8 steps).
It runs in onnxruntime, never needs gradients, and has no torch parameters: it is an nn.Module only so the loop
can freeze it and the cache can fingerprint it (a buffer holds the sha256 of the ONNX file).

Feature distillation (--kd-terms feature_*) needs two intermediate tensors of the recogniser, which the ONNX file
does not output: `feature_tensors` finds them in the graph and `features()` runs a second session of the same
graph with them added as outputs (the session that gives the probabilities is left as it was).

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


def feature_tensors(graph):
    """Names of the backbone output and the sequence-encoder output in a CTC recogniser's ONNX graph.

    PP-OCRv4's recogniser (SVTR-LCNet, read off its graph: 860 nodes) is PPLCNetV3 -> EncoderWithSVTR -> CTC head:
      backbone: `p2o.AveragePool.1`, [N, 480, 1, W/8]: the last AveragePool of the graph (PPLCNetV3 ends with
                avg_pool2d [3, 2] at inference; the SE blocks' pools are GlobalAveragePool and come before it). It is
                the neck's input: EncoderWithSVTR concatenates it with its SVTR branch (`p2o.Concat.7`).
      encoder:  `transpose_51.tmp_0`, [N, W/8, 120]: the SVTR neck's output after its last 1x1 conv, squeezed and
                transposed to steps x channels (Im2Seq); the first input of the head's MatMul (`linear_85`,
                120 -> 6625) whose output goes through Add and Softmax to the graph output.
    The same two rules find them in any graph built this way (the tests' tiny teacher: its AveragePool over 48 x 8
    cells, and the input of its MatMul). Returns {"backbone": name, "encoder": name}.
    """
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type not in ("MatMul", "Gemm"):  # back through Softmax, Add, Reshape...
        node = producer.get(node.input[0])
    pools = [n for n in graph.node if n.op_type == "AveragePool"]
    if node is None or not pools:
        raise UserError("the teacher's ONNX graph has no AveragePool (backbone) or no MatMul head (sequence "
                        "encoder) before its output: feature terms need a CTC recogniser built like PP-OCR's")
    return {"backbone": pools[-1].output[0], "encoder": node.input[0]}


def steps_last(array):
    """[N, C, 1, T] (a conv feature map) or [N, T, C] (a sequence) -> [N, T, C] float32 torch."""
    tensor = torch.from_numpy(np.asarray(array, np.float32))
    return tensor.mean(2).transpose(1, 2) if tensor.dim() == 4 else tensor


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
        self._model, self._options, self._feature_session, self._feature_dims = model, options, None, None

    def feature_session(self):
        """A session of the same graph with the backbone and encoder tensors as extra outputs (built once)."""
        if self._feature_session is None:
            import onnx
            import onnxruntime as ort
            model = onnx.ModelProto()
            model.CopyFrom(self._model)
            self.feature_names = feature_tensors(model.graph)
            model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in self.feature_names.values())
            self._feature_session = ort.InferenceSession(model.SerializeToString(), self._options,
                                                         providers=["CPUExecutionProvider"])
        return self._feature_session

    def feature_dims(self):
        """{"backbone": channels, "encoder": channels} (one run on a blank 48 x 320 crop)."""
        if self._feature_dims is None:
            out = self.features(torch.zeros(1, 3, textrec.TEACHER_HEIGHT, textrec.MIN_TEACHER_WIDTH), [320])
            self._feature_dims = {k: out[k].shape[-1] for k in ("backbone", "encoder")}
        return self._feature_dims

    def features(self, pixels, widths):
        """forward()'s folded log-probabilities and the intermediate tensors, per time step, as a dict:
        {"logits": [B, T, student classes], "backbone": [B, T, C_b], "encoder": [B, T, C_e]}; steps past a crop's
        own P_i / 8 are 0 (masked by the loss), as in forward()."""
        session = self.feature_session()
        names = [session.get_outputs()[0].name, *self.feature_names.values()]
        pixels = pixels.cpu().numpy()
        steps, widths, out = pixels.shape[-1] // textrec.STEP, [int(w) for w in widths], {}
        for width in sorted(set(widths)):
            rows = [i for i, w in enumerate(widths) if w == width]
            probs, *feats = session.run(names, {self.input_name: np.ascontiguousarray(pixels[rows, :, :, :width],
                                                                                        np.float32)})
            found = {"logits": (torch.from_numpy(probs).float() @ self.fold).clamp_min(1e-12).log(),
                     **{k: steps_last(f) for k, f in zip(self.feature_names, feats)}}
            for k, value in found.items():
                if k not in out:
                    out[k] = torch.zeros(len(widths), steps, value.shape[-1])
                out[k][rows, :value.shape[1]] = value
        return out

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
