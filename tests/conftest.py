"""Shared fixtures. Everything runs offline on CPU.

HF_HUB_OFFLINE is read when huggingface_hub is imported, so it is set here, before any test module
imports transformers; the local Hub cache the hub tests use is built by `hub_cache` below.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import copy  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HUB_REPO_ID = "saedynamics-tests/tiny-neox"
HUB_STEPS = (0, 1, 2)  # step1 = step0 byte for byte (as Pythia's); step2 ships pickled weights only


def tiny_tokenizer():
    """A byte-level BPE tokenizer like Pythia's, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 20], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|padding|>",
    )


def tiny_neox(vocab_size: int, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        rotary_pct=0.25,
    )
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face hub cache holding HUB_REPO_ID at revisions step0, step1, step2.

    Layout as huggingface_hub writes it: models--org--name/{refs/<revision>, snapshots/<commit>/...}.
    """
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / ("models--" + HUB_REPO_ID.replace("/", "--"))
    tok = tiny_tokenizer()
    for step in HUB_STEPS:
        commit = hashlib.sha1(f"commit-{step}".encode()).hexdigest()
        snap = repo / "snapshots" / commit
        model = tiny_neox(len(tok), seed=0 if step in (0, 1) else step)
        model.save_pretrained(snap, safe_serialization=True)
        tok.save_pretrained(snap)
        if step == 2:  # an old-style revision: pickled weights only
            torch.save(model.state_dict(), snap / "pytorch_model.bin")
            (snap / "model.safetensors").unlink()
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
    (repo / "refs" / "main").write_text((repo / "refs" / "step2").read_text())
    return cache


@pytest.fixture()
def offline_hub(hub_cache, monkeypatch) -> Path:
    """Point huggingface_hub at the local cache for this test (and its subprocesses)."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


@pytest.fixture(scope="session")
def tiny_raw() -> dict:
    """The tiny end-to-end config (workflow/configs/tiny.yaml) as a dict."""
    return yaml.safe_load((REPO / "workflow/configs/tiny.yaml").read_text())


@pytest.fixture()
def tiny_cfg(tiny_raw):
    from saedynamics.config import load_config

    return load_config(copy.deepcopy(tiny_raw), "tiny.yaml")


def hub_config(tmp_path: Path, hub_cache: Path) -> dict:
    """A study over the local hub repo, with a local-files corpus."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(
        "".join(
            f'{{"text": "The quick brown fox {i} jumps over the lazy dog."}}\n' for i in range(200)
        )
    )
    return {
        "study": "hub-test",
        "results": str(tmp_path / "results"),
        "corpus": {"source": "files", "data_files": [str(corpus)], "format": "json"},
        "tokens": {"context_length": 16, "train_sequences": 64, "eval_sequences": 16},
        "model": {
            "source": "hub",
            "repo_id": HUB_REPO_ID,
            "steps": list(HUB_STEPS),
            "num_layers": 2,
            "d_model": 32,
            "tokenizer_revision": "step2",
            "cache_dir": str(hub_cache),
        },
        "activations": {"layers": [0, 1], "row_group_rows": 256},
        "training": {"n_latents": 64, "seeds": [0, 1], "train_tokens": 4096, "batch_size": 256},
        "architectures": {"topk": {"architecture": "topk", "k": 4, "lr": 0.004}},
    }


@pytest.fixture()
def hub_copy(hub_cache, tmp_path, monkeypatch) -> Path:
    """A private copy of the local HF cache (a test may change it), used as the default cache."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-hub"
    shutil.copytree(hub_cache, cache)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def hub_model(hub_cache: Path, steps=(0, 1, 2)):
    """The model config of the local test repo in HF cache `hub_cache`."""
    from saedynamics.config import HubModelConfig

    return HubModelConfig(
        source="hub",
        repo_id=HUB_REPO_ID,
        steps=list(steps),
        num_layers=2,
        d_model=32,
        tokenizer_revision="step2",
        cache_dir=str(hub_cache),
    )


def snapshot_of(cache: Path, step: int) -> Path:
    """The snapshot folder of the test repo's revision step<step> in HF cache `cache`."""
    repo = cache / ("models--" + HUB_REPO_ID.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / f"step{step}").read_text()


