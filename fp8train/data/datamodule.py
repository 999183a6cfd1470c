"""Next-token-prediction batches from a flat token array, as a Lightning DataModule.

A *window* is ``seq_len + 1`` consecutive tokens; ``inputs = window[:-1]``, ``targets =
window[1:]``. The token array is split once: the first ``1 - val_fraction`` of it is for
training, the rest is held out, and no window crosses the split.

* Training item ``idx`` is a window at a pseudo-random start derived from ``(seed, idx)`` only, so
  the dataset is map-style and stateless: Lightning's ``DistributedSampler`` hands each rank
  different indices and a run is reproducible for any number of workers. The same ``idx`` always
  gives the same window, so every epoch revisits the same ``samples_per_epoch`` windows; make an
  epoch at least as long as the run (``max_steps * batch_size * world_size``) to avoid repeats.
* Validation is ``val_batches * batch_size`` windows evenly spaced over the held-out split,
  identical on every run.

Datasets store the file path and open their memmap lazily in each process, so DataLoader workers
never pickle the token array.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from fp8train.data.corpus import DEFAULT_MAX_BYTES, TOKEN_DTYPES, embedded_corpus_path, load_token_file

__all__ = ["TokenWindows", "RandomWindows", "FixedWindows", "TokenDataModule"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # a full-avalanche 64-bit mix in plain Python: the same on every platform and NumPy version
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens from ``tokens[start:stop]`` of a flat token file.

    Subclasses choose where window ``idx`` starts (:meth:`window_start`).

    Args:
        path: the token file (raw ids of ``dtype``); already validated.
        dtype: numpy element type name (a key of ``TOKEN_DTYPES``).
        start, stop: the token range windows are drawn from (``stop - start >= seq_len + 1``).
        seq_len: tokens per input sequence ``T``.
        length: number of items.

    Items are ``(inputs, targets)``, each ``[T]`` int64, ``targets[t] == inputs[t + 1]`` for ``t < T - 1``.
    """

    def __init__(self, path: str | os.PathLike, dtype: str, start: int, stop: int, seq_len: int, length: int) -> None:
        if stop - start < seq_len + 1:
            raise ValueError(f"token range [{start}, {stop}) is shorter than one window of seq_len + 1 = {seq_len + 1}")
        self.path, self.dtype = Path(path), dtype
        self.start, self.stop, self.seq_len, self.length = start, stop, seq_len, length
        self._tokens: np.memmap | None = None

    @property
    def n_starts(self) -> int:
        """Number of distinct window starts in the range."""
        return self.stop - self.start - self.seq_len

    def window_start(self, idx: int) -> int:
        """Offset of window ``idx`` within ``[0, n_starts)``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < self.length:
            raise IndexError(f"index {idx} out of range for {type(self).__name__} of length {self.length}")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPES[self.dtype], mode="r")
        s = self.start + self.window_start(idx)
        window = torch.from_numpy(self._tokens[s : s + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        # a memmap pickles as a full in-memory copy; workers reopen the file instead
        return {**self.__dict__, "_tokens": None}


class RandomWindows(TokenWindows):
    """Window ``idx`` starts at ``splitmix64(splitmix64(seed) ^ idx) mod n_starts``.

    Args:
        seed: selects the sequence of windows; any int.
        (others as :class:`TokenWindows`)
    """

    def __init__(
        self, path: str | os.PathLike, dtype: str, start: int, stop: int, seq_len: int, length: int, seed: int
    ) -> None:
        super().__init__(path, dtype, start, stop, seq_len, length)
        self.seed = seed
        self._seed_hash = _splitmix64(seed & _MASK64)

    def window_start(self, idx: int) -> int:
        return _splitmix64(self._seed_hash ^ idx) % self.n_starts


class FixedWindows(TokenWindows):
    """``length`` windows evenly spaced from the first to the last possible start (they overlap
    when the range holds fewer than ``length`` disjoint windows)."""

    def window_start(self, idx: int) -> int:
        if self.length == 1:
            return 0
        return idx * (self.n_starts - 1) // (self.length - 1)


def _fail(name: str, value: Any, valid: str) -> None:
    raise ValueError(f"TokenDataModule.{name}={value!r} is invalid; valid: {valid}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


class TokenDataModule(L.LightningDataModule):
    """Train/validation batches of ``(inputs, targets)``, each ``[batch_size, seq_len]`` int64.

    Args:
        source: ``"embedded"`` for the byte-level stdlib corpus (vocab 256, no network, see
            :mod:`fp8train.data.corpus`) or a path to a flat token file of ``token_dtype``.
        seq_len: tokens per sequence ``T``.
        batch_size: sequences per batch, per process.
        val_fraction: share of the token array held out for validation, at its end; in (0, 1).
        vocab_size: the model's vocabulary; every token must be below it (256 or more for
            ``"embedded"``).
        token_dtype: element type of a token file: one of ``uint8``, ``uint16``, ``uint32``,
            ``int32``. Ignored for ``"embedded"`` (always uint8).
        num_workers: DataLoader worker processes.
        seed: selects the training windows.
        val_batches: number of fixed validation batches (``val_batches * batch_size`` windows).
        samples_per_epoch: training windows per epoch; ``None`` means ``train_tokens // seq_len``
            (one epoch sees about as many tokens as the training split holds).
        embedded_max_bytes: size cap of the embedded corpus (tokens).

    Raises:
        ValueError: an argument out of range (naming it, its value and what is valid), or, in
            ``setup``, a split too short for one window.
        FileNotFoundError: ``source`` is neither ``"embedded"`` nor an existing file.

    Example:
        >>> dm = TokenDataModule("embedded", seq_len=128, batch_size=16)
        >>> dm.setup("fit")
        >>> inputs, targets = next(iter(dm.train_dataloader()))   # [16, 128] int64 each
    """

    def __init__(
        self,
        source: str | os.PathLike = "embedded",
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.01,
        vocab_size: int = 256,
        token_dtype: str = "uint16",
        num_workers: int = 0,
        seed: int = 0,
        val_batches: int = 8,
        samples_per_epoch: int | None = None,
        embedded_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__()
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("vocab_size", vocab_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("val_batches", val_batches, 1)
        _check_int("embedded_max_bytes", embedded_max_bytes, 1)
        if samples_per_epoch is not None:
            _check_int("samples_per_epoch", samples_per_epoch, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            _fail("seed", seed, "an integer")
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not math.isfinite(val_fraction)
            or not 0 < val_fraction < 1
        ):
            _fail("val_fraction", val_fraction, "a number in (0, 1), e.g. 0.01")
        if token_dtype not in TOKEN_DTYPES:
            _fail("token_dtype", token_dtype, f"one of {list(TOKEN_DTYPES)}")
        if not isinstance(source, (str, os.PathLike)):
            _fail("source", source, "'embedded' or a path to a token file")
        self.embedded = source == "embedded"
        if self.embedded and vocab_size < 256:
            _fail("vocab_size", vocab_size, "an integer >= 256 for the byte-level 'embedded' corpus")
        if not self.embedded and not Path(source).is_file():
            raise FileNotFoundError(
                f"TokenDataModule.source={str(source)!r}: no such file; pass 'embedded' or the path of a token file"
            )
        self.save_hyperparameters()
        self.source = source
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.vocab_size, self.token_dtype = vocab_size, token_dtype
        self.num_workers, self.seed, self.val_batches = num_workers, seed, val_batches
        self.samples_per_epoch, self.embedded_max_bytes = samples_per_epoch, embedded_max_bytes
        self.train_dataset: RandomWindows | None = None
        self.val_dataset: FixedWindows | None = None

    @override
    def prepare_data(self) -> None:
        """Build the embedded corpus cache once per node (Lightning calls this on local rank 0)."""
        if self.embedded:
            embedded_corpus_path(self.embedded_max_bytes)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Open and validate the tokens, split them, and build both datasets (idempotent)."""
        if self.train_dataset is not None:
            return
        if self.embedded:
            path, dtype = embedded_corpus_path(self.embedded_max_bytes), "uint8"
            n_tokens = path.stat().st_size
        else:
            path, dtype = Path(self.source), self.token_dtype
            n_tokens = len(load_token_file(path, dtype, self.vocab_size, self.seq_len))
        n_val = round(n_tokens * self.val_fraction)
        n_train = n_tokens - n_val
        window = self.seq_len + 1
        for split, n in (("training", n_train), ("validation", n_val)):
            if n < window:
                raise ValueError(
                    f"TokenDataModule: the {split} split of {str(path)!r} has {n} tokens "
                    f"({n_tokens} tokens, val_fraction={self.val_fraction}), fewer than one window "
                    f"of seq_len + 1 = {window}; change val_fraction, shorten seq_len, or use more data"
                )
        length = self.samples_per_epoch or max(1, n_train // self.seq_len)
        self.train_dataset = RandomWindows(path, dtype, 0, n_train, self.seq_len, length, self.seed)
        n_val_windows = self.val_batches * self.batch_size
        self.val_dataset = FixedWindows(path, dtype, n_train, n_tokens, self.seq_len, n_val_windows)

    def _loader(self, dataset: Dataset | None, drop_last: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("TokenDataModule: call setup() before asking for a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # windows are already in random order; a sequential sampler makes DDP ranks disjoint
            shuffle=False,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        # full batches only: a short last batch would change shapes and recompile torch.compile
        return self._loader(self.train_dataset, drop_last=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, drop_last=False)
