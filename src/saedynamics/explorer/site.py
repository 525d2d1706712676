"""The explorer stage: a static site of latents across checkpoints and seeds, opened from the file
system (no server, nothing fetched).

For each (layer, architecture) it lists the latents of the final checkpoint's SAE of the first
seed (the reference seed) and, for each of them, follows its chain of decoder matches back through
training (`latents.chains`). At every checkpoint a latent page shows the chained latent's top eval
contexts with the activation on each token, its activation histogram, the tokens its decoder
direction promotes and suppresses through that checkpoint's unembedding, and its partners (optimal
decoder matches) in the other seeds.

Layout of `explorer/` (what the pages load is JSON, each document wrapped in one call
`EXPLORER.receive(...)`: browsers let a page opened from the file system load scripts, not fetch
files; `read_data` unwraps it):

    index.html                      the study: every (layer, architecture), with its metrics
                                    (also written beside the site as one self-contained page,
                                    explorer.html, for `snakemake --report`)
    tokens.js                       the vocabulary's display strings, by token id
    layer<L>/<architecture>/
        index.html, index.js        its latents: sortable, filterable by a token of their contexts
        latent.html                 one page for every latent: latent.html#<latent>
        latents/<latent>.js         one latent's data at every checkpoint
    assets/                         explorer.css, explorer.js
    manifest.json                   provenance, settings, sizes and build time
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from importlib import resources
from pathlib import Path

import jinja2
import numpy as np
import torch
from tqdm import tqdm

from saedynamics.artifacts import MANIFEST, atomic_directory, atomic_file, read_json
from saedynamics.errors import DataError
from saedynamics.explorer.latents import chains, context_rows, encode_eval, logit_effects
from saedynamics.inputs import checked_activation_file
from saedynamics.metrics.consistency import match
from saedynamics.resources import resolve_device
from saedynamics.saes import load

log = logging.getLogger("saedynamics")

WRAPPER = "EXPLORER.receive("  # every data file is WRAPPER + JSON + ");\n"
UNEMBEDDING = "embed_out.weight"  # GPT-NeoX (Pythia and the micro suite)
FINAL_NORM = "gpt_neox.final_layer_norm.weight"


def build_explorer(
    explorer,
    saes: list[Path],
    evals: list[Path],
    checkpoints: list[Path],
    tables: Path,
    out: Path,
    *,
    study: str,
    provenance: dict,
    front_page: Path | None = None,
) -> dict:
    """Write the site `out` (atomically: all of it or nothing) for the SAEs whose cfg.json files
    are `saes`, from the eval caches `evals`, the checkpoint directories `checkpoints` and the
    tables in `tables`; `explorer` is the validated ExplorerConfig. Every input is checked before
    any work. `front_page`: also the study's page as one self-contained file beside the site
    (styles inline, links into it; what `snakemake --report` embeds). Returns the manifest."""
    start = time.monotonic()
    device = resolve_device(explorer.device)
    runs = _sae_dirs(saes)
    steps = sorted({step for (_, step, _, _) in runs})
    layers = sorted({layer for (layer, _, _, _) in runs})
    names = sorted({name for (_, _, name, _) in runs})
    seeds = sorted({seed for (_, _, _, seed) in runs})
    missing = [
        f"step {s}, layer {la}, {n}, seed {sd}"
        for la in layers
        for s in steps
        for n in names
        for sd in seeds
        if (la, s, n, sd) not in runs
    ]
    if missing:
        raise DataError(
            "the explorer needs every (step, layer, architecture, seed) of the study; no SAE "
            f"given for {'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    eval_files = _by_step_layer(evals, steps, layers)
    checkpoint_dirs = _checkpoints(checkpoints, steps)
    summary = _summary(Path(tables), steps)
    final = checkpoint_dirs[steps[-1]]
    unembedding = {step: _unembedding(checkpoint_dirs[step]) for step in steps}
    token_strings = _token_strings(final / "tokenizer.json", len(unembedding[steps[-1]]))

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("saedynamics.explorer", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    with atomic_directory(out) as tmp:
        (tmp / "assets").mkdir()
        for name in ("explorer.css", "explorer.js"):
            text = resources.files("saedynamics.explorer").joinpath("static", name).read_text()
            (tmp / "assets" / name).write_text(text)
        _write_data(tmp / "tokens.js", {"kind": "tokens", "tokens": token_strings})
        listing = []
        progress = tqdm(total=len(layers) * len(names), desc="explorer", unit="architecture")
        for layer in layers:
            acts = {step: _eval(eval_files[(step, layer)], step, layer) for step in steps}
            for name in names:
                where = tmp / f"layer{layer}" / name
                shown = _architecture(
                    explorer,
                    {s: {sd: runs[(layer, s, name, sd)] for sd in seeds} for s in steps},
                    acts,
                    unembedding,
                    where,
                    device,
                    study=study,
                    layer=layer,
                    name=name,
                    summary=summary,
                    env=env,
                )
                listing.append(shown)
                progress.update()
        progress.close()
        seconds = time.monotonic() - start
        files = {
            str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        manifest = {
            "study": study,
            "steps": steps,
            "layers": layers,
            "architectures": names,
            "seeds": seeds,
            "settings": explorer.model_dump(mode="json"),
            "build_seconds": round(seconds, 1),
            "bytes": sum(files.values()),
            "latent_pages": sum(a["latents"] for a in listing),
            "files": files,
            "provenance": provenance,
        }
        page = dict(study=study, steps=steps, seeds=seeds, listing=listing, manifest=manifest)
        (tmp / "index.html").write_text(env.get_template("study.html").render(**page, site=""))
        manifest["files"]["index.html"] = (tmp / "index.html").stat().st_size
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if front_page is not None:
            css = (tmp / "assets" / "explorer.css").read_text()
            text = env.get_template("study.html").render(
                **page, site=f"{Path(out).name}/", inline_css=css, provenance=json.dumps(provenance)
            )
            with atomic_file(front_page) as tmp_page:
                tmp_page.write_text(text)
    log.info(
        "explorer: %d latent pages, %.1f MB in %d files, %.1f s",
        manifest["latent_pages"],
        manifest["bytes"] / 1e6,
        len(manifest["files"]),
        seconds,
    )
    return manifest


def read_data(path: str | Path):
    """The JSON document of one of the explorer's data files (`*.js`)."""
    text = Path(path).read_text()
    if not text.startswith(WRAPPER):
        raise DataError(f"{path}: not an explorer data file (it starts {text[:30]!r})")
    return json.loads(text[len(WRAPPER) : text.rindex(")")])


