"""Plots and tables of a run, written atomically: training curves, the confusion matrix, the per-class table."""
import utils


def plot_curves(history, path):
    """Loss and accuracy per epoch from metrics.jsonl rows."""
    import matplotlib  # heavy: only when a plot is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ["train_loss"] + [k for k in history[0] if k.startswith("train_") and k not in
                                 ("train_loss", "train_accuracy", "train_seconds", "train_docs_per_s")]:
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", label=key.replace("train_", ""))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    ax_loss.legend()
    main_metric = history[0]["metric_name"]
    ax_acc.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train accuracy")
    ax_acc.plot(epochs, [row["val_" + main_metric] for row in history], marker="o", label="val " + main_metric)
    ax_acc.set(xlabel="epoch", ylabel="score", title="Quality", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_confusion(matrix, labels, path, title):
    import matplotlib  # heavy: only when a plot is drawn
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
    utils.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def per_class_table(per_class):
    """Markdown table of per-class precision, recall, F1 and support."""
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1-score']:.3f} | {int(m['support'])} |"
              for name, m in per_class.items()]
    return "\n".join(lines)
