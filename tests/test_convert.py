import pytest
import torch
import torch.nn as nn

import fp8train
from fp8train import Float8Linear, conversion_report, convert_to_float8_training


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.odd = nn.Linear(32, 30)
        self.lm_head = nn.Linear(32, 64)

    def forward(self, x):
        h = self.body(x)
        return self.lm_head(h) + self.odd(h).sum(-1, keepdim=True)


def test_swap_keeps_parameters_and_optimizer():
    m = Tiny()
    params_before = dict(m.named_parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    convert_to_float8_training(m, module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    assert isinstance(m.body[0], Float8Linear) and isinstance(m.body[2], Float8Linear)
    assert type(m.lm_head) is nn.Linear and type(m.odd) is nn.Linear
    after = dict(m.named_parameters())
    assert after.keys() == params_before.keys()
    assert all(after[k] is params_before[k] for k in after)
    w0 = m.body[0].weight.detach().clone()
    m(torch.randn(4, 32)).sum().backward()
    opt.step()
    assert not torch.equal(w0, m.body[0].weight)  # the old optimizer updated the swapped layer


def test_report_reasons():
    m = convert_to_float8_training(Tiny(), module_filter_fn=lambda mod, fqn: fqn != "lm_head")
    rep = conversion_report(m)
    assert rep.converted == ["body.0", "body.2"]
    assert rep.skipped["lm_head"] == "excluded by module_filter_fn"
    assert "out_features=30 is not divisible by 16" in rep.skipped["odd"]
    assert "2 converted, 2 skipped" in rep.table()


def test_recipe_name_and_idempotent():
    m = convert_to_float8_training(Tiny(), config="delayed")
    assert m.body[0].config.has_delayed
    convert_to_float8_training(m, config="tensorwise")
    assert conversion_report(m).skipped["body.0"] == "already a Float8Linear"


def test_single_linear_returns_new_module_and_bad_single_raises():
    lin = convert_to_float8_training(nn.Linear(16, 16))
    assert isinstance(lin, Float8Linear)
    with pytest.raises(ValueError, match="in_features=10"):
        convert_to_float8_training(nn.Linear(10, 16))


def test_bad_config_type():
    with pytest.raises(ValueError, match="config="):
        convert_to_float8_training(Tiny(), config=3)
    with pytest.raises(ValueError, match="known recipes"):
        convert_to_float8_training(Tiny(), config="nope")


def test_converted_model_trains():
    torch.manual_seed(0)
    m = convert_to_float8_training(Tiny(), config="delayed")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x, target = torch.randn(64, 32), torch.randn(64, 64)
    losses = []
    for _ in range(30):
        loss = (m(x) - target).pow(2).mean()
        loss.backward()
        fp8train.sync_float8_amax_and_scale_history(m)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
