"""Token data: the embedded byte-level corpus, token-file loading, and the Lightning DataModule."""

from fp8train.data.corpus import cache_dir, embedded_corpus, embedded_corpus_path, load_token_file
from fp8train.data.datamodule import TokenDataModule

__all__ = ["TokenDataModule", "cache_dir", "embedded_corpus", "embedded_corpus_path", "load_token_file"]
