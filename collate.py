"""Batching: the DataLoader of a split, collators that pad each batch to its own longest document and normalise
the pages, and the lean variants of a split and a collator for training with a cached teacher (no teacher pages
read).
"""
import copy

import torch
from torch.utils.data import DataLoader

import dataset
import recipe
from losses import IGNORE_INDEX


def make_loader(task, split, cfg, shuffle, lean=False):
    """The DataLoader of task.splits[split]: in the seeded epoch order (recipe.EpochShuffle, batches of similar
    length with --group-by-length) when shuffle, else in order. lean: batches without the teacher's pixels (training
    with a cached teacher, whose outputs are looked up by index): the preprocessed teacher pages are neither read
    from the split nor collated. The order is the same."""
    data = task.splits[split]
    collator = task.collator
    if lean:
        data, collator = without_teacher_pixel_columns(data), without_teacher_pixels(collator)
    lengths = None
    if cfg.group_by_length and "n_tokens" in data.column_names:
        lengths = [int(n) for n in data.with_format(None)["n_tokens"]]
    sampler = recipe.EpochShuffle(len(data), cfg.seed, cfg.batch_size, lengths) if shuffle else None
    if sampler is not None and hasattr(collator, "follow_epochs"):  # text recognition's --augment: by epoch
        collator = collator.follow_epochs(sampler)
    # Its own generator: each new iterator draws a worker base seed, which must not advance the global RNG
    # (a resumed run makes one iterator more than an uninterrupted one, and dropout would drift).
    return DataLoader(data, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(cfg.seed))


def without_teacher_pixel_columns(split):
    """The preprocessed split without its teacher pages (the `teacher_pixels` column; a view, nothing is copied),
    for the training batches of a run with a cached teacher: they are then never read from disk. Text
    recognition has no such column (its teacher crop is made from the student's image, in the collator)."""
    drop = [c for c in ("teacher_pixels",) if c in split.column_names]
    return split.remove_columns(drop) if drop else split


def without_teacher_pixels(collator):
    """A copy of a task's collator whose batches leave out the teacher's page (teacher_pixel_values): for the
    training batches of a run whose teacher outputs come from the teacher cache (looked up by `index`), so no
    teacher page is read, resized or normalised. A wrapper (tasks.RelabelledCollator) gets a lean copy inside."""
    lean = copy.copy(collator)
    if hasattr(collator, "teacher_pixels"):
        lean.teacher_pixels = False
    elif hasattr(collator, "collator"):
        lean.collator = without_teacher_pixels(collator.collator)
    else:
        raise TypeError(f"{type(collator).__name__} has no teacher_pixels switch")
    return lean


class ClassificationCollator:
    """Pads each batch to its own longest sequence (or to pad_to, the naive way) and normalises the pages.

    teacher_pixels False: no teacher_pixel_values (a cached teacher; without_teacher_pixels); nor are there any
    without a teacher_spec (a teacher that reads no page: none were stored)."""

    def __init__(self, pad_token_id, student_spec, teacher_spec, pad_to=None, teacher_pixels=True):
        self.pad_token_id, self.pad_to = pad_token_id, pad_to
        self.student_spec = student_spec
        self.teacher_spec = teacher_spec
        self.teacher_pixels = teacher_pixels and teacher_spec is not None

    def __call__(self, docs):
        longest = self.pad_to or max(len(d["input_ids"]) for d in docs)
        labels = torch.tensor([int(d["label"]) for d in docs])
        input_ids = torch.full((len(docs), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(docs), longest), dtype=torch.long)
        bbox = torch.zeros((len(docs), longest, 4), dtype=torch.long)
        for i, d in enumerate(docs):
            n = len(d["input_ids"])
            input_ids[i, :n] = torch.as_tensor(d["input_ids"])
            attention_mask[i, :n] = 1
            bbox[i, :n] = torch.as_tensor(d["bbox"])
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "bbox": bbox,
            "pixel_values": dataset.normalize_pixels(torch.stack([torch.as_tensor(d["student_pixels"]) for d in docs]),
                                             self.student_spec),
            "labels": labels,
            "labeled": labels != IGNORE_INDEX,  # unlabelled documents (--unlabeled) are taught by the teacher only
            "index": torch.tensor([int(d["index"]) for d in docs]),
        }
        if self.teacher_pixels:
            batch["teacher_pixel_values"] = dataset.normalize_pixels(
                torch.stack([torch.as_tensor(d["teacher_pixels"]) for d in docs]), self.teacher_spec)
        return batch
