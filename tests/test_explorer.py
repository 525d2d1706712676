"""The feature explorer (saedynamics.explorer): its numbers against brute force, the site the demo
builds against the SAEs and eval caches it came from, bad input, and the pages in a real browser
(headless Chromium from the Debian packages, driven by Selenium; .ci/run installs both)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from saedynamics.explorer.latents import chains, context_rows, encode_eval, logit_effects
from saedynamics.explorer.site import read_data

from .conftest import REPO, cli_error, tiny_tokenizer

# ---- the numbers, against brute force -------------------------------------------------------------


def dense_codes(seed=0, rows=300, latents=7):
    """Codes with many zeros, one latent that never fires, distinct positive values."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(rows, latents, generator=g) * (torch.rand(rows, latents, generator=g) < 0.2)
    codes[:, 3] = 0
    return codes


def test_the_eval_codes_give_each_latents_density_top_activations_and_histogram():
    codes = dense_codes()
    batches = codes.split(64)  # the top activations must survive the batch boundaries
    c = encode_eval(lambda x: x, iter(batches), 5)
    dense = codes.numpy().astype(np.float64)
    np.testing.assert_allclose(c.density, (dense > 0).mean(0))
    np.testing.assert_allclose(c.maximum, dense.max(0), rtol=1e-6)
    values, rows = c.top_values, c.top_rows
    for f in range(dense.shape[1]):
        fired = np.flatnonzero(dense[:, f] > 0)
        best = fired[np.argsort(-dense[fired, f])][:5]
        assert rows[f, : len(best)].tolist() == best.tolist()
        np.testing.assert_allclose(values[f, : len(best)], dense[best, f], rtol=1e-6)
        assert (rows[f, len(best) :] == -1).all() and (values[f, len(best) :] == 0).all()
        # bins of equal width over (0, max]: a value on a bin's upper edge falls in that bin
        hist = c.histograms(4)[f]
        if len(fired):
            edges = np.linspace(0, dense[:, f].max(), 5)
            expected = [
                ((dense[:, f] > lo) & (dense[:, f] <= hi)).sum()
                for lo, hi in itertools.pairwise(edges)
            ]
            assert hist.tolist() == expected
        else:
            assert f == 3 and hist.sum() == 0
    # any (row, latent) looked up, -1 rows included
    r = np.array([[0, 5, -1], [299, 17, 100]])
    f = np.array([[0, 1, 2], [6, 3, 4]])
    np.testing.assert_allclose(c.at(r, f), np.where(r >= 0, dense[r, f], 0), rtol=1e-6)


def test_context_rows_stay_in_their_document_whatever_the_row_order():
    doc = np.array([0, 0, 0, 0, 1, 1, 1])
    pos = np.array([0, 1, 2, 3, 0, 1, 2])
    shuffle = np.array([4, 2, 6, 0, 5, 3, 1])  # row i holds token shuffle[i]
    rows = context_rows(doc[shuffle], pos[shuffle], np.array([[1, -1], [0, 6]]), before=2, after=1)
    where = {int(t): i for i, t in enumerate(shuffle)}  # token -> its row
    # row 1 is token 2 (doc 0, pos 2): tokens 0, 1, 2, 3; row 0 is token 4 (doc 1, pos 0): -, -, 4, 5
    assert rows[0, 0].tolist() == [where[0], where[1], where[2], where[3]]
    assert rows[0, 1].tolist() == [-1, -1, -1, -1]
    assert rows[1, 0].tolist() == [-1, -1, where[4], where[5]]
    # row 6 is token 1 (doc 0, pos 1): -, 0, 1, 2
    assert rows[1, 1].tolist() == [-1, where[0], where[1], where[2]]


