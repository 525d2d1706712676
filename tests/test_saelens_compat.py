"""Every exported SAE loads in SAELens where SAELens has the architecture, and agrees with ours.

Tolerance: 1e-5 absolute on codes and reconstructions (float32; the two implementations order
their floating-point operations differently). Architectures SAELens lacks say so in cfg.json.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from saedynamics.errors import DataError
from saedynamics.saes import REGISTRY, load

sae_lens = pytest.importorskip("sae_lens", reason="SAELens is in the `compat` extra")

D_IN, D_SAE = 12, 48
ATOL = 1e-5


def random_sae(name: str):
    """An SAE of `name` with random, non-trivial parameters, exported with an input scale."""
    cls = REGISTRY[name]
    sizes = {"k": 6, "k_min": 2, "k_max": 8}  # sparsity settings that fit D_SAE
    cfg = cls.Config(
        architecture=name, **{k: v for k, v in sizes.items() if k in cls.Config.model_fields}
    )
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    sae = cls(D_IN, D_SAE, cfg, generator=g)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name_ in cls.exported_buffers:
            buf = getattr(sae, name_)
            buf.copy_(torch.rand(buf.shape, generator=g) * 0.5)
    return sae.exported(input_scale=1.7)


def inputs():
    return torch.randn(256, D_IN, generator=torch.Generator().manual_seed(0)) * 2 + 0.3


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if c.saelens_architecture))
def test_saelens_loads_our_sae_and_agrees(tmp_path, name):
    ours = random_sae(name)
    ours.save(tmp_path / name, {"hook_name": "blocks.0.hook_resid_post"}, {"seed": 0})
    cfg = json.loads((tmp_path / name / "cfg.json").read_text())
    assert cfg["architecture"] == REGISTRY[name].saelens_architecture
    assert "sae_lens" in cfg["saedynamics"]["loadable_by"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / name))
    mine = load(tmp_path / name)
    x = inputs()
    with torch.no_grad():
        codes_ours, codes_theirs = mine.encode(x), theirs.encode(x)
        assert (codes_ours != 0).any(), "a degenerate test: no latent fires"
        torch.testing.assert_close(codes_theirs, codes_ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            theirs.decode(codes_theirs), mine.decode(codes_ours), atol=ATOL, rtol=0
        )


@pytest.mark.parametrize(
    "name", sorted(n for n, c in REGISTRY.items() if not c.saelens_architecture)
)
def test_architectures_saelens_lacks_say_so(tmp_path, name):
    ours = random_sae(name)
    ours.save(tmp_path / name, {}, {"seed": 0})
    cfg = json.loads((tmp_path / name / "cfg.json").read_text())
    assert cfg["saedynamics"]["loadable_by"] == ["saedynamics"]
    assert "saedynamics.saes.load" in cfg["saedynamics"]["note"]
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(load(tmp_path / name)(x), ours(x))
    # SAELens looks cfg.json's architecture up in its registry and raises a bare KeyError with
    # it: the name it shows says what the user can do instead
    assert cfg["architecture"] == (
        f"{name} (not a SAELens architecture: load with saedynamics.saes.load)"
    )
    with warnings.catch_warnings(), pytest.raises(KeyError) as error:
        warnings.simplefilter("ignore")
        sae_lens.SAE.load_from_disk(str(tmp_path / name))
    assert error.value.args == (cfg["architecture"],)


def test_an_sae_saved_by_saelens_is_named_as_such(tmp_path):
    """`saedynamics.saes.load` on a folder SAELens wrote (no 'saedynamics' section in cfg.json)
    says so, and which loader reads it, instead of failing on a missing architecture."""
    sae = sae_lens.SAE.from_dict({"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    sae.save_model(str(tmp_path / "theirs"))
    with pytest.raises(DataError) as error:
        load(tmp_path / "theirs")
    assert str(error.value) == (
        f"{tmp_path / 'theirs' / 'cfg.json'}: not an SAE saved by saedynamics (no 'saedynamics' "
        "section); an SAE saved by SAELens loads with sae_lens.SAE.load_from_disk"
    )
