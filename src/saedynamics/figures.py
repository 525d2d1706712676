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

from saedynamics.artifacts import atomic_file, figure_metadata, read_json  # noqa: E402
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


def _panels(df: pd.DataFrame, title: str, height: float = 3.0, rows: int = 1):
    """A figure with one column of panels per layer (and `rows` rows); axes[row][layer]."""
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(
        rows,
        len(layers),
        figsize=(4.0 * len(layers) + 2.8, height * rows),  # + room for the legend on the right
        sharey="row",
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(title)
    grid = [dict(zip(layers, row, strict=True)) for row in axes]
    return fig, (grid[0] if rows == 1 else grid)


def _draw_lines(ax, df: pd.DataFrame, value: str, styles: dict, x: str = "step", **line) -> None:
    """One line per architecture: mean +- std over seeds (or seed pairs) of `value` against `x`."""
    for name, style in styles.items():
        g = df[df["architecture"] == name].groupby(x)[value].agg(["mean", "std"])
        if g.empty:
            continue
        g["std"] = g["std"].fillna(0)  # one seed: no band; an undefined mean stays NaN, a gap
        kw = {"color": style["color"], "marker": style["marker"], "ms": 4, "label": style["label"]}
        ax.plot(g.index, g["mean"], **(kw | line))
        ax.fill_between(
            g.index,
            g["mean"] - g["std"],
            g["mean"] + g["std"],
            color=style["color"],
            alpha=0.2,
            lw=0,
        )


def _mark_undefined(ax, sub: pd.DataFrame, value: str, label: str) -> None:
    """A labelled dotted line at each step where `value` is undefined (NaN) for every SAE: the
    line has a gap there, and the reader sees why rather than a number that means nothing."""
    undefined = sub.groupby("step")[value].apply(lambda v: v.isna().all())
    for step in undefined[undefined].index:
        ax.axvline(step, color="0.55", ls=":", lw=1)
        ax.text(
            step,
            0.5,
            label,
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="center",
            va="center",
            fontsize=7,
            color="0.3",
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )


def _lines_vs_step(
    df: pd.DataFrame,
    value: str,
    ylabel: str,
    title: str,
    null: str | None = None,
    undefined: str | None = None,
):
    """Mean +- std over seeds (or pairs) of `value` against the step, one panel per layer;
    `undefined` labels the steps where the value is NaN for every SAE."""
    styles = architecture_styles(df)
    fig, axes = _panels(df, title)
    for layer, ax in axes.items():
        sub = df[df["layer"] == layer]
        _draw_lines(ax, sub, value, styles)
        if undefined is not None:
            _mark_undefined(ax, sub, value, undefined)
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


def ce_recovered(tables: Path):
    df = load(tables, "spliced")
    return _lines_vs_step(
        df,
        "ce_loss_score",
        "CE-loss recovered (1: as the LM, 0: as zero-ablation)",
        "SAEs spliced into the LM: next-token loss recovered across training",
        undefined="undefined: zero-ablation loss ≤ clean loss",
    )


def decoder_drift(tables: Path):
    df = load(tables, "drift")
    styles = architecture_styles(df)
    fig, (top, bottom) = _panels(
        df, "Decoder drift: how each SAE's dictionary moves across LM training", rows=2
    )
    for layer in top:
        sub = df[df["layer"] == layer]
        _draw_lines(top[layer], sub.dropna(subset=["mcc_next"]), "mcc_next", styles)
        _draw_lines(bottom[layer], sub, "mcc_final", styles)
        _draw_lines(
            bottom[layer],
            sub,
            "mcc_final_other_seeds",
            styles,
            ls=":",
            marker="",
            lw=1,
            label="_control",
        )
        top[layer].set_title(f"layer {layer}")
        _step_axis(top[layer], df["step"])
        _step_axis(bottom[layer], df["step"])
        top[layer].set_xlabel("")
    first = next(iter(top))
    top[first].set_ylabel("MCC to the next checkpoint\n(same seed)")
    bottom[first].set_ylabel("MCC to the final checkpoint\n(same seed; dotted: other seeds)")
    _legend(fig, top[first])
    return fig


def latent_stability(tables: Path):
    df = load(tables, "latent_stability")
    final = df["step"].max()
    df = df[df["step"] == final].assign(
        density=lambda d: 10 ** ((d["log10_density_lo"].clip(lower=-7) + d["log10_density_hi"]) / 2)
    )
    styles = architecture_styles(df)
    fig, axes = _panels(df, f"Which latents every seed finds, by firing frequency (step {final:,})")
    for layer, ax in axes.items():
        sub = df[df["layer"] == layer]
        for name, style in styles.items():
            g = sub[sub["architecture"] == name]
            g = (
                g.assign(w=g["shared_with_all"] * g["n_latents"])
                .groupby("density")[["w", "n_latents"]]
                .sum()
            )
            if g.empty:
                continue
            ax.plot(
                g.index,
                g["w"] / g["n_latents"],
                color=style["color"],
                marker=style["marker"],
                ms=4,
                label=style["label"],
            )
        ax.set_xscale("log")
        ax.set_xlabel("firing frequency on eval tokens (log)")
        ax.set_title(f"layer {layer}")
    first = next(iter(axes.values()))
    first.set_ylabel("latents shared with every other seed\n(fraction, cos >= 0.7)")
    _legend(fig, first)
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
    "ce_recovered": ce_recovered,
    "decoder_drift": decoder_drift,
    "latent_stability": latent_stability,
    "lm_loss": lm_loss,
}