# ---- one (layer, architecture) ------------------------------------------------------------------


def _architecture(
    explorer, dirs, acts, unembedding, where, device, *, study, layer, name, summary, env
):
    """Compute and write the index and the latent data of one (layer, architecture); returns its
    line of the study index."""
    steps = sorted(dirs)
    seeds = sorted(dirs[steps[0]])
    ref = seeds[0]
    saes = {s: {sd: load(d).to(device).eval() for sd, d in dirs[s].items()} for s in steps}
    final_sae = saes[steps[-1]][ref]
    title = final_sae.title or final_sae.architecture
    for s in steps:
        for sd, sae in saes[s].items():
            if sae.d_in != acts[s]["act"].shape[1]:
                raise DataError(
                    f"{dirs[s][sd]}: d_in {sae.d_in}, but the eval activations of step {s}, "
                    f"layer {layer} have d_model {acts[s]['act'].shape[1]}; rerun the train rule"
                )
    shown = _sample(final_sae.d_sae, explorer.latents, explorer.sample_seed)
    decoders = {s: {sd: sae.W_dec.detach().cpu() for sd, sae in saes[s].items()} for s in steps}
    chain = chains([decoders[s][ref] for s in steps])
    docs = [[] for _ in shown]  # per shown latent, its entry at each step
    n = max(explorer.contexts, PARTNER_TOKENS)
    for i, s in enumerate(steps):
        x = torch.from_numpy(acts[s]["act"])
        codes = {
            sd: encode_eval(
                sae.encode, (b.to(device).float() for b in x.split(explorer.batch_size)), n
            )
            for sd, sae in saes[s].items()
        }
        step = _step_entries(
            explorer, s, chain, i, shown, codes, ref, decoders[s], unembedding[s], acts[s]
        )
        for doc, entry in zip(docs, step, strict=True):
            doc.append(entry)

    (where / "latents").mkdir(parents=True)
    rows = []
    for latent, entries in zip(shown, docs, strict=True):
        _write_data(
            where / "latents" / f"{latent}.js",
            {
                "kind": "latent",
                "study": study,
                "layer": layer,
                "architecture": name,
                "architecture_title": title,
                "latent": int(latent),
                "seed": ref,
                "seeds": seeds,
                "steps": entries,
            },
        )
        last = entries[-1]
        others = [p["cosine"] for p in last["partners"][1:]]
        contexts = last["activations"]
        rows.append(
            [
                int(latent),
                last["frac_nonzero"],
                _num(np.mean(others)) if others and None not in others else None,
                last["cosine_previous"],
                last["max_value"],
                list(dict.fromkeys(c["tokens"][c["maxValueTokenIndex"]] for c in contexts))[:5],
                sorted({t for c in contexts for t in c["tokens"]}),
            ]
        )
    metrics = summary.get((layer, name), {})
    index = {
        "kind": "index",
        "study": study,
        "layer": layer,
        "architecture": name,
        "architecture_title": title,
        "n_latents": final_sae.d_sae,
        "steps": steps,
        "seeds": seeds,
        "columns": INDEX_COLUMNS,
        "rows": rows,
        "metrics": [metrics.get(s, {"step": s}) for s in steps],
    }
    _write_data(where / "index.js", index)
    page = dict(study=study, layer=layer, name=name, title=title, steps=steps, seeds=seeds)
    (where / "index.html").write_text(
        env.get_template("latents.html").render(
            **page, n_shown=len(shown), n_latents=final_sae.d_sae, metrics=index["metrics"]
        )
    )
    (where / "latent.html").write_text(env.get_template("latent.html").render(**page))
    return {
        "layer": layer,
        "architecture": name,
        "title": title,
        "href": f"layer{layer}/{name}/index.html",
        "latents": len(shown),
        "n_latents": final_sae.d_sae,
        "alive": float(np.mean(codes[ref].density > 0)),  # at the final step
        "metrics": metrics.get(steps[-1], {}),
    }


