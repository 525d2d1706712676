"""Every figure renders from small synthetic tables (no workflow run), in one consistent style."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from saedynamics import figures
from saedynamics.config import FiguresConfig

STEPS, LAYERS, SEEDS = [0, 16, 128], [1, 3], [0, 1, 2]
ARCHS = {"topk": ("topk", "TopK"), "topk-k64": ("topk", "TopK"), "relu": ("relu", "ReLU + L1")}


def identity():
    for step, layer, (name, (kind, title)) in itertools.product(STEPS, LAYERS, ARCHS.items()):
        yield {
            "study": "synthetic",
            "step": step,
            "layer": layer,
            "architecture": name,
            "architecture_type": kind,
            "architecture_title": title,
            "d_model": 64,
            "n_latents": 512,
        }


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("tables")
    recon, cons, sup, spliced, stability = [], [], [], [], []
    for ident in identity():
        for seed in SEEDS:
            recon.append(
                ident
                | {
                    "seed": seed,
                    "fvu": rng.uniform(0.05, 0.4),
                    "l0": rng.uniform(4, 40),
                    "dead_fraction": rng.uniform(0, 0.3),
                }
            )
            sup.append(ident | {"seed": seed, "effective_features": rng.uniform(50, 400)})
            spliced.append(ident | {"seed": seed, "ce_loss_score": rng.uniform(0.5, 1.0)})
            for lo in (-4.0, -3.0, -2.0, -1.0):
                stability.append(
                    ident
                    | {
                        "seed": seed,
                        "log10_density_lo": lo,
                        "log10_density_hi": lo + 1,
                        "n_latents": int(rng.integers(1, 100)),
                        "shared_with_all": rng.uniform(0, 1),
                    }
                )
        for a, b in itertools.combinations(SEEDS, 2):
            cons.append(
                ident
                | {
                    "seed_a": a,
                    "seed_b": b,
                    "mcc": rng.uniform(0.4, 0.9),
                    "shared_fraction": rng.uniform(0, 0.6),
                    "null_pw_mcc": 0.35,
                    "null_shared_fraction": 0.0,
                }
            )
    drift = [
        {k: v for k, v in ident.items() if k not in ("d_model", "n_latents")}
        | {
            "seed": seed,
            "mcc_final": rng.uniform(0.5, 1),
            "mcc_final_other_seeds": rng.uniform(0.3, 0.5),
            "mcc_next": rng.uniform(0.5, 1) if ident["step"] != STEPS[-1] else np.nan,
            "next_step": (STEPS + [None])[STEPS.index(ident["step"]) + 1],
            "n_latents": 512,
            "n_alive": 400,
        }
        | (
            {"n_alive_next": 450, "kept_next": 300, "lost_next": 100, "born_next": 150}
            if ident["step"] != STEPS[-1]
            else dict.fromkeys(["n_alive_next", "kept_next", "lost_next", "born_next"], np.nan)
        )
        for ident in identity()
        for seed in SEEDS
    ]
    checkpoints = [{"step": s, "lm_eval_loss": 7 - s / 40, "duplicate_of": None} for s in STEPS]
    for name, rows in [
        ("reconstruction", recon),
        ("consistency", cons),
        ("superposition", sup),
        ("spliced", spliced),
        ("latent_stability", stability),
        ("drift", drift),
        ("checkpoints", checkpoints),
    ]:
        pd.DataFrame(rows).to_parquet(out / f"{name}.parquet")
    return out


NOT_BY_STEP = {
    "fvu_vs_l0",
    "latent_stability",
    "latent_persistence",
    "metrics_vs_lm_loss",
    "overview_heatmap",
}


def _named(fig) -> set[str]:
    """Every architecture name a figure shows: legend entries and axis tick labels."""
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    texts = {t.get_text() for legend in legends for t in legend.get_texts()}
    return texts | {t.get_text() for ax in fig.axes for t in ax.get_yticklabels()}


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_every_figure_renders_from_tables(tables, name):
    figures._style()
    fig = figures.FIGURES[name](tables)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.get_ylabel()]
    assert axes, "an axis label on every figure"
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        if ax.get_xlabel():
            assert "(" in ax.get_xlabel() or "step" in ax.get_xlabel(), (
                ax.get_xlabel()
            )  # units or scale
    if name != "lm_loss":  # every architecture named in words: a legend entry or a row label
        assert {"TopK", "TopK (topk-k64)", "ReLU + L1"} <= _named(fig), _named(fig)
        if name not in NOT_BY_STEP:  # the step axis shows step 0
            step_axes = [ax for ax in fig.axes if ax.get_xscale() == "symlog"]
            assert step_axes and all(ax.get_xlim()[0] < 0 for ax in step_axes)
    plt.close(fig)


def test_colours_are_the_same_in_every_figure(tables):
    figures._style()
    colours = {}
    for name in ("pw_mcc", "effective_features", "dead_fraction", "ce_recovered"):
        fig = figures.FIGURES[name](tables)
        for legend in fig.legends:
            for handle, text in zip(legend.legend_handles, legend.get_texts(), strict=True):
                colour = tuple(
                    np.round(np.asarray(plt.matplotlib.colors.to_rgba(handle.get_color())), 3)
                ) + (str(handle.get_linestyle()),)  # a variant: its type's colour, dashed
                assert colours.setdefault(text.get_text(), colour) == colour, (
                    name,
                    text.get_text(),
                )
        plt.close(fig)
    assert len(set(colours.values())) == len(colours)  # (colour, line style) tells them apart


def test_render_all_writes_every_format(tables, tmp_path):
    written = figures.render_all(tables, tmp_path, FiguresConfig(formats=["png", "pdf"], dpi=60))
    assert sorted(p.name for p in written) == sorted(
        f"{n}.{f}" for n in figures.FIGURES for f in ("png", "pdf")
    )
    assert all(p.stat().st_size > 2000 for p in written)
    # the same tables give the same bytes (no dates in the files)
    again = figures.render_all(
        tables, tmp_path / "again", FiguresConfig(formats=["png", "pdf"], dpi=60)
    )
    for p in again:
        assert p.read_bytes() == (tmp_path / p.name).read_bytes(), p.name


def test_an_undefined_score_is_a_labelled_gap_not_a_number(tmp_path):
    """CE-loss recovered is NaN at step 0 (zero-ablation costs nothing there): every line has a
    gap at step 0, where a dotted line says why; the other steps are drawn."""
    rows = []
    for ident in identity():
        for seed in SEEDS:
            undefined = ident["step"] == 0
            rows.append(
                ident
                | {
                    "seed": seed,
                    "ce_loss_score": np.nan if undefined else 0.5 + 0.1 * seed,
                    "ce_loss_score_reason": "zero-ablation loss ..." if undefined else None,
                }
            )
    pd.DataFrame(rows).to_parquet(tmp_path / "spliced.parquet")
    figures._style()
    fig = figures.ce_recovered(tmp_path)
    for ax in fig.axes:
        drawn = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert len(drawn) == len(ARCHS)
        for line in drawn:
            x, y = line.get_data()
            assert list(x) == STEPS and np.isnan(y[0]) and np.allclose(y[1:], 0.6)
        texts = [t.get_text() for t in ax.texts]
        assert texts == ["undefined: zero-ablation loss ≤ clean loss"], texts
    plt.close(fig)


# ---- one style per architecture type, small multiples by family --------------------------------


def _every_type():
    """One row per registered architecture type (their own names), one layer, three steps."""
    from saedynamics.saes import REGISTRY

    for step, kind in itertools.product(STEPS, sorted(REGISTRY)):
        yield {
            "study": "all",
            "step": step,
            "layer": 1,
            "architecture": kind,
            "architecture_type": kind,
            "architecture_title": kind.upper(),
            "d_model": 64,
            "n_latents": 512,
        }


def test_every_registered_type_has_a_fixed_style_and_a_family():
    from saedynamics.saes import REGISTRY

    assert set(REGISTRY) == set(figures.ARCHITECTURE_STYLE)
    families = [k for kinds in figures.FAMILIES.values() for k in kinds]
    assert sorted(families) == sorted(REGISTRY)  # each type in exactly one family
    assert all(len(kinds) <= figures.MAX_LINES for kinds in figures.FAMILIES.values())
    colours = [c for c, _ in figures.ARCHITECTURE_STYLE.values()]
    markers = [m for _, m in figures.ARCHITECTURE_STYLE.values()]
    assert len(set(colours)) == len(colours) and len(set(markers)) == len(markers)


def test_colours_do_not_depend_on_the_set_of_architectures():
    """TopK looks the same in a study of 3 architectures and in one of 14; a variant keeps its
    type's colour and marker and differs by line style and a hollow marker."""
    few = figures.architecture_styles(pd.DataFrame(list(identity())))
    every = figures.architecture_styles(pd.DataFrame(list(_every_type())))
    for name in ("topk", "relu"):
        assert (few[name]["color"], few[name]["marker"]) == figures.ARCHITECTURE_STYLE[name]
        assert (every[name]["color"], every[name]["marker"]) == figures.ARCHITECTURE_STYLE[name]
    variant, base = few["topk-k64"], few["topk"]
    assert (variant["color"], variant["marker"]) == (base["color"], base["marker"])
    assert variant["ls"] != base["ls"] == "-" and variant["mfc"] == "white"


