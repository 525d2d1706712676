"""The paper's figures, drawn from the tidy tables alone (never from upstream artifacts).

One style throughout: the LM training step on a symmetric-log axis so that step 0 (initialisation)
is shown; one colour per architecture in every figure, legends naming architectures in words; one
panel per layer; shaded bands are +-1 std over seeds (or seed pairs); units on every axis.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.lines
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from saedynamics.artifacts import atomic_file  # noqa: E402
from saedynamics.config import FiguresConfig  # noqa: E402
from saedynamics.tables import load  # noqa: E402

# Okabe-Ito first (distinguishable with colour-vision deficiencies), then Tol's muted scheme: 16
# colours, and a marker per architecture too, so that lines stay apart in greyscale print
PALETTE = [
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
    "#332288",
    "#882255",
    "#117733",
    "#999933",
    "#AA4499",
    "#44AA99",
    "#661100",
    "#888888",
]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H", "o"]
STEP_LABEL = "LM training step (symlog; 0 = initialisation)"


def _style() -> None:
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "legend.fontsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "savefig.bbox": "tight",
        }
    )


def architecture_styles(df: pd.DataFrame) -> dict[str, dict]:
    """name -> colour, marker, label; stable (sorted by name) so every figure agrees."""
    names = sorted(df["architecture"].unique())
    first = df.drop_duplicates("architecture").set_index("architecture")

    def label(name: str) -> str:  # the name in words; the config key too when it says more
        title = first.loc[name, "architecture_title"]
        return title if name == first.loc[name, "architecture_type"] else f"{title} ({name})"

    return {
        name: {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "label": label(name),
        }
        for i, name in enumerate(names)
    }


def _step_axis(ax, steps) -> None:
    steps = sorted(set(int(s) for s in steps))
    ax.set_xscale("symlog", linthresh=1, linscale=0.4)
    ax.set_xticks(steps)
    ax.set_xticklabels(
        [f"{s:,}" for s in steps],
        rotation=45 if len(steps) > 5 else 0,
        ha="right" if len(steps) > 5 else "center",
    )
    ax.minorticks_off()
    ax.set_xlim(-0.2 if steps[0] == 0 else steps[0] / 1.5, steps[-1] * 1.5)
    ax.set_xlabel(STEP_LABEL)


def _panels(df: pd.DataFrame, title: str, height: float = 3.0):
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(
        1,
        len(layers),
        figsize=(4.0 * len(layers) + 2.8, height),  # + room for the legend on the right
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(title)
    return fig, dict(zip(layers, axes[0], strict=True))


def _lines_vs_step(df: pd.DataFrame, value: str, ylabel: str, title: str, null: str | None = None):
    """Mean +- std over seeds (or pairs) of `value` against the step, one panel per layer."""
    styles = architecture_styles(df)
    fig, axes = _panels(df, title)
    for layer, ax in axes.items():
        sub = df[df["layer"] == layer]
        for name, style in styles.items():
            g = (
                sub[sub["architecture"] == name]
                .groupby("step")[value]
                .agg(["mean", "std"])
                .fillna(0)
            )
            if g.empty:
                continue
            ax.plot(
                g.index,
                g["mean"],
                color=style["color"],
                marker=style["marker"],
                ms=4,
                label=style["label"],
            )
            ax.fill_between(
                g.index,
                g["mean"] - g["std"],
                g["mean"] + g["std"],
                color=style["color"],
                alpha=0.2,
                lw=0,
            )
        if null is not None:
            ax.axhline(
                sub[null].mean(), color="0.45", ls="--", lw=1, label="random dictionaries (null)"
            )
        _step_axis(ax, df["step"])
        ax.set_title(f"layer {layer}")
    first = next(iter(axes.values()))
    first.set_ylabel(ylabel)
    _legend(fig, first)
    return fig


def _legend(fig, ax, handles=None) -> None:
    """One legend for the figure, outside the panels on the right (many architectures)."""
    handles, labels = (
        (handles, [h.get_label() for h in handles]) if handles else ax.get_legend_handles_labels()
    )
    fig.legend(handles, labels, loc="outside right center", frameon=False)


def pw_mcc(tables: Path):
    df = load(tables, "consistency")
    return _lines_vs_step(
        df,
        "mcc",
        "PW-MCC (mean matched decoder cosine)",
        "Seed consistency: PW-MCC across LM training",
        null="null_pw_mcc",
    )


def shared_fraction(tables: Path):
    df = load(tables, "consistency")
    return _lines_vs_step(
        df,
        "shared_fraction",
        "shared latents (fraction, cos >= 0.7)",
        "Seed consistency: shared latents across LM training",
        null="null_shared_fraction",
    )


def effective_features(tables: Path):
    df = load(tables, "superposition")
    fig = _lines_vs_step(
        df,
        "effective_features",
        "effective features F = exp H(p)",
        "Superposition: effective features across LM training",
    )
    d_model = int(df["d_model"].iloc[0])
    last = list(fig.axes)[len(df["layer"].unique()) - 1]
    right = last.secondary_yaxis("right", functions=(lambda f: f / d_model, lambda p: p * d_model))
    right.set_ylabel(f"psi = F / d_model (d_model = {d_model})")
    return fig


def dead_fraction(tables: Path):
    df = load(tables, "reconstruction")
    return _lines_vs_step(
        df,
        "dead_fraction",
        "dead latents (fraction, never active on eval tokens)",
        "Dead latents across LM training",
    )


def fvu_vs_l0(tables: Path):
    df = load(tables, "reconstruction")
    styles = architecture_styles(df)
    steps = sorted(df["step"].unique())
    cmap = plt.get_cmap("viridis", len(steps))
    norm = matplotlib.colors.BoundaryNorm(np.arange(len(steps) + 1) - 0.5, len(steps))
    fig, axes = _panels(
        df, "Reconstruction-sparsity frontier, coloured by LM training step", height=3.2
    )
    for layer, ax in axes.items():
        sub = df[df["layer"] == layer]
        for name, style in styles.items():
            s = sub[sub["architecture"] == name]
            ax.scatter(
                s["l0"],
                s["fvu"],
                c=[steps.index(v) for v in s["step"]],
                cmap=cmap,
                norm=norm,
                marker=style["marker"],
                s=28,
                edgecolor="0.2",
                lw=0.4,
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("L0 (active latents per token, log)")
        ax.set_title(f"layer {layer}")
    first = next(iter(axes.values()))
    first.set_ylabel("FVU (fraction of variance unexplained)")
    markers = [
        matplotlib.lines.Line2D(
            [], [], ls="", marker=st["marker"], color="0.55", mec="0.2", mew=0.4, label=st["label"]
        )
        for st in styles.values()
    ]
    _legend(fig, first, markers)
    bar = fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=list(axes.values()),
        ticks=range(len(steps)),
    )
    bar.ax.set_yticklabels([f"{s:,}" for s in steps])
    bar.set_label("LM training step")
    return fig


def lm_loss(tables: Path):
    df = load(tables, "checkpoints").dropna(subset=["lm_eval_loss"])
    fig, ax = plt.subplots(figsize=(4.2, 3.0), layout="constrained")
    ax.plot(df["step"], df["lm_eval_loss"], color="0.15", marker="o", ms=4)
    dup = df[df["duplicate_of"].notna()]
    if len(dup):
        ax.scatter(
            dup["step"], dup["lm_eval_loss"], color="#D55E00", zorder=3, label="duplicate weights"
        )
        ax.legend(frameon=False)
    _step_axis(ax, df["step"])
    ax.set_ylabel("LM eval loss (nats / token)")
    ax.set_title("The language model across training")
    return fig


FIGURES: dict[str, Callable] = {
    "pw_mcc": pw_mcc,
    "shared_fraction": shared_fraction,
    "effective_features": effective_features,
    "fvu_vs_l0": fvu_vs_l0,
    "dead_fraction": dead_fraction,
    "lm_loss": lm_loss,
}


def render_all(tables: Path, out_dir: Path, cfg: FiguresConfig) -> list[Path]:
    _style()
    written = []
    for name, draw in FIGURES.items():
        fig = draw(tables)
        for fmt in cfg.formats:
            path = Path(out_dir) / f"{name}.{fmt}"
            # no creation date in the file: the same tables give byte-identical figures
            metadata = (
                {"CreationDate": None} if fmt == "pdf" else {"Date": None} if fmt == "svg" else {}
            )
            with atomic_file(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=cfg.dpi, metadata=metadata)
            written.append(path)
        plt.close(fig)
    return written
