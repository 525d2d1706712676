"""Sources of training batches: all the trainer sees of the data (training.train_saes).

A source deals out an endless sequence of batches, dicts of tensors on the training device: "act"
[batch, d_model] float32 and the extra columns asked for. The order is fixed by the seed alone,
never by the columns asked for, the device or the threads, so that SAEs trained together or apart
see the same batches; `start=k` continues the sequence at batch k (the trainer's position), which
is how a resumed job gets exactly the batches it would have had.

The order: rows come in blocks (a file's row groups, slices of tensors). Every epoch the blocks are
permuted (seed, epoch) and taken in turn into a shuffle buffer of up to `buffer_rows` rows (at
least one block), whose rows are permuted (seed, epoch, buffer) and dealt out as batches; a batch
may span two buffers or epochs. A source that fits the buffer is read once and kept on the device;
a larger one is read a buffer at a time, so memory stays bounded by the buffer.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from saedynamics.activations import ActivationFile
from saedynamics.scaling import norm_statistics


class ShuffledSource:
    """Batches in the order of the module docstring, from blocks of rows that `_read` returns."""

    block_rows: list[int]  # rows per block
    d_model: int
    norm: dict  # input-scale statistics (scaling.NormStatistics)
    description: dict  # what the activations are (model, revision, hook, ...), for cfg.json
    act_bytes = 2  # bytes per activation value as the source keeps them (float16)

    def _read(self, blocks: list[int], columns) -> dict[str, np.ndarray | torch.Tensor]:
        """The rows of `blocks`, concatenated in that order."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the data: a resume checkpoint of other data is not resumed from."""
        raise NotImplementedError

    def batches(self, batch_size: int, columns, seed: int, buffer_rows: int, device="cpu",
                start: int = 0) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        if start < 0:
            raise ValueError(f"start {start} must be >= 0")
        n, blocks = sum(self.block_rows), len(self.block_rows)
        epoch, skip = divmod(start * batch_size, n)  # rows of this epoch already dealt out
        first_row = np.cumsum([0, *self.block_rows])
        resident = self._load(range(blocks), columns, device) if n <= buffer_rows else None
        parts, have = [], 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(blocks)
            for k, buffer in enumerate(_buffers(order, self.block_rows, buffer_rows)):
                rows = sum(self.block_rows[b] for b in buffer)
                if skip >= rows:  # dealt out before `start`: not read at all
                    skip -= rows
                    continue
                index = np.random.default_rng([seed, epoch, k]).permutation(rows)[skip:]
                skip = 0
                if resident is None:
                    data = self._load(buffer, columns, device)
                else:  # buffer positions -> rows of the resident copy, in file order
                    data = resident
                    index = np.concatenate(
                        [np.arange(first_row[b], first_row[b + 1]) for b in buffer]
                    )[index]
                index = torch.from_numpy(index).to(device)
                while len(index):
                    take, index = index[: batch_size - have], index[batch_size - have :]
                    parts.append({c: v.index_select(0, take) for c, v in data.items()})
                    have += len(take)
                    if have == batch_size:
                        yield {c: torch.cat([p[c] for p in parts]).float() for c in data}
                        parts, have = [], 0
            epoch += 1

    def _load(self, blocks, columns, device) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():  # read-only arrays: only ever gathered from, never written
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return {
                c: torch.as_tensor(v).to(device)
                for c, v in self._read(list(blocks), columns).items()
            }

    def memory_bytes(self, columns, buffer_rows: int) -> int:
        """The most `batches` keeps in memory at once (on the device): one buffer."""
        rows = min(sum(self.block_rows), max(buffer_rows, max(self.block_rows)))
        row = {"act": self.act_bytes * self.d_model, "lm_grad": 4 * self.d_model, "lm_entropy": 4}
        return rows * sum(row[c] for c in columns)


def _buffers(order: np.ndarray, block_rows: list[int], buffer_rows: int) -> list[list[int]]:
    """The blocks in `order`, in consecutive groups of at most buffer_rows rows (one at least)."""
    out, rows = [[]], 0
    for b in order:
        if out[-1] and rows + block_rows[b] > buffer_rows:
            out.append([])
            rows = 0
        out[-1].append(int(b))
        rows += block_rows[b]
    return out


def describe(metadata: dict, source: str) -> dict:
    """What an SAE's cfg.json records of its activations: the model, revision, hook, step and
    layer from an activation file's metadata, and where the batches came from."""
    keys = ("model", "revision", "commit", "hook", "hook_point", "context_length", "step", "layer")
    return {k: metadata.get(k) for k in keys} | {"source": source}


class FileSource(ShuffledSource):
    """An activation file (verified when opened), a row group per block."""

    def __init__(self, file: ActivationFile):
        self.file, self.block_rows, self.d_model = file, file.row_group_rows, file.d_model
        self.norm = file.norm
        self.description = describe(file.metadata, "cache")

    def _read(self, blocks, columns):
        return self.file.read_row_groups(blocks, columns)

    def fingerprint(self) -> dict:
        stat = self.file.path.stat()
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class TensorSource(ShuffledSource):
    """Tensors in memory (toy models, tests): {"act": [n, d], extra columns: [n, ...]}."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], description: dict | None = None, block_rows=8192
    ):
        self.tensors = {c: v.detach().cpu() for c, v in tensors.items()}
        n, self.d_model = self.tensors["act"].shape
        self.act_bytes = self.tensors["act"].element_size()
        self.block_rows = [min(block_rows, n - i) for i in range(0, n, block_rows)]
        self.norm = norm_statistics(self.tensors["act"])
        self.description = {"source": "tensors", **(description or {})}

    def _read(self, blocks, columns):
        rows = torch.cat(
            [
                torch.arange(b * self.block_rows[0], b * self.block_rows[0] + self.block_rows[b])
                for b in blocks
            ]
        )
        return {c: self.tensors[c][rows] for c in columns}

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            digest.update(name.encode() + self.tensors[name].contiguous().numpy().tobytes())
        return {"sha256": digest.hexdigest()}
