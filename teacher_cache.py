"""Teacher outputs computed once and reused across epochs and runs.

The frozen teacher gives the same logits for the same input every epoch, and it dominates the cost of
distillation (DiT-large: 303M parameters against the student's few million). Its logits for a split are
stored on disk under a key made of everything they depend on: the teacher's weights and label order, and the
preprocessed split (whose own cache key covers the source data, the tokenizer and the teacher's image
preprocessing). Change any of them and the key changes; a stale cache is never read.

A teacher forward may return a dict of tensors (text recognition with feature terms: "logits" and the
teacher's intermediate features; classification with --kd-terms attention: its attention maps too): each is
stored as its own table, the features and maps in float16 (half the disk and memory; they are regression
targets, standardised by the loss, or renormalised distributions) and "logits" in float32, and the cache then
returns a dict of float32 tensors. Which outputs are stored is part of the key (the caller's `extra`).

Teacher precision (--teacher-precision): a torch teacher may fill the cache under torch.autocast in bf16 or fp16
(`auto`: bf16 on a CPU with native bf16 and on a CUDA GPU with bf16, fp16 on a CUDA GPU without it, float32
elsewhere). Before it does, the KL divergence at the run's temperature between the float32 and the reduced-
precision teacher's distributions is measured on the first SAMPLE_BATCHES batches of the split (float32 math,
mean over predictions: one per document, or per word / time step for per-position tasks) and logged; above
KL_TOLERANCE (or not finite: fp16 overflowed) the cache is filled in float32 instead, with a one-line
warning; a later batch whose reduced-precision outputs are not finite is computed again in float32. The logits
are stored in float32 whatever the precision, and the precision used is part of the key, so a bf16 cache and a
float32 cache of the same teacher and split never stand in for each other, except that an existing float32
cache (the reference) is reused whatever precision is asked for. Teachers that are not torch modules with
floating weights (ONNX, transcripts) always run as they are: float32, and their key carries no precision.
"""
import hashlib
import itertools
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

log = logging.getLogger("docdistill")
CACHE_VERSION = "1"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the reduced precisions; float32: no autocast
KL_TOLERANCE = 1e-3  # nats per prediction, at the run's temperature: above it a reduced precision is refused
SAMPLE_BATCHES = 2  # batches of the split on which the reduced precision is checked against float32


def weights_fingerprint(model):
    """sha256 over every parameter and buffer, in name order (a changed weight changes the key)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher, split, extra="", precision=None, fingerprint=None):
    """precision: the one the cache is filled in, for a torch teacher (None: a teacher that has none, ONNX or
    transcripts). fingerprint: weights_fingerprint(teacher), when already computed."""
    split_files = ",".join(os.path.basename(f["filename"]) for f in split.cache_files) or split._fingerprint
    parts = [CACHE_VERSION, fingerprint or weights_fingerprint(teacher), split_files, str(len(split)), extra]
    if precision is not None:
        parts.append(f"teacher precision {precision}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def has_float_weights(teacher):
    """A torch module with floating-point weights: one whose precision can be chosen (autocast)."""
    return isinstance(teacher, torch.nn.Module) and any(p.is_floating_point() for p in teacher.parameters())


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX-BF16) and PyTorch dispatches AVX512
    kernels on it. Conservative: elsewhere bf16 is emulated and slower than float32, so False."""
    try:
        if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
            return False
    except (AttributeError, RuntimeError):
        return False
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    try:
        flags |= {"avx512_bf16"} if torch.cpu._is_avx512_bf16_supported() else set()
    except AttributeError:
        pass
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cuda_has_bf16(device):
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def resolve_precision(requested, teacher, device):
    """The precision the teacher is asked to fill the cache in (before the KL check): float32 for a teacher
    without floating torch weights; `auto` by device; otherwise as requested."""
    if not has_float_weights(teacher):
        return "float32"
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16(device) else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "float32"