def test_a_chain_follows_each_latent_back_through_the_optimal_matches():
    g = np.random.default_rng(0)
    first = g.normal(size=(6, 10))
    p1, p2 = g.permutation(6), g.permutation(6)
    middle = first[p1] + 0.05 * g.normal(size=(6, 10))  # middle latent i is first latent p1[i]
    last = middle[p2] + 0.05 * g.normal(size=(6, 10))  # last latent i is middle latent p2[i]
    out = chains([first, middle, last])
    assert out["latent"][2].tolist() == list(range(6))
    assert out["latent"][1].tolist() == p2.tolist()
    assert out["latent"][0].tolist() == p1[p2].tolist()

    def cos(a, b):
        return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    np.testing.assert_allclose(out["cosine_final"][0], cos(first[p1[p2]], last))
    np.testing.assert_allclose(out["cosine_previous"][2], cos(last, middle[p2]))
    np.testing.assert_allclose(out["cosine_final"][2], 1.0)
    assert np.isnan(out["cosine_previous"][0]).all()


def test_logit_effects_are_the_largest_and_smallest_direct_logits():
    g = torch.Generator().manual_seed(1)
    directions, unembedding = torch.randn(5, 8, generator=g), torch.randn(40, 8, generator=g)
    up, up_v, down, down_v = logit_effects(directions, unembedding, 3, block=2)
    logits = (directions @ unembedding.T).numpy()
    for i in range(5):
        order = np.argsort(logits[i])
        assert up[i].tolist() == order[::-1][:3].tolist() and down[i].tolist() == order[:3].tolist()
        np.testing.assert_allclose(up_v[i], logits[i][order[::-1][:3]], rtol=1e-5)
        np.testing.assert_allclose(down_v[i], logits[i][order[:3]], rtol=1e-5)


def test_activations_are_rounded_to_three_digits_of_their_latents_maximum():
    from saedynamics.explorer.site import _round

    values = np.array([[3.16049, 0.0, 1.00049], [1234.5, 17.0, 0.4]])
    out = _round(values, np.array([[3.1604], [1234.5]]), 3)
    assert out.tolist() == [[3.16, 0.0, 1.0], [1230.0, 20.0, 0.0]]
    assert json.dumps(out[0].tolist()) == "[3.16, 0.0, 1.0]"
    # and to significant digits of themselves
    small = np.array([0.000123456, -0.0987654, 98765.4])
    assert _round(small, small, 4).tolist() == [0.0001235, -0.09877, 98770.0]


def test_token_strings_show_the_text_and_the_bytes_of_partial_characters(tmp_path):
    from saedynamics.explorer.site import _token_strings

    tok = tiny_tokenizer()
    tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = tok.backend_tokenizer.get_vocab()
    strings = _token_strings(tmp_path / "tokenizer.json", len(vocab) + 2)
    assert strings[vocab["Ġquick"]] == " quick" and strings[vocab["a"]] == "a"
    assert strings[vocab["â"]] == "\\xe2"  # the first byte of '€' and many more
    assert strings[len(vocab)] == f"<id {len(vocab)}>"  # padded vocabulary (Pythia's)


# ---- the demo's explorer ---------------------------------------------------------------------------


def demo_explorer(demo_repo: Path) -> Path:
    return demo_repo / "results/demo/explorer"