PARTNER_TOKENS = 5  # a partner's top tokens shown (its top activations' tokens, distinct)
INDEX_COLUMNS = [
    "latent",
    "frac_nonzero",  # firing density at the final step
    "seed_stability",  # mean decoder cosine to the optimal match in each other seed
    "training_stability",  # decoder cosine to the chained match at the previous checkpoint
    "max_value",
    "top_tokens",  # the tokens of the top contexts' max-activating positions
    "context_tokens",  # every token of the top contexts (the index's filter)
]


def _step_entries(explorer, step, chain, i, shown, codes, ref, decoders, unembedding, acts) -> list:
    """The entry of every shown latent at checkpoint `i` (`step`): its chained latent there, that
    latent's top contexts, histogram, logit effects and partners in the other seeds. Field names
    follow Neuronpedia's feature export where the meaning is the same (token ids, not strings)."""
    here = chain["latent"][i, shown]
    ok = here >= 0
    lat = np.where(ok, here, 0)
    n, before, bins = explorer.contexts, explorer.context_before, explorer.histogram_bins
    ours = codes[ref]
    top_values, top_rows = ours.top_values[lat, :n], ours.top_rows[lat, :n]  # [N, n]
    top_rows[~ok] = -1
    ctx = context_rows(acts["doc_id"], acts["pos"], top_rows, before, explorer.context_after)
    maximum = ours.maximum[lat]
    valid = ctx >= 0
    ctx_values = ours.at(ctx, np.broadcast_to(lat[:, None, None], ctx.shape))
    ctx_values = _round(ctx_values, maximum[:, None, None], 3)
    ctx_values = np.where(ctx_values == 0, 0, ctx_values.astype(object)).tolist()  # 0, not 0.0
    tokens = np.where(valid, acts["token_id"][np.where(valid, ctx, 0)], -1).tolist()
    complete = valid.all(-1)  # contexts not cut by a document's edge: kept whole
    at = valid[:, :, :before].sum(-1).tolist()  # the max token's index among the kept tokens
    hist = ours.histograms(bins)[lat].tolist()
    centres = _round((np.arange(bins) + 0.5) / bins * maximum[:, None], maximum[:, None], 3)
    pos, pos_v, neg, neg_v = logit_effects(decoders[ref][lat], unembedding, explorer.logit_tokens)
    pos_v, neg_v = (_round(v, v, 4).tolist() for v in (pos_v, neg_v))
    pos, neg, centres = pos.tolist(), neg.tolist(), centres.tolist()
    top_list = _round(top_values, top_values, 4).tolist()
    partners = {sd: match(decoders[ref], decoders[sd]) for sd in decoders if sd != ref}
    top_tokens = {
        sd: np.where(r >= 0, acts["token_id"][np.maximum(r, 0)], -1)
        for sd, r in ((sd, c.top_rows[:, :PARTNER_TOKENS]) for sd, c in codes.items())
    }
    density = {sd: c.density for sd, c in codes.items()}

    entries = []
    for j in range(len(shown)):
        if not ok[j]:
            entries.append({"step": step, "latent": None})
            continue
        latent = int(lat[j])
        activations = []
        for c in range(n):
            if top_rows[j, c] < 0:
                break  # the top activations are sorted: the rest did not fire either
            t, v = tokens[j][c], ctx_values[j][c]
            if not complete[j, c]:
                keep = valid[j, c]
                t, v = (
                    [x for x, k in zip(t, keep, strict=True) if k],
                    [x for x, k in zip(v, keep, strict=True) if k],
                )
            activations.append(
                {
                    "tokens": t,
                    "values": v,
                    "maxValue": top_list[j][c],
                    "maxValueTokenIndex": at[j][c],
                }
            )
        seeds = [(ref, latent, 1.0)] + [
            (sd, int(p[latent]), cos[latent]) for sd, (p, cos) in partners.items()
        ]
        entries.append(
            {
                "step": step,
                "latent": latent,
                "frac_nonzero": _num(density[ref][latent]),
                "max_value": _num(maximum[j]),
                "cosine_previous": _num(chain["cosine_previous"][i, shown[j]]),
                "cosine_final": _num(chain["cosine_final"][i, shown[j]]),
                "activations": activations,
                "freq_hist_data_bar_heights": hist[j],
                "freq_hist_data_bar_values": centres[j],
                "pos_tokens": pos[j],
                "pos_values": pos_v[j],
                "neg_tokens": neg[j],
                "neg_values": neg_v[j],
                "partners": [
                    {
                        "seed": sd,
                        "latent": q if q >= 0 else None,
                        "cosine": _num(cos),
                        "frac_nonzero": _num(density[sd][q]) if q >= 0 else None,
                        "top_tokens": _unique(top_tokens[sd][q]) if q >= 0 else [],
                    }
                    for sd, q, cos in seeds
                ],
            }
        )
    return entries