def run_teacher(teacher, teacher_forward, batch, precision):
    """The teacher's outputs on a batch as {name: tensor}, in `precision` (torch.autocast; float32: none)."""
    device_type = batch["index"].device.type
    with torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                        enabled=precision in AUTOCAST_DTYPES):
        out = teacher_forward(teacher, batch)
    return out if isinstance(out, dict) else {"logits": out}


def precision_kl(exact, reduced, temperature, mask=None):
    """(sum, count): KL(float32 teacher || reduced-precision teacher) at `temperature`, summed over predictions
    (rows of the last axis: one per document, or per word / time step; with mask [B, W], only the real ones),
    computed in float32."""
    classes = exact.shape[-1]
    exact, reduced = exact.float(), reduced.float()
    if mask is not None and exact.dim() == 3 and tuple(mask.shape) == tuple(exact.shape[:2]):
        exact, reduced = exact[mask.bool()], reduced[mask.bool()]
    target = F.log_softmax(exact.reshape(-1, classes) / temperature, dim=-1)
    inputs = F.log_softmax(reduced.reshape(-1, classes) / temperature, dim=-1)
    total = F.kl_div(inputs, target, log_target=True, reduction="sum").item()
    if math.isfinite(total):
        total = max(total, 0.0)  # float32 rounding can leave a KL of ~1e-8 below 0: it is 0
    else:
        total = math.inf  # the reduced precision overflowed (inf or nan logits)
    return total, target.shape[0]


COMPACT_PARTS = ("logp_uint8", "topk_ids", "topk_logp", "rest_logp", "classes")  # stored as NAME.PART
LOGP_RANGE = 32.0  # 8-bit log-probabilities cover [-LOGP_RANGE, 0] in steps of LOGP_RANGE / 255 (0.125 nats)


