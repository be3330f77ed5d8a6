"""A LayoutLMv3 teacher whose text side starts from pretrained MiniLM-L6 weights (the one pretrained text
encoder that installs offline), for benchmarks/funsd.sh: a stand-in for microsoft/layoutlmv3-base where the hub
cannot be reached. The weight mapping and the tokenizer are minilm.py's (the demo's teacher uses them too).

    python benchmarks/layoutlmv3_from_minilm.py MINILM_DIR LAYOUTLMV3_CONFIG_DIR OUT_DIR
"""
import os
import sys

import torch
from transformers import LayoutLMv3Config, LayoutLMv3Model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minilm  # noqa: E402


def main(minilm_dir, layoutlmv3_dir, out_dir):
    config = minilm.layoutlmv3_config(LayoutLMv3Config.from_pretrained(layoutlmv3_dir), minilm_dir)
    config.architectures = None
    model = LayoutLMv3Model(config)
    copied = minilm.copy_text_weights(model, minilm.load_weights(minilm_dir))
    model.save_pretrained(out_dir)
    minilm.save_tokenizer(out_dir, minilm_dir)
    print(f"{out_dir}: LayoutLMv3 with {len(copied)} MiniLM tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:4])
