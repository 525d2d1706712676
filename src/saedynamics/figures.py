"""The paper's figures, drawn from the tidy tables alone (never from upstream artifacts).

One style throughout, decided once here:

- x: the LM training step on a symmetric-log axis, so that step 0 (initialisation) is shown; or
  the LM's eval loss (`metrics_vs_lm_loss`), training running left to right.
- One fixed colour and marker per architecture TYPE (`ARCHITECTURE_STYLE`, keyed by the registered
  type: `topk`, `relu`, ...), the same in every figure and every study whatever set of
  architectures a study trains. Variants of one type in a study (config names such as `topk-k64`,
  whose `architecture_type` is `topk`) keep the type's colour and marker and differ by line style
  (dashed, dash-dot, dotted, in sorted name order) and a hollow marker; the variant named as its type
  stays solid and filled. A type missing from the table (a new architecture) gets a grey shade.
- Small multiples by family (`FAMILIES`): where a panel would hold more than `MAX_LINES` (6) lines,
  one panel per family instead, each with the metric's null line where it has one, and its own
  legend below it. Families group the methods by how they choose the active latents:
  k per token (TopK, g-SAE, Variational TopK), k per batch (BatchTopK and the methods built on its
  allocation: Mutual Choice, Feature Choice, Matryoshka), an L1 penalty (ReLU 2023 / 2024, Gated,
  ATM) and a learned threshold or an input-dependent k (JumpReLU, AdaptiveK, top-AFA).
- Lines are means over seeds (or seed pairs); shaded bands are +-1 std, and every figure that draws
  bands says over how many (N from the table) in its title. One panel (row) per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import matplotlib.colors
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from saedynamics.artifacts import atomic_file, figure_metadata, read_json  # noqa: E402
from saedynamics.config import FiguresConfig  # noqa: E402
from saedynamics.tables import load  # noqa: E402

# Okabe-Ito first (distinguishable with colour-vision deficiencies), then Tol's muted scheme
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

# type -> (colour, marker): fixed, so an architecture looks the same in every figure and study.
# Colours and markers are distinct within a family (a family shares a panel) and across the table.
ARCHITECTURE_STYLE: dict[str, tuple[str, str]] = {
    # k per token
    "topk": ("#0072B2", "o"),
    "gsae": ("#D55E00", "s"),
    "vsae": ("#009E73", "^"),
    # k per batch
    "batchtopk": ("#CC79A7", "D"),
    "mutual_choice": ("#E69F00", "v"),
    "feature_choice": ("#56B4E9", "P"),
    "matryoshka": ("#000000", "X"),
    # L1 penalty
    "relu": ("#332288", "<"),
    "relu_2023": ("#999933", ">"),
    "gated": ("#882255", "h"),
    "atm": ("#44AA99", "p"),
    # threshold or input-dependent k
    "jumprelu": ("#AA4499", "*"),
    "adaptivek": ("#661100", "d"),
    "topafa": ("#117733", "H"),
}
FAMILIES: dict[str, list[str]] = {
    "k per token (TopK-like)": ["topk", "gsae", "vsae"],
    "k per batch (BatchTopK-like)": ["batchtopk", "mutual_choice", "feature_choice", "matryoshka"],
    "L1 penalty (ReLU-like)": ["relu", "relu_2023", "gated", "atm"],
    "threshold or adaptive k": ["jumprelu", "adaptivek", "topafa"],
}
OTHER_FAMILY = "other"
MAX_LINES = 6  # more lines than this in a panel: small multiples by family
VARIANT_LINESTYLES = [(0, (5, 2)), (0, (5, 1.5, 1, 1.5)), (0, (1.5, 1.5))]
STEP_LABEL = "LM training step (symlog; 0 = initialisation)"
NULL_STYLE = {"color": "0.4", "ls": "--", "lw": 1.1}


def _style() -> None:
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "font.size": 9,
            "axes.titlesize": 9.5,
            "axes.labelsize": 9,
            "legend.fontsize": 7.5,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "savefig.bbox": "tight",
        }
    )


def family_of(kind: str) -> str:
    return next((f for f, kinds in FAMILIES.items() if kind in kinds), OTHER_FAMILY)


def architecture_styles(df: pd.DataFrame) -> dict[str, dict]:
    """name -> colour, marker, line style, label, family: fixed per architecture type (see the
    module docstring), so every figure of every study agrees; ordered by family, then type."""
    first = df.drop_duplicates("architecture").set_index("architecture")
    order = {kind: i for i, kind in enumerate(k for kinds in FAMILIES.values() for k in kinds)}
    names = sorted(
        first.index,
        key=lambda n: (
            order.get(first.loc[n, "architecture_type"], len(order)),
            first.loc[n, "architecture_type"],
            n != first.loc[n, "architecture_type"],
            n,
        ),
    )
    unknown = sorted({k for k in first["architecture_type"] if k not in ARCHITECTURE_STYLE})
    greys = {k: str(0.15 + 0.5 * i / max(len(unknown), 1)) for i, k in enumerate(unknown)}
    markers = ["o", "s", "^", "D", "v"]
    styles = {}
    for name in names:
        kind = first.loc[name, "architecture_type"]
        title = first.loc[name, "architecture_title"]
        colour, marker = ARCHITECTURE_STYLE.get(
            kind, (greys.get(kind, "0.4"), markers[unknown.index(kind) % 5] if unknown else "o")
        )
        variants = sorted(n for n in names if first.loc[n, "architecture_type"] == kind)
        variants = [n for n in variants if n != kind]
        variant = name in variants
        ls = VARIANT_LINESTYLES[variants.index(name) % len(VARIANT_LINESTYLES)] if variant else "-"
        styles[name] = {
            "color": colour,
            "marker": marker,
            "ls": ls,
            "mfc": "white" if variant else colour,
            "label": title if name == kind else f"{title} ({name})",
            "family": family_of(kind),
            "type": kind,
        }
    return styles


def _groups(styles: dict) -> list[tuple[str | None, dict]]:
    """[(family or None, styles)]: one group when all lines fit a panel, else one per family."""
    if len(styles) <= MAX_LINES:
        return [(None, styles)]
    families = [*FAMILIES, OTHER_FAMILY]
    return [
        (f, {n: st for n, st in styles.items() if st["family"] == f})
        for f in families
        if any(st["family"] == f for st in styles.values())
    ]


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


def _band_note(df: pd.DataFrame, pairs: bool = False) -> str:
    """'shaded: +-1 std over N seeds', N from the table (the most any SAE has)."""
    keys = ["step", "layer", "architecture"]
    if pairs:
        n = int(df.groupby(keys).size().max())
        seeds = int(
            df.groupby(keys)[["seed_a", "seed_b"]]
            .apply(lambda g: len({*g.seed_a, *g.seed_b}))
            .max()
        )
        return f"line: mean, shaded: ±1 std over {n} seed pairs ({seeds} seeds)"
    n = int(df.groupby(keys)["seed"].nunique().max())
    return f"line: mean, shaded: ±1 std over {n} seeds"


class _Grid:
    """Panels: rows = `rows` per layer x layers, columns = groups (families, or one). Each panel
    is `grid[(row, layer, group)]`; `legend()` puts one legend per column below it, or one for
    the figure on the right when there is a single column."""

    def __init__(self, df, styles, title, rows=1, height=2.9, width=3.4, sharey="row"):
        self.layers = sorted(df["layer"].unique())
        self.groups = _groups(styles)
        self.rows = rows
        n_rows = rows * len(self.layers)
        single = len(self.groups) == 1
        self.fig, axes = plt.subplots(
            n_rows,
            len(self.groups),
            figsize=(width * len(self.groups) + (2.8 if single else 0.3), height * n_rows + 0.8),
            sharey=sharey,
            sharex=True,
            squeeze=False,
            layout="constrained",
        )
        self.fig.suptitle(title)
        self.axes = {
            (r, layer, g): axes[i * rows + r][g]
            for i, layer in enumerate(self.layers)
            for r in range(rows)
            for g in range(len(self.groups))
        }
        for (r, layer, g), ax in self.axes.items():
            family = self.groups[g][0]
            head = [family] if family and r == 0 and layer == self.layers[0] else []
            if len(self.layers) > 1 and r == 0:
                head.append(f"layer {layer}")
            ax.set_title(", ".join(head) if head else "")

    def items(self):
        for (r, layer, g), ax in self.axes.items():
            yield r, layer, self.groups[g][1], ax

    def ylabel(self, r: int, text: str) -> None:
        for layer in self.layers:  # the layer is in the panel titles
            self.axes[(r, layer, 0)].set_ylabel(text)

    def legend(self, extra: list | None = None) -> None:
        """The legend(s); also the x label on the bottom row only (the panels share x)."""
        for (r, layer, _), ax in self.axes.items():
            if (r, layer) != (self.rows - 1, self.layers[-1]):
                ax.set_xlabel("")
        extra = extra or []
        if len(self.groups) == 1:
            ax = self.axes[(0, self.layers[0], 0)]
            handles, labels = ax.get_legend_handles_labels()
            seen = dict(zip(labels, handles, strict=True))
            for h in extra:
                seen.setdefault(h.get_label(), h)
            self.fig.legend(
                list(seen.values()), list(seen), loc="outside right center", frameon=False
            )
            return
        bottom = (self.rows - 1, self.layers[-1])
        for g, (_, styles) in enumerate(self.groups):
            handles = [_handle(st) for st in styles.values()] + extra
            self.axes[(*bottom, g)].legend(
                handles=handles,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.2),
                frameon=False,
                ncol=1,
            )


def _legend(fig, ax, handles=None) -> None:
    """One legend for the figure, outside the panels on the right."""
    handles, labels = (
        (handles, [h.get_label() for h in handles]) if handles else ax.get_legend_handles_labels()
    )
    fig.legend(handles, labels, loc="outside right center", frameon=False)


def _line(style: dict) -> dict:
    """An architecture's line style (`architecture_styles`) as matplotlib keywords."""
    return {k: style[k] for k in ("color", "marker", "mfc", "ls", "label")}


