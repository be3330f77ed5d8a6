"""Probe how fast the demo's MiniLM-L6 LayoutLMv3 teacher starts learning, with and without its page image.

Trains on demo-teacher's pages (runs/cache/demo-teacher, made by `make demo` or demo_corpus.load_corpus) for STEPS steps of
16 pages, one thread, linear warm-up (6 steps) and decay, and prints the loss and training accuracy of every 4 steps.
VARIANT: 'vis' (words, boxes and a 128-px page: 65 page tokens from random weights) or 'novis' (words and boxes);
add '-pool' to start the head from MiniLM's pooler, as models.demo_minilm_teacher does.

    python benchmarks/demo_teacher_probe.py novis-pool 2e-4 32
"""
import os
import sys
import time

import datasets
import numpy as np
import torch
from transformers import LayoutLMv3ForSequenceClassification
from transformers.models.layoutlmv3.image_processing_pil_layoutlmv3 import LayoutLMv3ImageProcessorPil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import classification  # noqa: E402
import minilm  # noqa: E402
import models  # noqa: E402


def encode(pages, tokenizer):
    boxes = [[[max(0, min(1000, int(1000 * v / s))) for v, s in zip(b, (w, h, w, h))] for b in bs]
             for bs, w, h in zip(pages["word_boxes"], pages["width"], pages["height"])]
    enc = tokenizer([list(w) for w in pages["ocr_words"]], boxes=boxes, truncation=True, max_length=128,
                    padding="max_length", return_tensors="pt")
    processor = LayoutLMv3ImageProcessorPil(apply_ocr=False, size={"height": 128, "width": 128})
    pixels = torch.tensor(np.stack(processor([im.convert("RGB") for im in pages["image"]])["pixel_values"]))
    return enc["input_ids"], enc["attention_mask"], enc["bbox"], pixels, torch.tensor(pages["label"])


def main(variant, lr, steps, cache="runs/cache"):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tokenizer = classification.load_tokenizer("minilm", cache)
    pages = datasets.load_from_disk(os.path.join(cache, "demo-teacher"))["train"].shuffle(seed=0)
    ids, mask, bbox, pixels, labels = encode(pages.select(range(16 * steps)), tokenizer)
    config = minilm.layoutlmv3_config(models.builtin_configs()["builtin:layoutlmv3-base"]())
    config.update(dict(input_size=128, num_labels=16, visual_embed=not variant.startswith("novis")))
    model = LayoutLMv3ForSequenceClassification(config)
    weights = minilm.load_weights()
    minilm.copy_text_weights(model.layoutlmv3, weights)
    if "pool" in variant:
        minilm.copy_pooler(model.classifier, weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 6) * max(0, 1 - s / steps))
    start, accs = time.time(), []
    for step in range(steps):
        rows = slice(16 * step, 16 * step + 16)
        inputs = dict(input_ids=ids[rows], attention_mask=mask[rows], bbox=bbox[rows], labels=labels[rows])
        if config.visual_embed:
            inputs["pixel_values"] = pixels[rows]
        out = model(**inputs)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        accs.append((out.logits.argmax(-1) == labels[rows]).float().mean().item())
        if step % 4 == 3:
            print(f"{variant} lr {lr} step {step + 1}: loss {out.loss.item():.3f}, training accuracy of the last 4 "
                  f"steps {np.mean(accs[-4:]):.2f}, {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
