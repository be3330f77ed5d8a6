"""TrOCR (a Hugging Face VisionEncoderDecoderModel) for --task text-recognition: loading, image preprocessing and
the frozen teacher.

A directory (or hub id) whose config.json has model_type "vision-encoder-decoder" (e.g. microsoft/trocr-large-
printed) holds the model, its tokenizer and usually its image processor (preprocessor_config.json). Weights are read
from model.safetensors only: a pickled pytorch_model.bin is refused before anything in it runs.

TrOCRTeacher reads the clean crop as its image processor says (resized to its size, RGB, rescaled, normalised by its
mean/std; without a preprocessor_config.json: the encoder's image_size with mean/std 0.5), generates greedily (at
most --max-new-tokens tokens), decodes with its tokenizer and folds the text onto the student's ASCII charset
(data.fold). It then teaches as teachers.TranscriptTeacher does, through the same PathTeacher: a one-hot CTC
path per crop, read only by sequence-level KD (--kd-terms seq). Its tokens and decoding steps do not map onto the
student's per-time-step CTC classes, so the kl and feature terms are refused (textrec_task).
"""
import dataclasses
import hashlib
import json
import logging
import os
import types

import numpy as np
import torch
from transformers import AutoTokenizer, VisionEncoderDecoderModel
from transformers.utils import cached_file

import models
from config import UserError
from textrec import data, teachers

log = logging.getLogger("docdistill")
MODEL_TYPE = "vision-encoder-decoder"


def read_json(source, name):
    """A JSON file of a model directory or hub repository, or None when it has none (or the hub is unreachable)."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
    else:
        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - no hub, no such repository: treated as "no such file"
            path = None
    if not path or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def is_vision_encoder_decoder(source):
    """Whether `source` (a directory or a hub id) holds a VisionEncoderDecoder config. Files (.onnx, .jsonl),
    missing paths and names that are not hub ids are not asked about."""
    if not source or source.endswith((".onnx", ".jsonl")) or os.path.isfile(source):
        return False
    if not os.path.isdir(source) and (source.startswith(("/", ".", "~")) or source.count("/") != 1):
        return False
    config = read_json(source, "config.json")
    return bool(config) and config.get("model_type") == MODEL_TYPE


@dataclasses.dataclass
class ImageSpec:
    """How a VisionEncoderDecoder model reads an image: PIL resize to height x width, rescale, normalise."""
    height: int
    width: int
    mean: list
    std: list
    channels: int = 3
    resample: int = 2  # PIL's BILINEAR, as ViTImageProcessor
    rescale: float = 1 / 255
    normalize: bool = True

    def array(self, image):
        """[channels, height, width] float32 of a PIL image."""
        image = image.convert("RGB" if self.channels == 3 else "L").resize((self.width, self.height), self.resample)
        pixels = np.asarray(image, np.float32) * self.rescale
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
        if self.normalize:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32)


def image_spec(source, config):
    """The model's image preprocessing: its preprocessor_config.json when it has one, else the encoder's
    image_size with mean/std 0.5."""
    encoder = config.encoder
    side = encoder.image_size
    height, width = (side, side) if isinstance(side, int) else tuple(side)
    channels = getattr(encoder, "num_channels", 3)
    spec = ImageSpec(height, width, [0.5] * channels, [0.5] * channels, channels)
    saved = read_json(source, "preprocessor_config.json") if source else None
    if saved:
        size = saved.get("size", (height, width))
        if isinstance(size, int):
            size = (size, size)
        elif isinstance(size, dict):
            size = (size.get("height", size.get("shortest_edge", height)), size.get("width", size.get("shortest_edge",
                                                                                                      width)))
        spec.height, spec.width = int(size[0]), int(size[1])
        spec.mean = list(saved.get("image_mean", spec.mean)) if saved.get("do_normalize", True) else spec.mean
        spec.std = list(saved.get("image_std", spec.std))
        spec.normalize = bool(saved.get("do_normalize", True))
        spec.rescale = float(saved.get("rescale_factor", spec.rescale)) if saved.get("do_rescale", True) else 1.0
        spec.resample = int(saved.get("resample", spec.resample))
    return spec


def refuse_pickled_weights(source):
    """A directory whose only weights are a pickled pytorch_model.bin is refused in one line (nothing in it ran)."""
    if not os.path.isdir(source):
        return
    files = set(os.listdir(source))
    if not files & {"model.safetensors", "model.safetensors.index.json"} and "pytorch_model.bin" in files:
        raise UserError(f"the pytorch_model.bin in {source} was refused, nothing in it ran: a pickled checkpoint can "
                        f"run code when loaded; give a model.safetensors copy of these weights (from their publisher, "
                        f"or converted where you trust their source)")


def has_safetensors(source):
    return not os.path.isdir(source) or bool(set(os.listdir(source)) & {"model.safetensors",
                                                                        "model.safetensors.index.json"})


def load_model(source, config=None):
    """A VisionEncoderDecoderModel from model.safetensors (directory or hub id), or from its config alone (random
    weights) when the directory holds none. Returns (model, whether weights were loaded)."""
    refuse_pickled_weights(source)
    config = config or models.load_pretrained_config(source)
    if not has_safetensors(source):
        return VisionEncoderDecoderModel(config), False
    try:
        return models.from_pretrained(VisionEncoderDecoderModel, source, use_safetensors=True), True
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the VisionEncoderDecoder weights of {source!r} (model.safetensors only): "
                        f"{str(e).splitlines()[0]}") from e


def load_tokenizer(source):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the tokenizer of {source!r}: a VisionEncoderDecoder teacher's directory needs "
                        f"its tokenizer files ({str(e).splitlines()[0]})") from e


def tokenizer_digest(tokenizer):
    """sha256 of the tokenizer's vocabulary and special tokens (what its decoding depends on)."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(blob.encode()).digest()


