"""Float8Training on CPU: swap timing, sync timing, metrics in loggers, resume, guard, errors."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import struct
import subprocess
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import fp8train
import fp8train.lightning as fl
from fp8train import Float8Linear, Float8LinearConfig
from fp8train.lightning import CHECKPOINT_KEY, Float8Training

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "scripts"))
from lightning_models import ManualMLP, NoEligible, TinyMLP, loader  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*isinstance.treespec, LeafSpec.*",
    "ignore:.*number of training batches.*:UserWarning",
    "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning",
)


def make_trainer(root, callbacks, **overrides) -> L.Trainer:
    kw = dict(
        accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(root),
    )
    kw.update(overrides)
    return L.Trainer(callbacks=callbacks, **kw)


def read_csv(root) -> list[dict[str, str]]:
    (path,) = glob.glob(os.path.join(str(root), "**", "metrics.csv"), recursive=True)
    with open(path) as f:
        return list(csv.DictReader(f))


def fp8_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".fp8_" in k}


@pytest.fixture
def info_log():
    """Messages of ``rank_zero_info`` (Lightning's logger does not propagate to caplog)."""
    records: list[str] = []
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


class Spy(Callback):
    """Records what the model looks like when the strategy is set up (on_fit_start)."""

    def on_fit_start(self, trainer, pl_module):
        self.types = {n: type(m).__name__ for n, m in pl_module.named_modules() if isinstance(m, torch.nn.Linear)}
        opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimizer_has_fp8_params = all(id(m.weight) in opt_params for m in pl_module.modules()
                                            if isinstance(m, Float8Linear))


# --- construction ------------------------------------------------------------------------------------
def test_invalid_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match=r"config='nope'.*tensorwise.*delayed"):
        Float8Training("nope")
    with pytest.raises(ValueError, match=r"config=3"):
        Float8Training(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"stats='all'.*'off', 'summary', 'detailed'"):
        Float8Training(stats="all")
    with pytest.raises(ValueError, match=r"on_divergence='stop'.*'warn', 'fallback', 'raise'"):
        Float8Training(on_divergence="stop")
    for bad in (0, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match=r"saturation_bound="):
            Float8Training(saturation_bound=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"guard_every_n_steps=-1"):
        Float8Training(guard_every_n_steps=-1)
    with pytest.raises(ValueError, match=r"item 3 is invalid"):
        Float8Training(skip=["lm_head", 3])  # type: ignore[list-item]
    cb = Float8Training(Float8LinearConfig.from_recipe_name("delayed", emulate=True), skip="lm_head")
    assert cb.config.emulate and cb.config.has_delayed


def test_environment_check_names_the_fix():
    class Stub:  # only what setup's environment check reads
        class strategy:
            root_device = torch.device("meta")

    with pytest.raises(RuntimeError, match=r"no 'meta' kernel.*from_recipe_name\('delayed', emulate=True\)"):
        Float8Training("delayed")._check_environment(Stub())  # type: ignore[arg-type]
    Float8Training(Float8LinearConfig.from_recipe_name("delayed", emulate=True))._check_environment(Stub())


def test_environment_check_lets_mx_fall_back_to_emulation(info_log):
    class Stub:
        class strategy:
            root_device = torch.device("meta")

    Float8Training("mxfp8")._check_environment(Stub())  # type: ignore[arg-type]  # no fp8 kernel needed
    assert "runs its MX GEMMs on meta emulated" in "\n".join(info_log)
    # an MX forward with per-tensor backward GEMMs still needs the per-tensor kernels
    mixed = Float8LinearConfig.from_recipe_name("mxfp8", cast_config_grad_output=fp8train.CastConfig(),
                                                cast_config_weight_for_grad_input=fp8train.CastConfig(),
                                                cast_config_input_for_grad_weight=fp8train.CastConfig())
    with pytest.raises(RuntimeError, match="no 'meta' kernel"):
        Float8Training(mixed)._check_environment(Stub())  # type: ignore[arg-type]


