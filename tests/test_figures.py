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
        }
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
    if (
        name != "lm_loss"
    ):  # one legend entry per architecture, in words, for the per-architecture figures
        labels = {t.get_text() for legend in fig.legends for t in legend.get_texts()}
        assert {"TopK", "TopK (topk-k64)", "ReLU + L1"} <= labels, labels
        if name not in ("fvu_vs_l0", "latent_stability"):  # the step axis shows step 0
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
                )
                assert colours.setdefault(text.get_text(), colour) == colour, (
                    name,
                    text.get_text(),
                )
        plt.close(fig)
    assert len(set(colours.values())) == len(colours)


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
