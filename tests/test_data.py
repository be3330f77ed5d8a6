"""Box normalisation, label matching, image preprocessing and lean batching."""
import numpy as np
import pytest
import torch
from PIL import Image

import collate
import dataset
import models
from config import UserError


def test_boxes_scaled_to_0_1000():
    assert dataset.normalize_boxes([[50, 100, 150, 200]], width=200, height=400) == [[250, 250, 750, 500]]


def test_boxes_clamped_and_inverted_corners_ordered():
    boxes = dataset.normalize_boxes([[-5, 10, 210, 20], [150, 300, 50, 100]], width=200, height=400)
    assert boxes == [[0, 25, 1000, 50], [250, 250, 750, 750]]
    assert all(0 <= v <= 1000 for box in boxes for v in box)


def test_labels_matched_by_name_not_position():
    teacher = ["letter", "form", "Email", "file_folder"]
    data = ["file folder", "email", "letter", "form"]
    order = models.match_labels(teacher, data)
    assert order == [3, 2, 0, 1]
    logits = torch.tensor([[10.0, 20.0, 30.0, 40.0]])  # teacher order
    assert logits[:, order].tolist() == [[40.0, 30.0, 10.0, 20.0]]  # dataset order


def test_label_mismatch_lists_the_differing_names():
    with pytest.raises(UserError) as e:
        models.match_labels(["letter", "form", "memo"], ["letter", "form", "receipt"])
    assert "memo" in str(e.value) and "receipt" in str(e.value)


def test_resize_and_normalize_equal_the_image_processor():
    from transformers.models.beit.image_processing_pil_beit import BeitImageProcessorPil
    rng = np.random.default_rng(0)
    page = Image.fromarray(rng.integers(0, 255, (300, 230), dtype=np.uint8), mode="L")
    processor = BeitImageProcessorPil(size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                      do_center_crop=False)
    spec = dataset.image_spec(processor)
    ours = dataset.normalize_pixels(torch.as_tensor(dataset.resize_page(page, spec))[None], spec)
    theirs = torch.as_tensor(np.asarray(processor(page.convert("RGB"), return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs.float(), atol=1e-5)


def test_collator_pads_to_longest_in_batch_only():
    spec = {"size": [8, 8], "resample": 2, "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}
    collator = collate.ClassificationCollator(pad_token_id=1, student_spec=spec, teacher_spec=spec)
    docs = [{"input_ids": [0, 5, 6, 2], "bbox": [[0, 0, 0, 0], [1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 0, 0]],
             "student_pixels": np.zeros((3, 8, 8), np.uint8), "teacher_pixels": np.full((3, 8, 8), 255, np.uint8),
             "label": 3, "index": 0},
            {"input_ids": [0, 7, 2], "bbox": [[0, 0, 0, 0], [9, 9, 9, 9], [0, 0, 0, 0]],
             "student_pixels": np.zeros((3, 8, 8), np.uint8), "teacher_pixels": np.zeros((3, 8, 8), np.uint8),
             "label": 1, "index": 1}]
    batch = collator(docs)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["input_ids"][1].tolist() == [0, 7, 2, 1]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["bbox"][1, 3].tolist() == [0, 0, 0, 0]
    assert batch["pixel_values"].min() == -1.0 and batch["teacher_pixel_values"][0].max() == 1.0
    assert batch["labels"].tolist() == [3, 1]


def test_length_grouped_order_is_a_seeded_permutation():
    from recipe import EpochShuffle
    lengths = list(np.random.default_rng(0).integers(5, 500, 200))
    sampler = EpochShuffle(200, seed=7, batch_size=8, lengths=lengths)
    sampler.set_epoch(3)
    first = list(sampler)
    assert sorted(first) == list(range(200)) and first == list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) != first
    spread = [np.ptp([lengths[i] for i in first[k:k + 8]]) for k in range(0, 200, 8)]
    assert np.mean(spread) < 0.25 * np.ptp(lengths)  # batches hold similar lengths
