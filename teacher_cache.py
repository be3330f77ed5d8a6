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

Teacher precision (--teacher-precision): a torch teacher may fill the cache under torch.autocast in bf16 or fp16,
or (CPU) as int8, its linear layers dynamically quantised (models.quantize_int8). `auto` tries, on a CPU, bf16
where the CPU computes it natively (AVX512-BF16 or AMX) and int8, and on a CUDA GPU bf16 (fp16 without it); it
keeps the fastest that passes the check, float32 when none does, and logs what it picked and why. The check: the
reduced precisions run on the first SAMPLE_BATCHES batches (their outputs become those batches' cache rows, so
none of that work is lost) and float32 runs on as few of those pages as the decision needs (check_precisions): the
KL divergence at the run's temperature between the float32 and reduced-precision distributions (float32 math, per
prediction: one per document, or per word / time step) is averaged over CHECK_PAGES pages at a time until its mean
is below KL_TOLERANCE by Z standard errors (pass) or above it by as much (refuse), or the sample is used up (the
mean decides). Above the tolerance (or not finite: fp16 overflowed) a precision is refused, with a one-line
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

import compact_logits
import models
import utils

log = logging.getLogger("docdistill")
CACHE_VERSION = "1"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the reduced precisions by autocast
KL_TOLERANCE = 1e-3  # nats per prediction, at the run's temperature: above it a reduced precision is refused
SAMPLE_BATCHES = 2  # batches of the split on which a reduced precision is checked against float32
CHECK_PAGES = 4  # float32 reference pages added at a time until the check is decided
Z = 3.0  # standard errors between the mean KL and the tolerance that decide the check (undecided: refused)
RACE_MARGIN = 1.1  # auto keeps a less exact precision only when it is at least this much faster per page


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
    flags = set(utils.cpu_model()[1])
    try:
        flags |= {"avx512_bf16"} if torch.cpu._is_avx512_bf16_supported() else set()
    except AttributeError:
        pass
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_has_amx_bf16():
    """Whether the CPU multiplies bf16 matrices in AMX tiles: there bf16 beat dynamic int8 on every teacher
    measured (DiT-large 0.125 against 0.18 s a page, the demo's 0.040 against 0.17: docs/results/speed.md), so
    auto does not spend a race on int8 (quantising the teacher and running it on the sample)."""
    return "amx_bf16" in utils.cpu_model()[1]


def cuda_has_bf16(device):
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # an older torch without the argument
        return torch.cuda.is_bf16_supported()


def candidate_precisions(requested, teacher, device):
    """The precisions the cache may be filled in, to try in this order before float32 (the reference): none for a
    teacher without floating torch weights; `auto` by device (bf16 where native, int8 on a CPU with a quantised
    engine and no AMX-BF16); otherwise the one requested."""
    if not has_float_weights(teacher) or requested == "float32":
        return []
    if requested != "auto":
        return [requested]
    if device.type == "cuda":
        return ["bf16" if cuda_has_bf16(device) else "fp16"]
    native = ["bf16"] if device.type == "cpu" and cpu_has_native_bf16() else []
    return native + (["int8"] if device.type == "cpu" and cpu_has_int8() and not cpu_has_amx_bf16() else [])


def resolve_precision(requested, teacher, device):
    """The first precision the teacher is asked to fill the cache in (float32 when there is none to try)."""
    return (candidate_precisions(requested, teacher, device) or ["float32"])[0]


def cpu_has_int8():
    """Whether PyTorch has a quantised CPU engine here (dynamic int8 linear layers)."""
    return any(engine in ("x86", "fbgemm", "onednn") for engine in torch.backends.quantized.supported_engines)


def run_teacher(teacher, teacher_forward, batch, precision):
    """The teacher's outputs on a batch as {name: tensor}, in `precision` (torch.autocast for bf16 and fp16; int8:
    `teacher` is already the quantised copy; float32: as it is)."""
    device_type = batch["index"].device.type
    with torch.autocast(device_type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                        enabled=precision in AUTOCAST_DTYPES):
        out = teacher_forward(teacher, batch)
    return out if isinstance(out, dict) else {"logits": out}


def prediction_kls(exact, reduced, temperature, mask=None):
    """KL(float32 teacher || reduced-precision teacher) at `temperature` of every prediction (rows of the last axis:
    one per document, or per word / time step; with mask [B, W], only the real ones), float32 math; a prediction
    that overflowed (inf or nan logits) counts inf; float32 rounding's ~-1e-8 counts 0."""
    classes = exact.shape[-1]
    exact, reduced = exact.float(), reduced.float()
    if mask is not None and exact.dim() == 3 and tuple(mask.shape) == tuple(exact.shape[:2]):
        exact, reduced = exact[mask.bool()], reduced[mask.bool()]
    target = F.log_softmax(exact.reshape(-1, classes) / temperature, dim=-1)
    inputs = F.log_softmax(reduced.reshape(-1, classes) / temperature, dim=-1)
    kls = F.kl_div(inputs, target, log_target=True, reduction="none").sum(-1)
    return torch.where(torch.isfinite(kls), kls.clamp_min(0.0), torch.full_like(kls, math.inf))


