"""The report of a study (--mode sweep): sweep.csv, sweep.md, best_config.json, sweep_test.json, the heatmap of
validation over temperature x alpha, and, with student_size an axis, the gain of distillation against student size
(sweep_sizes.png). sweep.py runs the study; this module only writes what it found."""
import csv
import os

import numpy as np
import optuna

import utils


def trial_rows(study, axes):
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.WAITING:
            continue
        state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
        if "same_as" in t.user_attrs:
            state = f"same run as trial {t.user_attrs['same_as']}"
        rows.append({"trial": t.number, "dir": t.user_attrs.get("dir", ""), "state": state,
                     **{k: t.params.get(k, "") for k in axes},
                     "validation": t.value if t.state == optuna.trial.TrialState.COMPLETE else "",
                     "seconds": round(t.user_attrs.get("seconds", 0.0), 1) if "seconds" in t.user_attrs else ""})
    return rows


def heatmap(rows, metric, path):
    """Validation score over temperature x alpha (the best over the other axes), as a PNG."""
    import matplotlib  # heavy: only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    done = [r for r in rows if r["validation"] != ""]  # finished trials, those that reused a run included
    temps = sorted({r["temperature"] for r in done})
    alphas = sorted({r["alpha"] for r in done})
    grid = np.full((len(temps), len(alphas)), np.nan)
    for r in done:
        i, j = temps.index(r["temperature"]), alphas.index(r["alpha"])
        grid[i, j] = r["validation"] if np.isnan(grid[i, j]) else max(grid[i, j], r["validation"])
    fig, ax = plt.subplots(figsize=(1.2 * len(alphas) + 2.5, 0.8 * len(temps) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", origin="lower")
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    ax.set_yticks(range(len(temps)), [f"{t:g}" for t in temps])
    ax.set_xlabel("alpha")
    ax.set_ylabel("temperature")
    for i in range(len(temps)):
        for j in range(len(alphas)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, label=f"validation {metric}")
    ax.set_title(f"validation {metric} (best over the other axes)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def size_plot(sizes, path):
    """Validation gain of distillation (distilled minus alpha 0, per seed and their mean +- std) per student size."""
    import matplotlib  # heavy: only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(sizes)
    metric = sizes[names[0]]["metric"]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2.5, 3.8))
    for i, name in enumerate(names):
        gains = sizes[name]["gain"]
        ax.scatter([i] * len(gains), gains, color="tab:gray", s=14, zorder=2, label="one seed" if i == 0 else None)
        mean, std = sizes[name]["gain_mean_std"]
        ax.errorbar([i], [mean], yerr=[std], fmt="o", color="tab:blue", capsize=5, zorder=3,
                    label="mean +- std over seeds" if i == 0 else None)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("student size (--student-size)")
    ax.set_ylabel(f"validation {metric}: distilled - alpha 0")
    ax.set_title("gain of distillation by student size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def size_lines(sizes):
    """The size study as markdown lines."""
    lines = ["", "Distillation gain by student size (validation; each size's best distilled setting against the same "
             "setting at alpha 0, paired by seed; mean +- std over seeds):", "",
             "| student size | distilled setting | distilled | alpha 0 | gain | gain per seed |", "|---|---|---|---|---|---|"]
    for name, r in sizes.items():
        setting = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "student_size")
        cells = [f"{m:.4f} +- {s:.4f}" for m, s in (r["distilled_mean_std"], r["baseline_mean_std"])]
        mean, std = r["gain_mean_std"]
        lines.append(f"| {name} | {setting} | {cells[0]} | {cells[1]} | {mean:+.4f} +- {std:.4f} | "
                     f"{', '.join(f'{g:+.4f}' for g in r['gain'])} |")
    return lines + ["", "Gain by student size: sweep_sizes.png"]


def write_outputs(cfg, study, axes, best, results, command, test_split):
    """command: the `python main.py --mode train` command of the best setting."""
    out = cfg.output_dir
    rows = trial_rows(study, axes)
    metric = results["roles"]["best"]["metric"]
    columns = ["trial", "dir", "state", *axes, "validation", "seconds"]
    tmp = os.path.join(out, "sweep.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out, "sweep.csv"))
    best_row = {"trial": best.number, "dir": best.user_attrs["dir"], "params": best.params,
                f"validation_{metric}": best.value, "command": command, "test": results}
    utils.atomic_json(best_row, os.path.join(out, "best_config.json"))
    utils.atomic_json(results, os.path.join(out, "sweep_test.json"))
    lines = [f"Study {study.study_name}: {len(rows)} trials ({cfg.sweep_sampler}), validation {metric} on "
             f"--eval-split {cfg.eval_split}; the best is marked.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c == "validation" and r[c] != "" else str(r[c]) for c in columns]
        if r["trial"] == best.number:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test split ({test_split}), seeds {', '.join(map(str, results['seeds']))}: mean and std of "
              f"{metric} over the seeds.", "", f"| setting | test {metric} mean | std | per seed |", "|---|---|---|---|"]
    for role, title in (("best", "best"), ("baseline", "baseline (alpha 0)")):
        r = results["roles"][role]
        settings = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"| {title}: {settings} | {r['mean']:.4f} | {r['std']:.4f} | "
                     f"{', '.join(f'{x[metric]:.4f}' for x in r['runs'])} |")
    lines += ["", "Train the best setting:", "", "    " + command, ""]
    if "temperature" in axes and "alpha" in axes:
        heatmap(rows, metric, os.path.join(out, "sweep_heatmap.png"))
        lines.append("Validation over temperature x alpha: sweep_heatmap.png")
    if results.get("sizes"):
        size_plot(results["sizes"], os.path.join(out, "sweep_sizes.png"))
        lines += size_lines(results["sizes"])
    text = "\n".join(lines)
    utils.atomic_text(text + "\n", os.path.join(out, "sweep.md"))
    print("\n" + text)
