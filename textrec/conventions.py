"""How the labels write what the teacher reads, and the teacher taught in the labels' convention (--label-conventions).

Measured once per training run on a seeded sample of up to SAMPLE labelled training crops: the teacher's own reading
of each (teachers.OnnxRecognizer.read: greedy CTC over its charset, folded onto ASCII) against its transcript.

    case     "upper" when the labels write (almost) no lower-case letter (under 1% of their letters) while the
             teacher reads at least 5% of its letters in lower case (SROIE: receipts transcribed in capitals); "lower"
             the other way round; else "as printed" (nothing to do).
    spaces   "keep" when the labels have at least MIN_SPACES spaces inside their texts and the teacher reads fewer
             than 80% of them (PP-OCRv4 runs English words together); else "as read".
    trailing punctuation: the share of labels ending in `: . , ;` that the teacher reads without that last character
             (FUNSD's `Fax:` read `Fax`); taught from the labels when it is at least a third (of at least 10).

Taught in the labels' convention:
    case     the teacher's probability of each letter goes to the case the labels use (case_fold: a [C, C] 0/1
             matrix after the teacher's fold onto the student's charset, as full-width characters are folded), so
             kl, seq and simkd teach "TOTAL" where the teacher read "Total". Part of the teacher cache's key.
    spaces, trailing punctuation   on a labelled crop, the steps where the labels have a space (or the trailing
             punctuation) that the teacher does not read leave the kl term (label_gaps): the transcript is aligned to
             the teacher's per-step distribution (CTC Viterbi), and the steps of the blank before the character, the
             character and the blank after it are masked when the teacher gives that character less than 0.5 at all
             of them. CTC on the label then teaches it there, and the teacher is not heard saying "nothing here".
             Unlabelled crops are taught as the teacher reads. --mute-teacher-disagreements does the same for every
             character of a transcript the teacher does not read (all its disagreements with the labels).
"""
import logging
import random

import numpy as np
import torch

from textrec import data

log = logging.getLogger("docdistill")
SAMPLE = 300
MIN_SPACES = 20
TRAILING = ":.,;"
TRAILING_SHARE, MIN_TRAILING = 1 / 3, 10  # trailing punctuation taught from the labels: the teacher drops a third
SPACE = data.STUDENT_CHARS.index(" ") + 1  # the student class of the space


def measure(truths, readings):
    """The conventions of labels `truths` against the teacher's `readings` of the same crops (a dict, logged and
    saved with the student)."""
    def counts(texts):
        letters = [c for t in texts for c in t if c.isalpha()]
        return (sum(c.islower() for c in letters) / max(len(letters), 1),
                sum(c.isupper() for c in letters) / max(len(letters), 1),
                sum(t.strip().count(" ") for t in texts))
    label_lower, label_upper, label_spaces = counts(truths)
    read_lower, read_upper, read_spaces = counts(readings)
    case = ("upper" if label_lower < 0.01 <= 0.05 <= read_lower else
            "lower" if label_upper < 0.01 <= 0.05 <= read_upper else "as printed")
    spaces = "keep" if label_spaces >= MIN_SPACES and read_spaces < 0.8 * label_spaces else "as read"
    ending = [(t, r) for t, r in zip(truths, readings) if len(t) > 1 and t[-1] in TRAILING]
    dropped = sum(r.lower() == t[:-1].lower() for t, r in ending)
    return {"crops": len(truths), "case": case, "spaces": spaces,
            "label_lower_share": round(label_lower, 4), "teacher_lower_share": round(read_lower, 4),
            "label_spaces": label_spaces, "teacher_spaces": read_spaces,
            "trailing_punctuation_labels": len(ending),
            "trailing_punctuation_dropped_by_teacher": round(dropped / max(len(ending), 1), 4)}


def describe(found):
    """One line: what was found and what is taught."""
    return (f"labels against the teacher's readings of {found['crops']} labelled training crops: letter case "
            f"{found['case']} (lower-case letters: labels {found['label_lower_share']:.1%}, teacher "
            f"{found['teacher_lower_share']:.1%}); spaces {found['spaces']} (labels {found['label_spaces']}, teacher "
            f"{found['teacher_spaces']}); the teacher drops the last character of "
            f"{found['trailing_punctuation_dropped_by_teacher']:.0%} of the {found['trailing_punctuation_labels']} "
            f"labels ending in punctuation (reported only)"
            + ("; taught: " + ", ".join(
                ([f"the teacher's letters folded to {found['case']} case"] if found["case"] in ("upper", "lower")
                 else []) + (["no 'no space' where a label has one (kl)"] if found["spaces"] == "keep" else []))
               if found["case"] in ("upper", "lower") or found["spaces"] == "keep" else "; nothing to teach"))


def sample(split, seed):
    """Indices of up to SAMPLE labelled crops of a prepared split (seeded)."""
    labelled = [i for i, has in enumerate(split.with_format(None)["has_label"]) if has]
    return sorted(random.Random(seed).sample(labelled, min(SAMPLE, len(labelled))))