class CompactLogits:
    """A per-step table ([N, T, C] logits: text recognition's) stored small, looked up as full log-probabilities
    (which every loss that reads the teacher through a softmax, KL at any temperature included, reads as its logits):

        top_k 0   every class, its log-probability clamped to [-LOGP_RANGE, 0] and stored in 8 bits (4x smaller than
                  float32; the run's KL within 2e-5 nats per step of the float32 table's, see docs/results);
        top_k K   only the K most likely classes of each step (ids uint8, log-probabilities float16) and the log of the
                  probability left over (float16), which a lookup shares evenly among the other classes.
    """

    def __init__(self, parts, classes):
        self.parts, self.classes = parts, int(classes)

    @classmethod
    def of(cls, logits, top_k):
        logp = torch.log_softmax(logits.float(), dim=-1)
        if not top_k:
            return cls({"logp_uint8": torch.round((logp.clamp(min=-LOGP_RANGE) + LOGP_RANGE) * 255 / LOGP_RANGE)
                        .to(torch.uint8)}, logits.shape[-1])
        top, ids = logp.topk(top_k, dim=-1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        return cls({"topk_ids": ids.to(torch.uint8 if logits.shape[-1] <= 256 else torch.int32),
                    "topk_logp": top.half(), "rest_logp": rest.half()}, logits.shape[-1])

    def tables(self, name):
        return {f"{name}.{part}": t for part, t in {**self.parts, "classes": torch.tensor([self.classes])}.items()}

    def __getitem__(self, index):
        """Full [len(index), T, C] log-probabilities of the rows at `index`."""
        if "logp_uint8" in self.parts:
            return self.parts["logp_uint8"][index].float() * (LOGP_RANGE / 255) - LOGP_RANGE
        ids, logp, rest = (self.parts[k][index] for k in ("topk_ids", "topk_logp", "rest_logp"))
        others = max(self.classes - ids.shape[-1], 1)
        full = (rest.float() - math.log(others)).unsqueeze(-1).expand(*rest.shape, self.classes).clone()
        return full.scatter_(-1, ids.long(), logp.float())


def with_compact(tables):
    """Stored tables -> the tables to look up: a CompactLogits' parts (NAME.PART) grouped into one."""
    out = {name: table for name, table in tables.items() if name.rsplit(".", 1)[-1] not in COMPACT_PARTS}
    for name in {n.rsplit(".", 1)[0] for n in tables if n.rsplit(".", 1)[-1] in COMPACT_PARTS}:
        parts = {p: tables[f"{name}.{p}"] for p in COMPACT_PARTS if f"{name}.{p}" in tables}
        out[name] = CompactLogits({p: t for p, t in parts.items() if p != "classes"}, parts["classes"].item())
    return out


class TeacherCache:
    """Logits of the teacher for every document of a split, looked up by the batch's `index` column (or a dict of
    such tables: the same dict of outputs as the teacher's forward); a table may be a CompactLogits (top_k)."""

    def __init__(self, logits, seconds=None):
        self.logits = logits
        self.seconds = seconds or {}  # what filling it cost (build(): main process, a cache it filled), else {}

    def rows(self, table, batch):
        logits = table[batch["index"].cpu()].float()
        positions = batch["step_mask"] if "step_mask" in batch else batch["labels"]
        # Per-word (per-step) rows are stored padded to the longest document: cut to this batch. Attention maps are
        # cut on their rows here only; kd_terms.attention_kl cuts their columns (and a page's text tokens).
        if logits.dim() > 2 and positions.dim() > 1:
            logits = logits[:, :positions.shape[1]]
        return logits.to(batch["labels"].device)

    def __call__(self, batch):
        if isinstance(self.logits, dict):
            return {k: self.rows(table, batch) for k, table in self.logits.items()}
        return self.rows(self.logits, batch)


def real_positions(batch):
    """The real words (token classification: "positions") or time steps (text recognition: "step_mask") of a
    batch, [B, W]; None for one prediction per document."""
    return next((batch[k] for k in ("positions", "step_mask") if k in batch), None)


def to_tables(rows, top_k=None):
    """{name: {index: row}} -> {name: table}: rows at their index, per-word rows (and attention maps, on both axes)
    zero-padded to the longest; "logits" in float32, features and attention maps in float16. top_k not None: per-step
    "logits" ([N, T, C], text recognition) stored compactly (CompactLogits: 8-bit, or top_k classes and the rest)."""
    tables = {}
    for name, found in rows.items():
        table = torch.zeros((max(found) + 1, *(max(sizes) for sizes in zip(*(r.shape for r in found.values())))),
                            dtype=torch.float32 if name == "logits" else torch.float16)
        for i, row in found.items():  # per-word rows differ in length: zero-padded to the longest
            table[i][tuple(slice(0, n) for n in row.shape)] = row
        if name == "logits" and top_k is not None and table.dim() == 3 and top_k < table.shape[-1]:
            tables.update(CompactLogits.of(table, top_k).tables(name))
        else:
            tables[name] = table
    return tables


@torch.no_grad()
def fill(teacher, teacher_forward, split, collator, batch_size, device, precision, temperature, top_k=None):
    """The teacher's outputs on every document of the split as tables, the precision they were computed in, the
    number of documents, and the seconds the precision check took (float32 and reduced precision on its sample).

    A reduced precision is first checked on the first SAMPLE_BATCHES batches against float32 (precision_kl):
    above KL_TOLERANCE, everything is computed in float32. The sample's outputs in the precision kept are used.
    """
    # Own generator: building the cache must not advance the global RNG, or a run that builds it and one
    # that reuses it would draw different dropout masks from the same seed.
    loader = DataLoader(split, batch_size=batch_size, collate_fn=collator, generator=torch.Generator())
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in loader)
    rows = {}

    def store(batch, outputs):
        for name, value in outputs.items():
            rows.setdefault(name, {}).update(zip(batch["index"].tolist(), value.float().cpu()))

    done, check_seconds = 0, 0.0
    if precision != "float32":
        start = time.perf_counter()
        sample = list(itertools.islice(batches, SAMPLE_BATCHES))
        exact = [run_teacher(teacher, teacher_forward, b, "float32") for b in sample]
        reduced = [run_teacher(teacher, teacher_forward, b, precision) for b in sample]
        total, count = map(sum, zip(*(precision_kl(e["logits"], r["logits"], temperature, real_positions(b))
                                      for b, e, r in zip(sample, exact, reduced))))
        kl = total / max(count, 1)
        check_seconds = time.perf_counter() - start
        documents = sum(len(b["index"]) for b in sample)
        if not math.isfinite(kl) or kl > KL_TOLERANCE:  # not finite: fp16 overflowed
            log.warning("teacher precision %s refused: KL(float32 || %s) at T=%g is %.3g nats over %d predictions "
                        "(%d documents), above the tolerance %g; the teacher cache is filled in float32",
                        precision, precision, temperature, kl, count, documents, KL_TOLERANCE)
            precision = "float32"
        else:
            log.info("teacher precision %s: KL(float32 || %s) at T=%g is %.3g nats over %d predictions (%d documents), "
                     "within the tolerance %g", precision, precision, temperature, kl, count, documents, KL_TOLERANCE)
        for batch, outputs in zip(sample, reduced if precision != "float32" else exact):
            store(batch, outputs)
        done = len(sample)
    redone = 0
    for batch in tqdm(batches, desc=f"teacher logits (once, {precision})", total=len(loader), initial=done):
        outputs = run_teacher(teacher, teacher_forward, batch, precision)
        if precision != "float32" and not all(bool(torch.isfinite(v).all()) for v in outputs.values()):
            outputs, redone = run_teacher(teacher, teacher_forward, batch, "float32"), redone + 1
        store(batch, outputs)
    if redone:
        log.warning("teacher precision %s gave non-finite outputs on %d batches after the check: those were "
                    "computed in float32", precision, redone)
    return to_tables(rows, top_k), precision, len(rows["logits"]), check_seconds


