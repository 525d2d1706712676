"""Config validation: valid configs load; bad ones stop with a message naming the key."""

from __future__ import annotations

import copy

import pytest

from saedynamics.cli import main
from saedynamics.config import PYTHIA_STEPS, load_config
from saedynamics.errors import ConfigError
from saedynamics.saes import REGISTRY

from .conftest import REPO


@pytest.mark.parametrize(
    "path", ["config.yaml", "workflow/configs/demo.yaml", "workflow/configs/tiny.yaml"]
)
def test_shipped_configs_are_valid(path):
    cfg = load_config(REPO / path)
    assert cfg.architectures and cfg.training.seeds


def test_study_config_is_the_pythia_study():
    cfg = load_config(REPO / "config.yaml")
    assert cfg.model.repo_id == "EleutherAI/pythia-70m-deduped"
    assert (cfg.model.num_layers, cfg.model.d_model) == (6, 512)  # filled from the known sizes
    assert cfg.training.n_latents == 16384 and len(cfg.training.seeds) == 3
    assert set(cfg.model.steps) <= set(PYTHIA_STEPS) and 1 not in cfg.model.steps


def test_pythia_revisions():
    assert PYTHIA_STEPS[:12] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert len(PYTHIA_STEPS) == 154 and PYTHIA_STEPS[-1] == 143000


def test_micro_schedule_is_pythia_like(tiny_raw):
    demo = load_config(REPO / "workflow/configs/demo.yaml")
    assert demo.model.schedule()[:11] == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert demo.model.schedule()[-1] == demo.model.train_steps


BAD = [
    (
        lambda c: c["activations"].update(layrs=[0]),
        "activations.layrs: unknown key; allowed keys here: ",
    ),
    (lambda c: c.update(seeds=[0]), "seeds: unknown key"),
    (
        lambda c: c["architectures"]["topk"].update(architecture="topkk"),
        "'topkk' is not registered; allowed: ",
    ),
    (lambda c: c["architectures"]["topk"].update(kk=3), "architectures.topk.kk: unknown key"),
    (
        lambda c: c["architectures"]["topk"].update(k="many"),
        "architectures.topk.k: Input should be a valid integer",
    ),
    (
        lambda c: c["architectures"]["topk"].update(k=64),
        "k = 64 must be smaller than n_latents = 64",
    ),
    (lambda c: c["activations"].update(layers=[0, 5]), "layers [5]: the model has 2 layers"),
    (lambda c: c["model"].update(steps=[0, 7]), "steps [7] are not saved by the micro suite"),
    (lambda c: c["model"].update(source="hf"), "model.source must be 'hub' or 'micro'"),
    (lambda c: c["training"].update(seeds=[1]), "at least two distinct seeds"),
    (
        lambda c: c["training"].update(n_latents=-5),
        "training.n_latents: Input should be greater than 0",
    ),
    (lambda c: c.pop("training"), "training: required key is missing"),
    (lambda c: c.update(study="../escape"), "study: '../escape' must be lower-case letters"),
    (lambda c: c.update(architectures={}), "architectures must be a non-empty mapping"),
    (lambda c: c["architectures"].update({"Bad Name": {"architecture": "topk"}}), "must match"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_configs_name_the_key(tiny_raw, mutate, message):
    raw = copy.deepcopy(tiny_raw)
    mutate(raw)
    with pytest.raises(ConfigError) as err:
        load_config(raw, "tiny.yaml")
    assert message in str(err.value)
    assert "tiny.yaml" in str(err.value)


def test_hub_steps_must_be_pythia_revisions(tiny_raw):
    raw = copy.deepcopy(tiny_raw)
    raw["model"] = {"source": "hub", "repo_id": "EleutherAI/pythia-70m-deduped", "steps": [0, 1500]}
    raw["activations"]["layers"] = [1]
    with pytest.raises(ConfigError, match=r"steps \[1500\] are not Pythia revisions"):
        load_config(raw)
    raw["model"] = {"source": "hub", "repo_id": "someone/other-model", "steps": [0]}
    with pytest.raises(ConfigError, match="set model.num_layers and model.d_model"):
        load_config(raw)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_stage_settings_are_minimal_slices(tiny_cfg):
    train = tiny_cfg.stage_settings("train", "topk")  # a job of one architecture
    # the tiny config streams: its train jobs run the checkpoint, as the activations stage would
    assert set(train) == {"study", "training", "architectures", "activations", "model"}
    assert train["activations"] == tiny_cfg.stage_settings("activations")["activations"]
    assert tiny_cfg.stage_settings("activations")["splits"] == ["eval"]
    cached = tiny_cfg.model_copy(
        update={"training": tiny_cfg.training.model_copy(update={"source": "cache"})}
    )
    assert set(cached.stage_settings("train")) == {"study", "training", "architectures"}
    assert cached.stage_settings("activations")["splits"] == ["train", "eval"]
    assert list(train["architectures"]) == ["topk"] and train["architectures"]["topk"]["k"] == 4
    # the default job: every architecture of the (step, layer)
    assert list(tiny_cfg.stage_settings("train")["architectures"]) == ["topk", "relu"]
    with pytest.raises(ConfigError, match="'batchtopk' is not in this config's architectures"):
        tiny_cfg.stage_settings("train", "batchtopk")
    assert set(tiny_cfg.stage_settings("figures")) == {"study", "figures"}
    # defaults are part of the slice, so a changed default re-runs the stage
    assert train["training"]["grad_clip_norm"] == 1.0


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "workflow/configs/tiny.yaml")
        .read_text()
        .replace("layers: [0, 1]", "layers: [0, 9]")
    )
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("error: invalid configuration")
        and "layers [9]" in err
        and "Traceback" not in err
    )
    assert main(["check-config", str(REPO / "workflow/configs/tiny.yaml")]) == 0
    assert (
        main(
            [
                "train",
                "--settings",
                "{not json",
                "--step",
                "0",
                "--layer",
                "0",
                "--architecture",
                "x",
                "--activations",
                "a",
                "--out",
                "b",
            ]
        )
        == 1
    )
    assert "--settings is not valid JSON" in capsys.readouterr().err


