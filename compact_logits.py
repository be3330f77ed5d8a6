"""Per-step teacher tables ([N, T, C] logits: text recognition's) stored small in the teacher cache
(--teacher-top-k): every class in 8 bits, or the top K classes and the probability left."""
import math

import torch

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