def test_many_architectures_get_one_panel_per_family_with_the_null(tmp_path):
    rng = np.random.default_rng(1)
    rows = [
        ident
        | {
            "seed_a": a,
            "seed_b": b,
            "mcc": rng.uniform(0.4, 0.9),
            "shared_fraction": rng.uniform(0, 0.6),
            "null_pw_mcc": 0.35,
            "null_shared_fraction": 0.01,
        }
        for ident in _every_type()
        for a, b in itertools.combinations(SEEDS, 2)
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "consistency.parquet")
    figures._style()
    fig = figures.pw_mcc(tmp_path)
    assert [ax.get_title() for ax in fig.axes] == list(figures.FAMILIES)
    for ax, kinds in zip(fig.axes, figures.FAMILIES.values(), strict=True):
        solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        nulls = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert len(solid) == len(kinds) <= figures.MAX_LINES
        assert len(nulls) == 1 and nulls[0].get_ydata()[0] == pytest.approx(0.35)
        assert {t.get_text() for t in ax.get_legend().get_texts()} >= {k.upper() for k in kinds}
    assert "±1 std over 3 seed pairs (3 seeds)" in fig._suptitle.get_text()
    plt.close(fig)


def test_bands_say_over_how_many_seeds(tables):
    figures._style()
    for name in ("dead_fraction", "effective_features", "decoder_drift", "metrics_vs_lm_loss"):
        fig = figures.FIGURES[name](tables)
        assert f"±1 std over {len(SEEDS)} seeds" in fig._suptitle.get_text(), name
        plt.close(fig)