# --- swap timing + metrics in the CSV logger ---------------------------------------------------------------
@pytest.mark.parametrize(
    "build, recipe, emulate",
    [
        ("init", "delayed", False),  # real CPU _scaled_mm
        ("configure_model", "delayed", True),  # emulated
        ("setup", "tensorwise", False),
        ("init", "rowwise", False),
    ],
)
def test_swap_before_strategy_setup_and_metrics_in_csv(tmp_path, info_log, build, recipe, emulate):
    torch.manual_seed(0)
    model = TinyMLP(build=build)
    cb = Float8Training(Float8LinearConfig.from_recipe_name(recipe, emulate=emulate), skip=["lm_head"])
    spy = Spy()
    trainer = make_trainer(tmp_path, [cb, spy], logger=CSVLogger(str(tmp_path)))
    trainer.fit(model, loader())

    assert spy.types == {"net.0": "Float8Linear", "net.2": "Float8Linear", "lm_head": "Linear"}
    assert spy.optimizer_has_fp8_params  # converted before configure_optimizers, parameters kept
    assert cb.report.converted == ["net.0", "net.2"]
    assert "skip pattern 'lm_head'" in cb.report.skipped["lm_head"]
    assert all(torch.isfinite(loss) for loss in model.losses)

    rows = read_csv(tmp_path)
    keys = {k for r in rows for k, v in r.items() if v}
    assert "fp8/model/divergence_events" in keys and "fp8/model/fallback_layers" in keys
    assert "fp8/net.0/weight/amax" in keys and "fp8/net.0/weight/wasted_bits" in keys
    if recipe == "delayed":
        for role in ("input", "weight", "grad_output"):
            assert {f"fp8/net.2/{role}/{s}" for s in ("amax", "scale", "wasted_bits", "saturation")} <= keys
        assert "fp8/model/nonfinite_events" in keys
    fp8_rows = [r for r in rows if r.get("fp8/model/divergence_events")]
    assert len(fp8_rows) == 4  # log_every_n_steps=1, 4 optimizer steps
    assert not any(k.startswith("fp8/lm_head") for k in keys)

    text = "\n".join(info_log)
    assert "lm_head" in text and "excluded by skip pattern 'lm_head'" in text  # the fit-start table
    assert "fp8 health at fit end" in text


@pytest.mark.parametrize("stats", ["off", "summary", "detailed"])
def test_stats_modes(tmp_path, stats):
    torch.manual_seed(0)
    cb = Float8Training("tensorwise", stats=stats)
    trainer = make_trainer(tmp_path, [cb], logger=CSVLogger(str(tmp_path)), max_steps=2)
    trainer.fit(TinyMLP(), loader())
    keys = {k for r in read_csv(tmp_path) for k, v in r.items() if v}
    fp8 = {k for k in keys if k.startswith("fp8/")}
    if stats == "off":
        assert not fp8
    elif stats == "summary":
        # dynamic recipe, no hooks: weights only (their amax, scale, wasted bits)
        assert "fp8/net.0/weight/amax" in fp8 and "fp8/net.0/input/amax" not in fp8
        assert not any(k.endswith("/underflow") for k in fp8)
    else:
        for role in ("input", "weight", "grad_output"):
            assert {f"fp8/lm_head/{role}/{s}" for s in ("amax", "scale", "saturation", "underflow")} <= fp8
        assert "fp8/model/underflow_max" in fp8


