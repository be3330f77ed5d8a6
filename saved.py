"""Saved models: what a run writes as its best model, and the one reader of saved students' files.

A run saves its best model twice (save_best): NAME_model.pth (the state dict and the config as JSON; tensors and
strings only, read with weights_only, with the sha256 of its tensors) and a save_pretrained directory NAME/ that
plain transformers loads, with CHECKSUMS beside its weights: the sha256 of every weights file in it. read_student()
checks both forms and refuses a changed byte in one line ("... is corrupt"); a saved model read as a teacher is
checked the same way (verify_directory). Files written before docdistill saved
checksums are read with a warning. Building the model from what is read is the task's part (registry.load_student).
"""
import hashlib
import json
import logging
import os

import recipe
import utils
from config import UserError

log = logging.getLogger("docdistill")
CHECKSUMS = "checksums.json"  # {"sha256": {file name: hex digest}} of a saved directory's weights files
WEIGHTS_SUFFIXES = (".safetensors", ".bin")


def save_best(task, model, out_dir, name):
    """The best model so far: NAME_model.pth (weights + JSON config, with a checksum of its tensors) and the
    save_pretrained directory NAME/ (task.save_pretrained, then CHECKSUMS). A LoRA model is saved with its adapters
    merged in: a plain model of its architecture."""
    model = recipe.merged(model)
    if getattr(model.config, "architectures", "") is None:  # named in the .pth too, as save_pretrained names it
        model.config.architectures = [type(model).__name__]
    best = {"state_dict": model.state_dict(), "config": model.config.to_json_string()}
    utils.atomic_torch_save(utils.with_checksum(best), os.path.join(out_dir, f"{name}_model.pth"))

    def write(directory):
        task.save_pretrained(model, directory, role=name)
        write_checksums(directory)
    utils.atomic_dir(os.path.join(out_dir, name), write)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory):
    """CHECKSUMS: the sha256 of every weights file of a save_pretrained directory."""
    sums = {name: file_sha256(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name.endswith(WEIGHTS_SUFFIXES)}
    with open(os.path.join(directory, CHECKSUMS), "w") as f:
        json.dump({"sha256": sums}, f, indent=2)


def verify_directory(directory, warn_missing=False):
    """Refuse a saved directory whose weights files no longer match its CHECKSUMS; a directory without one (written
    elsewhere, or before docdistill saved them) is read as it is, with a warning when warn_missing."""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.exists(path):
        if warn_missing:
            log.warning("%s has no %s (written before docdistill saved them): its weights are not verified",
                        directory, CHECKSUMS)
        return
    try:
        with open(path) as f:
            sums = json.load(f)["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not readable ({utils.first_line(e)}): use an intact copy of {directory}") from e
    for name, expected in sums.items():  # a missing file is the loader's to report (it looks for other weights)
        weights = os.path.join(directory, name)
        if os.path.exists(weights) and file_sha256(weights) != expected:
            raise UserError(f"{weights} is corrupt: its bytes do not match the checksum saved with it (changed on "
                            f"disk or in a copy): use an intact copy, or train again")


def read_student_file(path):
    """A NAME_model.pth's {"state_dict", "config"}, read safely (tensors and strings only), checksum verified."""
    saved = utils.safe_torch_load(path)
    if not isinstance(saved, dict) or not {"state_dict", "config"} <= set(saved):
        raise UserError(f"{path} is not a docdistill student (expected student_model.pth or a student/ "
                        f"directory written by --mode train)")
    utils.verify_checksum(saved, path)
    return saved


def student_directory(path):
    """The save_pretrained directory of a saved student path: the directory itself, or student/ beside a .pth or
    an exported .onnx (where the tokenizer, image processor and config are)."""
    if os.path.isdir(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(path)), "student" if path.endswith(".pth") else "")


def read_config(path):
    """The config (a dict) of a saved student: its directory's config.json, or the one inside a .pth."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise UserError(f"{path} has no config.json: give the student/ directory written by --mode train (or "
                            f"student_model.pth beside it)")
        with open(config_path) as f:
            return json.load(f)
    return json.loads(read_student_file(path)["config"])


def read_student(path):
    """(config dict, state dict or None) of a saved student, every checksum verified: a NAME_model.pth gives its
    state dict; a save_pretrained directory gives None (the task's loader reads its safetensors)."""
    if os.path.isdir(path):
        verify_directory(path, warn_missing=True)
        return read_config(path), None
    saved = read_student_file(path)
    return json.loads(saved["config"]), saved["state_dict"]


def label_names(path):
    """The class names a saved student knows, or None when the path holds no readable student (the loader then
    says what is wrong)."""
    try:
        id2label = read_config(path)["id2label"]
        return [id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label))]
    except Exception:  # noqa: BLE001 - anything unreadable is reported by registry.load_student
        return None