@pytest.fixture()
def hub_stage(offline_hub, tmp_path):
    """A hub study's raw config, its token sample and checkpoint step2, under tmp_path."""
    from saedynamics.checkpoints import download_checkpoint
    from saedynamics.config import load_config
    from saedynamics.corpus import build_token_sample

    raw = hub_config(tmp_path, offline_hub)
    cfg = load_config(raw)
    build_token_sample(
        cfg.corpus, cfg.tokens, cfg.model, tmp_path / "tokens", tmp_path / "tokenizer"
    )
    download_checkpoint(cfg.model, 2, tmp_path / "ckpt", [])
    return raw, tmp_path


@pytest.fixture(autouse=True)
def _keep_logging():
    """cli.main points the root logger at the (captured) stderr of its test: undo that after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process; assert it failed with a one-paragraph error message; return it."""
    from saedynamics.cli import main

    capsys.readouterr()
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    message = err[err.rindex("error: ") :].strip()
    assert "\n" not in message and "Traceback" not in err, err
    return message


def copy_workflow(dest: Path) -> Path:
    """A copy of the workflow (Snakefile, rules, configs, package) to run Snakemake in."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "workflow", "src"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(
                src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        else:
            shutil.copy2(src, dest / name)
    return dest


# ---- a git + DVC repository of this checkout, after the demo ran through DVC ----------------------

# The study the `demo_repo` fixture runs as `demo`: the tiny config (the DVC and SLURM tests prove
# the wiring, which the demo's size adds nothing to); point this at workflow/configs/demo.yaml to
# run the real demo instead. It is copied over workflow/configs/demo.yaml with `study: demo`, so the
# stages and paths stay those of the demo.
DEMO_CONFIG_ENV = "SAEDYNAMICS_TEST_DEMO_CONFIG"


def use_test_demo_config(checkout: Path) -> dict:
    """Write the config the tests run as the demo (DEMO_CONFIG_ENV) over `checkout`'s
    workflow/configs/demo.yaml; return it."""
    source = Path(os.environ.get(DEMO_CONFIG_ENV, REPO / "workflow/configs/tiny.yaml"))
    raw = yaml.safe_load(source.read_text()) | {"study": "demo"}
    (checkout / "workflow/configs/demo.yaml").write_text(yaml.safe_dump(raw))
    return raw


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` (with a committer identity of its own); its stdout."""
    import subprocess

    ident = ["-c", "user.name=saedynamics tests", "-c", "user.email=tests@saedynamics.invalid"]
    out = subprocess.run(["git", *ident, *args], cwd=repo, capture_output=True, text=True)
    if out.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed in {repo}:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def dvc(repo: Path, *args: str, check: bool = True):
    """Run `dvc` in `repo` as a user does (stage commands find this Python's snakemake first)."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    out = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"dvc {' '.join(args)} failed in {repo}:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}"
        )
    return out


def checkout_files() -> list[str]:
    """The checkout's files as git sees them: tracked, plus untracked ones that are not ignored
    (uncommitted work is included; results, caches and .snakemake are not)."""
    listed = git(REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return sorted(f for f in set(listed.split("\0")) if f and (REPO / f).is_file())


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    """A fresh git repository holding this checkout, in which the demo ran through DVC as a user
    runs it (`dvc repro figures@demo explorer@demo`: compute@demo, then figures@demo and
    explorer@demo), with dvc.lock committed.

    The study is the tiny config run as `demo` (DEMO_CONFIG_ENV). results/demo is complete
    (tokens, checkpoints, activations, SAEs, metrics, tables, validation, figures, logs,
    benchmarks) and in the repository's DVC cache: every test that only reads a finished study
    reads this one. Tests may add a DVC remote and commit to the repository; they must not change
    results/demo. The output of `dvc repro` is in `<repo>/../dvc-repro.log`. About 2 minutes on 2
    CPU cores.
    """
    import time

    repo = tmp_path_factory.mktemp("demo-repo") / "saedynamics"
    for name in checkout_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    use_test_demo_config(repo)
    git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "-m", "saedynamics checkout")
    start = time.monotonic()
    out = dvc(repo, "repro", "figures@demo", "explorer@demo")
    log = f"{out.stdout}\n{out.stderr}\n# {time.monotonic() - start:.0f} s\n"
    (repo.parent / "dvc-repro.log").write_text(log)
    git(repo, "add", "--all")  # dvc.lock (results/ is ignored)
    git(repo, "commit", "--quiet", "-m", "dvc repro figures@demo explorer@demo")
    return repo
