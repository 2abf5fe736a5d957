"""diagnostics.png: the records of diagnostics.jsonl (gpt2np.train.diagnostics) in one picture.

    gpt2np plot-diagnostics RUN_DIR [--out PNG]     (redraw it from the jsonl)

Left, a heatmap of log10 update ratio (tensor x step) on a diverging scale centred on the
usual ~1e-3 guide: white is a step of about 1e-3 of the weight's norm, red is a tensor
moving faster, dark red 1e-1 and more (a weight replaced in ten steps), blue one that barely
moves. Biases are left out: they start at zero, so their ratio means little. Right, per
layer over the steps: the gradient norm (the block's tensors together), the residual
stream's std, the attention's mean entropy and the fraction of GELU inputs in the flat
tail, lines coloured from the first layer (dark) to the last (yellow).
"""
from __future__ import annotations

import math

import numpy as np

from gpt2np.files import replace_atomically
GUIDE = -3.0  # log10 of the ~1e-3 update ratio of a healthy run (Karpathy's rule of thumb)
RANGE = (-6.0, 0.0)  # the heatmap's colour range in log10: 1e-6 (frozen) .. 1 (replaced)


def _short(name: str) -> str:
    return name.replace("transformer.", "").replace(".weight", ".w").replace(".bias", ".b")


def _groups(names):
    """Tensor names grouped per layer: embeddings, each block, ln_f (in the params' order)."""
    groups = {}
    for n in names:
        parts = n.split(".")
        key = f"h.{parts[2]}" if parts[1] == "h" else ("ln_f" if parts[1] == "ln_f" else "emb")
        groups.setdefault(key, []).append(n)
    return groups


def _layer_colors(keys):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    blocks = [k for k in keys if k.startswith("h.")]
    colors = {k: cmap(i / max(1, len(blocks) - 1)) for i, k in enumerate(blocks)}
    colors.update({"emb": "tab:red", "ln_f": "black"})
    return colors


def _heatmap(fig, ax, records):
    from matplotlib.colors import TwoSlopeNorm

    # biases start at 0: their ratio says nothing until they have grown, so they are left
    # out (diagnostics.jsonl has them); the matrices, embeddings and LayerNorm gains remain
    names = [n for n in records[-1]["update_ratio"] if not n.endswith(".bias")]
    steps = [r["step"] for r in records]
    grid = np.full((len(names), len(steps)), np.nan)
    for j, r in enumerate(records):
        for i, n in enumerate(names):
            v = r["update_ratio"].get(n)
            if v is not None and v > 0:
                grid[i, j] = math.log10(v)
    # each step's cell spans to the next diagnostic step (the last one: the same width)
    gap = steps[-1] - steps[-2] if len(steps) > 1 else 1
    edges = np.array(steps + [steps[-1] + gap], dtype=float)
    norm = TwoSlopeNorm(vmin=RANGE[0], vcenter=GUIDE, vmax=RANGE[1])
    mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), np.clip(grid, *RANGE),
                         cmap="RdBu_r", norm=norm, shading="flat")
    ax.set_ylim(len(names), 0)  # the params' order from the top
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels([_short(n) for n in names], fontsize=max(3.0, min(7.0, 420 / len(names))))
    ax.set_xlabel("step")
    ax.set_title("update ratio ||dW|| / ||W|| per step, weights (white = the 1e-3 guide)",
                 fontsize=10)
    bar = fig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.02)
    bar.ax.axhline(GUIDE, color="black", lw=1.5)
    bar.set_ticks([-6, -5, -4, -3, -2, -1, 0])
    bar.set_ticklabels(["1e-6", "1e-5", "1e-4", "1e-3 guide", "1e-2", "1e-1", "1"])


def _lines(ax, records, keyed, title, ylabel, log=True):
    """keyed: {layer key: [value per record]}; one line per layer."""
    steps = [r["step"] for r in records]
    colors = _layer_colors(list(keyed))
    for key, values in keyed.items():
        ys = [np.nan if v is None else v for v in values]
        ax.plot(steps, ys, "-", lw=1.2, color=colors[key], label=key,
                marker="." if len(steps) < 30 else None)
    if log:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=7)


def _per_layer_grad_norms(records):
    groups = _groups(records[-1]["grad_norm"])
    return {key: [math.sqrt(sum(r["grad_norm"][n] ** 2 for n in names)) for r in records]
            for key, names in groups.items()}


def _activation(records, figure):
    """{layer key: [figure per record]} over the blocks (and ln_f where it has the figure)."""
    out = {}
    for name in records[-1]["activations"]:
        key = name.replace("transformer.", "")
        if figure in records[-1]["activations"][name]:
            out[key] = [r["activations"].get(name, {}).get(figure) for r in records]
    return out


def plot_diagnostics(records: list, path):
    """Draw diagnostics.png from diagnostics.jsonl records (written atomically)."""
    records = [r for r in records if "update_ratio" in r]
    if not records:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 10), dpi=100)
    FigureCanvasAgg(fig)
    spec = fig.add_gridspec(4, 2, width_ratios=(1.25, 1))
    _heatmap(fig, fig.add_subplot(spec[:, 0]), records)
    axes = [fig.add_subplot(spec[i, 1]) for i in range(4)]
    _lines(axes[0], records, _per_layer_grad_norms(records),
           "gradient norm per layer (before clipping)", "L2 norm")
    _lines(axes[1], records, _activation(records, "resid_std"),
           "residual stream std entering each block (ln_f: the last)", "std")
    _lines(axes[2], records, _activation(records, "attn_entropy"),
           "attention entropy per layer (mean over heads, positions)", "nats", log=False)
    axes[2].set_ylim(bottom=0)  # 0: every query attends to one key
    _lines(axes[3], records, {k: [None if v is None else 100 * v for v in vs]
                              for k, vs in _activation(records, "gelu_tail").items()},
           "GELU inputs in the flat tail x < -3", "%", log=False)
    axes[3].set_ylim(0, max([1.0] + [y for ln in axes[3].lines for y in ln.get_ydata()
                                     if np.isfinite(y)]) * 1.05)
    axes[3].set_xlabel("step")
    axes[0].legend(fontsize=6, ncol=max(1, len(axes[0].lines) // 8), loc="best")
    fig.tight_layout()
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