def test_fvu_above_one_is_flagged(tables, tmp_path):
    recon = pd.read_parquet(tables / "reconstruction.parquet")
    recon.loc[recon["architecture"] == "relu", "fvu"] = 1.4
    recon.to_parquet(tmp_path / "reconstruction.parquet")
    figures._style()
    fig = figures.fvu_vs_l0(tmp_path)
    labels = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert "FVU > 1" in labels and "frontier" in labels
    assert [ax.get_title() for ax in fig.axes] == [
        f"step {s:,}, layer {layer}" for layer in LAYERS for s in STEPS
    ]
    plt.close(fig)


def test_latent_persistence_bars_add_up(tables):
    """Per architecture and transition: lost | kept | born side by side, as fractions of the
    dictionary (the fixture: 100 lost, 300 kept, 150 born of 512 latents)."""
    figures._style()
    fig = figures.latent_persistence(tables)
    ax = fig.axes[0]
    widths = sorted({round(p.get_width(), 6) for p in ax.patches})
    assert widths == sorted(round(v / 512, 6) for v in (100, 300, 150))
    assert ax.get_title() == f"step {STEPS[0]:,} → {STEPS[1]:,}, layer {LAYERS[0]}"
    plt.close(fig)


def test_latent_stability_draws_the_null_and_the_counts(tables):
    figures._style()
    fig = figures.latent_stability(tables)
    labels = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
    assert "random dictionaries (null)" in labels
    assert any("latents in the bin" in ax.get_ylabel() for ax in fig.axes)
    plt.close(fig)