@pytest.mark.parametrize("stats", ["summary", "detailed"])
def test_mxfp8_stats_report_payload_diagnostics(tmp_path, stats, info_log):
    from fp8train import diagnostics
    from fp8train.metrics import mx_payload

    torch.manual_seed(0)
    model = TinyMLP()
    cb = Float8Training("mxfp8", stats=stats, on_divergence="raise")
    trainer = make_trainer(tmp_path, [cb], logger=CSVLogger(str(tmp_path)), max_steps=2)
    trainer.fit(model, loader())  # no raise: MX clamping is not divergence
    rows = [r for r in read_csv(tmp_path) if r.get("fp8/model/divergence_events")]
    keys = {k for r in rows for k, v in r.items() if v}
    assert "runs its MX GEMMs on cpu emulated" in "\n".join(info_log)
    # wasted bits of the MX payload: the mean over blocks, as fp8train.diagnostics measures it; the
    # last logged value is of the weights after the last optimizer step, i.e. the final weights
    layer = model.net[0]
    want = float(diagnostics.wasted_bits(mx_payload(layer.weight.detach(), layer.config.cast_config_weight)))
    assert float(rows[-1]["fp8/net.0/weight/wasted_bits"]) == pytest.approx(want, abs=1e-5)
    assert not any(k.endswith("/scale") for k in keys)  # one scale per block: no single scale to log
    if stats == "summary":
        assert "fp8/net.0/weight/amax" in keys and "fp8/net.0/input/wasted_bits" not in keys
    else:
        for role in ("input", "weight", "grad_output"):
            assert {f"fp8/lm_head/{role}/{s}" for s in ("amax", "wasted_bits", "saturation", "underflow")} <= keys
        # net.2 = nn.Linear(64, 32): weights uniform in (-1/8, 1/8), ~9% clamped; reported, not an event
        assert float(rows[-1]["fp8/net.2/weight/saturation"]) > 0.05
        assert float(rows[-1]["fp8/model/divergence_events"]) == 0