def _round(values: np.ndarray, reference: np.ndarray, digits: int) -> np.ndarray:
    """`values` rounded to a step of 10^(1 - digits) times the leading power of ten of
    `reference` (broadcast to values; itself for significant digits): 3.16 rather than 3.1604 for
    3 digits of 3.2. A correctly rounded division by a power of ten gives the double nearest the
    decimal, which JSON then prints short."""
    ref = np.abs(np.broadcast_to(reference, values.shape))
    scale = np.floor(np.log10(np.where(ref > 0, ref, 1.0))).astype(int) - digits + 1
    down = np.power(10.0, np.maximum(-scale, 0))  # exact: 10^k, 0 <= k <= 22
    up = np.power(10.0, np.maximum(scale, 0))
    return np.rint(values * down / up) * up / down


def _unique(ids: np.ndarray) -> list[int]:
    return list(dict.fromkeys(int(t) for t in ids if t >= 0))


def _num(x, digits: int = 4):
    """A JSON number with `digits` significant digits; None for NaN (JSON has no NaN)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _sample(n_latents: int, n: int, seed: int) -> np.ndarray:
    """The latents given pages: all, or a seeded uniform sample of n, in index order."""
    if n >= n_latents:
        return np.arange(n_latents)
    return np.sort(np.random.default_rng(seed).choice(n_latents, n, replace=False))


def _write_data(path: Path, doc) -> None:
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    path.write_text(WRAPPER + text + ");\n")


# ---- inputs ---------------------------------------------------------------------------------------


def _sae_dirs(saes: list[Path]) -> dict:
    """{(layer, step, architecture name, seed): SAE directory} from cfg.json paths (or dirs)."""
    out = {}
    for path in map(Path, saes):
        directory = path.parent if path.name == "cfg.json" else path
        cfg = directory / "cfg.json"
        if not cfg.is_file():
            raise DataError(f"{cfg}: no such SAE config; run the train rule")
        try:
            ours = read_json(cfg)["saedynamics"]
            key = (ours["layer"], ours["step"], ours["architecture_name"], ours["seed"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{cfg}: not an saedynamics SAE config ({e})") from None
        if not (directory / "sae_weights.safetensors").is_file():
            raise DataError(f"{directory / 'sae_weights.safetensors'}: missing; run the train rule")
        out[key] = directory
    if not out:
        raise DataError("the explorer was given no SAEs")
    return out


def _by_step_layer(evals: list[Path], steps, layers) -> dict:
    """{(step, layer): eval.parquet} from paths .../step<N>/layer<L>/eval.parquet."""
    found = {}
    for path in map(Path, evals):
        try:
            key = (
                int(path.parts[-3].removeprefix("step")),
                int(path.parts[-2].removeprefix("layer")),
            )
        except (IndexError, ValueError):
            raise DataError(
                f"{path}: not an eval cache path (.../step<N>/layer<L>/eval.parquet)"
            ) from None
        found[key] = path
    for step in steps:
        for layer in layers:
            if (step, layer) not in found:
                raise DataError(
                    f"no eval cache for step {step}, layer {layer} (expected "
                    f".../activations/step{step}/layer{layer}/eval.parquet); run the activations rule"
                )
            if not found[(step, layer)].is_file():
                raise DataError(
                    f"{found[(step, layer)]}: no such eval cache; run the activations rule"
                )
    return found


def _eval(path: Path, step: int, layer: int) -> dict:
    acts = checked_activation_file(path, step, layer)
    return acts.read(("doc_id", "pos", "token_id", "act"))


def _checkpoints(checkpoints: list[Path], steps) -> dict:
    found = {int(Path(p).name.removeprefix("step")): Path(p) for p in checkpoints}
    for step in steps:
        if step not in found or not found[step].is_dir():
            raise DataError(
                f"no checkpoint directory for step {step} (expected checkpoints/step{step}/); "
                "run the checkpoint rule"
            )
    return found


def _unembedding(directory: Path) -> torch.Tensor:
    """The unembedding [vocab, d] the checkpoint's LM uses, with its final LayerNorm's scale folded
    in (as TransformerLens' fold_ln: the direct path with the norm's scale, not its centring or its
    division by the norm). Read from the verified weights; a checkpoint that does not store its
    unembedding (tied weights) is loaded as every stage loads the LM, tying included."""
    from safetensors import safe_open

    from saedynamics.checkpoints import load_model, verify_checkpoint

    verify_checkpoint(directory)
    tensors = {}
    for f in sorted(Path(directory).glob("model*.safetensors")):
        with safe_open(f, "pt") as weights:
            for key in (UNEMBEDDING, FINAL_NORM):
                if key in weights.keys():  # noqa: SIM118 - safe_open has no __contains__
                    tensors[key] = weights.get_tensor(key).float()
    if UNEMBEDDING not in tensors or FINAL_NORM not in tensors:
        model = load_model(directory)
        norm = getattr(getattr(model, "gpt_neox", None), "final_layer_norm", None)
        if norm is None:
            raise DataError(
                f"{directory}: not a GPT-NeoX checkpoint (no gpt_neox.final_layer_norm); the "
                "explorer reads GPT-NeoX checkpoints"
            )
        tensors = {
            UNEMBEDDING: model.get_output_embeddings().weight.detach().float(),
            FINAL_NORM: norm.weight.detach().float(),
        }
    return tensors[UNEMBEDDING] * tensors[FINAL_NORM]


def _token_strings(path: Path, vocab: int) -> list[str]:
    """Display strings of token ids 0..vocab-1: the decoded text; a byte-level token that is not
    valid UTF-8 alone shows as its bytes (\\xe2); ids beyond the tokenizer as <id N>."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DataError(f"{path}: no tokenizer.json; rerun the checkpoint rule")
    tok = Tokenizer.from_file(str(path))
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    out = []
    for i in range(vocab):
        raw = tok.id_to_token(i)
        if raw is None:
            out.append(f"<id {i}>")
            continue
        text = tok.decode([i])
        if "\ufffd" in text and all(c in to_byte for c in raw):
            text = "".join(
                f"\\x{to_byte[c]:02x}" if to_byte[c] >= 0x80 else chr(to_byte[c]) for c in raw
            )
        out.append(text)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (the one GPT-NeoX's tokenizer uses): printable bytes stand for
    themselves, the rest are shifted to code points from 256 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, shift = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shift)
            shift += 1
    return out