def _handle(style: dict, **kw) -> matplotlib.lines.Line2D:
    return matplotlib.lines.Line2D([], [], **(_line(style) | {"ms": 5} | kw))


def _null_handle(label: str = "random dictionaries (null)") -> matplotlib.lines.Line2D:
    return matplotlib.lines.Line2D([], [], label=label, **NULL_STYLE)


def _draw_lines(ax, df: pd.DataFrame, value: str, styles: dict, x: str = "step", **line) -> None:
    """One line per architecture: mean +- std over seeds (or seed pairs) of `value` against `x`."""
    for i, (name, style) in enumerate(styles.items()):
        g = df[df["architecture"] == name].groupby(x)[value].agg(["mean", "std"])
        if g.empty:
            continue
        g["std"] = g["std"].fillna(0)  # one seed: no band; an undefined mean stays NaN, a gap
        # the first lines of a panel drawn wider and with larger markers, so that a line that
        # coincides with a later one (e.g. Mutual Choice on BatchTopK) still shows round it
        kw = _line(style) | {"ms": max(6.5 - 0.8 * i, 3.5), "lw": max(2.3 - 0.3 * i, 1.2)}
        ax.plot(g.index, g["mean"], **(kw | line))
        ax.fill_between(
            g.index,
            g["mean"] - g["std"],
            g["mean"] + g["std"],
            color=style["color"],
            alpha=0.18,
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
    pairs: bool = False,
):
    """Mean +- std over seeds (or pairs) of `value` against the step, a panel per layer (and per
    family when there are many architectures); `null` the column of the null baseline, drawn in
    every panel; `undefined` labels the steps where the value is NaN for every SAE."""
    styles = architecture_styles(df)
    grid = _Grid(df, styles, f"{title}\n{_band_note(df, pairs)}")
    for _, layer, group, ax in grid.items():
        sub = df[df["layer"] == layer]
        _draw_lines(ax, sub[sub["architecture"].isin(group)], value, styles=group)
        if undefined is not None:
            _mark_undefined(ax, sub, value, undefined)
        if null is not None:
            ax.axhline(sub[null].mean(), **NULL_STYLE)
        _step_axis(ax, df["step"])
    grid.ylabel(0, ylabel)
    grid.legend([_null_handle()] if null is not None else None)
    return grid.fig


