"""A LayoutLMv3 teacher whose text side starts from pretrained MiniLM-L6 weights (the one pretrained text
encoder that installs offline), for benchmarks/funsd.sh: a stand-in for microsoft/layoutlmv3-base where the hub
cannot be reached.

LayoutLMv3's text embeddings and transformer layers have BERT's layout and names, so MiniLM's (hidden 384,
6 layers, 12 heads) are copied in; the 2-D position embeddings, the relative position biases and the page patch
embedding start from random weights and are learnt when the teacher is fine-tuned (--mode teacher). The
tokenizer is MiniLM's uncased WordPiece with word boxes (LayoutLMv2's tokenizer class).

    python benchmarks/layoutlmv3_from_minilm.py MINILM_DIR LAYOUTLMV3_CONFIG_DIR OUT_DIR
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import LayoutLMv2TokenizerFast, LayoutLMv3Config, LayoutLMv3Model


def main(minilm_dir, layoutlmv3_dir, out_dir):
    bert = json.load(open(os.path.join(minilm_dir, "config.json")))
    config = LayoutLMv3Config.from_pretrained(layoutlmv3_dir)
    # 4 * coordinate_size + 2 * shape_size = hidden_size (the 2-D position embeddings are concatenated)
    config.update(dict(vocab_size=bert["vocab_size"], hidden_size=bert["hidden_size"],
                       num_hidden_layers=bert["num_hidden_layers"], num_attention_heads=bert["num_attention_heads"],
                       intermediate_size=bert["intermediate_size"], layer_norm_eps=bert["layer_norm_eps"],
                       coordinate_size=bert["hidden_size"] // 6, shape_size=bert["hidden_size"] // 6,
                       pad_token_id=bert["pad_token_id"], architectures=None))
    model = LayoutLMv3Model(config)
    weights = {k.removeprefix("bert."): v for k, v in load_file(os.path.join(minilm_dir, "model.safetensors")).items()}
    state = model.state_dict()
    copied = []
    for name, tensor in weights.items():
        if name == "embeddings.position_embeddings.weight":
            # BERT counts positions from 0, LayoutLMv3 (like RoBERTa) from pad_token_id + 1
            start = config.pad_token_id + 1
            state[name][start:start + len(tensor)] = tensor
        elif name == "embeddings.token_type_embeddings.weight":
            state[name][:] = tensor[:config.type_vocab_size]
        elif name in state and state[name].shape == tensor.shape:
            state[name] = tensor
        else:
            continue  # the pooler and position-id buffers
        copied.append(name)
    model.load_state_dict(state)
    layers = sum(".layer." in name for name in copied)
    assert layers == 16 * config.num_hidden_layers, f"copied {layers} layer tensors"
    model.save_pretrained(out_dir)
    vocab = [line.rstrip("\n") for line in open(os.path.join(minilm_dir, "vocab.txt"), encoding="utf-8")]
    LayoutLMv2TokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(out_dir)
    print(f"{out_dir}: LayoutLMv3 with {len(copied)} MiniLM tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters")


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:4])
