"""Activation I/O throughput: does caching keep up with the forward pass, the reader with a memmap?

    python benchmarks/activations.py                      # Pythia-70m's shape, CPU or GPU
    python benchmarks/activations.py --sequences 512 --context 2048 --device cuda

Prints one table. Targets: caching overhead <= 10 %, reader >= 0.8x the memmap.

Caching. A GPT-NeoX with Pythia-70m's shape (d 512, 6 layers, 8 heads, vocab 50304; random
weights, built from a config: nothing is downloaded) is saved as a checkpoint, a token sample of
random ids is written in the `tokens` rule's format, and `cache_activations` runs on them twice
per round, alternately:
  - forward only:     `ActivationWriter` replaced by a writer that drops what it is given, so the
                      run is the bare forward pass with its hooks (no copy off the device);
  - forward + cache:  the real writer, Parquet files for every layer and split.
Tokens/s are those `cache_activations` itself logs (timed after the model is loaded, so loading is
not counted); the median over rounds is reported. "writer alone" feeds the writers precomputed
activations: the tokens/s they absorb, which bounds the overhead on a device whose forward pass is
faster than this one's.

Reading. One array of random activations (float16, per-dimension scales as in a residual stream)
is stored twice: as an activation Parquet file (`ActivationWriter`) and as a `.npy` read through
`np.load(mmap_mode=...)`. Both produce float32 torch batches in the same seeded shuffled-by-blocks
order: blocks of `row_group_rows` rows in a random order, `buffer_row_groups` of them at a time,
the rows of a buffer (plus the previous leftover) permuted. The memmap baseline is the fair best
case of that pattern for a memmap: it gathers each batch straight from the mapped pages (one
`index_select` and one float conversion per batch, no buffer, no thread). `shuffled` does the same
per batch, gathering each row straight from the Parquet file's mapped data pages (whose rows, past
the page headers, lie at byte offsets that no one row width divides: it gathers from a view with a
row at every byte), while its background thread locates the next buffer's rows and touches their
pages; so the ratio prices the bookkeeping of the Parquet layout. Both files are mapped once and
read for an epoch before timing, so both come from the page cache with their pages mapped (a cold
disk would slow both alike: Parquet stores the same bytes). The consumer does no work: all of the
reader's work shows, none of it hides behind a trainer's compute.

Besides wall-clock rates the table gives CPU time per unit (all threads of the process): steadier
than wall time on a shared machine. Where other work keeps the cores busy, torch's OpenMP threads
waste time waiting for each other, in the forward pass and in both readers' gathers;
`--torch-threads 1` then gives the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's code

from saedynamics import activations  # noqa: E402
from saedynamics.activations import (  # noqa: E402
    ActivationFile,
    ActivationWriter,
    cache_activations,
)
from saedynamics.artifacts import sha256_file  # noqa: E402
from saedynamics.config import ActivationsConfig  # noqa: E402

EVAL_SEQUENCES = 2  # cache_activations always does the eval split (full logits): keep it small


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--layers", default="1,3,5", help="hooked layers (the study's)")
    p.add_argument("--context", type=int, default=128, help="tokens per sequence (128-2048)")
    p.add_argument(
        "--sequences",
        type=int,
        default=256,
        help="train sequences per caching run (several "
        "row groups per layer: a writer that cannot overlap the forward pass would show)",
    )
    p.add_argument("--batch-sequences", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of each measurement")
    p.add_argument("--reader-rows", type=int, default=1 << 18)
    p.add_argument("--batch-size", type=int, default=4096, help="rows per reader batch")
    p.add_argument("--reader-batches", type=int, default=128, help="batches timed per round")
    p.add_argument("--row-group-rows", type=int, default=8192)
    p.add_argument("--buffer-row-groups", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=None, help="default: the reader's")
    p.add_argument("--decode-threads", type=int, default=None, help="default: the reader's")
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    p.add_argument("--only", choices=["caching", "reading"], help="run one half of the table")
    return p.parse_args()


# ---- caching --------------------------------------------------------------------------------------


def build_checkpoint(args, root: Path) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.heads,
        intermediate_size=4 * args.d_model,
        max_position_embeddings=max(2048, args.context),
        rotary_pct=0.25,
    )
    out = root / "checkpoint"
    GPTNeoXForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    files = {f.name: sha256_file(f) for f in sorted(out.iterdir())}  # what load_model verifies
    manifest = {"source": "micro", "step": 0, "revision": "bench", "files": files}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def build_tokens(args, root: Path) -> Path:
    """A token sample in the `tokens` rule's format: `--sequences` train, EVAL_SEQUENCES eval."""
    rng = np.random.default_rng(0)
    ctx, tables = args.context, []
    splits = {"train": args.sequences, "eval": EVAL_SEQUENCES}
    for split, n in splits.items():
        ids = np.arange(n, dtype=np.int32) + (0 if split == "train" else args.sequences)
        tables.append(
            pa.table(
                {
                    "split": pa.array([split] * (n * ctx)).dictionary_encode(),
                    "doc_id": np.repeat(ids, ctx),
                    "pos": np.tile(np.arange(ctx, dtype=np.int32), n),
                    "token_id": rng.integers(0, args.vocab, n * ctx, dtype=np.int32),
                }
            )
        )
    table = pa.concat_tables(tables).replace_schema_metadata(
        {"saedynamics": json.dumps({"context_length": ctx})}
    )
    path = root / "tokens.parquet"
    pq.write_table(table, path)
    return path