def case_fold(case, chars=data.STUDENT_CHARS):
    """[C, C] 0/1 (C = blank + chars): student class -> the class of the same character in `case`."""
    matrix = np.eye(len(chars) + 1, dtype=np.float32)
    if case not in ("upper", "lower"):
        return matrix
    for k, c in enumerate(chars):
        target = c.upper() if case == "upper" else c.lower()
        if target != c and target in chars:
            matrix[k + 1] = 0.0
            matrix[k + 1, chars.index(target) + 1] = 1.0
    return matrix


def viterbi_states(logp, targets, lengths):
    """The best CTC alignment of each crop's target under per-step log-probabilities logp [B, T, C]: the state of
    every step [B, T] (state 2k + 1 is target character k, the even states the blanks around them), -1 past a crop's
    length or where the target cannot be aligned within it. targets: list of id lists; lengths [B]."""
    B, T, _ = logp.shape
    S = max(2 * max(map(len, targets), default=0) + 1, 1)
    ext = torch.full((B, S), data.BLANK, dtype=torch.long)
    for b, target in enumerate(targets):
        ext[b, 1:2 * len(target):2] = torch.tensor(target, dtype=torch.long)
    valid = torch.arange(S)[None] < torch.tensor([2 * len(t) + 1 for t in targets])[:, None]
    emit = logp.float().gather(2, ext[:, None, :].expand(B, T, S)).masked_fill(~valid[:, None, :], -1e30)
    skip = torch.zeros(B, S, dtype=torch.bool)  # s - 2 -> s allowed: a character unlike the one before it
    skip[:, 2:] = (ext[:, 2:] != data.BLANK) & (ext[:, 2:] != ext[:, :-2])
    delta = torch.full((B, S), -1e30)
    delta[:, :2] = emit[:, 0, :2]
    back = torch.zeros(B, T, S, dtype=torch.long)
    for t in range(1, T):
        stay, step = delta, torch.cat([torch.full((B, 1), -1e30), delta[:, :-1]], 1)
        jump = torch.cat([torch.full((B, 2), -1e30), delta[:, :-2]], 1).masked_fill(~skip, -1e30)
        best, choice = torch.stack([stay, step, jump], -1).max(-1)
        running = (t < lengths)[:, None]
        delta = torch.where(running, best + emit[:, t], delta)
        back[:, t] = torch.where(running, torch.arange(S)[None] - choice, torch.arange(S)[None])
    states = torch.full((B, T), -1, dtype=torch.long)
    for b, target in enumerate(targets):
        n, last = int(lengths[b]), 2 * len(target)
        end = last if last == 0 or delta[b, last] >= delta[b, last - 1] else last - 1
        if n == 0 or delta[b, end] <= -1e29:
            continue
        for t in range(n - 1, -1, -1):
            states[b, t] = end
            end = int(back[b, t, end])
    return states


def checked(target, kinds):
    """Positions of a transcript's characters (class ids) that the kl term may leave out: "space" its spaces,
    "trailing" its last character when it is trailing punctuation, "all" every character."""
    if "all" in kinds:
        return list(range(len(target)))
    found = [k for k, c in enumerate(target) if c == SPACE] if "space" in kinds else []
    if "trailing" in kinds and len(target) > 1 and data.decode(target[-1:]) in TRAILING:
        found.append(len(target) - 1)
    return found


def label_gaps(teacher_logp, labels, labelled, mask, kinds=("space",)):
    """[B, T] True at the steps to leave out of kl: around each character of a labelled crop's transcript that the
    teacher does not read (of the kinds in checked(): its probability of that character under 0.5 at each of the
    steps the alignment gives the blank before it, the character and the blank after it). teacher_logp [B, T, C]
    on the student's steps."""
    gaps = torch.zeros(mask.shape, dtype=torch.bool)
    targets = {b: [int(c) for c in labels[b] if c != data.IGNORE_INDEX] for b in range(len(labels)) if labelled[b]}
    targets = {b: t for b, t in targets.items() if checked(t, kinds)}
    if not targets:
        return gaps.to(mask.device)
    rows = list(targets)
    logp = teacher_logp[rows].detach().float().cpu()
    states = viterbi_states(logp, [targets[b] for b in rows], mask[rows].sum(1).cpu())
    probs = logp.exp()
    for r, b in enumerate(rows):
        for k in checked(targets[b], kinds):
            steps = (states[r] >= 2 * k) & (states[r] <= 2 * k + 2)
            if steps.any() and bool((probs[r][steps, targets[b][k]] < 0.5).all()):
                gaps[b] |= steps
    return gaps.to(mask.device)


def gap_kinds(found):
    """What kl leaves out, from what measure() found: the spaces the teacher drops ("keep"), and the trailing
    punctuation when the teacher drops at least a third of it."""
    if not found:
        return ()
    return tuple(["space"] * (found["spaces"] == "keep")
                 + ["trailing"] * (found["trailing_punctuation_dropped_by_teacher"] >= TRAILING_SHARE
                                   and found["trailing_punctuation_labels"] >= MIN_TRAILING))
