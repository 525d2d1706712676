"""Text source -> one fixed token sample per study (tokens.parquet) and its tokenizer.

The text goes through the `datasets` library whatever its source: a Hub dataset id (streamed, so
only what is needed is read), local files, or the offline corpus that ships with every CPython:
`pydoc_data.topics`, the text of Python's own documentation (79 topics, ~465k characters).

The sample: documents are tokenized, joined with the end-of-text token (Pythia packs its training
data this way) and cut into context windows; the windows are shuffled once with `tokens.seed`, the
first `eval_sequences` form the eval split and the rest (up to `train_sequences`) the train split.
`doc_id` is the window's index in the sample (unique across splits) and `pos` the position in it.
The same sample is used for every checkpoint, so activations differ only by the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from saedynamics.artifacts import MANIFEST, atomic_directory, sha256_file, write_json, write_parquet
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
        ds = datasets.load_dataset(
            corpus.dataset,
            corpus.subset,
            split=corpus.split,
            revision=corpus.revision,
            streaming=True,
        )
    else:
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


def build_token_sample(
    corpus: CorpusConfig,
    tokens: TokensConfig,
    model: HubModelConfig | MicroModelConfig,
    out_parquet: Path,
    out_tokenizer: Path,
    provenance: dict | None = None,
) -> dict:
    """Write the tokenizer directory and tokens.parquet; return the sample's summary.

    The tokenizer directory gets a manifest.json (where the tokenizer came from, the sha256 of its
    files, `provenance`) beside the Hugging Face files, which ignore it.
    """
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
    ctx = tokens.context_length
    wanted = (
        None if tokens.train_sequences is None else tokens.train_sequences + tokens.eval_sequences
    )

    windows: list[np.ndarray] = []
    buffer: list[int] = []
    n_docs = 0
    for text in iter_texts(corpus):
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.append(eos)
        n_docs += 1
        while len(buffer) >= ctx:
            windows.append(np.asarray(buffer[:ctx], dtype=np.int32))
            buffer = buffer[ctx:]
        if wanted is not None and len(windows) >= wanted:
            break
    if len(windows) <= tokens.eval_sequences:
        raise DataError(
            f"the corpus gives only {len(windows)} windows of {ctx} tokens, not more than "
            f"tokens.eval_sequences = {tokens.eval_sequences}; lower it or add text"
        )
    if wanted is not None and len(windows) < wanted:
        raise DataError(
            f"the corpus gives only {len(windows)} windows of {ctx} tokens; the config asks for "
            f"{wanted} (tokens.train_sequences + tokens.eval_sequences)"
        )

    order = np.random.default_rng(tokens.seed).permutation(len(windows))
    eval_ids = np.sort(order[: tokens.eval_sequences])
    train_ids = np.sort(order[tokens.eval_sequences : wanted])
    summary = {
        "documents_read": n_docs,
        "context_length": ctx,
        "train_sequences": len(train_ids),
        "eval_sequences": len(eval_ids),
        "train_tokens": len(train_ids) * ctx,
        "eval_tokens": len(eval_ids) * ctx,
        "vocab_size": len(tokenizer),
        "eos_token_id": int(eos),
        "corpus": corpus.model_dump(mode="json"),
        "tokenizer": tokenizer_source,
    }
    tables = []
    for split, ids in (("train", train_ids), ("eval", eval_ids)):
        block = np.stack([windows[i] for i in ids])
        tables.append(
            pa.table(
                {
                    "split": pa.array([split] * block.size).dictionary_encode(),
                    "doc_id": np.repeat(ids.astype(np.int32), ctx),
                    "pos": np.tile(np.arange(ctx, dtype=np.int32), len(ids)),
                    "token_id": block.reshape(-1),
                }
            )
        )
    table = pa.concat_tables(tables).replace_schema_metadata({"saedynamics": json.dumps(summary)})
    write_parquet(out_parquet, table, provenance, compression="zstd")
    log.info(
        "token sample: %d train + %d eval windows of %d tokens from %d documents",
        len(train_ids),
        len(eval_ids),
        ctx,
        n_docs,
    )
    return summary


def read_token_sample(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_ids [n], token_ids [n, context_length]) of one split."""
    try:
        table = pq.read_table(path, columns=["doc_id", "token_id"], filters=[("split", "=", split)])
        meta = json.loads(pq.read_schema(path).metadata[b"saedynamics"])
    except (OSError, pa.ArrowInvalid, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable token sample ({e}); rerun the tokens rule") from e
    ctx = meta["context_length"]
    token_ids = table.column("token_id").to_numpy().reshape(-1, ctx)
    doc_ids = table.column("doc_id").to_numpy().reshape(-1, ctx)[:, 0]
    return doc_ids, token_ids
