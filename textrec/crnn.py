"""The student recogniser: a small CRNN (conv backbone + BiLSTM + CTC head), saved as safetensors + JSON.

Input: grey crops [B, 1, H, W] normalised to [-1, 1] (H = --student-height, 32 by default). The backbone halves
the width twice and the height to 1: W / 4 time steps, each a vector of `channels[-1]`; a BiLSTM (1 layer in
`tiny`, 2 in `full`) reads them in order and a linear head gives per-step logits over blank + the charset (a SimKD
student, --kd-terms simkd: a projector and the teacher's frozen head instead, simkd.CTCSimKDHead).
"""
import json
import os

import torch.nn as nn
from safetensors.torch import load_file, save_file

import models
from textrec import simkd

FULL = dict(channels=[64, 128, 256, 256], hidden=192, layers=2)  # --student-size full; the others: models.STUDENT_SIZES


class CRNNConfig:
    model_type = "crnn-ctc"

    def __init__(self, chars, height=32, channels=(32, 64, 128, 160), hidden=128, layers=2, simkd_head=None,
                 label_conventions=None, **_):
        self.chars, self.height, self.channels, self.hidden, self.layers = chars, height, list(channels), hidden, layers
        self.simkd_head = simkd_head  # --kd-terms simkd: the head is simkd.CTCSimKDHead(simkd_head)
        self.label_conventions = label_conventions  # what --label-conventions found and taught (a record, no effect)
        self.id2label = dict(enumerate(["<blank>"] + list(chars)))

    def to_dict(self):
        return {"model_type": self.model_type, "chars": self.chars, "height": self.height, "channels": self.channels,
                "hidden": self.hidden, "layers": self.layers,
                **({"simkd_head": self.simkd_head} if self.simkd_head else {}),
                **({"label_conventions": self.label_conventions} if self.label_conventions else {})}

    def to_json_string(self):
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values):
        return cls(**{k: v for k, v in values.items() if k != "model_type"})


def block(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class CRNN(nn.Module):
    """conv(c1, stride 2) | conv(c2) pool 2x2 | conv(c3) pool (4,1) | conv(c4) | mean over the 2 rows left."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        c1, c2, c3, c4 = config.channels
        self.backbone = nn.Sequential(
            *block(1, c1, stride=2),
            *block(c1, c2), nn.MaxPool2d(2, 2),
            *block(c2, c3), nn.MaxPool2d((4, 1), (4, 1)),
            *block(c3, c4))
        self.encoder = nn.LSTM(c4, config.hidden, num_layers=config.layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * config.hidden, len(config.id2label))
        if config.simkd_head:  # a SimKD student: projector + the teacher's frozen head, folded (textrec.simkd)
            self.head = simkd.CTCSimKDHead(config.simkd_head)

    def features(self, pixels):
        """Backbone features [B, T, c4] and sequence-encoder features [B, T, 2 * hidden]."""
        backbone = self.backbone(pixels).mean(2).transpose(1, 2)
        encoded, _ = self.encoder(backbone)
        return backbone, encoded

    def forward(self, pixels, features=False):
        """Per-step logits [B, T, classes]; with features=True a dict of the logits and the features() as well
        ({"logits", "backbone", "encoder"}: what feature distillation reads; export and predict take the logits;
        a SimKD student adds "projected", its encoder features projected to the teacher's width)."""
        backbone, encoded = self.features(pixels)
        if not features:
            return self.head(encoded)
        if self.config.simkd_head:
            logits, projected = self.head(encoded, projected=True)
            return {"logits": logits, "backbone": backbone, "encoder": encoded, "projected": projected}
        return {"logits": self.head(encoded), "backbone": backbone, "encoder": encoded}

    def feature_dims(self):
        return {"backbone": self.config.channels[-1], "encoder": 2 * self.config.hidden}

    def save_pretrained(self, directory):
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()},
                  os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json"), "w") as f:
            f.write(self.config.to_json_string())

    @classmethod
    def from_pretrained(cls, directory):
        with open(os.path.join(directory, "config.json")) as f:
            model = cls(CRNNConfig.from_dict(json.load(f)))
        model.load_state_dict(load_file(os.path.join(directory, "model.safetensors")))
        return model


def from_saved(config, weights, path):
    """A saved CRNN student: its student/ directory (weights None: safetensors + JSON config read from `path`) or
    the config and state dict of a student_model.pth (saved.read_student reads both, checksums verified)."""
    if weights is None:
        return CRNN.from_pretrained(path)
    return models.load_student_weights(CRNN(CRNNConfig.from_dict(config)), weights, path)


def build(chars, height, size):
    shape = FULL if size == "full" else models.STUDENT_SIZES[size]["crnn"]
    return CRNN(CRNNConfig(chars, height=height, **shape))
