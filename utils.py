"""Small shared helpers: seeds and RNG state, atomic and safe files, device and memory info, plots, logging."""
import json
import logging
import os
import pickle
import platform
import random
import tempfile

import numpy as np
import torch

from config import UserError

log = logging.getLogger("docdistill")


def setup_logging(main_process=True):
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING)
    import transformers
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

def _atomic_write(path, write):
    """Write through a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json(obj, path):
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def safe_torch_load(path):
    """torch.load that never unpickles arbitrary objects (a checkpoint can't run code on this machine)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} needs unsafe unpickling (it holds Python objects, not just tensors) and was "
                        f"refused: load only checkpoints written by docdistill, or re-save the weights "
                        f"as a plain state dict") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0]}): it may be truncated "
                        f"or from another program") from e


def write_jsonl(rows, path):
    _atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))


def append_jsonl(obj, path):
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- machine

def device_info():
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpu_threads": torch.get_num_threads()}
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return info


# ----------------------------------------------------------------------------- plots

def plot_curves(history, path):
    """Loss and accuracy per epoch from metrics.jsonl rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "train_kd", "train_ce"):
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=key.replace("train_", ""))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_loss.legend()
    main_metric = history[0]["metric_name"]
    ax_acc.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train accuracy")
    ax_acc.plot(epochs, [row["val_" + main_metric] for row in history], marker="o", label="val " + main_metric)
    ax_acc.set(xlabel="epoch", ylabel="score", title="Quality", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix, labels, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    size = max(5, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i][j]:
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[i][j] > max(map(max, matrix)) / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
