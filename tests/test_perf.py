"""FLOPs per token, peak FLOP/s by GPU name, MFU."""

import dataclasses

import pytest
import torch

from fp8train.models import Llama, LlamaConfig
from fp8train.perf import flops_per_token, matmul_params, mfu, peak_flops, peak_flops_for_name


def test_flops_per_token_tiny_by_hand():
    cfg = LlamaConfig.from_name("llama_tiny")  # D=128, L=4, H=4, F=384, V=256
    per_layer = 4 * 128 * 128 + 3 * 128 * 384  # wq wk wv wo + w1 w2 w3 = 65536 + 147456
    n = 4 * per_layer + 128 * 256  # + lm_head = 884736
    assert matmul_params(cfg) == n == 884_736
    attention = 12 * 4 * 128 * 128  # 12 * L * D * T at T = 128
    assert flops_per_token(cfg, 128) == 6 * n + attention == 6_094_848
    assert flops_per_token(cfg, 128, causal_halved=True) == 6 * n + attention // 2


def test_matmul_params_gqa_and_model_agree():
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128)
    # wq, wo: 64x64; wk, wv: 64x32 (2 kv heads of 16); ffn 3 x 64x128; lm_head 64x96
    assert matmul_params(cfg) == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 64 * 96
    model = Llama(cfg)
    norms = (2 * cfg.n_layers + 1) * cfg.dim
    assert model.num_params(exclude_embeddings=True) == matmul_params(cfg) + norms
    tied = Llama(dataclasses.replace(cfg, tie_embeddings=True))
    assert tied.num_params(exclude_embeddings=True) == matmul_params(cfg) + norms


def test_flops_per_token_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len=0"):
        flops_per_token(LlamaConfig(), 0)


@pytest.mark.parametrize(
    "name, fp8, peak",
    [
        ("NVIDIA H100 80GB HBM3", False, 989e12),
        ("NVIDIA H100 80GB HBM3", True, 1979e12),
        ("NVIDIA H100 PCIe", False, 756e12),
        ("NVIDIA H100 PCIe", True, 1513e12),
        ("NVIDIA H200", False, 989e12),
        ("NVIDIA H200", True, 1979e12),
        ("NVIDIA A100-SXM4-80GB", False, 312e12),
        ("NVIDIA A100-SXM4-80GB", True, 312e12),  # no fp8 tensor cores: bf16 is the ceiling
        ("NVIDIA GeForce RTX 3090", True, None),
    ],
)
def test_peak_flops_for_name(name, fp8, peak):
    assert peak_flops_for_name(name, fp8) == peak


def test_peak_flops_device(monkeypatch):
    assert peak_flops("cpu", fp8=False) is None
    assert peak_flops(torch.device("cpu"), fp8=True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: seen.append(d) or "NVIDIA H100 80GB HBM3")
    assert peak_flops("cuda:1", fp8=True) == 1979e12
    assert seen == [torch.device("cuda:1")]


def test_mfu():
    assert mfu(1000.0, 6e9, None) is None
    assert mfu(30_000.0, 1e10, 1e15) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="tokens_per_s=-1"):
        mfu(-1.0, 1e9, 1e15)
    with pytest.raises(ValueError, match="peak=0"):
        mfu(1.0, 1e9, 0.0)