def precision_kl(exact, reduced, temperature, mask=None):
    """(sum, count) of prediction_kls."""
    kls = prediction_kls(exact, reduced, temperature, mask)
    return float(kls.sum()), len(kls)


def check_verdict(kls):
    """Whether the KLs so far decide the check: "pass" (mean below KL_TOLERANCE by Z standard errors), "refuse"
    (above it by as much, or not finite), or "" (not yet). The KL per prediction is a mean of nonnegative values;
    its standard error shrinks as 1/sqrt(n), so a precision far from the tolerance (bf16: ~1e-5 against 1e-3) is
    decided by the first few pages, one near it takes the whole sample."""
    values = torch.cat(kls)
    if not bool(torch.isfinite(values).all()):
        return "refuse"
    mean = float(values.mean())
    error = float(values.std() / len(values) ** 0.5) if len(values) > 1 else math.inf
    return "pass" if mean + Z * error <= KL_TOLERANCE else "refuse" if mean - Z * error > KL_TOLERANCE else ""


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
            tables.update(compact_logits.CompactLogits.of(table, top_k).tables(name))
        else:
            tables[name] = table
    return tables


@torch.no_grad()
def fill(teacher, teacher_forward, split, collator, batch_size, device, precision, temperature, top_k=None):
    """The teacher's outputs on every document of the split as tables, the precision they were computed in, the
    number of documents, and the seconds the precision check took.

    With precisions to try (candidate_precisions), the first SAMPLE_BATCHES batches decide which (check_precisions)
    and their outputs in it become their rows; the other batches follow in the precision kept.
    """
    # Own generator: building the cache must not advance the global RNG, or a run that builds it and one
    # that reuses it would draw different dropout masks from the same seed.
    loader = DataLoader(split, batch_size=batch_size, collate_fn=collator, generator=torch.Generator())
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in loader)
    rows = {}

    def store(batch, outputs):
        for name, value in outputs.items():
            rows.setdefault(name, {}).update(zip(batch["index"].tolist(), value.float().cpu()))

    used, model, done, check_seconds = "float32", teacher, 0, 0.0
    tried = candidate_precisions(precision, teacher, device)
    if tried:
        start = time.perf_counter()
        sample = list(itertools.islice(batches, SAMPLE_BATCHES))
        used, model, outputs = check_precisions(teacher, teacher_forward, sample, tried, temperature,
                                                race=precision == "auto")
        for batch, out in zip(sample, outputs):
            store(batch, out)
        check_seconds, done = time.perf_counter() - start, len(sample)
    redone = 0
    for batch in tqdm(batches, desc=f"teacher logits (once, {used})", total=len(loader), initial=done):
        outputs = run_teacher(model, teacher_forward, batch, used)
        if used != "float32" and not all(bool(torch.isfinite(v).all()) for v in outputs.values()):
            outputs, redone = run_teacher(teacher, teacher_forward, batch, "float32"), redone + 1
        store(batch, outputs)
    if redone:
        log.warning("teacher precision %s gave non-finite outputs on %d batches after the check: those were "
                    "computed in float32", used, redone)
    return to_tables(rows, top_k), used, len(rows["logits"]), check_seconds


def race_winner(seconds, mean_kls, passed):
    """The precision auto keeps among float32 and those that passed the check: the fastest per page, unless a more
    exact one (smaller KL to float32) is within RACE_MARGIN of its time. The times come from a few batches, which
    vary by about that much on a shared machine, so a precision must be clearly faster to change the soft targets."""
    pool = ["float32", *passed]
    fastest = min(seconds[p] for p in pool)
    return min((p for p in pool if seconds[p] <= fastest * RACE_MARGIN), key=mean_kls.get)