class DroppingWriter:
    """ActivationWriter's interface; keeps nothing, so the caching run is the bare forward pass."""

    def __init__(self, path, d_model, metadata, row_group_rows, extra_columns=(), **options):
        self.path, self.metadata = Path(path), metadata

    def append(self, *args, **kwargs) -> None:
        pass

    def close(self) -> dict:
        return self.metadata

    def abort(self) -> None:
        pass


class Measured(logging.Handler):
    """Tokens and seconds that cache_activations logs when it finishes, and the CPU time used.

    The CPU clock starts at the first progress bar (a split's forward loop; the model is loaded by
    then) and stops at the log line; it counts every thread of the process: the writers' too.
    """

    def __init__(self):
        super().__init__(logging.INFO)
        self.cpu_started: float | None = None

    def tqdm(self, iterable, **kwargs):
        if self.cpu_started is None:
            self.cpu_started = time.process_time()
        return iterable

    def emit(self, record: logging.LogRecord) -> None:
        self.cpu = time.process_time() - self.cpu_started
        _step, self.tokens, _layers, self.seconds, *_ = record.args


def cache_rate(cfg, checkpoint: Path, tokens: Path, out: Path, writer) -> tuple[float, float]:
    """(tokens/s, CPU seconds per token) of one cache_activations run with this writer class."""
    measured = Measured()
    logger = logging.getLogger(activations.__name__)
    logger.addHandler(measured)
    logger.setLevel(logging.INFO)
    try:
        with (
            mock.patch.object(activations, "ActivationWriter", writer),
            mock.patch.object(activations, "tqdm", measured.tqdm),
        ):
            cache_activations(cfg, checkpoint, tokens, out)
    finally:
        logger.removeHandler(measured)
    return measured.tokens / measured.seconds, measured.cpu / measured.tokens