def _lower_bound_violations(config_cls):
    """(field, bad value) for every numeric field with a lower bound."""
    import annotated_types

    for name, field in config_cls.model_fields.items():
        for m in field.metadata:
            if isinstance(m, annotated_types.Ge):
                yield name, m.ge - 1
            elif isinstance(m, annotated_types.Gt):
                yield name, m.gt - 1


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_architecture_rejects_bad_hyperparameters(tiny_raw, kind):
    def attempt(**hyper):
        raw = copy.deepcopy(tiny_raw)
        raw["architectures"] = {"probe": {"architecture": kind, **hyper}}
        with pytest.raises(ConfigError) as err:
            load_config(raw, "tiny.yaml")
        return str(err.value)

    assert "architectures.probe.not_an_option: unknown key" in attempt(not_an_option=1)
    bounded = list(_lower_bound_violations(REGISTRY[kind].Config))
    assert bounded, f"{kind} declares no bounds on its hyperparameters"
    for field, bad in bounded:
        assert f"architectures.probe.{field}" in attempt(**{field: bad}), field
    if "k" in REGISTRY[kind].Config.model_fields:  # n_latents is 64 in tiny.yaml
        assert "architectures.probe" in attempt(k=64) and "64" in attempt(k=64)


def test_yaml_scientific_notation_is_a_number_where_a_number_is_expected(tmp_path):
    """PyYAML reads `3e-4` as a string (YAML 1.1 wants a dot); strict types must not refuse it."""
    text = (REPO / "workflow/configs/tiny.yaml").read_text()
    text = text.replace("lr: 0.004", "lr: 4e-3").replace(
        "train_tokens: 16384", "train_tokens: 1.6384e4"
    )
    text = text.replace("study: tiny", "study: 1e3")  # a string key keeps its string
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.architectures["topk"].lr == 0.004 and cfg.training.train_tokens == 16384
    assert isinstance(cfg.training.train_tokens, int) and cfg.study == "1e3"
    path.write_text(text.replace("n_latents: 64", "n_latents: 6.45e1"))  # not whole: still refused
    with pytest.raises(ConfigError, match=r"training\.n_latents: .*valid integer \(got 64\.5\)"):
        load_config(path)


def test_the_study_budget_against_a_hand_count(tiny_raw, capsys):
    """budget.study_budget on the tiny config, every number counted by hand here."""
    from saedynamics.budget import GPUS, study_budget

    raw = copy.deepcopy(tiny_raw)
    raw["training"]["save_dtype"] = "float16"
    cfg = load_config(raw)
    b = study_budget(cfg, gpu="A100", utilisation=0.5)
    d, n, ctx, layers, vocab = 16, 64, 32, 2, 300  # tiny: d_model, n_latents, context, LM layers
    rows = 400 * 31  # train windows x kept positions
    assert b["saes"] == 2 * 2 * 2 * 2 and b["jobs"] == 2 * 2  # steps x layers (x archs x seeds)
    assert b["epochs"] == pytest.approx(16384 / rows)
    sae = 2 * d * n + n + d
    assert b["disk"]["SAEs"] == 16 * sae * 2  # float16
    assert b["disk"]["token sample"] == 440 * ctx * 4
    assert b["disk"]["eval caches"] == 2 * 2 * 40 * 31 * 2 * d
    assert b["disk"]["train caches"] == 0  # stream
    assert b["disk"]["resume state (one job at a time)"] == 2 * 2 * sae * 12
    sae_flops = 2 * 2 * 16384 * (2 * 2 * 12 * d * n)
    block = 24 * d * d + 4 * ctx * d
    lm = 2 * 2 * 16384 * ((0 + 1) * block + (1 + 1) * block) / 2  # layers 0 and 1, no extras
    assert b["flops"] == {"SAE sets": sae_flops, "LM forward passes": lm}
    assert b["lm_share"] == pytest.approx(lm / (sae_flops + lm))
    assert b["gpu_hours"] == pytest.approx((sae_flops + lm) / (GPUS["A100"] * 0.5) / 3600)
    # an architecture that needs the LM's gradient: the whole model, and twice what is above
    raw["architectures"]["gsae"] = {"architecture": "gsae", "k": 4}
    g = study_budget(load_config(raw))
    whole, above = layers * block + 2 * vocab * d, [block + 2 * vocab * d, 2 * vocab * d]
    assert g["flops"]["LM forward passes"] == 2 * 2 * 16384 * sum(whole + 2 * a for a in above) / 2
    # check-config prints it
    assert main(["check-config", str(REPO / "workflow/configs/tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "16 SAEs in 4 train jobs" in out and "LM share of the FLOPs" in out
