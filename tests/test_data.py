"""Embedded corpus (deterministic, cached, atomic), token-file validation, TokenDataModule."""

import json
import pickle
import sysconfig
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fp8train.data import TokenDataModule, corpus, embedded_corpus, embedded_corpus_path, load_token_file
from fp8train.data.corpus import SEPARATOR, stdlib_source_files
from fp8train.data.datamodule import FixedWindows, RandomWindows

SMALL = 96 * 1024  # tokens of embedded corpus in tests: builds in milliseconds


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("FP8TRAIN_CACHE", str(d))
    return d


def _write(path: Path, values, dtype: str) -> Path:
    np.asarray(values, dtype=dtype).tofile(path)
    return path


# --- embedded corpus ------------------------------------------------------------------------------
def test_stdlib_files_sorted_and_exclude_site_packages():
    files = stdlib_source_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r for r in rel)
    no_tests = stdlib_source_files(include_tests=False)
    assert set(no_tests) < set(files) and not any(p.parent.name == "test" for p in no_tests)


def test_embedded_corpus_content_and_cap(cache):
    tokens = embedded_corpus(SMALL)
    assert tokens.dtype == np.uint8 and tokens.shape == (SMALL,)
    first = stdlib_source_files()[0].read_bytes()
    assert bytes(tokens[: len(first)]) == first and tokens[len(first)] == SEPARATOR
    assert embedded_corpus_path(SMALL).parent == cache
    meta = json.loads(embedded_corpus_path(SMALL).with_suffix(".json").read_text())
    assert meta["n_tokens"] == SMALL and meta["max_bytes"] == SMALL and "python" in meta and "files_sha256" in meta


def test_embedded_corpus_deterministic_and_cached(cache, monkeypatch):
    path = embedded_corpus_path(SMALL)
    data = path.read_bytes()

    def no_write(*_):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(corpus, "_atomic_write", no_write)
    assert embedded_corpus_path(SMALL) == path
    monkeypatch.undo()
    # a fresh cache directory builds the same bytes
    monkeypatch.setenv("FP8TRAIN_CACHE", str(cache.parent / "other"))
    other = embedded_corpus_path(SMALL)
    assert other != path and other.read_bytes() == data
    # no temporary files left behind
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".json"]


def test_stale_or_truncated_cache_is_rebuilt(cache):
    path = embedded_corpus_path(SMALL)
    data = path.read_bytes()
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "files_sha256": "0" * 64}))
    assert embedded_corpus_path(SMALL) == path and json.loads(sidecar.read_text()) == meta
    path.write_bytes(data[:100])
    assert embedded_corpus_path(SMALL).read_bytes() == data