# ---- validation on toy models (drawn from validation/*.json, that stage's tables) --------------------


def toy_superposition(validation: Path):
    doc = read_json(Path(validation) / "superposition.json")
    df = pd.DataFrame(doc["models"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6), layout="constrained")
    fig.suptitle("Effective features on toy models of superposition: SAE against ground truth")
    points = ax.scatter(
        df["f_true"],
        df["f_sae"],
        c=np.log10(df["density"]),
        cmap="viridis",
        s=30,
        edgecolor="0.2",
        lw=0.4,
    )
    top = max(df["f_true"].max(), df["f_sae"].max()) * 1.05
    ax.plot([0, top], [0, top], color="0.5", ls="--", lw=1, label="y = x")
    r = doc["pearson_r"]
    ref = doc["reference"]["pearson_r_sae"]
    ax.set_title(f"Pearson r = {r:.3f} (paper: {ref})" if r is not None else "r undefined")
    ax.set_xlabel("ground truth F = exp H(p), p_i ~ |W_i|^2 (features)")
    ax.set_ylabel("through the SAE: F of its codes (features)")
    ax.legend(frameon=False, loc="upper left")
    fig.colorbar(points, ax=ax, label="log10 feature density (1 - S)")
    ax2.plot(df["density"], df["f_true"], color="0.15", marker="o", ms=4, label="ground truth")
    ax2.plot(
        df["density"], df["f_sae"], color=PALETTE[0], marker="s", ms=4, label="through the SAE"
    )
    ax2.axhline(doc["settings"]["toy_hidden"], color="0.5", ls=":", lw=1, label="N neurons")
    ax2.set_xscale("log")
    ax2.set_xlabel("feature density 1 - S (log)")
    ax2.set_ylabel("effective features F")
    ax2.set_title(
        f"{len(df)} toy models, {doc['settings']['toy_features']} features in "
        f"{doc['settings']['toy_hidden']} neurons"
    )
    ax2.legend(frameon=False)
    return fig


def organism_consistency(validation: Path):
    doc = read_json(Path(validation) / "organism.json")
    names = list(doc["conditions"])
    fig, axes = plt.subplots(
        1,
        len(names),
        figsize=(3.3 * len(names), 3.2),
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle("PW-MCC against ground-truth recovery on the model organism (Song et al. 2025)")
    for ax, name in zip(axes[0], names, strict=True):
        cond = doc["conditions"][name]
        c = cond["curve"]
        for gt in c["gt_mcc_seed"].values():
            ax.plot(c["tokens"], gt, color=PALETTE[1], lw=0.6, alpha=0.5)
        ax.plot(
            c["tokens"],
            c["gt_mcc"],
            color=PALETTE[1],
            lw=1.8,
            label="ground-truth MCC (per seed, mean)",
        )
        ax.plot(c["tokens"], c["pw_mcc"], color=PALETTE[0], lw=1.8, label="PW-MCC (across seeds)")
        ax.axhline(
            doc["null_pw_mcc"], color="0.45", ls="--", lw=1, label="random dictionaries (null)"
        )
        ax.set_xscale("log")
        ax.set_xlabel("SAE training tokens (log)")
        r = cond["pearson_r"]
        ax.set_title(
            f"{name.replace('_', ' ')}\nL0 {cond['final']['l0']:.1f}, r = "
            + ("n/a" if r is None else f"{r:.2f}"),
            fontsize=9,
        )
    axes[0][0].set_ylabel("matched decoder cosine (MCC)")
    _legend(fig, axes[0][0])
    return fig


VALIDATION_FIGURES: dict[str, Callable] = {
    "toy_superposition": toy_superposition,
    "organism_consistency": organism_consistency,
}


def _save(fig, out_dir: Path, name: str, cfg: FiguresConfig, provenance: dict | None) -> list[Path]:
    written = []
    for fmt in cfg.formats:
        path = Path(out_dir) / f"{name}.{fmt}"
        # no creation date in the file: the same tables give byte-identical figures
        metadata = (
            {"CreationDate": None} if fmt == "pdf" else {"Date": None} if fmt == "svg" else {}
        ) | figure_metadata(fmt, provenance)
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=cfg.dpi, metadata=metadata)
        written.append(path)
    plt.close(fig)
    return written


def render_validation(
    validation: Path, out_dir: Path, cfg: FiguresConfig, provenance: dict | None = None
) -> list[Path]:
    """Every figure of VALIDATION_FIGURES, from validation/*.json, into `out_dir`."""
    _style()
    return [
        p
        for name, draw in VALIDATION_FIGURES.items()
        for p in _save(draw(validation), out_dir, name, cfg, provenance)
    ]


def render_all(
    tables: Path, out_dir: Path, cfg: FiguresConfig, provenance: dict | None = None
) -> list[Path]:
    """Every figure of FIGURES in every configured format; `provenance` in each file's metadata."""
    _style()
    return [
        p
        for name, draw in FIGURES.items()
        for p in _save(draw(tables), out_dir, name, cfg, provenance)
    ]