def generation_settings(model):
    """The generation config a greedy generate() reads (decoder start, eos, pad), checked to be usable."""
    gen = model.generation_config
    start = gen.decoder_start_token_id
    start = model.config.decoder_start_token_id if start is None else start
    if start is None:
        raise UserError("the VisionEncoderDecoder model has no decoder_start_token_id (config.json or "
                        "generation_config.json): generate() cannot start")
    return {"decoder_start_token_id": start, "eos_token_id": gen.eos_token_id, "pad_token_id": gen.pad_token_id}


@torch.no_grad()
def greedy_ids(model, pixels, max_new_tokens):
    """Greedy generate: token ids [B, L] (starting with the decoder start token)."""
    return model.generate(pixel_values=pixels.to(model.dtype), max_new_tokens=max_new_tokens, num_beams=1,
                          do_sample=False)


class TrOCRTeacher(teachers.PathTeacher):
    """A frozen VisionEncoderDecoder recogniser: its greedy, folded transcripts as one-hot CTC paths."""

    def __init__(self, source, max_new_tokens):
        super().__init__()
        config = models.load_pretrained_config(source)
        self.model, loaded = load_model(source, config)
        if not loaded:
            log.warning("teacher %s has no model.safetensors: random weights (good for timing, not for teaching)",
                        source)
        self.model.eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(source)
        self.spec = image_spec(source, config)
        self.max_new_tokens = max_new_tokens
        settings = json.dumps({"spec": dataclasses.asdict(self.spec), "max_new_tokens": max_new_tokens,
                               "generation": generation_settings(self.model)}, sort_keys=True)
        # What the transcripts depend on besides the weights: the teacher cache's key covers every buffer.
        digest = hashlib.sha256(settings.encode() + tokenizer_digest(self.tokenizer)).digest()
        self.register_buffer("settings_sha256", torch.tensor(list(digest), dtype=torch.uint8))
        self.config = types.SimpleNamespace(id2label=dict(enumerate(self.classes)), model_type=MODEL_TYPE)
        self.path = source
        files = [os.path.join(source, f) for f in ("model.safetensors",)] if os.path.isdir(source) else []
        self.weights_mb = sum(os.path.getsize(f) for f in files if os.path.exists(f)) / 1e6 or None

    def read(self, pixels, widths=None):
        """The teacher's transcripts of crops [B, C, H, W] (its image processor's input): greedy generate, decode,
        strip, fold onto the student's charset."""
        ids = greedy_ids(self.model, pixels, self.max_new_tokens)
        return [data.fold(text.strip()) for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def forward(self, pixels, lengths, steps):
        """One-hot CTC log-probabilities [B, steps, student classes] spelling each crop's transcript within its own
        `lengths` time steps."""
        return self.paths(self.read(pixels), steps, lengths).to(pixels.device)
