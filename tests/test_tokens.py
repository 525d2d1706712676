"""The token sample (corpus.py): split exactly and deterministically, sharded, and resumable after a
real kill, ending with the shards an uninterrupted run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from saedynamics.corpus import DRAW_BLOCK, TokenSample, build_token_sample
from saedynamics.errors import DataError

from .kill_at import run


def sample(tmp_path: Path, tiny_cfg, name: str, **changes) -> Path:
    tokens = tiny_cfg.tokens.model_copy(update=changes)
    out = tmp_path / name / "tokens"
    build_token_sample(tiny_cfg.corpus, tokens, tiny_cfg.model, out, tmp_path / name / "tok")
    return out


def test_the_eval_split_is_an_exact_seeded_draw_of_the_first_windows(tmp_path, tiny_cfg):
    out = sample(tmp_path, tiny_cfg, "a", shard_sequences=64)
    s = TokenSample(out)
    train_ids, train = s.windows("train")
    eval_ids, evals = s.windows("eval")
    total = tiny_cfg.tokens.train_sequences + tiny_cfg.tokens.eval_sequences
    assert len(eval_ids) == tiny_cfg.tokens.eval_sequences and len(train_ids) == total - len(
        eval_ids
    )
    # every one of the first `total` windows, each in one split, in corpus order within a split
    assert sorted([*train_ids, *eval_ids]) == list(range(total))
    assert list(train_ids) == sorted(train_ids) and list(eval_ids) == sorted(eval_ids)
    # selection sampling on the seed's draws, recomputed here from the documented rule
    draws = np.random.default_rng([tiny_cfg.tokens.seed, 0]).random(DRAW_BLOCK)
    chosen = []
    for i in range(total):
        if draws[i] * (total - i) < tiny_cfg.tokens.eval_sequences - len(chosen):
            chosen.append(i)
    assert chosen == list(eval_ids)
    # windows of the corpus's token stream, cut in order: consecutive ids follow one another
    ctx = tiny_cfg.tokens.context_length
    assert train.shape == (len(train_ids), ctx) and evals.shape == (len(eval_ids), ctx)
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert [x["windows"] for x in shards] == [64] * 6 + [16]
    # another seed, another eval split; the same seed, the same sample
    other = TokenSample(sample(tmp_path, tiny_cfg, "b", shard_sequences=64, seed=1))
    assert list(other.windows("eval")[0]) != list(eval_ids)
    again = TokenSample(sample(tmp_path, tiny_cfg, "c", shard_sequences=64))
    assert np.array_equal(again.windows("train")[1], train)


def test_the_whole_corpus_when_train_sequences_is_unset(tmp_path, tiny_cfg):
    s = TokenSample(sample(tmp_path, tiny_cfg, "a", train_sequences=None))
    train_ids, _ = s.windows("train")
    eval_ids, _ = s.windows("eval")
    assert len(eval_ids) == tiny_cfg.tokens.eval_sequences
    assert sorted([*train_ids, *eval_ids]) == list(range(len(train_ids) + len(eval_ids)))
    assert len(train_ids) > tiny_cfg.tokens.train_sequences  # more than the tiny config asks for


def test_a_corpus_too_small_names_the_keys(tmp_path, tiny_cfg):
    with pytest.raises(DataError, match=r"tokens.eval_sequences, tokens.train_sequences"):
        sample(tmp_path, tiny_cfg, "a", train_sequences=10**7)
    assert not (tmp_path / "a/tokens").exists()


def test_an_old_or_broken_sample_is_refused(tmp_path):
    old = tmp_path / "tokens.parquet"
    old.mkdir()  # the old file's name, or any folder without a manifest
    with pytest.raises(DataError, match="not a readable token sample"):
        TokenSample(old)
    (old / "manifest.json").write_text(json.dumps({"format": 1}))
    with pytest.raises(DataError, match="format 1.*snakemake --forcerun tokens"):
        TokenSample(old)


def tokens_command(tiny_cfg, out: Path, work: Path) -> list[str]:
    settings = {
        "study": "t",
        "corpus": tiny_cfg.corpus.model_dump(mode="json"),
        "tokens": {**tiny_cfg.tokens.model_dump(mode="json"), "shard_sequences": 64},
        "model": tiny_cfg.model.model_dump(mode="json"),
    }
    command = [sys.executable, "-m", "saedynamics", "tokens", "--settings", json.dumps(settings)]
    return (
        command
        + ["--out-tokens", str(out), "--out-tokenizer", str(out.parent / "tok")]
        + [
            "--work",
            str(work),
        ]
    )


def test_a_killed_tokens_job_resumes_to_the_same_shards(tmp_path, tiny_cfg):
    reference = tmp_path / "reference" / "tokens"
    done = run(tokens_command(tiny_cfg, reference, tmp_path / "reference-work"))
    assert done.returncode == 0, done.stderr
    out, work = tmp_path / "run" / "tokens", tmp_path / "run-work"
    for kill_at in ("tokens:2", "tokens:5"):  # killed after the 2nd shard, then after the 5th
        job = run(tokens_command(tiny_cfg, out, work), kill_at)
        assert job.returncode == -9, job.stderr
        assert not out.exists()  # nothing in place until the sample is complete
        progress = json.loads((work / "progress.json").read_text())
        assert len(progress["shards"]) == int(kill_at.split(":")[1])
    job = run(tokens_command(tiny_cfg, out, work))
    assert job.returncode == 0, job.stderr
    assert "resuming the token sample after 5 shards" in job.stderr
    assert not work.exists()
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        if name.endswith(".parquet"):
            assert pq.read_table(out / name).equals(pq.read_table(reference / name)), name
    ours, theirs = (json.loads((d / "manifest.json").read_text()) for d in (out, reference))
    assert {k: v for k, v in ours.items() if k != "provenance"} == {
        k: v for k, v in theirs.items() if k != "provenance"
    }


def test_a_work_folder_of_other_settings_is_discarded(tmp_path, tiny_cfg):
    out, work = tmp_path / "run" / "tokens", tmp_path / "work"
    job = run(tokens_command(tiny_cfg, out, work), "tokens:3")
    assert job.returncode == -9
    other = tiny_cfg.model_copy(update={"tokens": tiny_cfg.tokens.model_copy(update={"seed": 7})})
    job = run(tokens_command(other, out, work))
    assert job.returncode == 0, job.stderr
    assert "resuming" not in job.stderr
    assert TokenSample(out).manifest["seed"] == 7


def test_an_unreachable_dataset_or_missing_files_stop_the_tokens_stage(tmp_path, tiny_cfg):
    """The Hub is offline in the tests, as it is on this build machine: a dataset not in the HF
    cache stops the stage with one message naming the key; nothing is written."""
    from saedynamics.config import CorpusConfig

    hub = CorpusConfig(source="hub", dataset="saedynamics-tests/no-such-corpus")
    out = tmp_path / "tokens"
    with pytest.raises(DataError) as error:
        build_token_sample(hub, tiny_cfg.tokens, tiny_cfg.model, out, tmp_path / "tok")
    message = str(error.value)
    assert message.startswith("corpus.dataset 'saedynamics-tests/no-such-corpus': cannot be read")
    assert "the Hugging Face Hub is unreachable from this machine" in message
    assert "\n" not in message and not list(tmp_path.iterdir())
    files = CorpusConfig(source="files", data_files=[str(tmp_path / "nope/*.jsonl")])
    with pytest.raises(DataError, match=r"corpus.data_files: \[.*nope/\*.jsonl'\] match no file"):
        build_token_sample(files, tiny_cfg.tokens, tiny_cfg.model, out, tmp_path / "tok")
    assert not list(tmp_path.iterdir())