def pw_mcc(tables: Path):
    df = load(tables, "consistency")
    return _lines_vs_step(
        df,
        "mcc",
        "PW-MCC (mean matched decoder cosine)",
        "Seed consistency: PW-MCC across LM training",
        null="null_pw_mcc",
        pairs=True,
    )


def shared_fraction(tables: Path):
    df = load(tables, "consistency")
    return _lines_vs_step(
        df,
        "shared_fraction",
        "shared latents (fraction, cos ≥ 0.7)",
        "Seed consistency: latents shared by a seed pair across LM training",
        null="null_shared_fraction",
        pairs=True,
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
    # the rightmost panel of the first row (panels are laid out row by row)
    n_groups = len(_groups(architecture_styles(df)))
    last = fig.axes[n_groups - 1]
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


def _log_axis(axis) -> None:
    """Log ticks a reader can read: 1-2-5 labels in plain numbers, unlabelled minor ticks."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=np.arange(1, 10)))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The Pareto frontier (lowest FVU at no more L0) of mean (l0, fvu) points, by L0."""
    points = points.sort_values(["l0", "fvu"])
    return points[points["fvu"] <= points["fvu"].cummin()]


def fvu_vs_l0(tables: Path):
    df = load(tables, "reconstruction")
    styles = architecture_styles(df)
    steps = sorted(df["step"].unique())
    layers = sorted(df["layer"].unique())
    fig, axes = plt.subplots(
        len(layers),
        len(steps),
        figsize=(2.9 * len(steps) + 2.8, 3.0 * len(layers) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(
        "Reconstruction-sparsity frontier at each LM checkpoint\n"
        f"points: mean, bars: ±1 std over {int(df.groupby(['step', 'layer', 'architecture'])['seed'].nunique().max())} seeds;"
        " grey line: the frontier (lowest FVU at no more L0)"
    )
    means = (
        df.groupby(["layer", "step", "architecture"])[["l0", "fvu"]]
        .agg(["mean", "std"])
        .fillna(0.0)
    )
    worse = False
    for i, layer in enumerate(layers):
        for j, step in enumerate(steps):
            ax = axes[i][j]
            pts = means.loc[(layer, step)] if (layer, step) in means.index.droplevel(2) else None
            if pts is None:
                continue
            for name, style in styles.items():
                if name not in pts.index:
                    continue
                p = pts.loc[name]
                ax.errorbar(
                    p[("l0", "mean")],
                    p[("fvu", "mean")],
                    xerr=p[("l0", "std")],
                    yerr=p[("fvu", "std")],
                    **(_line(style) | {"ms": 6, "ls": "", "elinewidth": 0.8}),
                )
                if p[("fvu", "mean")] > 1:
                    worse = True
                    ax.plot(
                        p[("l0", "mean")],
                        p[("fvu", "mean")],
                        marker="o",
                        ms=12,
                        mfc="none",
                        mec="#D55E00",
                        mew=1.5,
                        ls="",
                    )
            front = _frontier(
                pd.DataFrame({"l0": pts[("l0", "mean")], "fvu": pts[("fvu", "mean")]})
            )
            ax.plot(front["l0"], front["fvu"], color="0.5", lw=1.2, zorder=0)
            ax.axhline(1.0, color="#D55E00", ls=":", lw=1)
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
            ax.set_title(f"step {step:,}" + (f", layer {layer}" if len(layers) > 1 else ""))
            if i == len(layers) - 1:
                ax.set_xlabel("L0 (active latents per token, log)")
        axes[i][0].set_ylabel("FVU (fraction of variance unexplained, log)")
    # FVU on a log axis: the crowd of good SAEs spreads out, and FVU = 1 stays in view
    fvu = means[("fvu", "mean")]
    top = max(1.25, float((fvu + means[("fvu", "std")]).max()) * 1.15)
    bottom = float(fvu[fvu > 0].min()) / 1.3 if (fvu > 0).any() else 0.01
    axes[0][0].set_yscale("log")
    axes[0][0].set_ylim(bottom, top)
    _log_axis(axes[0][0].yaxis)
    extra = [
        matplotlib.lines.Line2D([], [], color="0.5", lw=1.2, label="frontier"),
        matplotlib.lines.Line2D(
            [], [], color="#D55E00", ls=":", lw=1, label="FVU = 1 (no better than the mean)"
        ),
    ]
    if worse:
        extra.append(
            matplotlib.lines.Line2D(
                [],
                [],
                marker="o",
                ms=10,
                mfc="none",
                mec="#D55E00",
                mew=1.5,
                ls="",
                label="FVU > 1",
            )
        )
    fig.legend(
        handles=[_handle(st | {"ls": ""}) for st in styles.values()] + extra,
        loc="outside right center",
        frameon=False,
    )
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


def _null_by_layer(tables: Path, step: int | None = None) -> dict[int, dict[str, float]]:
    """layer -> the random-dictionary nulls (PW-MCC, shared fraction) from the consistency table
    (at `step`, or over every step), {} where there is no consistency table."""
    path = Path(tables) / "consistency.parquet"
    if not path.exists():
        return {}
    cons = load(tables, "consistency")
    if step is not None and (cons["step"] == step).any():
        cons = cons[cons["step"] == step]
    return {
        int(layer): {"pw_mcc": g["null_pw_mcc"].mean(), "shared": g["null_shared_fraction"].mean()}
        for layer, g in cons.groupby("layer")
    }


def decoder_drift(tables: Path):
    df = load(tables, "drift")
    nulls = _null_by_layer(tables)
    styles = architecture_styles(df)
    grid = _Grid(
        df,
        styles,
        "Decoder drift: how each SAE's dictionary moves across LM training\n" + _band_note(df),
        rows=2,
    )
    control = "control: other seeds, final ckpt\n(range over the panel's SAEs)"
    for r, layer, group, ax in grid.items():
        sub = df[(df["layer"] == layer) & df["architecture"].isin(group)]
        if r == 0:
            _draw_lines(ax, sub.dropna(subset=["mcc_next"]), "mcc_next", group)
            if layer in nulls:
                ax.axhline(nulls[layer]["pw_mcc"], **NULL_STYLE)
        else:
            _draw_lines(ax, sub, "mcc_final", group)
            # the control of each architecture, one grey band (min-max over the panel's lines)
            c = sub.groupby(["step", "architecture"])["mcc_final_other_seeds"].mean().unstack()
            if c.notna().any().any():
                ax.fill_between(
                    c.index, c.min(axis=1), c.max(axis=1), color="0.55", alpha=0.35, lw=0
                )
            if layer in nulls:
                ax.axhline(nulls[layer]["pw_mcc"], **NULL_STYLE)
        _step_axis(ax, df["step"])
        if r == 0:
            ax.set_xlabel("")
    grid.ylabel(0, "MCC to the same seed's SAE\nat the next checkpoint")
    grid.ylabel(1, "MCC to the same seed's SAE\nat the final checkpoint")
    extra = [matplotlib.patches.Patch(color="0.55", alpha=0.35, label=control)]
    if nulls:
        extra.append(_null_handle())
    grid.legend(extra)
    return grid.fig


def latent_persistence(tables: Path):
    """Born / kept / lost alive latents between consecutive checkpoints (same seed)."""
    df = load(tables, "drift").dropna(subset=["kept_next"])
    styles = architecture_styles(df)
    layers = sorted(df["layer"].unique())
    transitions = sorted(df[["step", "next_step"]].drop_duplicates().itertuples(index=False))
    names = list(styles)
    fig, axes = plt.subplots(
        len(layers),
        len(transitions),
        figsize=(2.9 * len(transitions) + 2.2, 0.24 * len(names) * len(layers) + 1.6),
        sharey=True,
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    n = int(df.groupby(["step", "layer", "architecture"])["seed"].nunique().max())
    fig.suptitle(
        "Latent persistence between consecutive LM checkpoints s → s' (same seed, alive latents)\n"
        f"mean over {n} seeds, fraction of the dictionary; lost + kept = alive at s,"
        " kept + born = alive at s'"
    )
    parts = [
        ("lost_next", "lost: alive at s, no partner at s'", "0.78", None),
        ("kept_next", "kept: alive at s and s', matched at cos ≥ 0.7", "0.3", None),
        ("born_next", "born: alive at s', no partner at s", "white", "////"),
    ]
    y = np.arange(len(names))
    cols = [c for c, *_ in parts]
    widest = (
        df[cols]
        .div(df["n_latents"], axis=0)
        .sum(axis=1)
        .groupby([df["layer"], df["step"], df["architecture"]])
        .mean()
        .max()
    )
    for i, layer in enumerate(layers):
        for j, (step, nxt) in enumerate(transitions):
            ax = axes[i][j]
            sub = df[(df["layer"] == layer) & (df["step"] == step)]
            frac = (
                sub.assign(**{c: sub[c] / sub["n_latents"] for c, *_ in parts})
                .groupby("architecture")[[c for c, *_ in parts]]
                .mean()
                .reindex(names)
            )
            left = np.zeros(len(names))
            for col, label, colour, hatch in parts:
                v = frac[col].fillna(0).to_numpy()
                ax.barh(
                    y,
                    v,
                    left=left,
                    color=colour,
                    hatch=hatch,
                    edgecolor="0.3",
                    lw=0.5,
                    height=0.72,
                    label=label,
                )
                left = left + v
            ax.set_xlim(0, max(1.0, float(widest) * 1.02))
            ax.grid(axis="y", visible=False)
            ax.set_title(
                f"step {int(step):,} → {int(nxt):,}"
                + (f", layer {layer}" if len(layers) > 1 else "")
            )
            if i == len(layers) - 1:
                ax.set_xlabel("latents (fraction of the dictionary)")
        axes[i][0].set_yticks(y, [styles[n]["label"] for n in names])
        for tick, name in zip(axes[i][0].get_yticklabels(), names, strict=True):
            tick.set_color(styles[name]["color"])
        axes[i][0].set_ylabel("architecture" + (f" (layer {layer})" if len(layers) > 1 else ""))
        axes[i][0].invert_yaxis()
        # family separators
        fams = [styles[n]["family"] for n in names]
        for k in range(1, len(names)):
            if fams[k] != fams[k - 1]:
                for ax in axes[i]:
                    ax.axhline(k - 0.5, color="0.2", lw=0.8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    return fig


def latent_stability(tables: Path):
    df = load(tables, "latent_stability")
    final = df["step"].max()
    nulls = _null_by_layer(tables, final)
    df = df[df["step"] == final].assign(
        density=lambda d: 10 ** ((d["log10_density_lo"].clip(lower=-7) + d["log10_density_hi"]) / 2)
    )
    styles = architecture_styles(df)
    n = int(df.groupby(["layer", "architecture"])["seed"].nunique().max())
    grid = _Grid(
        df,
        styles,
        f"Which latents every seed finds, by firing frequency (step {final:,})\n"
        f"top: pooled over {n} seeds; bottom: latents per bin, mean per SAE",
        rows=2,
    )
    for r, layer, group, ax in grid.items():
        sub = df[(df["layer"] == layer) & df["architecture"].isin(group)]
        for name, style in group.items():
            g = sub[sub["architecture"] == name]
            if g.empty:
                continue
            g = (
                g.assign(w=g["shared_with_all"] * g["n_latents"])
                .groupby("density")[["w", "n_latents"]]
                .sum()
            )
            y = g["w"] / g["n_latents"] if r == 0 else g["n_latents"] / n
            ax.plot(g.index, y, **(_line(style) | {"ms": 4.5}))
        if r == 0 and layer in nulls:
            ax.axhline(nulls[layer]["shared"], **NULL_STYLE)
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, numticks=8))
        ax.xaxis.set_major_formatter(matplotlib.ticker.LogFormatterSciNotation())
        if r == 1:
            ax.set_yscale("log")
            ax.set_xlabel("firing frequency on eval tokens (log)")
    grid.ylabel(0, "latents shared with every\nother seed (fraction, cos ≥ 0.7)")
    grid.ylabel(1, "latents in the bin\n(per SAE, log)")
    grid.legend([_null_handle("random dictionaries (null)")] if nulls else None)
    return grid.fig


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


# metric -> (table, column, label, null column, higher is better)
KEY_METRICS: dict[str, tuple[str, str, str, str | None]] = {
    "PW-MCC": ("consistency", "mcc", "PW-MCC", "null_pw_mcc"),
    "FVU": ("reconstruction", "fvu", "FVU", None),
    "dead fraction": ("reconstruction", "dead_fraction", "dead latents (fraction)", None),
    "effective features": ("superposition", "effective_features", "effective features F", None),
}


KEYS = ["step", "layer", "architecture"]


def _key_metrics(tables: Path) -> dict[str, pd.DataFrame]:
    return {
        name: load(tables, table)
        for name, (table, *_) in KEY_METRICS.items()
        if (Path(tables) / f"{table}.parquet").exists()
    }


def metrics_vs_lm_loss(tables: Path):
    """The key metrics against the LM's eval loss at each checkpoint instead of the step."""
    loss = load(tables, "checkpoints").dropna(subset=["lm_eval_loss"]).drop_duplicates("step")
    loss = loss.set_index("step")["lm_eval_loss"]
    data = _key_metrics(tables)
    ref = next(iter(data.values()))
    ref = ref[ref["step"].isin(loss.index)]
    styles = architecture_styles(ref)
    grid = _Grid(
        ref,
        styles,
        "Key metrics against the LM's eval loss (training runs left to right)\n"
        + _band_note(data.get("FVU", ref)),
        rows=len(data),
        height=2.3,
    )
    for r, layer, group, ax in grid.items():
        name = list(data)[r]
        _, col, _, null = KEY_METRICS[name]
        d = data[name]
        d = d[(d["layer"] == layer) & d["architecture"].isin(group) & d["step"].isin(loss.index)]
        d = d.assign(lm_loss=d["step"].map(loss))
        _draw_lines(ax, d, col, group, x="lm_loss")
        if null is not None:
            ax.axhline(d[null].mean(), **NULL_STYLE)
        if r == len(data) - 1:
            ax.set_xlabel("LM eval loss (nats / token)")
    for r, name in enumerate(data):
        grid.ylabel(r, KEY_METRICS[name][2])
    first = next(iter(grid.axes.values()))
    if not first.xaxis_inverted():
        first.invert_xaxis()  # shared x: lower loss (later in training) on the right
    grid.legend([_null_handle()] if any(KEY_METRICS[n][3] for n in data) else None)
    return grid.fig


def overview_heatmap(tables: Path):
    """Architecture x step, one heat map per key metric: the whole study at a glance."""
    data = _key_metrics(tables)
    ref = next(iter(data.values()))
    styles = architecture_styles(ref)
    names = list(styles)
    layers = sorted(ref["layer"].unique())
    steps = sorted(ref["step"].unique())
    fig, axes = plt.subplots(
        len(layers),
        len(data),
        figsize=(
            (0.42 * len(steps) + 1.0) * len(data) + 1.6,
            0.26 * len(names) * len(layers) + 1.4,
        ),
        squeeze=False,
        layout="constrained",
    )
    seeds = next((d for d in data.values() if "seed" in d.columns), None)
    n = "" if seeds is None else f"{int(seeds.groupby(KEYS)['seed'].nunique().max())} "
    fig.suptitle(
        f"Every architecture at every LM checkpoint: mean over {n}seeds (seed pairs for PW-MCC);"
        " grey: not measured"
    )
    for i, layer in enumerate(layers):
        for j, (name, d) in enumerate(data.items()):
            ax = axes[i][j]
            _, col, label, _ = KEY_METRICS[name]
            m = (
                d[d["layer"] == layer]
                .groupby(["architecture", "step"])[col]
                .mean()
                .unstack()
                .reindex(index=names, columns=steps)
            )
            cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
            vmax = float(np.nanmax(m.to_numpy())) if m.notna().any().any() else 1.0
            vmin = float(np.nanmin(m.to_numpy())) if m.notna().any().any() else 0.0
            if col == "fvu":
                vmin, vmax = 0.0, max(1.0, vmax) if vmax > 1 else vmax
            im = ax.imshow(m.to_numpy(dtype=float), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            for (a, s), v in np.ndenumerate(m.to_numpy(dtype=float)):
                text = "n/a" if np.isnan(v) else f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"
                dark = np.isnan(v) or (v - vmin) / ((vmax - vmin) or 1) > 0.55
                flag = col == "fvu" and v > 1
                ax.text(
                    s,
                    a,
                    text + ("!" if flag else ""),
                    ha="center",
                    va="center",
                    fontsize=6.5,
                    color="black" if dark else "white",
                    fontweight="bold" if flag else "normal",
                )
            ax.set_xticks(
                range(len(steps)), [f"{s:,}" for s in steps], rotation=45 if len(steps) > 5 else 0
            )
            ax.set_yticks(
                range(len(names)), [styles[nm]["label"] for nm in names] if j == 0 else []
            )
            if j == 0:
                for tick, nm in zip(ax.get_yticklabels(), names, strict=True):
                    tick.set_color(styles[nm]["color"])
            ax.grid(False)
            ax.set_title(label + (f", layer {layer}" if len(layers) > 1 else ""))
            if i == len(layers) - 1:
                ax.set_xlabel("LM training step")
            fams = [styles[nm]["family"] for nm in names]
            for k in range(1, len(names)):
                if fams[k] != fams[k - 1]:
                    ax.axhline(k - 0.5, color="white", lw=2)
            fig.colorbar(im, ax=ax, shrink=0.8, pad=0.02)
        axes[i][0].set_ylabel("architecture (by family)")
    return fig


FIGURES: dict[str, Callable] = {
    "pw_mcc": pw_mcc,
    "shared_fraction": shared_fraction,
    "effective_features": effective_features,
    "fvu_vs_l0": fvu_vs_l0,
    "dead_fraction": dead_fraction,
    "ce_recovered": ce_recovered,
    "decoder_drift": decoder_drift,
    "latent_persistence": latent_persistence,
    "latent_stability": latent_stability,
    "lm_loss": lm_loss,
    "metrics_vs_lm_loss": metrics_vs_lm_loss,
    "overview_heatmap": overview_heatmap,
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


def render_figures(
    tables: Path, validation: Path | None, out_dir: Path, cfg: FiguresConfig, provenance: dict
) -> list[Path]:
    """The figures stage: `render_all` from the tables, and `render_validation` from the study's
    validation/ folder when given."""
    written = render_all(Path(tables), Path(out_dir), cfg, provenance=provenance)
    if validation:
        written += render_validation(Path(validation), Path(out_dir), cfg, provenance)
    return written
