"""Token sources: an embedded byte-level corpus that needs no network, and memory-mapped token files.

**Embedded corpus.** The ``.py`` source files of the running Python's standard library, read as
raw bytes (token = byte value, vocab 256), in sorted path order, each followed by a NUL byte
(:data:`SEPARATOR`, which never occurs in Python source) and cut at ``max_bytes``. Python 3.11's
stdlib gives about 31.5 MB with its test suites included, 12 MB without. Sorting makes the
corpus identical on every rank and run; the alphabetically last files form the held-out split.

The first build writes ``stdlib_py-<key>.bin`` (``np.uint8``) and a ``.json`` sidecar (Python
version, token count, SHA-256 of the file list with sizes, arguments) under :func:`cache_dir`.
``<key>`` hashes the sidecar's fields, so a different Python, stdlib or ``max_bytes`` never reads
another's cache, and a path once returned always holds the same bytes; a sidecar that does not
match (or a truncated ``.bin``) triggers a rebuild. Both files are written to a temporary name and
renamed into place, so concurrent ranks never see a half-written file (they may build twice,
writing identical bytes). Caches of other Pythons are left in place; delete the directory to
reclaim them.

**Token files.** :func:`load_token_file` memory-maps a flat array of token ids, e.g. written
with ``np.asarray(ids, dtype=np.uint16).tofile("train.bin")``, and validates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SEPARATOR",
    "TOKEN_DTYPES",
    "cache_dir",
    "stdlib_source_files",
    "embedded_corpus",
    "embedded_corpus_path",
    "load_token_file",
]

#: Default cap on the embedded corpus size (bytes = tokens).
DEFAULT_MAX_BYTES = 32 * 2**20
#: Byte written after each source file: NUL, absent from Python source text.
SEPARATOR = 0
#: Element types a token file may have, by name.
TOKEN_DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in ("uint8", "uint16", "uint32", "int32")}

_CACHE_STEM = "stdlib_py"
# bump when the corpus recipe changes, so old caches are rebuilt
_FORMAT_VERSION = 1
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})


def cache_dir() -> Path:
    """``$FP8TRAIN_CACHE`` if set, else ``~/.cache/fp8train``. Not created here."""
    env = os.environ.get("FP8TRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fp8train"


def stdlib_source_files(include_tests: bool = True) -> list[Path]:
    """Every ``.py`` file under the stdlib directory, sorted by relative path.

    Installed third-party packages (``site-packages``) are never included.

    Args:
        include_tests: also take the stdlib's own test suites (``test/``, ``tests/``, ``idle_test/``).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = _SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            if f.endswith(".py"):
                path = Path(dirpath) / f
                found.append((path.relative_to(root).as_posix(), path))
    return [path for _, path in sorted(found)]


