"""Teacher and student models: loading by hub id or local directory, the tiny student, label matching, int8."""
import copy
import json
import logging
import os
import pickle

import torch
from torch import nn
from safetensors.torch import load_file
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageClassification,
                          AutoModelForSequenceClassification, BeitConfig, DistilBertConfig, LayoutLMv3Config,
                          LayoutLMv3ForSequenceClassification)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil
from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil

import heads
import minilm
import utils
from config import UserError, has_weights, why_random_student

log = logging.getLogger("docdistill")

# The named student sizes (--student-size), the one place they are defined, for each student architecture; 'full'
# keeps the config as is (a pretrained student keeps its weights; the CRNN's full shape is crnn.FULL).
# LayoutLMv3: 4*coordinate_size + 2*shape_size must equal hidden_size for the 2-D position embeddings.
# CRNN (text recognition): conv channels per stage, LSTM hidden size per direction, LSTM layers.
STUDENT_SIZES = {
    "micro": {"layoutlmv3": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                 coordinate_size=12, shape_size=8),
              "distilbert": dict(dim=64, n_layers=2, n_heads=2, hidden_dim=256),
              "crnn": dict(channels=[8, 16, 32, 64], hidden=48, layers=1)},
    "small": {"layoutlmv3": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                                 coordinate_size=24, shape_size=16),
              "distilbert": dict(dim=128, n_layers=2, n_heads=2, hidden_dim=512),
              "crnn": dict(channels=[16, 32, 64, 128], hidden=96, layers=1)},
    "tiny": {"layoutlmv3": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                                coordinate_size=48, shape_size=32),
             "distilbert": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=1024),
             "crnn": dict(channels=[32, 64, 128, 256], hidden=176, layers=1)},
}
TINY_LAYOUTLMV3 = STUDENT_SIZES["tiny"]["layoutlmv3"]
TINY_DISTILBERT = STUDENT_SIZES["tiny"]["distilbert"]


DEMO_TEACHER_SHAPE = dict(image_size=128, patch_size=16, hidden_size=192, num_hidden_layers=6,
                          num_attention_heads=3, intermediate_size=768)


def demo_teacher_config(labels):
    """A small DiT (BEiT architecture, as in microsoft/dit-*) that trains on 2 CPU cores in minutes."""
    return BeitConfig(**DEMO_TEACHER_SHAPE, use_mean_pooling=True,
                      use_absolute_position_embeddings=True, use_relative_position_bias=False,
                      layer_scale_init_value=0.1, drop_path_rate=0.1,
                      id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})


# The demo's teacher that reads words, boxes and page (LayoutLMv3 architecture): 4 layers of 128 and a 128-pixel
# page, against the demo student's 2 layers of 128 (--student-size small) and 64-pixel page.
DEMO_READER_SIDE = 128
DEMO_READER_SHAPE = {**STUDENT_SIZES["small"]["layoutlmv3"], "num_hidden_layers": 4}