def build(accelerator, teacher, teacher_forward, split, collator, batch_size, cache_dir, extra="",
          precision="float32", temperature=1.0, top_k=None):
    """Load the split's teacher logits from cache_dir, or compute them once (main process) and store them.

    precision: auto, float32, bf16 or fp16 (--teacher-precision; see the module's docstring); temperature: the
    run's, at which a reduced precision is checked against float32. top_k: None (every table as it is), or per-step
    logits stored compactly (CompactLogits: 0, every class in 8 bits; K, the top K classes and the rest), in the key.
    """
    path, seconds = None, {}
    extra = f"{extra}|compact logits, top-k {top_k}" if top_k is not None else extra
    if accelerator.is_main_process:
        wanted = resolve_precision(precision, teacher, accelerator.device)
        keyed = has_float_weights(teacher)  # a teacher without a precision to choose keeps its key
        fingerprint = weights_fingerprint(teacher)

        def path_of(used):
            key = cache_key(teacher, split, extra, used if keyed else None, fingerprint)
            return os.path.join(cache_dir, "teacher", key + ".safetensors")

        for used in dict.fromkeys([wanted, "float32"]):  # the float32 cache, the reference, is as good as any
            if os.path.exists(path_of(used)):
                path = path_of(used)
                log.info("teacher logits reused from %s (teacher precision %s)", path, used)
                break
        if path is None:
            start = time.perf_counter()
            tables, used, documents, check_seconds = fill(teacher, teacher_forward, split, collator, batch_size,
                                           accelerator.device, wanted, temperature, top_k)
            path = path_of(used)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            save_file(tables, tmp)
            os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache
            seconds = {"teacher_cache_seconds": time.perf_counter() - start, "precision_check_seconds": check_seconds}
            log.info("teacher logits computed once for %d documents in %s in %.1f s (of which the precision check "
                     "%.1f s): %s", documents, used, seconds["teacher_cache_seconds"], check_seconds, path)
    path = broadcast_object_list([path])[0]  # the other processes wait here for the main one's cache
    accelerator.wait_for_everyone()
    tables = with_compact(load_file(path))
    return TeacherCache(tables["logits"] if set(tables) == {"logits"} else tables, seconds)
