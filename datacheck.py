"""Checks on raw data that turn what would be a traceback deep inside a run into one line naming the problem.

Split-level problems (an empty split, text files that are not UTF-8, class names as strings, image paths) are
handled here when the data is loaded; document-level problems are flagged while preprocessing and dropped or
reported by --on-bad-sample (dataset.drop_bad_documents).
"""
import codecs
import json
import os

import datasets
import numpy as np

from config import UserError

CHUNK = 1 << 20  # bytes read at a time when checking a text file
BOX_TOLERANCE = 0.02  # a word box may stick out of the page by 2% of its side (OCR rounding, tight crops)


def text_file_problem(path):
    """Why a JSON/JSON Lines file cannot be read as data (not UTF-8, or no content), or ""."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, has_content = 0, False
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            try:
                has_content = bool(decoder.decode(chunk).strip()) or has_content
            except UnicodeDecodeError as e:
                return not_utf8(path, e, offset)
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        return not_utf8(path, e, offset)
    return "" if has_content else f"{path} is empty: add documents to it, or remove it"


def not_utf8(path, error, offset=0):
    return (f"{path} is not UTF-8 text (byte {offset + error.start}: {error.reason}): save it as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8`")


def check_text_files(paths):
    for path in paths:
        if problem := text_file_problem(path):
            raise UserError(problem)


def check_not_empty(data):
    """Every split has documents (an empty one fails later in ways that do not name it)."""
    for name, split in data.items():
        if len(split) == 0:
            raise UserError(empty_split(name))


def check_saved_splits(directory):
    """A save_to_disk directory whose splits all hold data (datasets cannot load one with an empty split)."""
    index = os.path.join(directory, "dataset_dict.json")
    splits = [""]  # a single saved Dataset
    if os.path.exists(index):
        with open(index) as f:
            splits = json.load(f)["splits"]
    for name in splits:
        with open(os.path.join(directory, name, "state.json")) as f:
            if not json.load(f)["_data_files"]:
                raise UserError(empty_split(name or "train"))


def empty_split(name):
    return f"split {name!r} is empty (0 documents): add documents to it, or remove it from the data"


def resolve_image_paths(split, folder):
    """An 'image' column of file paths (relative ones from `folder`) -> an Image column reading those files."""
    if split.features.get("image") != datasets.Value("string"):
        return split
    split = split.map(lambda path: {"image": path if not path or os.path.isabs(path) else os.path.join(folder, path)},
                      input_columns="image")
    return split.cast_column("image", datasets.Image())


def encode_string_labels(data, train_split):
    """A 'label' column of class names -> a ClassLabel with the training split's names (sorted), in every split."""
    train = data[train_split]
    if "label" not in train.column_names or train.features["label"] != datasets.Value("string"):
        return data
    names = set(train["label"])
    if None in names:
        raise UserError(f"split {train_split!r} has documents without a label: give every document its class name")
    for name, split in data.items():
        if unknown := set(split["label"]) - names:
            raise UserError(f"split {name!r} has labels {sorted(map(str, unknown))[:5]} that no training document "
                            f"has: give every document one of the training split's class names")
    classes = datasets.ClassLabel(names=sorted(names))
    return datasets.DatasetDict({name: split.cast_column("label", classes) for name, split in data.items()})


def box_problem(boxes, width, height, fix):
    """Why word boxes [x0, y0, x1, y1] cannot be used on a width x height page, or "": `fix` says which units
    they must be in."""
    if len(boxes) == 0:
        return ""
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        b = np.zeros(0)
    if b.ndim != 2 or b.shape[1] != 4 or not np.isfinite(b).all():
        bad = next((i for i, box in enumerate(boxes) if not _four_numbers(box)), 0)
        return f"word box {bad} {boxes[bad]!r} is not 4 numbers: boxes must be [x0, y0, x1, y1] in {fix}"
    inverted = np.flatnonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if inverted.size:
        return (f"word box {inverted[0]} {list(boxes[inverted[0]])} is inverted (x1 < x0 or y1 < y0): boxes must "
                f"be [x0, y0, x1, y1], not [x, y, width, height]")
    page = np.array([width, height, width, height], dtype=np.float64)
    outside = np.flatnonzero(((b < -BOX_TOLERANCE * page) | (b > (1 + BOX_TOLERANCE) * page)).any(axis=1))
    if outside.size:
        return f"word box {outside[0]} {list(boxes[outside[0]])} lies outside the {width}x{height} page: boxes must " \
               f"be in {fix}"
    return ""


def _four_numbers(box):
    try:
        return len(box) == 4 and all(np.isfinite(float(v)) for v in box)
    except (TypeError, ValueError):
        return False