def demo_reader_config(labels, vocab_size, pad_token_id):
    """LayoutLMv3 teacher for the demo: DEMO_READER_SHAPE, page at 128 px; random weights."""
    config = builtin_configs()["builtin:layoutlmv3-base"]()
    config.update({**DEMO_READER_SHAPE, "vocab_size": vocab_size, "pad_token_id": pad_token_id,
                   "input_size": DEMO_READER_SIDE, "architectures": ["LayoutLMv3ForSequenceClassification"],
                   "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}})
    return config


def demo_minilm_teacher(labels):
    """LayoutLMv3 classifier with MiniLM-L6's pretrained text weights and pooler (minilm.py), reading words and
    boxes; no page image: 65 page tokens from random weights slowed its fine-tuning down (README, the demo)."""
    config = minilm.layoutlmv3_config(builtin_configs()["builtin:layoutlmv3-base"]())
    config.update({"visual_embed": False, "architectures": ["LayoutLMv3ForSequenceClassification"],
                   "id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}})
    model = LayoutLMv3ForSequenceClassification(config)
    weights = minilm.load_weights()
    minilm.copy_text_weights(model.layoutlmv3, weights)
    minilm.copy_pooler(model.classifier, weights)
    return model


def reads_page(model):
    """Whether a document teacher reads the page image (every one but a LayoutLMv3 built without visual_embed)."""
    return getattr(getattr(model, "module", model).config, "visual_embed", True)


def reads_text(model):
    """Whether a document teacher reads words and boxes (LayoutLMv3) besides the page, or only the page."""
    return getattr(model, "module", model).config.model_type == "layoutlmv3"  # DDP-wrapped in --mode teacher


def load_document_teacher(source, labels, trainable=False, vocab_size=None, pad_token_id=None):
    """Teacher for one label per page + its image processor: an image classifier (load_image_classifier), or a
    LayoutLMv3 sequence classifier that reads words, boxes and page ('demo-layoutlmv3' builds the demo's)."""
    side = DEMO_READER_SIDE
    if source in ("demo-layoutlmv3", "demo-minilm"):
        processor = LayoutLMv3ImageProcessorPil(apply_ocr=False, size={"height": side, "width": side})
        if source == "demo-layoutlmv3":
            return AutoModelForSequenceClassification.from_config(
                demo_reader_config(labels, vocab_size, pad_token_id)), processor
        return demo_minilm_teacher(labels), processor
    if source != "demo-dit" and os.path.isdir(source) and load_pretrained_config(source).model_type == "layoutlmv3":
        config = load_pretrained_config(source)
        processor = AutoImageProcessor.from_pretrained(source, backend="pil")
        return load_teacher(AutoModelForSequenceClassification, source, config, labels, trainable), processor
    return load_image_classifier(source, labels, trainable)


def from_pretrained(auto_class, source, **kwargs):
    """auto_class.from_pretrained(source), refusing weights that need unsafe unpickling in one line. A saved
    student whose head is not its architecture's (--kd-terms simkd: SimKDHead) is built from its config with that
    head, then given its weights."""
    if saved_simkd_head(source):
        model = heads.restore_head(auto_class.from_config(AutoConfig.from_pretrained(source)))
        return load_student_weights(model, load_file(os.path.join(source, "model.safetensors")), source)
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except pickle.UnpicklingError as e:  # a pytorch_model.bin holding more than tensors; nothing in it ran
        where = f"the pytorch_model.bin in {source}" if os.path.isdir(source) else f"the weights of {source!r}"
        raise UserError(f"{where} was refused, nothing in it ran: it holds pickled Python objects, which can "
                        f"run code when loaded ({utils.unsafe_pickle_reason(e)}): use a model.safetensors copy of "
                        f"these weights (from their publisher, or converted where you trust their source) "
                        f"instead") from e


def config_from_dict(config):
    """A transformers config object from a saved config's dict (the one inside a NAME_model.pth)."""
    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def saved_simkd_head(source):
    """Whether a local save_pretrained directory holds a student with a SimKD head."""
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return bool(json.load(f).get("simkd_head"))


def builtin_configs():
    """Configs that need no hub and no files: the library defaults equal these published models' configs."""
    return {"builtin:layoutlmv3-base": lambda: LayoutLMv3Config(max_position_embeddings=514, type_vocab_size=1),
            "builtin:distilbert-base-uncased": DistilBertConfig}


def load_pretrained_config(source, **overrides):
    """AutoConfig from a hub id, a directory or a builtin: name, with one-line errors instead of tracebacks."""
    if source.startswith("builtin:"):
        if source not in builtin_configs():
            raise UserError(f"unknown {source!r}: choose one of {', '.join(builtin_configs())}")
        config = builtin_configs()[source]()
        config.update(overrides)
        return config
    if source.startswith(("/", ".", "~")) and not os.path.isdir(source):  # a path, never a hub id
        raise UserError(f"{source}: no such directory (a teacher or student config is a directory with "
                        f"config.json, or a hub id)")
    try:
        return AutoConfig.from_pretrained(source, **overrides)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {source!r}: give a local directory with config.json "
                        f"or a hub id reachable from this machine ({str(e).splitlines()[0]})") from e


def normalize_label(name):
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def match_labels(model_labels, dataset_labels, who="teacher"):
    """Index map from dataset label order to model label order, matched by name, never by position."""
    model_norm = [normalize_label(n) for n in model_labels]
    data_norm = [normalize_label(n) for n in dataset_labels]
    only_model = sorted(set(model_norm) - set(data_norm))
    only_data = sorted(set(data_norm) - set(model_norm))
    if only_model or only_data or len(set(model_norm)) != len(model_norm):
        raise UserError(f"{who} labels do not match the dataset labels ({len(model_labels)} classes in the {who}, "
                        f"{len(dataset_labels)} in the dataset): only in {who}: {only_model or '-'}; "
                        f"only in dataset: {only_data or '-'}. Fine-tune the {who} on this dataset "
                        f"(--mode teacher) or use a dataset with the same classes")
    return [model_norm.index(n) for n in data_norm]


def freeze(model):
    """The teacher never trains in distillation: eval mode (no dropout) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_image_classifier(source, labels, trainable=False):
    """Teacher image classifier + its image processor.

    source: hub id, directory with weights, directory with only config.json (random weights), or 'demo-dit'.
    With trainable=True (teacher mode) a head whose labels differ from the dataset's is re-initialised.
    """
    if source == "demo-dit":
        config = demo_teacher_config(labels)
        side = DEMO_TEACHER_SHAPE["image_size"]
        processor = BeitImageProcessorPil(size={"height": side, "width": side}, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, do_center_crop=False)
        return AutoModelForImageClassification.from_config(config), processor
    config = load_pretrained_config(source)
    arch = (config.architectures or [""])[0]
    if not arch.endswith("ForImageClassification"):
        raise UserError(f"teacher {source!r} is a {arch or config.model_type} model, not an image classifier: "
                        f"give an *ForImageClassification checkpoint such as microsoft/dit-base-finetuned-rvlcdip")
    processor = AutoImageProcessor.from_pretrained(source, backend="pil")  # we only read its settings
    return load_teacher(AutoModelForImageClassification, source, config, labels, trainable), processor


def load_teacher(auto_class, source, config, labels, trainable=False):
    """A teacher with a head for `labels`: weights from the source, or random ones from a config-only directory.

    With trainable=True (teacher mode) a head whose labels differ from the dataset's is re-initialised.
    """
    model_labels = [config.id2label[i] for i in range(len(config.id2label))]
    try:
        match_labels(model_labels, labels)
        relabel = {}
    except UserError:
        if not trainable:
            raise
        log.info("teacher head re-initialised for the dataset's %d labels", len(labels))
        relabel = dict(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                       ignore_mismatched_sizes=True)
    if has_weights(source):
        return from_pretrained(auto_class, source, **relabel)
    log.warning("%s has no weights: the teacher starts from random weights", source)
    config.update({k: v for k, v in relabel.items() if k != "ignore_mismatched_sizes"})
    return auto_class.from_config(config)


def build_student(auto_class, config_source, labels, size="tiny", vocab_size=None, **config_overrides):
    """The student, built from a (hub or local) config by an Auto* class, shrunk to a STUDENT_SIZES shape unless
    'full'.

    size 'full' with a source that has weights (a hub id, or a directory holding them) starts from those
    pretrained weights; its head keeps what it learnt when the source names the same labels (its rows put in
    `labels`' order, matched by name) and is fresh otherwise. Anything else starts from random weights.
    Embedding tables (positions, 2-D positions, token types) keep the base config's sizes so inputs that
    are valid for the base model stay valid for the student.
    """
    config = load_pretrained_config(config_source)
    source_labels = [config.id2label[i] for i in sorted(config.id2label)]
    pretrained = not why_random_student(config_source, size)
    if size in STUDENT_SIZES:
        shapes = STUDENT_SIZES[size]
        config.update(shapes["distilbert"] if config.model_type == "distilbert" else shapes["layoutlmv3"])
    if vocab_size is not None and not pretrained:
        config.vocab_size = vocab_size
    config.update(config_overrides)
    config.id2label = dict(enumerate(labels))
    config.label2id = {n: i for i, n in enumerate(labels)}
    if not pretrained:
        return auto_class.from_config(config)
    if vocab_size is not None and vocab_size > config.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the pretrained student {config_source!r} only "
                        f"{config.vocab_size}: use the tokenizer it was trained with (--tokenizer)")
    log.info("student starts from the pretrained weights in %s", config_source)
    try:
        model = from_pretrained(auto_class, config_source, config=config)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the pretrained student {config_source!r} ({str(e).splitlines()[0]}): "
                        f"use --student-size tiny for a random student") from e
    match_head(model, source_labels, labels)
    return model


def match_head(model, source_labels, labels):
    """A pretrained model's classification head made to answer `labels`: its rows reordered by name when the source
    was trained on the same labels in another order (rows by position would name every class wrongly), fresh rows
    when it knew other labels."""
    layers = [m for name, m in model.named_modules() if name.startswith("classifier") and isinstance(m, nn.Linear)
              and m.out_features == len(labels)]
    if not layers:
        return
    rows = [p for p in (layers[-1].weight, layers[-1].bias) if p is not None]
    try:
        order = match_labels(source_labels, labels, who="pretrained student")
    except UserError:
        log.info("the pretrained student's head knew other labels: it starts fresh")
        order = None
    with torch.no_grad():
        for param in rows:
            if order is not None:
                param.copy_(param[order].clone())
            elif param.dim() > 1:  # as transformers initialises a Linear layer
                param.normal_(0.0, getattr(model.config, "initializer_range", 0.02))
            else:
                param.zero_()


# Models that number positions after the padding index (RoBERTa's scheme): pad_token_id + 1 positions are unused.
PADDING_OFFSET_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "layoutlmv3"}


def token_limit(config):
    """How many tokens the model's position embeddings can number."""
    offset = config.pad_token_id + 1 if config.model_type in PADDING_OFFSET_MODELS else 0
    return config.max_position_embeddings - offset


def check_max_length(max_length, config, who):
    """--max-length must fit the model's positions, or the run fails with an IndexError on the first long page."""
    limit = token_limit(config)
    if max_length > limit:
        raise UserError(f"--max-length {max_length} is more than the {limit} token positions of the {who} "
                        f"({config.model_type}, max_position_embeddings {config.max_position_embeddings}): use "
                        f"--max-length {limit} or less")


def quantize_int8(model):
    """int8 dynamic quantisation of the Linear layers (CPU kernels only; embeddings stay float).

    LayoutLMv3 reads the weights of its relative-position bias layers directly, so those stay float.
    """
    names = {name: torch.ao.quantization.default_dynamic_qconfig for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and "rel_pos" not in name}
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).cpu().eval(), names, dtype=torch.qint8)


def label_names(model):
    return [model.config.id2label[i] for i in range(len(model.config.id2label))]


def count_parameters(model):
    if hasattr(model, "onnx_parameters"):  # a frozen teacher that runs in onnxruntime: its graph's weights
        return model.onnx_parameters
    return sum(p.numel() for p in model.parameters())


def size_mb(model):
    """Size of the float weights on disk, in MB (parameters and buffers)."""
    if hasattr(model, "onnx_mb"):
        return model.onnx_mb
    tensors = list(model.state_dict().values())
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def load_student_weights(model, state_dict, source):
    """Load a student state dict, refusing one that belongs to another architecture."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f"{source} does not fit this student ({str(e).splitlines()[1].strip()}): check "
                        f"--student-config/--student-size/--task match the run that saved it") from e
    if missing or unexpected:
        raise UserError(f"{source} does not hold weights for this student ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {(missing + unexpected)[:2]}): check "
                        f"--student-config/--student-size/--task match the run that saved it")
    return model