@pytest.mark.slow
def test_the_demo_builds_an_explorer_true_to_its_saes(demo_repo):
    """Every (layer, architecture) has an index and a data file per latent; a latent's entry at
    each step holds what its SAE does on that step's eval cache, recomputed here densely."""
    from saedynamics.activations import ActivationFile
    from saedynamics.saes import load

    root = demo_repo / "results/demo"
    site = demo_explorer(demo_repo)
    manifest = json.loads((site / "manifest.json").read_text())
    steps, layers, seeds = manifest["steps"], manifest["layers"], manifest["seeds"]
    assert (site / "index.html").is_file() and manifest["latent_pages"] > 0
    for layer in layers:
        for name in manifest["architectures"]:
            index = read_data(site / f"layer{layer}/{name}/index.js")
            assert [r[0] for r in index["rows"]] == list(range(index["n_latents"]))
            assert (site / f"layer{layer}/{name}/latent.html").is_file()
            assert (
                len(list((site / f"layer{layer}/{name}/latents").iterdir())) == index["n_latents"]
            )

    layer, name = layers[-1], manifest["architectures"][0]
    index = read_data(site / f"layer{layer}/{name}/index.js")
    cols = index["columns"]
    busiest = max(index["rows"], key=lambda r: r[cols.index("frac_nonzero")])[0]
    doc = read_data(site / f"layer{layer}/{name}/latents/{busiest}.js")
    assert [s["step"] for s in doc["steps"]] == steps
    for entry in doc["steps"]:
        step, latent = entry["step"], entry["latent"]
        sae = load(root / f"saes/step{step}/layer{layer}/{name}/seed{seeds[0]}")
        acts = ActivationFile(root / f"activations/step{step}/layer{layer}/eval.parquet").read(
            ("token_id", "act")
        )
        with torch.no_grad():
            codes = sae.encode(torch.from_numpy(acts["act"]).float())[:, latent].numpy()
        assert entry["frac_nonzero"] == pytest.approx((codes > 0).mean(), rel=1e-3)
        assert entry["max_value"] == pytest.approx(codes.max(), rel=1e-3)
        assert len(entry["activations"]) == min(10, int((codes > 0).sum()))
        values = [c["maxValue"] for c in entry["activations"]]
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, np.sort(codes)[::-1][: len(values)], rtol=1e-3)
        top = entry["activations"][0]
        k = top["maxValueTokenIndex"]
        assert len(top["tokens"]) == len(top["values"])
        assert top["values"][k] == pytest.approx(top["maxValue"], rel=2e-3)
        assert top["tokens"][k] == acts["token_id"][np.argmax(codes)]
        assert [p["seed"] for p in entry["partners"]] == seeds
        assert sum(entry["freq_hist_data_bar_heights"]) == int((codes > 0).sum())
        assert len(entry["pos_tokens"]) == len(entry["neg_values"]) == 10


@pytest.mark.slow
def test_the_logit_effects_use_the_unembedding_the_lm_uses(demo_repo):
    from saedynamics.checkpoints import load_model
    from saedynamics.explorer.site import _unembedding

    checkpoint = next((demo_repo / "results/demo/checkpoints").glob("step*/"))
    lm = load_model(checkpoint)
    folded = lm.get_output_embeddings().weight * lm.gpt_neox.final_layer_norm.weight
    assert torch.equal(_unembedding(checkpoint), folded.detach())


def test_bad_input_names_the_file_and_writes_nothing(tmp_path, capsys):
    """A missing SAE, a step without an eval cache: one message naming what is missing, and no
    explorer folder (nor a temporary one) left behind."""
    out = tmp_path / "explorer"
    settings = json.dumps({"study": "x", "explorer": {}})
    sae = tmp_path / "saes/step3/layer1/topk/seed0"
    message = cli_error(
        capsys, "explorer", "--settings", settings, "--saes", sae / "cfg.json",
        "--eval", tmp_path / "activations/step3/layer1/eval.parquet",
        "--checkpoints", tmp_path / "checkpoints/step3", "--tables", tmp_path, "--out", out,
    )  # fmt: skip
    assert str(sae / "cfg.json") in message and "run the train rule" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_step_without_an_eval_cache_stops_the_explorer(demo_repo, tmp_path, capsys):
    root = demo_repo / "results/demo"
    steps = sorted(int(p.name[4:]) for p in (root / "saes").glob("step*"))
    evals = sorted(str(p) for p in root.glob(f"activations/step{steps[-1]}/layer*/eval.parquet"))
    out = tmp_path / "explorer"
    message = cli_error(
        capsys, "explorer", "--settings", json.dumps({"study": "demo", "explorer": {}}),
        "--saes", *root.glob("saes/step*/layer*/*/seed*/cfg.json"), "--eval", *evals,
        "--checkpoints", *root.glob("checkpoints/step*"), "--tables", root / "tables", "--out", out,
    )  # fmt: skip
    assert f"no eval cache for step {steps[0]}, layer" in message
    assert f"activations/step{steps[0]}/layer" in message and "run the activations rule" in message
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- in a real browser ------------------------------------------------------------------------------

ARTIFACTS = REPO / "test-artifacts/explorer"  # screenshots, kept after the run


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver (Debian's chromium and chromium-driver: matching
    versions, nothing downloaded at run time)."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("no chromium/chromedriver here (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=options)
    yield d
    d.quit()


