"""Activation I/O: does caching keep up with the forward pass; how fast does the format decode?

    python benchmarks/activations.py                      # Pythia-70m's shape, CPU or GPU
    python benchmarks/activations.py --sequences 512 --context 2048 --device cuda

Prints one table per half. Whether reading matters for training at all is printed by
benchmarks/train_throughput.py (the reading share of a grouped training job's step time).

Caching. A GPT-NeoX with Pythia-70m's shape (d 512, 6 layers, 8 heads, vocab 50304; random
weights, built from a config: nothing is downloaded) is saved as a checkpoint, a token sample of
random ids is written in the `tokens` rule's format, and `cache_activations` runs on them twice
per round, alternately:
  - forward only:     `ActivationWriter` replaced by a writer that drops what it is given, so the
                      run is the bare forward pass with its hooks (no copy off the device);
  - forward + cache:  the real writer, Parquet files for every layer and split.
Tokens/s are those `cache_activations` itself logs (timed after the model is loaded, so loading is
not counted); the median over rounds is reported. "writer alone" feeds the writers precomputed
activations: the tokens/s they absorb.

Decoding. The same float16 activations stored three ways and read whole into a NumPy array: as an
activation file (act a fixed_size_list<float16>: what pandas, `datasets`, polars read as numbers;
`ActivationFile.read`), as the same Parquet file with the vectors as fixed_size_binary (activation
format 2, which standard tools see as opaque bytes) and as a `.npy` read with NumPy (the bytes as
they are on disk). GB/s of float16 values, files in the page cache: the two Parquet layouts through
pyarrow on one thread (the formats alone), and ActivationFile.read (ours, row groups decoded on a
few threads).
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

from saedynamics import caching  # noqa: E402
from saedynamics.activations import ActivationFile, ActivationWriter  # noqa: E402
from saedynamics.artifacts import sha256_file  # noqa: E402
from saedynamics.caching import cache_activations  # noqa: E402
from saedynamics.config import ActivationsConfig  # noqa: E402
from saedynamics.corpus import SAMPLE_FORMAT  # noqa: E402
from saedynamics.resources import resolve_device  # noqa: E402

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
    p.add_argument("--reader-rows", type=int, default=1 << 18, help="rows decoded")
    p.add_argument("--row-group-rows", type=int, default=8192)
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    p.add_argument("--only", choices=["caching", "decoding"], help="run one half")
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
    """A token sample in the `tokens` rule's layout (corpus.py): `--sequences` train windows in one
    shard, EVAL_SEQUENCES eval windows, random token ids."""
    rng = np.random.default_rng(0)
    ctx, path = args.context, root / "tokens"
    path.mkdir()
    splits = {"train-00000.parquet": args.sequences, "eval.parquet": EVAL_SEQUENCES}
    first = 0
    for name, n in splits.items():
        ids = rng.integers(0, args.vocab, n * ctx, dtype=np.int32)
        windows = pa.FixedSizeListArray.from_arrays(pa.array(ids), ctx)
        doc_ids = np.arange(first, first + n, dtype=np.int32)
        pq.write_table(pa.table({"doc_id": doc_ids, "token_ids": windows}), path / name)
        first += n
    shards = [{"file": "train-00000.parquet", "windows": args.sequences}]
    manifest = {"format": SAMPLE_FORMAT, "context_length": ctx, "shards": shards}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


class DroppingWriter:
    """ActivationWriter's interface; keeps nothing, so the caching run is the bare forward pass."""

    def __init__(self, path, d_model, metadata, *args, **options):
        self.path, self.metadata = Path(path), metadata

    def append(self, *args, **kwargs) -> None:
        pass

    def close(self) -> dict:
        return self.metadata

    def discard(self) -> None:
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
    logger = logging.getLogger(caching.__name__)
    logger.addHandler(measured)
    logger.setLevel(logging.INFO)
    try:
        with (
            mock.patch.object(caching, "ActivationWriter", writer),
            mock.patch.object(caching, "tqdm", measured.tqdm),
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


# ---- decoding -------------------------------------------------------------------------------------


def bench_decoding(args, root: Path) -> dict[str, float]:
    """Seconds to read the whole file into a NumPy array, per storage (medians of rounds)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.reader_rows, args.d_model)) * 3).astype(np.float16)
    ids = np.arange(args.reader_rows, dtype=np.int32)
    writer = ActivationWriter(root / "lists.parquet", args.d_model, {}, args.row_group_rows)
    writer.append(ids, ids, ids, torch.from_numpy(x))
    writer.close()
    binary = pa.Array.from_buffers(pa.binary(2 * args.d_model), len(x), [None, pa.py_buffer(x)])
    table = pa.table({"act": binary})
    pq.write_table(table, root / "binary.parquet", row_group_size=args.row_group_rows,
                   compression="none", use_dictionary=False, write_statistics=False)  # fmt: skip
    np.save(root / "array.npy", x)

    def ours() -> float:  # row groups decoded on a few threads (ActivationFile)
        started = time.perf_counter()
        ActivationFile(root / "lists.parquet", verify=False).read()
        return time.perf_counter() - started

    def one_thread(name: str):  # pyarrow alone, one thread: the formats side by side
        def run() -> float:
            started = time.perf_counter()
            table = pq.read_table(root / name, columns=["act"], use_threads=False)
            column = table.column("act").combine_chunks()
            if isinstance(column.type, pa.FixedSizeListType):
                column.flatten().to_numpy().reshape(len(column), -1)
            else:
                np.frombuffer(column.buffers()[1], np.float16).reshape(len(column), -1)
            return time.perf_counter() - started

        return run

    def npy() -> float:
        started = time.perf_counter()
        np.load(root / "array.npy")
        return time.perf_counter() - started

    runs = {
        "fixed_size_list, 1 thread": one_thread("lists.parquet"),
        "fixed_size_binary, 1 thread": one_thread("binary.parquet"),
        "ActivationFile.read": ours,
        ".npy (np.load)": npy,
    }
    for fn in runs.values():  # page cache
        fn()
    return {name: statistics.median(fn() for _ in range(args.rounds)) for name, fn in runs.items()}


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


def print_decoding(args, decoding: dict) -> None:
    gb = args.reader_rows * args.d_model * 2 / 1e9
    print(
        f"decoding: {args.reader_rows:,} rows x d {args.d_model} float16 ({gb:.2f} GB) into NumPy"
    )
    for name, seconds in decoding.items():
        print(f"  {name:<24} {seconds * 1e3:>8.0f} ms  {gb / seconds:>6.2f} GB/s")


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # no bars between the table's lines
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(
        f"GPT-NeoX d {args.d_model}, {args.n_layers} layers, {args.heads} heads, vocab {args.vocab}"
        f" on {resolve_device(args.device)}, {torch.get_num_threads()} torch threads,"
        f" {os.cpu_count()} CPUs; medians of {args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="saedynamics-bench-") as tmp:
        if args.only in (None, "caching"):
            print_caching(args, bench_caching(args, Path(tmp)))
        if args.only in (None, "decoding"):
            print_decoding(args, bench_decoding(args, Path(tmp)))


if __name__ == "__main__":
    main()
