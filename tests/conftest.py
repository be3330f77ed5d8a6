import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)


def run_main(*args, timeout=600):
    """Run the real `python main.py ...` command; return the completed process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A small generated corpus on disk (2 train, 1 validation, 1 test page per class)."""
    import demo
    path = tmp_path_factory.mktemp("data") / "demo"
    demo.generate_demo_dataset(str(path), train_per_class=2, val_per_class=1, test_per_class=1, seed=3)
    return str(path)