def check_precisions(teacher, teacher_forward, sample, tried, temperature, race):
    """(the precision kept, the teacher model it runs, its outputs on the sample batches): each precision of `tried`
    runs on the whole sample (timed), float32 on CHECK_PAGES of its pages at a time until every one is decided
    (check_verdict; one still undecided at the sample's end is refused: it was not shown to be within the tolerance).
    Kept: with race (auto), race_winner among float32 and those that passed; else the one asked for if it passed,
    float32 if not."""
    pages = sum(len(b["index"]) for b in sample)
    runs = {}
    for precision in tried:
        model = models.quantize_int8(teacher) if precision == "int8" else teacher
        start = time.perf_counter()
        runs[precision] = (model, [run_teacher(model, teacher_forward, b, precision) for b in sample],
                           (time.perf_counter() - start) / pages)
    kls, verdicts = {p: [] for p in tried}, dict.fromkeys(tried, "")
    checked, exact_seconds = 0, 0.0
    for index, batch in enumerate(sample):
        for first in range(0, len(batch["index"]), CHECK_PAGES):
            if all(verdicts.values()):
                break
            chunk = {k: v[first:first + CHECK_PAGES] for k, v in batch.items()}
            start = time.perf_counter()
            exact = run_teacher(teacher, teacher_forward, chunk, "float32")["logits"]
            exact_seconds += time.perf_counter() - start
            checked += len(chunk["index"])
            for precision in (p for p in tried if not verdicts[p]):
                reduced = runs[precision][1][index]["logits"][first:first + CHECK_PAGES]
                kls[precision].append(prediction_kls(exact, reduced, temperature, real_positions(chunk)))
                verdicts[precision] = check_verdict(kls[precision])
    seconds = {"float32": exact_seconds / max(checked, 1), **{p: runs[p][2] for p in tried}}
    mean_kls = {"float32": 0.0, **{p: float(torch.cat(kls[p]).mean()) for p in tried}}
    passed = [p for p in tried if verdicts[p] == "pass"]  # undecided at the sample's end: not shown, refused
    kept = race_winner(seconds, mean_kls, passed) if race else (passed or ["float32"])[0]
    for precision in tried:
        said = (f"teacher precision {precision}{{}}: KL(float32 || {precision}) at T={temperature:g} is "
                f"{mean_kls[precision]:.3g} nats over {len(torch.cat(kls[precision]))} predictions ({checked} "
                f"documents in float32)")
        if verdicts[precision] == "pass":
            log.info(said.format("") + f", within the tolerance {KL_TOLERANCE:g}")
        else:
            why = "above" if verdicts[precision] == "refuse" else f"not below by {Z:g} standard errors"
            log.warning(said.format(" refused") + f", {why} the tolerance {KL_TOLERANCE:g}; the teacher cache is "
                        f"filled in {kept}")
    if race:
        log.info("teacher precision auto: %s, the fastest that passed, or a more exact one within %g%% of it (%s "
                 "seconds a page)", kept, 100 * (RACE_MARGIN - 1),
                 ", ".join(f"{p} {seconds[p]:.3g}" + ("" if p == "float32" or verdicts[p] == "pass" else " refused")
                           for p in ["float32", *tried]))
    if kept == "float32":  # the reference on the whole sample, as its rows
        return kept, teacher, [run_teacher(teacher, teacher_forward, b, "float32") for b in sample]
    return kept, runs[kept][0], runs[kept][1]


def build(accelerator, teacher, teacher_forward, split, collator, batch_size, cache_dir, extra="",
          precision="float32", temperature=1.0, top_k=None):
    """Load the split's teacher logits from cache_dir, or compute them once (main process) and store them.

    precision: auto, float32, bf16, fp16 or int8 (--teacher-precision; see the module's docstring); temperature:
    the run's, at which a reduced precision is checked against float32. top_k: None (every table as it is), or
    per-step logits stored compactly (CompactLogits: 0, every class in 8 bits; K, the top K classes and the
    rest), in the key.
    """
    path, seconds = None, {}
    extra = f"{extra}|compact logits, top-k {top_k}" if top_k is not None else extra
    if accelerator.is_main_process:
        tried = candidate_precisions(precision, teacher, accelerator.device)
        keyed = has_float_weights(teacher)  # a teacher without a precision to choose keeps its key
        fingerprint = weights_fingerprint(teacher)

        def path_of(used):
            key = cache_key(teacher, split, extra, used if keyed else None, fingerprint)
            return os.path.join(cache_dir, "teacher", key + ".safetensors")

        for used in dict.fromkeys([*tried, "float32"]):  # the float32 cache, the reference, is as good as any
            if os.path.exists(path_of(used)):
                path = path_of(used)
                log.info("teacher logits reused from %s (teacher precision %s)", path, used)
                break
        if path is None:
            start = time.perf_counter()
            tables, used, documents, check_seconds = fill(teacher, teacher_forward, split, collator, batch_size,
                                                          accelerator.device, precision, temperature, top_k)
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
    tables = compact_logits.with_compact(load_file(path))
    return TeacherCache(tables["logits"] if set(tables) == {"logits"} else tables, seconds)