def writer_alone_rate(args, root: Path, layers: list[int]) -> tuple[float, float]:
    """(tokens/s, CPU s/token) the writers of all layers absorb, fed finished activations."""
    ctx = args.context - 1  # position 0 is dropped
    acts = torch.randn(args.batch_sequences * ctx, args.d_model) * 3
    ids = np.zeros(args.batch_sequences * ctx, dtype=np.int32)
    n_batches = max(8, args.sequences // args.batch_sequences)
    started, cpu_started = time.perf_counter(), time.process_time()
    writers = [
        ActivationWriter(root / f"alone{layer}.parquet", args.d_model, {}, args.row_group_rows)
        for layer in layers
    ]
    for _ in range(n_batches):
        for writer in writers:
            writer.append(ids, ids, ids, acts)
    for writer in writers:
        writer.close()
    n_tokens = n_batches * args.batch_sequences * args.context
    return n_tokens / (time.perf_counter() - started), (
        time.process_time() - cpu_started
    ) / n_tokens


def medians(runs: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Each run `rounds` times, the runs interleaved (load that comes and goes hits all alike)."""
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return {
        name: (statistics.median(r for r, _ in values), statistics.median(c for _, c in values))
        for name, values in results.items()
    }


def bench_caching(args, root: Path) -> dict[str, float]:
    layers = [int(x) for x in args.layers.split(",")]
    checkpoint, tokens = build_checkpoint(args, root), build_tokens(args, root)
    cfg = ActivationsConfig(
        layers=layers,
        batch_sequences=args.batch_sequences,
        row_group_rows=args.row_group_rows,
        device=args.device,
    )
    runs = {
        "forward": lambda: cache_rate(cfg, checkpoint, tokens, root / "dropped", DroppingWriter),
        "cache": lambda: cache_rate(cfg, checkpoint, tokens, root / "acts", ActivationWriter),
    }
    for fn in runs.values():  # warm-up: allocator, page cache, lazy imports
        fn()
    runs["writer_alone"] = lambda: writer_alone_rate(args, root, layers)
    return medians(runs, args.rounds)


# ---- reading --------------------------------------------------------------------------------------


def activation_like(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows with per-dimension scales (a few large dimensions, as a residual stream has)."""
    rng = np.random.default_rng(seed)
    scales = rng.gamma(2.0, 1.0, d).astype(np.float32)
    out = np.empty((n, d), dtype=np.float16)
    for start in range(0, n, 1 << 15):
        block = rng.standard_normal((min(1 << 15, n - start), d), dtype=np.float32)
        out[start : start + len(block)] = block * scales
    return out


def block_shuffled_indices(n_rows, block_rows, buffer_blocks, batch_size, seed):
    """Row indices per batch, endlessly: the access pattern of ActivationFile.shuffled."""
    rng = np.random.default_rng(seed)
    starts = np.arange(0, n_rows, block_rows)
    leftover = np.empty(0, dtype=np.int64)
    while True:
        order = rng.permutation(len(starts))
        for b in range(0, len(order), buffer_blocks):
            blocks = [
                np.arange(s, min(s + block_rows, n_rows))
                for s in starts[order[b : b + buffer_blocks]]
            ]
            rows = np.concatenate([leftover, *blocks])
            rows = rows[rng.permutation(len(rows))]
            n_full = len(rows) // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield torch.from_numpy(rows[i : i + batch_size])
            leftover = rows[n_full:]


def memmap_batches(array: torch.Tensor, args):
    for index in block_shuffled_indices(
        len(array), args.row_group_rows, args.buffer_row_groups, args.batch_size, seed=0
    ):
        yield {"act": array.index_select(0, index).float()}


def batch_rate(stream, n: int) -> tuple[float, float]:
    """(batches/s, CPU seconds per batch, all threads) over n batches after the first."""
    next(stream)  # the first buffer is start-up, not throughput
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(n):
        batch = next(stream)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert batch["act"].dtype == torch.float32 and batch["act"].shape[0] == len(batch["act"])
    stream.close()
    return n / seconds, cpu / n


def bench_reading(args, root: Path) -> dict[str, tuple[float, float]]:
    x = activation_like(args.reader_rows, args.d_model)
    parquet, npy = root / "read.parquet", root / "read.npy"
    writer = ActivationWriter(parquet, args.d_model, {}, args.row_group_rows)
    ids = np.arange(len(x), dtype=np.int32)
    writer.append(ids, ids, ids, torch.from_numpy(x))
    writer.close()
    np.save(npy, x)
    del x
    # both mapped once, as a trainer would; "c": a writable view (torch wants one), never written
    acts, array = ActivationFile(parquet), torch.from_numpy(np.load(npy, mmap_mode="c"))

    options = {"prefetch": args.prefetch, "decode_threads": args.decode_threads}
    options = {name: value for name, value in options.items() if value is not None}

    def parquet_stream():
        return acts.shuffled(
            args.batch_size, seed=0, buffer_row_groups=args.buffer_row_groups, **options
        )

    epoch = args.reader_rows // args.batch_size
    for stream in (parquet_stream(), memmap_batches(array, args)):  # page cache and page tables
        batch_rate(stream, epoch)
    return medians(
        {
            "parquet": lambda: batch_rate(parquet_stream(), args.reader_batches),
            "memmap": lambda: batch_rate(memmap_batches(array, args), args.reader_batches),
        },
        args.rounds,
    )


# ---- report ---------------------------------------------------------------------------------------


def print_caching(args, caching: dict) -> None:
    (fwd, fwd_cpu), (cache, cache_cpu) = caching["forward"], caching["cache"]
    alone, alone_cpu = caching["writer_alone"]
    print(
        f"caching: {args.sequences} x {args.context}-token sequences (+ {EVAL_SEQUENCES} eval), "
        f"batches of {args.batch_sequences}, layers {args.layers}"
    )
    print(f"  {'':<18} {'tokens/s':>12}  {'CPU us/token':>12}   (CPU: all threads)")
    print(f"  {'forward only':<18} {fwd:>12,.0f}  {fwd_cpu * 1e6:>12,.1f}")
    print(f"  {'forward + cache':<18} {cache:>12,.0f}  {cache_cpu * 1e6:>12,.1f}")
    print(f"  {'writer alone':<18} {alone:>12,.0f}  {alone_cpu * 1e6:>12,.1f}   (all layers)")
    print(
        f"  {'overhead':<18} {fwd / cache - 1:>12.1%}  {cache_cpu / fwd_cpu - 1:>12.1%}"
        "   target <= 10%"
    )


def print_reading(args, reading: dict) -> None:
    (parquet, parquet_cpu), (memmap, memmap_cpu) = reading["parquet"], reading["memmap"]
    print(
        f"reading: {args.reader_rows:,} rows x d {args.d_model}, batches of {args.batch_size}, "
        f"row groups of {args.row_group_rows}, buffers of {args.buffer_row_groups} row groups"
    )
    print(f"  {'':<18} {'batches/s':>12}  {'rows/s':>12}  {'CPU ms/batch':>12}")
    for name, rate, cpu in (("parquet", parquet, parquet_cpu), ("memmap", memmap, memmap_cpu)):
        print(
            f"  {name + ' shuffled':<18} {rate:>12,.1f}  {rate * args.batch_size:>12,.0f}"
            f"  {cpu * 1e3:>12.2f}"
        )
    print(
        f"  {'ratio':<18} {parquet / memmap:>12.2f}  {'':>12}  {memmap_cpu / parquet_cpu:>12.2f}"
        "   target >= 0.8"
    )


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # no bars between the table's lines
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(
        f"GPT-NeoX d {args.d_model}, {args.n_layers} layers, {args.heads} heads, vocab {args.vocab}"
        f" on {activations.resolve_device(args.device)}, {torch.get_num_threads()} torch threads,"
        f" {os.cpu_count()} CPUs; medians of {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="saedynamics-bench-") as tmp:
        if args.only in (None, "caching"):
            print_caching(args, bench_caching(args, Path(tmp)))
        if args.only in (None, "reading"):
            print_reading(args, bench_reading(args, Path(tmp)))


if __name__ == "__main__":
    main()
