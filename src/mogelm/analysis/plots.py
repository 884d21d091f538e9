"""Plots for the compare report and the simulator's search (the only matplotlib importer in mogelm;
matplotlib is imported lazily, with the Agg backend, so `import mogelm` never needs it).

Every function takes plain numbers (lists / nested lists, as stored in summary.json and
log.jsonl, or as the simulator computes them) and writes one PNG:

    val_loss(curves, path)                        validation (and smoothed training) loss
    imbalance_over_training(runs, devices, path)  IS per layer over steps, P simulated devices (the title
                                                  says whether and how much the curves are smoothed)
    expert_load_heatmaps(shares, path, ...)       layers x experts share of tokens (Fig. 7/10 analogue)
    intra_group_load(shares_LE, groups, path)     load inside each MoGE group (Fig. 9 analogue)
    coactivation(mats, path, ...)                 P(expert i and j fire together) (Fig. 8 analogue), with
                                                  expert-id ticks (each group's first expert when E > 16)
    search_throughput(panels, pangu, path)        `mogelm sim search --plot`: candidates' throughput (Fig. 3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLORS = {"moge": "#1f77b4", "topk": "#d62728", "softmax_topk": "#ff7f0e", "group_limited": "#2ca02c"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y, window: int) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.array([y[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _save(fig, path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def val_loss(curves: dict, path, train_curves: dict | None = None) -> Path:
    """curves: label -> (steps, val losses); train_curves: label -> (steps, train losses), smoothed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, (steps, losses) in (train_curves or {}).items():
        w = max(1, len(steps) // 25)
        ax.plot(steps, _smooth(losses, w), color=COLORS.get(label), alpha=0.3, lw=1,
                label=f"{label} train (smoothed)")
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, "o-", color=COLORS.get(label), lw=2, ms=4, label=f"{label} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title("Validation loss: MoGE vs top-k (same data, steps, seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    finals = [losses[-1] for _, losses in curves.values() if len(losses)]
    if finals:  # zoom on the interesting part, not the first steps at ln(V)
        lo = min(finals)
        ax.set_ylim(lo - 0.3, lo + 3.0)
    return _save(fig, path)


def imbalance_over_training(runs: dict, devices: list[int], path, num_tokens: int | None = None) -> Path:
    """runs: label -> {"steps": [S], "is": {P: [[per-layer IS] per step]}}; one panel per P."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4), squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]
    windows = set()
    for ax, P in zip(axes[0], devices):
        for label, run in runs.items():
            is_SL = np.asarray(run["is"].get(P, run["is"].get(str(P), [])), dtype=float)
            if is_SL.size == 0:
                continue
            w = max(1, len(run["steps"]) // 30)
            windows.add(w)
            for layer in range(is_SL.shape[1]):
                ax.plot(run["steps"], _smooth(is_SL[:, layer], w), styles[layer % 4], color=COLORS.get(label),
                        lw=1.5, alpha=0.85, label=f"{label} layer {layer}")
        ax.set_title(f"{P} simulated devices" + (f" (batches of {num_tokens} tokens)" if num_tokens else ""))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Imbalance Score (max - min) / |X|")
    axes[0][-1].legend(fontsize=7, ncol=2)
    smoothed = max(windows, default=1)
    note = (f"; curves are running means over {smoothed} steps" if smoothed > 1
            else "; every step shown, unsmoothed")
    fig.suptitle("Imbalance Score per layer over training "
                 f"(paper Eq. 3; MoGE: 0 when each device holds whole groups{note})")
    return _save(fig, path)


def expert_load_heatmaps(shares: dict, path, experts_per_group: int, active: int) -> Path:
    """shares: label -> [L][E] fraction of tokens routed to each expert (final validation pass)."""
    plt = _plt()
    labels = list(shares)
    mats = [np.asarray(shares[k], dtype=float) * 100 for k in labels]
    vmax = max(m.max() for m in mats)
    fig, axes = plt.subplots(len(labels), 1, figsize=(10, 1.6 + 0.55 * mats[0].shape[0] * len(labels)),
                             squeeze=False)
    E = mats[0].shape[1]
    for ax, label, m in zip(axes[:, 0], labels, mats):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        for b in range(experts_per_group, E, experts_per_group):
            ax.axvline(b - 0.5, color="white", lw=0.8, alpha=0.7)
        ax.set_ylabel("layer")
        ax.set_yticks(range(m.shape[0]))
        ax.set_title(f"{label}: share of tokens per expert "
                     f"(uniform = {100 * active / E:.1f} %, busiest {m.max():.1f} %)")
        fig.colorbar(im, ax=ax, label="% of tokens", pad=0.01)
    axes[-1, 0].set_xlabel(f"expert (white lines: groups of {experts_per_group})")
    fig.tight_layout()
    return _save(fig, path)


def intra_group_load(shares_LE, num_groups: int, path, layers: list[int] | None = None) -> Path:
    """MoGE: share of each group's tokens that each of its experts takes (paper Fig. 9 analogue)."""
    plt = _plt()
    m = np.asarray(shares_LE, dtype=float)
    L, E = m.shape
    per = E // num_groups
    layers = layers if layers is not None else list(range(L))
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 2.1 * len(layers)), squeeze=False, sharex=True)
    cmap = _plt().get_cmap("tab10")
    for ax, layer in zip(axes[:, 0], layers):
        group_tot = m[layer].reshape(num_groups, per).sum(-1, keepdims=True)
        within = (m[layer].reshape(num_groups, per) / np.maximum(group_tot, 1e-12)).reshape(-1) * 100
        ax.bar(range(E), within, color=[cmap(e // per % 10) for e in range(E)])
        ax.axhline(100 / per, color="black", ls="--", lw=1, label=f"uniform {100 / per:.0f} %")
        ax.set_ylabel(f"layer {layer}\n% of group")
        ax.set_ylim(0, max(100 / per * 2, within.max() * 1.1))
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("expert (colour = group)")
    fig.suptitle("MoGE: each expert's share of its group's tokens")
    fig.tight_layout()
    return _save(fig, path)


def coactivation(mats: dict, path, experts_per_group: int, layer_names: list[str]) -> Path:
    """mats: label -> list over shown layers of [E][E] P(i and j both chosen for a token).
    The diagonal (P(i)) is masked so the colour scale shows pairs."""
    plt = _plt()
    labels = list(mats)
    n_layers = len(layer_names)
    fig, axes = plt.subplots(len(labels), n_layers, figsize=(4.6 * n_layers, 4.2 * len(labels)),
                             squeeze=False)
    shown = {k: [np.asarray(x, dtype=float) * 100 for x in mats[k]] for k in labels}
    for k in labels:
        for x in shown[k]:
            np.fill_diagonal(x, np.nan)
    vmax = max(np.nanmax(x) for k in labels for x in shown[k])
    for i, k in enumerate(labels):
        for j, x in enumerate(shown[k]):
            ax = axes[i, j]
            im = ax.imshow(x, cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            E = x.shape[0]
            for b in range(experts_per_group, E, experts_per_group):
                ax.axvline(b - 0.5, color="cyan", lw=0.5, alpha=0.6)
                ax.axhline(b - 0.5, color="cyan", lw=0.5, alpha=0.6)
            ax.set_title(f"{k}, {layer_names[j]}", fontsize=10)
            ticks = list(range(0, E, 1 if E <= 16 else experts_per_group))  # every id, or each group's first
            ax.set_xticks(ticks)
            ax.set_yticks(ticks)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_ylabel("expert", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="% of tokens using both experts", shrink=0.8)
    fig.suptitle("Expert co-activation (diagonal hidden; cyan lines: MoGE groups)")
    return _save(fig, path)


def search_throughput(panels: dict, pangu: list[int], path) -> Path:
    """panels: target label -> (MoGE normalised throughput per candidate, the same shapes routed
    top-k on the same scale), candidates in one order (by active parameters); pangu: indices of
    the Pangu Pro MoE shape, starred. One panel per target."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (label, (moge, topk)) in zip(axes[0], panels.items()):
        xs = list(range(len(moge)))
        ax.scatter(xs, moge, s=14, c="tab:blue", label="MoGE candidates")
        ax.scatter(xs, topk, s=10, marker="x", c="tab:gray", label="same shape, top-k")
        for i in pangu:
            ax.scatter([i], [moge[i]], s=260, marker="*", c="tab:orange", edgecolors="k",
                       label="Pangu Pro MoE shape", zorder=5)
        ax.set_title(label)
        ax.set_xlabel("candidate (sorted by active parameters)")
        ax.set_ylabel("decode tokens/s per card (normalised)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle("mogelm sim search: MoGE candidates in the paper's space (cf. paper Fig. 3)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
