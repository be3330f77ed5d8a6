"""Teacher outputs computed once and reused across epochs and runs.

The frozen teacher gives the same logits for the same input every epoch, and it dominates the cost of
distillation (DiT-large: 303M parameters against the student's few million). Its logits for a split are
stored on disk under a key made of everything they depend on: the teacher's weights and label order, and the
preprocessed split (whose own cache key covers the source data, the tokenizer and the teacher's image
preprocessing). Change any of them and the key changes; a stale cache is never read.

A teacher forward may return a dict of tensors (text recognition with feature terms: "logits" and the
teacher's intermediate features): each is stored as its own table, the features in float16 (half the disk and
memory; they are regression targets, standardised by the loss) and "logits" in float32, and the cache then
returns a dict of float32 tensors. Which outputs are stored is part of the key (the caller's `extra`).
"""
import hashlib
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

log = logging.getLogger("docdistill")
CACHE_VERSION = "1"


def weights_fingerprint(model):
    """sha256 over every parameter and buffer, in name order (a changed weight changes the key)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher, split, extra=""):
    split_files = ",".join(os.path.basename(f["filename"]) for f in split.cache_files) or split._fingerprint
    blob = "|".join([CACHE_VERSION, weights_fingerprint(teacher), split_files, str(len(split)), extra])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class TeacherCache:
    """Logits of the teacher for every document of a split, looked up by the batch's `index` column (or a dict of
    such tables: the same dict of outputs as the teacher's forward)."""

    def __init__(self, logits):
        self.logits = logits

    def rows(self, table, batch):
        logits = table[batch["index"].cpu()].float()
        if logits.dim() > 2:  # per-word (per-step) logits are stored padded to the longest document; cut to this batch
            logits = logits[:, :(batch["step_mask"] if "step_mask" in batch else batch["labels"]).shape[1]]
        return logits.to(batch["labels"].device)

    def __call__(self, batch):
        if isinstance(self.logits, dict):
            return {k: self.rows(table, batch) for k, table in self.logits.items()}
        return self.rows(self.logits, batch)


@torch.no_grad()
def build(accelerator, teacher, teacher_forward, split, collator, batch_size, cache_dir, extra=""):
    """Load the split's teacher logits from cache_dir, or compute them once (main process) and store them."""
    path = os.path.join(cache_dir, "teacher", cache_key(teacher, split, extra) + ".safetensors")
    if accelerator.is_main_process and not os.path.exists(path):
        # Own generator: building the cache must not advance the global RNG, or a run that builds it and one
        # that reuses it would draw different dropout masks from the same seed.
        loader = DataLoader(split, batch_size=batch_size, collate_fn=collator, generator=torch.Generator())
        rows = {}
        for batch in tqdm(loader, desc="teacher logits (once)"):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                out = teacher_forward(teacher, batch)
            outputs = out if isinstance(out, dict) else {"logits": out}
            for name, value in outputs.items():
                rows.setdefault(name, {}).update(zip(batch["index"].tolist(), value.float().cpu()))
        tables = {}
        for name, found in rows.items():
            table = torch.zeros((max(found) + 1, *max(r.shape for r in found.values())),
                                dtype=torch.float32 if name == "logits" else torch.float16)
            for i, row in found.items():  # per-word rows differ in length: zero-padded to the longest
                table[i, :row.shape[0]] = row
            tables[name] = table
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        save_file(tables, tmp)
        os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
        log.info("teacher logits computed once for %d documents: %s", len(rows["logits"]), path)
    elif accelerator.is_main_process:
        log.info("teacher logits reused from %s", path)
    accelerator.wait_for_everyone()
    tables = load_file(path)
    return TeacherCache(tables["logits"] if set(tables) == {"logits"} else tables)