def open_page(browser, path: Path, shot: str):
    """Open a page of the site from the file system; no console messages at all; a screenshot."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(path.as_uri() if "#" not in str(path) else "file://" + str(path))
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "footer"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / shot))
    messages = browser.get_log("browser")
    assert not messages, messages


@pytest.mark.slow
def test_the_explorer_works_in_a_browser(demo_repo, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    site = demo_explorer(demo_repo)
    manifest = json.loads((site / "manifest.json").read_text())
    layer, name = manifest["layers"][-1], manifest["architectures"][0]

    open_page(browser, site / "index.html", "study.png")
    links = browser.find_elements(By.CSS_SELECTOR, "table.metrics a")
    assert len(links) == len(manifest["layers"]) * len(manifest["architectures"])

    # the index of latents: every latent listed, sorted by a click, filtered by a token
    open_page(browser, site / f"layer{layer}/{name}/index.html", "index.png")
    index = read_data(site / f"layer{layer}/{name}/index.js")
    rows = browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    assert len(rows) == len(index["rows"])
    col = index["columns"].index("frac_nonzero")
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="frac_nonzero"]').click()
    shown = [
        int(r.get_attribute("data-latent"))
        for r in browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    ]
    by_density = sorted(index["rows"], key=lambda r: (-(r[col] or 0), r[0]))
    assert shown == [r[0] for r in by_density]
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="frac_nonzero"]').click()  # and back up
    first = browser.find_element(By.CSS_SELECTOR, "#latents tbody tr").get_attribute("data-latent")
    assert int(first) == min(index["rows"], key=lambda r: (r[col], r[0]))[0]
    browser.save_screenshot(str(ARTIFACTS / "index_sorted.png"))
    tokens = read_data(site / "tokens.js")["tokens"]
    busiest = by_density[0]
    token = next(t for t in busiest[index["columns"].index("top_tokens")] if tokens[t].strip())
    browser.find_element(By.ID, "filter").send_keys(tokens[token].strip())
    kept = [
        int(r.get_attribute("data-latent"))
        for r in browser.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    ]
    wanted = {i for i, s in enumerate(tokens) if s.strip().lower() == tokens[token].strip().lower()}
    ctx = index["columns"].index("context_tokens")
    assert busiest[0] in kept
    assert set(kept) == {r[0] for r in index["rows"] if wanted & set(r[ctx])}
    browser.save_screenshot(str(ARTIFACTS / "index_filtered.png"))

    # a latent's page: every checkpoint with highlighted contexts, every seed's partner
    browser.find_element(
        By.CSS_SELECTOR, f'#latents tbody tr[data-latent="{busiest[0]}"] a'
    ).click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "section.step"))
    open_page(browser, site / f"layer{layer}/{name}/latent.html#{busiest[0]}", "latent.png")
    doc = read_data(site / f"layer{layer}/{name}/latents/{busiest[0]}.js")
    sections = browser.find_elements(By.CSS_SELECTOR, "section.step")
    assert sorted(int(s.get_attribute("data-step")) for s in sections) == manifest["steps"]
    for section, entry in zip(sections, reversed(doc["steps"]), strict=True):
        contexts = section.find_elements(By.CSS_SELECTOR, ".context")
        assert len(contexts) == len(entry["activations"]) > 0
        lit = section.find_elements(By.CSS_SELECTOR, ".tok.max")
        assert len(lit) == len(contexts)
        assert all("255, 102, 0" in t.get_attribute("style") for t in lit)  # rgb(a)
        partners = section.find_elements(By.CSS_SELECTOR, "table.partners tbody tr")
        assert len(partners) == len(manifest["seeds"])
        assert section.find_elements(By.CSS_SELECTOR, "svg.histogram rect.bar")
    assert browser.find_elements(By.CSS_SELECTOR, "svg.trajectory circle.dot")
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1400, min(int(height) + 40, 6000))
    browser.save_screenshot(str(ARTIFACTS / "latent_full.png"))
    assert not browser.get_log("browser")