def test_tensorboard_logger_gets_fp8_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [Float8Training("delayed")], logger=TensorBoardLogger(str(tmp_path)),
                           max_steps=2)
    trainer.fit(TinyMLP(), loader())
    (events,) = glob.glob(os.path.join(str(tmp_path), "**", "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(events)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "fp8/net.0/input/amax" in tags and "fp8/model/divergence_events" in tags


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of an offline run's ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending += chunk
            continue
        raw, pending = (pending + chunk, b"") if kind == 4 else (chunk, b"")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_contains_fp8_metrics(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # no state shared with other
        monkeypatch.setenv(var, str(tmp_path / var.lower()))                # wandb users of this machine
    wandb.finish()  # a run left open by an earlier test would be reused by WandbLogger
    torch.manual_seed(0)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="fp8train-test")
    trainer = make_trainer(tmp_path, [Float8Training("delayed")], logger=logger, max_steps=2)
    trainer.fit(TinyMLP(), loader())
    run_dir = os.path.dirname(logger.experiment.dir)  # .../offline-run-<time>-<id>/files
    wandb.finish()
    (run_file,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    rows = [r for r in _wandb_history(run_file) if "fp8/model/divergence_events" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 1]
    assert all(r["fp8/net.0/input/amax"] > 0 and r["fp8/net.0/grad_output/scale"] > 0 for r in rows)


def test_lightning_module_does_not_import_wandb():
    code = "import sys, fp8train.lightning; assert 'wandb' not in sys.modules, 'wandb imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- warnings for setups that cannot work as asked -----------------------------------------------------------
def test_skip_pattern_matching_nothing_warns_with_layer_names(tmp_path):
    trainer = make_trainer(tmp_path, [Float8Training("tensorwise", skip=["decoder.*", "lm_head"])], max_steps=1)
    match = r"pattern 'decoder\.\*' matches no linear layer.*'net\.0', 'net\.2', 'lm_head'"
    with pytest.warns(UserWarning, match=match):
        trainer.fit(TinyMLP(), loader())


def test_skip_function(tmp_path):
    cb = Float8Training("tensorwise", skip=lambda mod, fqn: mod.out_features == 32)
    make_trainer(tmp_path, [cb], max_steps=1).fit(TinyMLP(), loader())
    assert cb.report.converted == ["net.0", "lm_head"]
    assert "skip function <lambda>" in cb.report.skipped["net.2"]


def test_no_eligible_linears_warns_and_trains_in_high_precision(tmp_path):
    model = NoEligible()
    trainer = make_trainer(tmp_path, [Float8Training("delayed", stats="detailed")], max_steps=2,
                           logger=CSVLogger(str(tmp_path)))
    with pytest.warns(UserWarning, match=r"(?s)no layer of NoEligible was converted.*fc .*not divisible by 16"):
        trainer.fit(model, loader())
    assert trainer.global_step == 2 and type(model.fc) is torch.nn.Linear


# --- sync timing ---------------------------------------------------------------------------------------------
def test_gradient_accumulation_syncs_once_per_optimizer_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TinyMLP(optimizer="sgd")
    calls = []
    real_sync = fl.sync_float8_amax_and_scale_history

    def counting_sync(module, *args, **kwargs):
        layer = model.net[0]
        calls.append({
            "micro_batches": len(model.losses),
            "amax_input": float(layer.fp8_amax_input),
            "amax_grad_output": float(layer.fp8_amax_grad_output),
        })
        return real_sync(module, *args, **kwargs)

    monkeypatch.setattr(fl, "sync_float8_amax_and_scale_history", counting_sync)
    trainer = make_trainer(tmp_path, [Float8Training("delayed")], max_steps=3, accumulate_grad_batches=3)
    trainer.fit(model, loader(n_batches=9))

    assert [c["micro_batches"] for c in calls] == [3, 6, 9]  # once per step, after the last micro-batch
    for step, c in enumerate(calls):
        assert c["amax_grad_output"] > 0  # the last micro-batch's backward already ran
        assert c["amax_input"] == pytest.approx(model.input_amax[step])  # max over all 3 micro-batches
    assert model.net[0].is_amax_initialized


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_weight_casts_reused_across_micro_batches(tmp_path, monkeypatch, recipe):
    from fp8train import linear as fp8_linear
    from fp8train.config import GemmInputRole

    casts = []
    real_cast = fp8_linear._cast
    monkeypatch.setattr(fp8_linear, "_cast", lambda t, cfg, role, *a, **k: (casts.append(role), real_cast(t, cfg, role, *a, **k))[1])
    results = {}
    for cache in (False, True):
        casts.clear()
        torch.manual_seed(0)
        model = TinyMLP()
        cb = Float8Training(recipe, cache_weight_casts=cache)
        make_trainer(tmp_path / str(cache), [cb], max_steps=2, accumulate_grad_batches=3,
                     limit_val_batches=0).fit(model, loader(n_batches=6))
        results[cache] = (casts.count(GemmInputRole.WEIGHT), [p.detach().clone() for p in model.parameters()])
    (n_plain, w_plain), (n_cached, w_cached) = results[False], results[True]
    assert n_cached * 3 == n_plain  # one weight cast per optimizer step instead of one per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(w_plain, w_cached))  # and bit-identical training


def test_manual_optimization_syncs_on_each_optimizer_step(tmp_path, monkeypatch):
    calls = []
    real_sync = fl.sync_float8_amax_and_scale_history
    monkeypatch.setattr(fl, "sync_float8_amax_and_scale_history", lambda m, *a: (calls.append(1), real_sync(m, *a)))
    model = ManualMLP(every=2)
    make_trainer(tmp_path, [Float8Training("delayed")], max_steps=2, max_epochs=1).fit(model, loader())
    assert len(model.losses) == 4 and len(calls) == 2 and model.net[0].is_amax_initialized
    # stepping the raw optimizer bypasses on_before_optimizer_step: no sync, and a warning says why
    model = ManualMLP(raw=True)
    with pytest.warns(UserWarning, match=r"no optimizer step for 64 batches.*LightningOptimizer"):
        make_trainer(tmp_path, [Float8Training("delayed")], max_steps=-1, max_epochs=1).fit(model, loader(64))
    assert not model.net[0].is_amax_initialized


# --- checkpoints ---------------------------------------------------------------------------------------------
def _fit_delayed(root, max_epochs, ckpt_path=None, seed=0, **cb_kwargs):
    torch.manual_seed(seed)
    model = TinyMLP()
    cb = Float8Training("delayed", **cb_kwargs)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1)
    trainer = make_trainer(root, [cb, ckpt], max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True,
                           num_sanity_val_steps=2, limit_val_batches=2)
    trainer.fit(model, loader(), loader(n_batches=2, seed=1), ckpt_path=ckpt_path)
    return model, cb, trainer


def test_resume_restores_fp8_state_bit_exactly_and_matches_uninterrupted_run(tmp_path):
    # uninterrupted: 2 epochs of 4 steps; interrupted: 1 epoch, then resume for the 2nd
    full, _, _ = _fit_delayed(tmp_path / "full", max_epochs=2)
    first, _, _ = _fit_delayed(tmp_path / "first", max_epochs=1)
    (path,) = glob.glob(str(tmp_path / "first" / "ckpt" / "*.ckpt"))
    ckpt = torch.load(path, weights_only=False)
    assert ckpt[CHECKPOINT_KEY]["recipe"] == "delayed"
    assert ckpt[CHECKPOINT_KEY]["converted"] == ["net.0", "net.2", "lm_head"]
    saved_config = Float8LinearConfig.from_dict(ckpt[CHECKPOINT_KEY]["config"])
    assert saved_config == Float8LinearConfig.from_recipe_name("delayed")

    class AtResume(Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = fp8_state(pl_module)
            self.initialized = [m.is_amax_initialized for m in pl_module.modules() if isinstance(m, Float8Linear)]

    at_resume = AtResume()
    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    resumed = TinyMLP()
    trainer = make_trainer(tmp_path / "resumed", [Float8Training("delayed"), at_resume,
                                                  ModelCheckpoint(dirpath=str(tmp_path / "resumed"))],
                           max_steps=-1, max_epochs=2, enable_checkpointing=True, num_sanity_val_steps=2,
                           limit_val_batches=2)
    trainer.fit(resumed, loader(), loader(n_batches=2, seed=1), ckpt_path=path)

    saved = fp8_state(first)
    assert saved.keys() == at_resume.state.keys() and len(saved) == 3 * 4 * 3
    for k in saved:  # bit-identical, also after the resumed run's sanity-check validation
        assert torch.equal(saved[k], at_resume.state[k]), k
    assert at_resume.initialized == [True, True, True]
    # the resumed steps reproduce the uninterrupted run exactly
    assert torch.equal(torch.stack(resumed.losses), torch.stack(full.losses[4:]))
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_recipe_mismatch_on_resume_raises_saying_what_differs(tmp_path):
    model, _, trainer = _fit_delayed(tmp_path / "delayed", max_epochs=1)
    (path,) = glob.glob(str(tmp_path / "delayed" / "ckpt" / "*.ckpt"))

    def resume(cb, ckpt_path):
        t = make_trainer(tmp_path / "r", [cb], max_steps=6)
        t.fit(TinyMLP(), loader(), ckpt_path=ckpt_path)

    with pytest.raises(RuntimeError, match=r"(?s)different fp8 setup.*recipe: checkpoint 'delayed', this run "
                                            r"'tensorwise'.*cast_config_input\.scaling_type: 'delayed' -> 'dynamic'"):
        resume(Float8Training("tensorwise"), path)
    with pytest.raises(RuntimeError, match=r"layers in fp8 only in the checkpoint: \['lm_head'\]"):
        resume(Float8Training("delayed", skip=["lm_head"]), path)

    # cast_kernel picks who computes the casts, not the recipe: resuming with another one, or from a
    # checkpoint written before the field existed, is no mismatch
    resume(Float8Training(Float8LinearConfig.from_recipe_name("delayed", cast_kernel="torch")), path)
    old = torch.load(path, weights_only=False)
    del old[CHECKPOINT_KEY]["config"]["cast_kernel"]
    torch.save(old, str(tmp_path / "old.ckpt"))
    resume(Float8Training("delayed"), str(tmp_path / "old.ckpt"))

    # no metadata (e.g. converted by hand): the fp8 buffer keys still tell, before the strict load
    ckpt = torch.load(path, weights_only=False)
    del ckpt[CHECKPOINT_KEY]
    del ckpt["callbacks"]
    stripped = str(tmp_path / "stripped.ckpt")
    torch.save(ckpt, stripped)
    with pytest.raises(RuntimeError, match=r"(?s)fp8 state in the checkpoint this run has no place for.*net\.0"):
        resume(Float8Training("tensorwise"), stripped)

    # without callback state the delayed layers' is_amax_initialized is inferred from the history
    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            self.initialized = pl_module.net[0].is_amax_initialized

    check = Check()
    t = make_trainer(tmp_path / "r2", [Float8Training("delayed"), check], max_steps=6)
    t.fit(TinyMLP(), loader(), ckpt_path=stripped)
    assert check.initialized is True


def test_high_precision_checkpoint_into_fp8_run_converts_and_says_so(tmp_path, info_log):
    torch.manual_seed(0)
    hp = TinyMLP()
    t = make_trainer(tmp_path, [], max_steps=2)
    t.fit(hp, loader())
    path = str(tmp_path / "hp.ckpt")
    t.save_checkpoint(path)

    model = TinyMLP()
    t = make_trainer(tmp_path, [Float8Training("delayed")], max_steps=4)
    t.fit(model, loader(), ckpt_path=path)
    assert any("has no fp8 state" in m and "fresh state" in m for m in info_log)
    assert isinstance(model.net[0], Float8Linear) and model.net[0].is_amax_initialized
    assert t.global_step == 4


# --- divergence guard ----------------------------------------------------------------------------------------
def test_guard_warns_naming_layer_and_role_on_saturation(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(blowup=(2, 1e4))
    cb = Float8Training("delayed", saturation_bound=0.2)
    trainer = make_trainer(tmp_path, [cb], logger=CSVLogger(str(tmp_path)), max_steps=4)
    with pytest.warns(UserWarning, match=r"fp8 divergence at step 3 in layer 'net\.0', operand 'input' \(used by "
                                         r"the output and grad_weight GEMMs\): \d+\.\d+% of elements saturated"):
        trainer.fit(model, loader())
    assert cb.fallback_layers == {} and model.net[0].fp8_enabled
    rows = read_csv(tmp_path)
    flagged = [r for r in rows if r.get("fp8/net.0/input/divergence")]
    assert [r["step"] for r in flagged] == ["2"]  # logged at the step it happened (0-based, as Lightning's)
    assert float(flagged[0]["fp8/net.0/input/saturation"]) > 0.5


def test_guard_names_non_finite_amax(tmp_path):
    class PoisonAmax(Callback):  # runs before Float8Training's sync: an amax turns NaN on step 2
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                pl_module.net[2].fp8_amax_grad_output.fill_(float("nan"))

    torch.manual_seed(0)
    cb = Float8Training("delayed", guard_every_n_steps=2, saturation_bound=None)
    trainer = make_trainer(tmp_path, [PoisonAmax(), cb], logger=CSVLogger(str(tmp_path)), max_steps=4,
                           log_every_n_steps=4)
    with pytest.warns(UserWarning, match=r"step 2 in layer 'net\.2', operand 'grad_output'.*amax was NaN/inf on 1 "
                                         r"sync"):
        trainer.fit(TinyMLP(), loader())
    assert int(trainer.lightning_module.net[2].fp8_nonfinite_grad_output) == 1
    last = [r for r in read_csv(tmp_path) if r.get("fp8/model/nonfinite_events")][-1]
    assert float(last["fp8/model/nonfinite_events"]) == 1 and float(last["fp8/model/divergence_events"]) == 1


def test_guard_fallback_switches_layer_to_high_precision_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(blowup=(1, 1e4))
    cb = Float8Training("delayed", on_divergence="fallback", saturation_bound=0.2)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    with pytest.warns(UserWarning, match=r"layer 'net\.0' now runs in high precision"):
        trainer.fit(model, loader())
    assert not model.net[0].fp8_enabled and "net.0" in cb.fallback_layers
    assert "saturated" in cb.fallback_layers["net.0"]
    path = str(tmp_path / "fb.ckpt")
    trainer.save_checkpoint(path)
    assert "net.0" in torch.load(path, weights_only=False)[CHECKPOINT_KEY]["fallback"]

    class Check(Callback):
        def on_train_start(self, trainer, pl_module):
            self.enabled = {n: m.fp8_enabled for n, m in pl_module.named_modules() if isinstance(m, Float8Linear)}

    check = Check()
    cb2 = Float8Training("delayed", on_divergence="warn")
    resumed = TinyMLP()
    make_trainer(tmp_path / "r", [cb2, check], max_steps=5).fit(resumed, loader(), ckpt_path=path)
    assert check.enabled["net.0"] is False
    assert not resumed.net[0].fp8_enabled and "net.0" in cb2.fallback_layers


def test_guard_raise_mode(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(blowup=(1, 1e4))
    trainer = make_trainer(tmp_path, [Float8Training("delayed", on_divergence="raise")], max_steps=4)
    with pytest.raises(RuntimeError, match=r"layer 'net\.0', operand 'input'.*saturated"):
        trainer.fit(model, loader())
    assert trainer.global_step == 2  # stopped at the step the guard fired
    # the hook wrappers are gone after the failed fit
    assert not {"setup", "configure_model", "on_load_checkpoint"} & set(model.__dict__)


def test_validation_does_not_feed_delayed_amax(tmp_path):
    class Check(Callback):  # listed after Float8Training: sees the state it leaves
        def __init__(self):
            self.seen = []

        def on_validation_start(self, trainer, pl_module):
            self.seen.append(["start", float(pl_module.net[0].fp8_amax_input)])

        def on_validation_batch_end(self, trainer, pl_module, *args):
            self.seen[-1] += ["batch", float(pl_module.net[0].fp8_amax_input)]

        def on_validation_end(self, trainer, pl_module):
            self.seen[-1] += ["end", float(pl_module.net[0].fp8_amax_input)]

    torch.manual_seed(0)
    check = Check()
    big = torch.utils.data.TensorDataset(torch.randn(8, 32) * 100, torch.randn(8, 16))
    # validation after every training batch, i.e. also in the middle of gradient accumulation
    trainer = make_trainer(tmp_path, [Float8Training("delayed"), check], max_steps=1, accumulate_grad_batches=2,
                           val_check_interval=1, limit_val_batches=1)
    trainer.fit(TinyMLP(), loader(), torch.utils.data.DataLoader(big, batch_size=8))
    _, before, _, during, _, after = check.seen[0]  # after the first micro-batch, before the sync
    # eval-mode forwards record no amax (Float8Linear checks self.training), so the large
    # validation activations never reach the delayed history
    assert before > 0 and during == before
    assert after == before


@pytest.mark.parametrize("eager_first", [True, False])
def test_compiled_delayed_model_compiles_once(tmp_path, eager_first):
    """Until the first sync the casts use dynamic scales; the callback runs those steps eagerly so the
    compiled module compiles once (twice with ``eager_until_synced=False``), then restores the stance."""
    from torch._dynamo.eval_frame import _stance
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    counter = CompileCounter()
    model = TinyMLP()
    model.net = torch.compile(model.net, backend=counter)
    cb = Float8Training("delayed", skip="lm_head", eager_until_synced=eager_first)
    trainer = make_trainer(tmp_path, [cb], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(model, loader())
    # with gradient accumulation the weight-cast cache adds a graph ("fill" on the first micro-batch,
    # "reuse" after): 2 graphs, or 4 when the first step compiles its dynamic-scale variants too
    assert counter.frame_count == (2 if eager_first else 4)
    assert _stance.stance == "default"
    assert len(model.losses) == 6 and all(torch.isfinite(x) for x in model.losses)
    with pytest.raises(ValueError, match=r"eager_until_synced='yes'"):
        Float8Training(eager_until_synced="yes")  # type: ignore[arg-type]
