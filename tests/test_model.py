"""Llama model: config validation, presets, shapes, causality, GQA, tying, checkpointing, compile."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8train.models import Llama, LlamaConfig
from fp8train.models.llama import TransformerBlock
from fp8train.perf import matmul_params

# small enough that a CPU inductor compile of forward + backward stays a few seconds
MICRO = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=64, max_seq_len=16)


def _model(cfg: LlamaConfig = MICRO, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(cfg)


def _tokens(cfg: LlamaConfig = MICRO, batch: int = 2, seq_len: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, seq_len or cfg.max_seq_len), generator=g)


@pytest.mark.parametrize(
    "field, value",
    [
        ("dim", 0),
        ("n_layers", -1),
        ("n_layers", True),
        ("n_heads", 3),  # 128 % 3 != 0
        ("n_kv_heads", 3),  # 4 % 3 != 0
        ("n_kv_heads", 0),
        ("vocab_size", 2.5),
        ("ffn_hidden_dim", None),
        ("max_seq_len", 0),
        ("rope_theta", 0.0),
        ("norm_eps", -1e-5),
        ("init_std", float("nan")),
        ("tie_embeddings", 1),
        ("activation_checkpointing", "yes"),
    ],
)
def test_config_error_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        LlamaConfig(**{field: value})
    msg = str(e.value)
    assert f"LlamaConfig.{field}=" in msg and repr(value) in msg and "valid:" in msg


def test_config_odd_head_dim_rejected():
    with pytest.raises(ValueError, match=r"n_heads=2 .*even head dim"):
        LlamaConfig(dim=6, n_heads=2)


def test_config_defaults_and_frozen():
    cfg = LlamaConfig(n_heads=8)
    assert cfg.n_kv_heads == 8 and cfg.head_dim == 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64  # type: ignore[misc]


def test_presets():
    assert LlamaConfig.names() == ["llama_tiny", "llama_125m", "llama_1b", "llama3_8b"]
    for name in LlamaConfig.names():
        cfg = LlamaConfig.from_name(name)
        # every Linear's in/out features: fp8 GEMMs need multiples of 16
        dims = [cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_hidden_dim, cfg.vocab_size]
        assert all(d % 16 == 0 for d in dims), (name, dims)
    big = LlamaConfig.from_name("llama_1b")
    assert (big.dim, big.n_layers, big.n_heads, big.ffn_hidden_dim, big.vocab_size, big.max_seq_len) == (
        2048, 16, 16, 8192, 32768, 2048,
    )
    # Llama 3 8B's published parameter count, from the config alone (never instantiated)
    l3 = LlamaConfig.from_name("llama3_8b")
    norms = (2 * l3.n_layers + 1) * l3.dim
    assert matmul_params(l3) + l3.vocab_size * l3.dim + norms == 8_030_261_248


def test_from_name_errors_and_overrides():
    with pytest.raises(ValueError, match=r"unknown Llama preset 'llama_7b'.*llama_tiny.*llama3_8b"):
        LlamaConfig.from_name("llama_7b")
    with pytest.raises(ValueError, match="no field"):
        LlamaConfig.from_name("llama_tiny", width=3)
    with pytest.raises(ValueError, match="LlamaConfig.n_layers=0"):
        LlamaConfig.from_name("llama_tiny", n_layers=0)
    cfg = LlamaConfig.from_name("llama_tiny", activation_checkpointing=True)
    assert cfg.activation_checkpointing and cfg.dim == LlamaConfig.from_name("llama_tiny").dim


def test_tiny_forward_shape_and_linear_names():
    cfg = LlamaConfig.from_name("llama_tiny")
    model = _model(cfg)
    tokens = _tokens(cfg, batch=2)
    logits = model(tokens)
    assert logits.shape == (2, cfg.max_seq_len, cfg.vocab_size) and logits.dtype == torch.float32
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {"lm_head"} | {
        f"layers.{i}.{p}"
        for i in range(cfg.n_layers)
        for p in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    }
    assert linears == expected
    assert all(model.get_submodule(n).bias is None for n in linears)
    # rotary tables are derived, not state
    assert not any("rope" in k for k in model.state_dict())
    # a fresh byte-level model predicts roughly uniformly: loss ~ ln(256)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


def test_init_scales_residual_outputs():
    cfg = LlamaConfig.from_name("llama_tiny")
    model = _model(cfg)
    std_q = model.layers[0].attention.wq.weight.std().item()
    std_o = model.layers[0].attention.wo.weight.std().item()
    assert std_q == pytest.approx(cfg.init_std, rel=0.05)
    assert std_o == pytest.approx(cfg.init_std / (2 * cfg.n_layers) ** 0.5, rel=0.05)


def test_forward_input_errors():
    model = _model()
    with pytest.raises(ValueError, match=r"seq_len=17 exceeds max_seq_len=16"):
        model(_tokens(seq_len=17))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.zeros(16, dtype=torch.long))


def test_causal():
    model = _model().eval()
    tokens = _tokens()
    changed = tokens.clone()
    t = 9
    changed[:, t] = (changed[:, t] + 1) % MICRO.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4


def test_shorter_sequences_use_rope_prefix():
    model = _model().eval()
    tokens = _tokens()
    torch.testing.assert_close(model(tokens[:, :7]), model(tokens)[:, :7])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = _model()
    mha_cfg = dataclasses.replace(MICRO, n_kv_heads=MICRO.n_heads)
    mha = Llama(mha_cfg)
    sd = gqa.state_dict()
    n_rep, hd = MICRO.n_heads // MICRO.n_kv_heads, MICRO.head_dim
    for k in list(sd):
        if k.endswith(("attention.wk.weight", "attention.wv.weight")):
            # query head h reads kv head h // n_rep
            w = sd[k].view(MICRO.n_kv_heads, hd, MICRO.dim)
            sd[k] = w.repeat_interleave(n_rep, dim=0).reshape(MICRO.n_heads * hd, MICRO.dim)
    mha.load_state_dict(sd)
    assert gqa.layers[0].attention.wk.weight.shape == (MICRO.n_kv_heads * hd, MICRO.dim)
    tokens = _tokens()
    torch.testing.assert_close(gqa(tokens), mha(tokens))


def test_tied_embeddings_share_storage():
    cfg = dataclasses.replace(MICRO, tie_embeddings=True)
    model = _model(cfg)
    assert model.lm_head.weight is model.tok_embeddings.weight
    untied = _model()
    table = cfg.vocab_size * cfg.dim
    assert model.num_params() == untied.num_params() - table
    # a tied table is also the lm_head matmul weight, so it stays among non-embedding params
    assert model.num_params(exclude_embeddings=True) == model.num_params()
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - table
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_tokens()).pow(2).mean().backward()
    opt.step()
    assert model.lm_head.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


def test_activation_checkpointing_same_grads_and_recomputes(monkeypatch):
    plain = _model()
    ckpt = _model(dataclasses.replace(MICRO, activation_checkpointing=True))  # same seed: same weights
    calls = []
    block_forward = TransformerBlock.forward

    # counted on forward itself: the recompute in backward does not run module hooks
    def counting_forward(self, *args):
        calls.append(self)
        return block_forward(self, *args)

    tokens = _tokens()
    F.cross_entropy(plain(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    monkeypatch.setattr(TransformerBlock, "forward", counting_forward)
    F.cross_entropy(ckpt(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    assert len(calls) == 2 * MICRO.n_layers  # each block ran again in backward
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    # eval mode never checkpoints
    calls.clear()
    with torch.no_grad():
        ckpt.eval()(tokens)
    assert len(calls) == MICRO.n_layers


def test_bf16_autocast_forward_backward():
    model = _model()
    tokens = _tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all()


def test_meta_device_build_then_init():
    ref = _model()
    with torch.device("meta"):
        model = Llama(MICRO)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.rope.cos, ref.rope.cos)
    torch.testing.assert_close(model.rope.sin, ref.rope.sin)
    assert model(_tokens()).isfinite().all()


def test_compile_inductor_forward_backward_matches_eager():
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    tokens = _tokens()
    for m in (eager, compiled):
        F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
    torch.testing.assert_close(compiled(tokens), eager(tokens), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_fullgraph_with_checkpointing_and_autocast():
    # aot_eager traces exactly what inductor would (no graph breaks allowed) without codegen cost
    model = _model(dataclasses.replace(MICRO, activation_checkpointing=True))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tokens = _tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = compiled(tokens)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()).backward()
    assert model.layers[0].attention.wq.weight.grad is not None


def test_fused_projections_compute_the_same_model():
    torch.manual_seed(0)
    cfg = LlamaConfig.from_name("llama_tiny", n_kv_heads=2)
    plain = Llama(cfg)
    fused = Llama(dataclasses.replace(cfg, fuse_projections=True))
    state = {}
    for k, v in plain.state_dict().items():
        if k.endswith(("attention.wk.weight", "attention.wv.weight", "feed_forward.w3.weight")):
            continue
        if k.endswith("attention.wq.weight"):
            p = k[: -len("wq.weight")]
            state[p + "wqkv.weight"] = torch.cat([v] + [plain.state_dict()[p + n + ".weight"] for n in ("wk", "wv")])
        elif k.endswith("feed_forward.w1.weight"):
            state[k.replace("w1.weight", "w13.weight")] = torch.cat([v, plain.state_dict()[k.replace("w1", "w3")]])
        else:
            state[k] = v
    fused.load_state_dict(state)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    assert fused.layers[0].attention.wqkv.weight.shape == (128 + 2 * 64, 128)


def test_fused_projections_convert_and_pass_the_auto_filter():
    import fp8train
    from fp8train.costmodel import H100

    with torch.device("meta"):
        plain = Llama(LlamaConfig.from_name("llama_1b"))
        fused = Llama(LlamaConfig.from_name("llama_1b", fuse_projections=True))
    cost = H100.replace(tokens=16384, min_speedup=1.15)  # a stricter filter than the default 1.10
    for m in (plain, fused):
        fp8train.convert_to_float8_training(m, config="tensorwise", auto_filter=cost,
                                            module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    # unfused, the 2048x2048 q/k/v/o projections (1.11x) stay bf16; fused, the 2048x6144 wqkv converts
    assert "auto filter" in fp8train.conversion_report(plain).skipped["layers.0.attention.wq"]
    assert "layers.0.attention.wqkv" in fp8train.conversion_report(fused).converted
    assert "layers.0.feed_forward.w13" in fp8train.conversion_report(fused).converted


def test_fuse_projections_must_be_bool():
    with pytest.raises(ValueError, match="LlamaConfig.fuse_projections=1"):
        LlamaConfig(fuse_projections=1)
