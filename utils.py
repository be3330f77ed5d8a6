"""Small shared helpers: seeds and RNG state, atomic and safe files, checksums, one run per output directory,
SIGTERM, device info, page images, logging."""
import contextlib
import glob
import hashlib
import json
import logging
import os
import pickle
import platform
import random
import re
import shutil
import signal
import socket
import tempfile
from contextlib import contextmanager

import numpy as np
import psutil
import torch
import transformers
from PIL import Image

from config import UserError

log = logging.getLogger("docdistill")


def setup_logging(main_process=True):
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    for noisy in ("datasets", "accelerate", "httpx", "huggingface_hub", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- RNG state

def rng_state():
    """Every RNG as plain tensors and numbers, so the checkpoint loads with weights_only=True."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": list(py_state), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """Write through a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    prefix = os.path.basename(path) + "."
    for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*.tmp")):
        os.remove(stale)  # left by a writer that was killed mid-save
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; results are meant to be shared
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory):
    """Make a rename durable: the directory entry itself is flushed to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def atomic_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_dir(path, write):
    """write(directory) into a fresh temp directory, then swap it in for `path`.

    Two renames, so a kill between them leaves the previous version as PATH.old-PID next to it, never a
    half-written PATH.
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(glob.escape(path) + ".*.tmp") + glob.glob(glob.escape(path) + ".old-*"):
        shutil.rmtree(stale)  # left by a writer that was killed mid-save
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
    old = f"{path}.old-{os.getpid()}"
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
    finally:
        for leftover in (tmp, old):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)


def atomic_files(path, write):
    """write(directory) into a fresh temp directory beside `path`, then move each file it wrote into `path` (created
    if missing), one atomic rename each: files of `path` that `write` did not write are kept, never removed."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        write(tmp)
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            os.chmod(os.path.join(tmp, name), 0o666 & ~_umask())
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_torch_load(path):
    """torch.load that never unpickles arbitrary objects (a checkpoint can't run code on this machine)."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes): it was cut off while being written or copied; use another copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} was refused: loading it needs unsafe unpickling ({unsafe_pickle_reason(e)}), "
                        f"which can run code. Load only checkpoints written by docdistill, or re-save the weights "
                        f"as a plain state dict or safetensors") from e
    except Exception as e:  # a truncated or foreign file fails in many ways inside torch.load
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first_line(e)}): it may be "
                        f"truncated or from another program") from e


def unsafe_pickle_reason(error):
    """What a weights_only torch.load refused, from its UnpicklingError: the global the file refers to."""
    found = re.search(r"GLOBAL (\S+)", str(error))
    return f"it refers to {found.group(1)}" if found else "it holds Python objects, not just tensors"


def tensors_sha256(obj):
    """sha256 over every tensor in nested dicts and lists: key path, dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()

    def visit(value, key):
        if torch.is_tensor(value):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                visit(value[k], f"{key}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(item, f"{key}/{i}")

    visit(obj, "")
    return digest.hexdigest()


def with_checksum(obj):
    """A dict to save, with the sha256 of its tensors under "sha256" (checked by verify_checksum on load)."""
    return {**obj, "sha256": tensors_sha256(obj)}


def verify_checksum(obj, path):
    """Refuse a loaded dict whose tensors no longer match the checksum saved with them (bytes flipped on disk)."""
    if "sha256" not in obj:
        log.warning("%s has no checksum (written before docdistill saved them): its tensors are not verified", path)
        return
    if tensors_sha256({k: v for k, v in obj.items() if k != "sha256"}) != obj["sha256"]:
        raise UserError(f"{path} is corrupt: its tensors do not match the checksum saved with them (bytes changed "
                        f"on disk or in a copy): use an intact copy, or start again without it")


def first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def write_jsonl(rows, path):
    """Rewrites the (small) file atomically: a kill mid-write never leaves a torn last line."""
    atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def all_finite(tensors):
    """True when no tensor holds a NaN or an infinity (one sync per device: e.g. AdamW keeps `step` on the CPU)."""
    checks = {}
    for tensor in tensors:
        checks.setdefault(tensor.device, []).append(torch.isfinite(tensor).all())
    return all(bool(torch.stack(found).all()) for found in checks.values())


# ----------------------------------------------------------------------------- one run per output directory

LOCK = ".docdistill.lock"


@contextmanager
def output_lock(directory):
    """While the block runs, `directory` holds LOCK ({"pid", "host"}) and another run that asks for it is refused in
    one line. The lock of a run that is gone (its process ended on this host without releasing it: SIGKILL, power
    cut) is taken over. A directory this call created is removed again if nothing else was written into it."""
    path = os.path.join(directory, LOCK)
    created = not os.path.exists(directory)
    os.makedirs(directory, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_json(path)  # None: being written, or torn
            if holder and holder.get("host") != me["host"]:
                raise UserError(f"{directory} is in use by a docdistill run on {holder['host']} (process "
                                f"{holder.get('pid')}): wait for it to end, choose another --output-dir, or remove "
                                f"{path} if that run is gone") from None
            if holder and process_alive(holder.get("pid")):
                raise UserError(f"{directory} is in use by another docdistill run (process {holder['pid']}): wait "
                                f"for it to end, or choose another --output-dir") from None
            log.warning("%s: taking over the lock of a run that ended without releasing it (process %s)", directory,
                        holder.get("pid") if holder else "unknown")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                os.rmdir(directory)


def read_json(path):
    """A JSON file's content, or None when it cannot be read (missing, being written, torn)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def process_alive(pid):
    """Whether a process of this host with this pid runs (another user's counts as running)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ----------------------------------------------------------------------------- signals

@contextmanager
def sigterm_requests():
    """Inside the block SIGTERM does not kill the process: it is recorded in the yielded list, to be acted on at
    a safe point. The previous handler (normally the default: exit) is back afterwards."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- machine

def cpu_model():
    """(the CPU's model name, the matrix and bf16 features it has among amx_bf16, amx_int8, avx512_bf16)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name in ("", platform.machine()):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, sorted(flags & {"amx_bf16", "amx_int8", "avx512_bf16"})


def device_info():
    name, features = cpu_model()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": name,
            "cpu_features": features, "cpu_threads": torch.get_num_threads()}
    info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


def peak_rss_bytes():
    """This process's peak resident set: VmHWM of /proc/self/status on Linux (the high-water mark of this
    program's own memory); elsewhere psutil's current RSS.
    Not ru_maxrss on Linux: it survives exec, so a process started by multiprocessing's spawn (a fork, then an
    exec) reports at least its parent's peak at the time it was started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def peak_memory_mb(device=None):
    """The process's peak memory so far, in MiB: {"peak_rss_mb"}: resident set (peak_rss_bytes), and on a CUDA
    device {"peak_cuda_mb"}: the allocator's peak (torch.cuda.max_memory_allocated). Both only grow: a phase's
    value is the peak up to its end."""
    peak = {"peak_rss_mb": peak_rss_bytes() / 2**20}
    if device is not None and torch.device(device).type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


# ----------------------------------------------------------------------------- images

def to_rgb(image):
    """A page as 8-bit RGB. Deeper grayscale (I;16, I, F) is scaled to 0-255: PIL's own conversion clips every
    value above 255 to white, so a 16-bit scan would come out blank."""
    if not image.mode.startswith(("I", "F")):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    peak = values.max(initial=0)
    scale = 1.0 if peak <= 255 else 255 / 65535 if peak <= 65535 else 255 / peak
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
