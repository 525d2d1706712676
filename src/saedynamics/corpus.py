"""Text source -> one fixed token sample per study (tokens/) and its tokenizer.

The text goes through the `datasets` library whatever its source: a Hub dataset id (streamed, so
only what is needed is read), local files, or the offline corpus that ships with every CPython:
`pydoc_data.topics`, the text of Python's own documentation (79 topics, ~465k characters).

The sample: documents are tokenized (in batches), joined with the end-of-text token (Pythia packs
its training data this way) and cut into context windows, in corpus order. Of the first N = train
+ eval windows, exactly `tokens.eval_sequences` form the eval split, each set equally likely
(selection sampling on uniform draws of the seed's stream, `tokens.seed`, drawn per block of
windows so that any window's draw can be recomputed); the others form the train split. With
`tokens.train_sequences` unset, N is every window of the corpus, counted in a first pass.
`doc_id` is the window's index in corpus order (unique across splits). The same sample is used for
every checkpoint, so activations differ only by the model; training shuffles it (sources.py).

Layout (tokens/): eval.parquet and train-00000.parquet, ... (`tokens.shard_sequences` windows
each), one row per window: doc_id int32, token_ids fixed_size_list<int32>[context_length]; and
manifest.json (counts, shards, the tokenizer's digest, provenance), written last. The job builds it
in resume/tokens/ and renames it into place when complete. A killed job continues there from its
last shard (`progress.json`, with the partial eval split and the windows not yet in a shard), and
ends with the same shards as an uninterrupted run.
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from saedynamics.artifacts import (
    MANIFEST,
    atomic_directory,
    read_json,
    sha256_file,
    write_json,
    write_parquet,
)
from saedynamics.config import CorpusConfig, HubModelConfig, MicroModelConfig, TokensConfig
from saedynamics.errors import ConfigError, DataError

log = logging.getLogger(__name__)

EOS, PAD = "<|endoftext|>", "<|padding|>"  # Pythia's special tokens


def iter_texts(corpus: CorpusConfig) -> Iterator[str]:
    """Documents of the configured source, in a fixed order."""
    import datasets

    if corpus.source == "pydoc":
        from pydoc_data.topics import topics

        ds = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    elif corpus.source == "hub":
        try:
            ds = datasets.load_dataset(
                corpus.dataset,
                corpus.subset,
                split=corpus.split,
                revision=corpus.revision,
                streaming=True,
            )
        except (ConnectionError, OSError, ValueError) as e:  # also datasets' DatasetNotFoundError
            raise DataError(
                f"corpus.dataset {corpus.dataset!r}: cannot be read ({' '.join(str(e).split())}): "
                "the Hugging Face Hub is unreachable from this machine (or HF_HUB_OFFLINE is set) "
                "and the dataset is not in its cache, or there is no such dataset; nothing was "
                "written"
            ) from None
    else:
        if missing := [f for f in corpus.data_files if not glob.glob(f)]:
            raise DataError(f"corpus.data_files: {missing} match no file; nothing was written")
        ds = datasets.load_dataset(
            corpus.format, data_files=corpus.data_files, split=corpus.split, streaming=True
        )
    for row in ds:
        if corpus.text_field not in row:
            raise ConfigError(
                f"corpus.text_field: the documents have no field {corpus.text_field!r}; "
                f"their fields are {', '.join(row)}"
            )
        text = row[corpus.text_field]
        if text:
            yield text


def train_tokenizer(corpus: CorpusConfig, vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer (Pythia's kind) trained on the corpus, saved in HF format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD
    )
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)


SAMPLE_FORMAT = 2  # 1: one tokens.parquet, a row per token
DRAW_BLOCK = 65536  # windows per block of eval draws


class _Sample:
    """The token sample being built in `folder`: windows in, shards and the eval split out."""

    def __init__(self, folder: Path, tokens: TokensConfig, total: int, resume, provenance):
        self.folder, self.tokens, self.ctx, self.total = (
            folder,
            tokens,
            tokens.context_length,
            total,
        )
        self.provenance = provenance
        state = resume or {"windows": 0, "eval": [], "pending": [], "shards": [], "documents": 0}
        self.n, self.documents, self.shards = state["windows"], state["documents"], state["shards"]
        self.eval, self.pending = state["eval"], state["pending"]  # [doc_id, window] pairs
        self.train = sum(s["windows"] for s in self.shards) + len(self.pending)
        self.leftover: list[int] = state.get("leftover", [])

    def full(self) -> bool:
        wanted = self.tokens.train_sequences
        return (
            len(self.eval) >= self.tokens.eval_sequences
            and wanted is not None
            and self.train >= wanted
        )

    def add_document(self, ids: list[int]) -> None:
        self.documents += 1
        self.leftover.extend(ids)
        while len(self.leftover) >= self.ctx and not self.full():
            window, self.leftover = self.leftover[: self.ctx], self.leftover[self.ctx :]
            draw = _draws(self.tokens.seed, self.n // DRAW_BLOCK)[self.n % DRAW_BLOCK]
            # selection sampling (Knuth's algorithm S): exactly eval_sequences of the first
            # `total` windows, each set of them equally likely
            if draw * max(self.total - self.n, 1) < self.tokens.eval_sequences - len(self.eval):
                self.eval.append([self.n, window])
            elif self.tokens.train_sequences is None or self.train < self.tokens.train_sequences:
                self.pending.append([self.n, window])
                self.train += 1
            self.n += 1
            if len(self.pending) >= self.tokens.shard_sequences:
                self.write_shard()

    def write_shard(self) -> None:
        """The pending train windows as the next shard, then the progress that resumes after it."""
        name = f"train-{len(self.shards):05d}.parquet"
        _write_windows(self.folder / name, self.pending, self.ctx, self.provenance)
        self.shards.append({"file": name, "windows": len(self.pending)})
        self.pending = []
        state = {
            k: getattr(self, k) for k in ("eval", "pending", "shards", "documents", "leftover")
        }
        write_json(
            self.folder / "progress.json",
            {**state, "windows": self.n, "tokens": self.tokens.model_dump()},
        )


@functools.lru_cache(maxsize=2)
def _draws(seed: int, block: int) -> np.ndarray:
    return np.random.default_rng([seed, block]).random(DRAW_BLOCK)


def _write_windows(path: Path, windows: list, ctx: int, provenance: dict | None) -> None:
    ids = np.array([doc for doc, _ in windows], dtype=np.int32)
    values = pa.array(np.array([w for _, w in windows], dtype=np.int32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(values, ctx)
    write_parquet(
        path, pa.table({"doc_id": ids, "token_ids": column}), provenance, compression="zstd"
    )


def _documents(corpus: CorpusConfig, tokenizer, eos: int, skip: int, batch: int = 256):
    """Token ids of each document after the first `skip`, end-of-text appended; `skip` documents
    are read but not tokenized (a resumed job's way back to where it stopped)."""
    texts = iter_texts(corpus)
    for _ in itertools.islice(texts, skip):
        pass
    while chunk := list(itertools.islice(texts, batch)):
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            yield [*ids, eos]


def build_token_sample(
    corpus: CorpusConfig,
    tokens: TokensConfig,
    model: HubModelConfig | MicroModelConfig,
    out_dir: Path,
    out_tokenizer: Path,
    provenance: dict | None = None,
    work_dir: Path | None = None,
) -> dict:
    """Write the tokenizer directory and the sample's directory (module docstring); return the
    sample's summary. `work_dir`: where the sample is built and a killed job resumes (default: a
    sibling of `out_dir`); it becomes `out_dir` when complete.

    The tokenizer directory gets a manifest.json (where the tokenizer came from, the sha256 of its
    files, `provenance`) beside the Hugging Face files, which ignore it.
    """
    out_dir = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(f".{out_dir.name}.partial")
    with atomic_directory(out_tokenizer) as tmp_tok:
        if model.source == "micro":
            tokenizer = train_tokenizer(corpus, model.vocab_size, tmp_tok)
            tokenizer_source = {"trained_on": corpus.source, "vocab_size": model.vocab_size}
        else:
            from saedynamics.checkpoints import download_tokenizer

            tokenizer_source = download_tokenizer(model, tmp_tok)
            tokenizer = load_tokenizer(tmp_tok)
        files = {p.name: sha256_file(p) for p in sorted(tmp_tok.iterdir())}
        write_json(tmp_tok / MANIFEST, {"tokenizer": tokenizer_source, "files": files}, provenance)
    eos = (
        tokenizer.convert_tokens_to_ids(EOS)
        if EOS in tokenizer.get_vocab()
        else tokenizer.eos_token_id
    )
    ctx, wanted = tokens.context_length, tokens.train_sequences
    resume = _resumable(work, tokens, files)
    if wanted is None:  # the whole corpus: count its windows first, for the eval draws
        total = sum(len(ids) for ids in _documents(corpus, tokenizer, eos, 0)) // ctx
    else:
        total = wanted + tokens.eval_sequences
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "tokenizer.json", {"files": files})
    sample = _Sample(work, tokens, total, resume, provenance)
    started, at_start = time.perf_counter(), sample.n
    with tqdm(total=total, initial=sample.n, desc="tokens", unit="window", mininterval=5) as bar:
        for ids in _documents(corpus, tokenizer, eos, sample.documents):
            before = sample.n
            sample.add_document(ids)
            bar.update(sample.n - before)
            if sample.full():
                break
    seconds = time.perf_counter() - started
    if len(sample.eval) < tokens.eval_sequences or (wanted is not None and sample.train < wanted):
        raise DataError(
            f"the corpus gives only {sample.n} windows of {ctx} tokens ({len(sample.eval)} eval, "
            f"{sample.train} train); the config asks for {tokens.eval_sequences} eval and "
            f"{wanted if wanted is not None else 'all the other'} train windows "
            "(tokens.eval_sequences, tokens.train_sequences): lower them or add text"
        )
    if sample.pending:
        sample.write_shard()
    _write_windows(work / "eval.parquet", sample.eval, ctx, provenance)
    summary = {
        "format": SAMPLE_FORMAT,
        "documents_read": sample.documents,
        "context_length": ctx,
        "train_sequences": sample.train,
        "eval_sequences": len(sample.eval),
        "train_tokens": sample.train * ctx,
        "eval_tokens": len(sample.eval) * ctx,
        "shards": sample.shards,
        "vocab_size": len(tokenizer),
        "eos_token_id": int(eos),
        "seed": tokens.seed,
        "corpus": corpus.model_dump(mode="json"),
        "tokenizer": tokenizer_source,
        "tokenizer_files": files,
    }
    for name in ("progress.json", "tokenizer.json"):
        (work / name).unlink(missing_ok=True)
    write_json(work / MANIFEST, summary, provenance)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    made = (sample.n - at_start) * ctx
    log.info("token sample: %d train + %d eval windows of %d tokens from %d documents; "
             "%d tokens in %.1f s (%.0f tokens/s)", sample.train, len(sample.eval), ctx,
             sample.documents, made, seconds, made / max(seconds, 1e-9))  # fmt: skip
    return summary