def _selection(max_bytes: int, include_tests: bool) -> tuple[list[Path], str]:
    """The files that fill ``max_bytes`` (the last one may be cut) and a SHA-256 naming them."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    digest = hashlib.sha256()
    for path in stdlib_source_files(include_tests):
        if total >= max_bytes:
            break
        size = path.stat().st_size
        chosen.append(path)
        digest.update(f"{path.relative_to(root).as_posix()}\t{size}\n".encode())
        total += size + 1
    return chosen, digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file owner-only; a shared cache must be readable by other users
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def embedded_corpus_path(max_bytes: int = DEFAULT_MAX_BYTES, include_tests: bool = True) -> Path:
    """Path of the cached embedded corpus (``np.uint8`` tokens), building it first if needed.

    Args:
        max_bytes: cap on the corpus length in tokens (= bytes).
        include_tests: see :func:`stdlib_source_files`.

    Returns:
        ``cache_dir() / "stdlib_py-<key>.bin"``.

    Raises:
        ValueError: ``max_bytes`` < 1.
        RuntimeError: the stdlib has no ``.py`` files (a stripped, bytecode-only Python).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"embedded corpus: max_bytes={max_bytes!r} is invalid; valid: an integer >= 1")
    files, files_sha = _selection(max_bytes, include_tests)
    if not files:
        raise RuntimeError(
            f"no .py files under {sysconfig.get_paths()['stdlib']} (a bytecode-only Python?); "
            "pass a token file as the data source instead of 'embedded'"
        )
    meta = {
        "format": _FORMAT_VERSION,
        "python": sys.version,
        "max_bytes": max_bytes,
        "include_tests": include_tests,
        "files_sha256": files_sha,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir()
    bin_path, json_path = directory / f"{_CACHE_STEM}-{key}.bin", directory / f"{_CACHE_STEM}-{key}.json"
    if _cache_matches(bin_path, json_path, meta):
        return bin_path

    parts = []
    for path in files:
        parts.append(path.read_bytes())
        parts.append(bytes([SEPARATOR]))
    data = b"".join(parts)[:max_bytes]
    directory.mkdir(parents=True, exist_ok=True)
    # data first, sidecar second: a sidecar on disk always describes a complete .bin
    _atomic_write(bin_path, data)
    _atomic_write(json_path, json.dumps({**meta, "n_tokens": len(data)}, indent=1).encode())
    return bin_path


def _cache_matches(bin_path: Path, json_path: Path, meta: dict) -> bool:
    try:
        cached = json.loads(json_path.read_text())
        n_tokens = bin_path.stat().st_size
    except (OSError, ValueError):
        return False
    return all(cached.get(k) == v for k, v in meta.items()) and cached.get("n_tokens") == n_tokens


def embedded_corpus(max_bytes: int = DEFAULT_MAX_BYTES, include_tests: bool = True) -> np.memmap:
    """The embedded corpus as a read-only ``np.uint8`` memmap ``[n_tokens]``, values 0..255.

    Example:
        >>> tokens = embedded_corpus(max_bytes=1 << 20)
        >>> tokens.shape, tokens.dtype
        ((1048576,), dtype('uint8'))
    """
    return np.memmap(embedded_corpus_path(max_bytes, include_tests), dtype=np.uint8, mode="r")


def load_token_file(path: str | os.PathLike, dtype: str, vocab_size: int, seq_len: int) -> np.memmap:
    """Memory-map a flat token file and check it can feed a model.

    Args:
        path: file of raw, headerless token ids (native byte order).
        dtype: element type, one of :data:`TOKEN_DTYPES`.
        vocab_size: the model's vocabulary; every id must be in ``[0, vocab_size)``.
        seq_len: training sequence length; the file must hold at least ``seq_len + 1`` tokens
            (one input window plus its shifted target).

    Returns:
        read-only memmap ``[n_tokens]`` of ``dtype``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unknown dtype, size not a multiple of the item size, an id out of range, or
            the file too short; each message says what to change.

    Reading every id to check the range costs one sequential pass over the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"token file {str(p)!r} does not exist (or is not a file)")
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token file dtype={dtype!r} is invalid; valid: one of {list(TOKEN_DTYPES)}")
    np_dtype = TOKEN_DTYPES[dtype]
    for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"load_token_file: {name}={value!r} is invalid; valid: an integer >= 1")
    size = p.stat().st_size
    if size % np_dtype.itemsize != 0:
        raise ValueError(
            f"token file {str(p)!r} has {size} bytes, not a multiple of {np_dtype.itemsize} "
            f"(the size of {dtype}); is dtype={dtype!r} the type it was written with?"
        )
    n_tokens = size // np_dtype.itemsize
    if n_tokens < seq_len + 1:
        raise ValueError(
            f"token file {str(p)!r} holds {n_tokens} tokens; one training window needs "
            f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a longer file"
        )
    tokens = np.memmap(p, dtype=np_dtype, mode="r")
    lo, hi = int(tokens.min()), int(tokens.max())
    if hi >= vocab_size:
        raise ValueError(
            f"token file {str(p)!r} contains token id {hi} but vocab_size={vocab_size}; set the "
            f"model's and data's vocab_size to at least {hi + 1}, or check dtype={dtype!r} is right"
        )
    if lo < 0:
        raise ValueError(f"token file {str(p)!r} contains negative token id {lo}; ids must be >= 0")
    return tokens