def test_embedded_cap_is_part_of_the_cache_key():
    small, smaller = embedded_corpus_path(SMALL), embedded_corpus_path(SMALL // 2)
    assert small != smaller
    assert smaller.read_bytes() == small.read_bytes()[: SMALL // 2]
    with pytest.raises(ValueError, match="max_bytes=0"):
        embedded_corpus_path(0)


# --- token files ----------------------------------------------------------------------------------
def test_load_token_file_ok(tmp_path):
    path = _write(tmp_path / "t.bin", np.arange(1000) % 500, "uint16")
    tokens = load_token_file(path, "uint16", vocab_size=500, seq_len=64)
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and len(tokens) == 1000
    assert int(tokens[501]) == 1


def test_load_token_file_missing(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_token_file(missing, "uint16", 100, 8)


def test_load_token_file_bad_dtype(tmp_path):
    path = _write(tmp_path / "t.bin", range(100), "uint16")
    with pytest.raises(ValueError, match=r"dtype='float16'.*uint8.*uint16.*uint32.*int32"):
        load_token_file(path, "float16", 100, 8)


def test_load_token_file_size_not_multiple(tmp_path):
    path = _write(tmp_path / "t.bin", range(101), "uint8")
    with pytest.raises(ValueError, match=r"101 bytes, not a multiple of 4"):
        load_token_file(path, "uint32", 200, 8)


def test_load_token_file_token_out_of_vocab(tmp_path):
    path = _write(tmp_path / "t.bin", [1, 2, 700, 3] * 50, "uint16")
    with pytest.raises(ValueError, match=r"token id 700 but vocab_size=512.*at least 701"):
        load_token_file(path, "uint16", 512, 8)
    negative = _write(tmp_path / "n.bin", [1, -4, 2] * 50, "int32")
    with pytest.raises(ValueError, match="negative token id -4"):
        load_token_file(negative, "int32", 512, 8)


def test_load_token_file_too_short(tmp_path):
    path = _write(tmp_path / "t.bin", range(64), "uint16")
    with pytest.raises(ValueError, match=r"holds 64 tokens.*seq_len \+ 1 = 65"):
        load_token_file(path, "uint16", 100, 64)
    load_token_file(path, "uint16", 100, 63)


# --- datasets and datamodule ----------------------------------------------------------------------
def _dm(**kw) -> TokenDataModule:
    args = dict(seq_len=32, batch_size=4, val_fraction=0.02, embedded_max_bytes=SMALL, val_batches=3, seed=0)
    args.update(kw)
    dm = TokenDataModule(**args)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_datamodule_embedded_batches():
    dm = _dm()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    corpus_bytes = embedded_corpus(SMALL)
    start = dm.train_dataset.window_start(0)
    assert x[0].tolist() == corpus_bytes[start : start + 32].tolist()
    val = list(dm.val_dataloader())
    assert len(val) == 3 and all(b[0].shape == (4, 32) for b in val)
    assert len(dm.train_dataset) == (SMALL - round(SMALL * 0.02)) // 32


def test_val_split_disjoint_from_train():
    dm = _dm()
    train, val = dm.train_dataset, dm.val_dataset
    n_train = SMALL - round(SMALL * 0.02)
    assert (train.start, train.stop) == (0, n_train) and (val.start, val.stop) == (n_train, SMALL)
    # every window (seq_len + 1 tokens) stays on its side of the split
    train_starts = [train.start + train.window_start(i) for i in range(len(train))]
    val_starts = [val.start + val.window_start(i) for i in range(len(val))]
    assert max(train_starts) + 33 <= n_train <= min(val_starts)
    assert max(val_starts) + 33 <= SMALL
    # random starts cover the split, not one corner of it
    assert min(train_starts) < n_train // 10 and max(train_starts) > n_train * 9 // 10


def test_datamodule_deterministic_by_seed():
    a = next(iter(_dm(seed=3).train_dataloader()))[0]
    b = next(iter(_dm(seed=3).train_dataloader()))[0]
    c = next(iter(_dm(seed=4).train_dataloader()))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(next(iter(_dm(seed=3).val_dataloader()))[0], next(iter(_dm(seed=4).val_dataloader()))[0])


def test_datamodule_token_file(tmp_path):
    values = np.random.default_rng(0).integers(0, 1000, size=5000)
    values[7] = 999
    path = _write(tmp_path / "tok.bin", values, "uint16")
    dm = _dm(source=str(path), token_dtype="uint16", vocab_size=1000, val_fraction=0.1, samples_per_epoch=40)
    assert len(dm.train_dataset) == 40 and len(dm.train_dataloader()) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 1000
    s = dm.train_dataset.window_start(0)
    assert x[0].tolist() == values[s : s + 32].tolist()
    with pytest.raises(ValueError, match="vocab_size=999"):
        _dm(source=str(path), token_dtype="uint16", vocab_size=999)


def test_dataset_pickles_without_tokens():
    ds = _dm().train_dataset
    ds[0]  # opens the memmap
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 2000
    assert torch.equal(clone[5][0], ds[5][0])


def test_datamodule_split_too_short(tmp_path):
    path = _write(tmp_path / "tok.bin", range(200), "uint16")
    with pytest.raises(ValueError, match=r"validation split .* has 2 tokens.*seq_len \+ 1 = 33"):
        _dm(source=str(path), vocab_size=256, val_fraction=0.01)


@pytest.mark.parametrize(
    "field, value",
    [
        ("seq_len", 0),
        ("batch_size", -2),
        ("val_fraction", 0.0),
        ("val_fraction", 1.0),
        ("vocab_size", 255),  # embedded corpus is byte-level
        ("token_dtype", "int64"),
        ("num_workers", -1),
        ("val_batches", 0),
        ("seed", 1.5),
        ("samples_per_epoch", 0),
    ],
)
def test_datamodule_argument_errors(field, value):
    with pytest.raises(ValueError, match=rf"TokenDataModule\.{field}={value!r} is invalid; valid:"):
        TokenDataModule(**{field: value})


def test_datamodule_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenDataModule(source=str(tmp_path / "missing.bin"))


def test_window_datasets_direct(tmp_path):
    path = _write(tmp_path / "t.bin", range(100), "uint8")
    fixed = FixedWindows(path, "uint8", 50, 100, seq_len=9, length=5)
    assert [fixed.window_start(i) for i in range(5)] == [0, 10, 20, 30, 40]
    assert fixed[4][1].tolist() == list(range(91, 100))
    rnd = RandomWindows(path, "uint8", 0, 50, seq_len=9, length=3, seed=0)
    with pytest.raises(IndexError):
        rnd[3]
    with pytest.raises(ValueError, match="shorter than one window"):
        RandomWindows(path, "uint8", 0, 9, seq_len=9, length=3, seed=0)


class _TinyLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(256, 16)
        self.head = torch.nn.Linear(16, 256)

    def _loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.head(self.emb(x)).flatten(0, 1), y.flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_smoke(tmp_path):
    dm = TokenDataModule(seq_len=32, batch_size=4, embedded_max_bytes=SMALL, val_fraction=0.02, val_batches=2)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3, val_check_interval=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_TinyLM(), datamodule=dm)
    assert trainer.global_step == 3 and "val/loss" in trainer.callback_metrics