def _summary(tables: Path, steps) -> dict:
    """{(layer, architecture): {step: metrics}} from the tidy tables: FVU, L0 and dead fraction
    (mean over seeds), PW-MCC and its null, and the LM's eval loss."""
    import pandas as pd

    paths = {t: tables / f"{t}.parquet" for t in ("reconstruction", "consistency", "checkpoints")}
    for p in paths.values():
        if not p.is_file():
            raise DataError(f"{p}: no such table; run the tables rule")
    recon = pd.read_parquet(paths["reconstruction"])
    cons = pd.read_parquet(paths["consistency"])
    lm = pd.read_parquet(paths["checkpoints"]).set_index("step")["lm_eval_loss"]
    keys = ["layer", "architecture", "step"]
    r = recon.groupby(keys)[["fvu", "l0", "dead_fraction"]].mean()
    c = cons.groupby(keys)[["mcc", "null_pw_mcc"]].mean()
    out = defaultdict(dict)
    for (layer, name, step), row in r.join(c, how="outer").iterrows():
        out[(int(layer), name)][int(step)] = {
            "step": int(step),
            "lm_loss": _num(lm.get(step, np.nan)),
            "fvu": _num(row["fvu"]),
            "l0": _num(row["l0"]),
            "dead_fraction": _num(row["dead_fraction"]),
            "pw_mcc": _num(row["mcc"]),
            "null_pw_mcc": _num(row["null_pw_mcc"]),
        }
    return dict(out)
