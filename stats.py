"""Paired bootstrap intervals: is the difference between two models on the same test items more than noise?"""
import numpy as np

RESAMPLES = 2000


def paired_bootstrap(a, b, resamples=RESAMPLES, seed=0):
    """95% interval of score(b) - score(a), the same items resampled together (seeded).

    a, b: one value per item (e.g. 1 where a page is right): score = the mean; or [items, 2] rows of
    (errors, length) (e.g. a crop's character edits and its reference characters): score = errors / length summed
    over the items, as CER is computed over a whole split.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)

    score = (lambda x: x.mean(axis=-1)) if a.ndim == 1 else \
        (lambda x: x[..., 0].sum(-1) / np.maximum(x[..., 1].sum(-1), 1e-12))
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    diffs = np.concatenate([score(b[chunk]) - score(a[chunk]) for chunk in np.array_split(idx, 20)])
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": float(score(b) - score(a)), "low": float(low), "high": float(high),
            "resamples": resamples}