def _resumable(work: Path, tokens: TokensConfig, files: dict) -> dict | None:
    """The progress of a killed job in `work`, if it was building this sample with this
    tokenizer; else None, the folder cleared."""
    try:
        progress = read_json(work / "progress.json")
        same = (
            progress["tokens"] == tokens.model_dump()
            and read_json(work / "tokenizer.json")["files"] == files
        )
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if same:
        log.info("resuming the token sample after %d shards (%d documents read)",
                 len(progress["shards"]), progress["documents"])  # fmt: skip
        return progress
    if work.exists():
        shutil.rmtree(work)
    return None


class TokenSample:
    """A token sample directory (module docstring), checked as it opens."""

    def __init__(self, directory: Path):
        self.path = Path(directory)
        try:
            self.manifest = read_json(self.path / MANIFEST)
            found = self.manifest.get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise DataError(
                f"{self.path}: not a readable token sample ({e}); rerun the tokens rule"
            ) from None
        if found != SAMPLE_FORMAT:
            raise DataError(
                f"{self.path}: a token sample of format {found}, this saedynamics reads format "
                f"{SAMPLE_FORMAT} (a folder of shards); rerun the tokens rule (snakemake --forcerun tokens)"
            )
        self.context_length = self.manifest["context_length"]

    def windows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(doc_ids [n], token_ids [n, context_length]) of one split, in corpus order."""
        files = (
            ["eval.parquet"] if split == "eval" else [s["file"] for s in self.manifest["shards"]]
        )
        try:
            tables = [pq.read_table(self.path / name) for name in files]
        except (OSError, pa.ArrowInvalid) as e:
            raise DataError(
                f"{self.path}: a file of the token sample is unreadable ({e}); rerun the tokens rule"
            ) from None
        table = pa.concat_tables(tables)
        token_ids = table.column("token_ids").combine_chunks().flatten().to_numpy()
        return table.column("doc_id").to_numpy(), token_ids.reshape(-1, self.context_length)


def read_token_sample(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids [n], token_ids [n, context_length]) of one split of the sample at `path`."""
    return TokenSample(path).windows(split)
