import pytest
import torch

from tests import v2pe_cases
from tests.test_v2pe_model import _batch
from tests.v2pe_helpers import tiny_model
from workloads.engine import TrainingConfig, build_engine, lr_lambda
from workloads.v2pe.train import forward_loss


def test_schedule_warms_up_then_decays():
    f = lr_lambda(TrainingConfig(warmup_steps=4, steps=14, min_lr_ratio=0.1))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_deepspeed_zero_with_context_parallel_matches_one_process(gloo_world, tmp_path, zero_stage):
    batch = _batch(tmp_path, multiple=4)
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, TrainingConfig(lr=1e-2, eps=1e-3, grad_clip=0.0, steps=10, sharding="none"))
    want_losses = []
    for _ in range(2):
        loss, _ = forward_loss(model, batch)
        engine.backward(loss)
        engine.step()
        want_losses.append(float(loss))
    losses, params = gloo_world(2).run(v2pe_cases.cp_engine_step, state, batch, zero_stage, 2)[0]
    # Two AdamW steps at lr 1e-2 from the same gradients (equal to float32 rounding, see
    # test_v2pe_model). With Adam's usual eps=1e-8 a gradient near 1e-8 turns its
    # rounding noise into an O(lr) update (Adam is sign-like there), so the test uses
    # eps=1e-3: updates stay linear in small gradients and a difference of ~1e-6 in a
    # gradient moves a parameter by at most ~lr/eps * 1e-6 = 1e-5.
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_train_steps_fit_a_batch(tmp_path):
    """The whole step (loss, backward, AdamW, schedule) learns: loss on one batch falls."""
    from workloads.v2pe.train import train_step

    batch = _batch(tmp_path, multiple=2)
    model = tiny_model()
    engine = build_engine(model, TrainingConfig(lr=3e-3, warmup_steps=2, steps=30, sharding="none"))
    log = [train_step(engine, batch) for _ in range(30)]
    assert all(m.stepped for m in log)
    assert log[-1].loss < 0.5 * log[0].loss, [round(m.loss, 3) for m in log]
    # lr reported after each step: warm-up step 2 of 2 reaches 3e-3; step 30 ends the cosine at 10%.
    assert log[0].lr == pytest.approx(3e-3) and log[-1].lr == pytest.approx(3e-4)


@pytest.mark.parametrize("sharding, zero_stage", [("none", 0), ("deepspeed", 1), ("deepspeed", 3)])
def test_checkpoint_restore_continues_exactly(gloo_world, tmp_path, sharding, zero_stage):
    """Saved in the background (DCP, or DeepSpeed's own shards), restored into a fresh
    engine: the next steps' losses equal those of an uninterrupted run."""
    batch = _batch(tmp_path, multiple=4)
    state = tiny_model().state_dict()
    want, got, step, lr_resumed, lr_straight = gloo_world(2).run(
        v2pe_cases.checkpoint_roundtrip, state, batch, sharding, zero_stage, str(tmp_path / "ckpt"))[0]
    assert step == 1
    assert lr_resumed == lr_straight  # the schedule resumed where it was
    # Same data, same restored weights and Adam moments: bit-identical in practice;
    # 1e-6 relative only allows for a different reduction order after a restore.
    assert got == pytest.approx(want, rel=1e-6)


def test_a_nonfinite_gradient_is_never_applied():
    model = torch.nn.Linear(4, 2)
    engine = build_engine(model, TrainingConfig(lr=1e-1, steps=10, sharding="none"))
    x = torch.ones(3, 4)
    engine.backward(model(x).sum())
    assert engine.step() and engine.last_applied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in engine.optimizer.state[model.weight].items()}
    lr = engine.lr
    engine.backward(model(x).sum() * float("nan"))
    assert engine.step() and not engine.last_applied and engine.last_grad_norm != engine.last_grad_norm  # nan
    for k, v in model.state_dict().items():  # weights, Adam's moments and the schedule as they were
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for k, v in engine.optimizer.state[model.weight].items():
        torch.testing.assert_close(v, moments[k], rtol=0, atol=0)
    assert engine.lr == lr
    engine.backward(model(x).sum())  # the next finite step applies, from clean gradients
    assert engine.step() and engine.last_applied
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(model.weight, before["weight"])


def test_the_loop_stops_or_skips_nonfinite_steps_as_configured():
    from orchestrator.worker import NonFiniteSteps
    from workloads.engine import DivergenceError

    stop = NonFiniteSteps(TrainingConfig())  # on_nonfinite: stop by default
    assert stop.check(1, 0.5, 1.0, True) is None
    err = stop.check(2, float("nan"), float("nan"), False)
    assert isinstance(err, DivergenceError) and "step 2: loss nan, gradient norm nan" in str(err)
    assert "training.on_nonfinite: stop" in str(err)
    skip = NonFiniteSteps(TrainingConfig(on_nonfinite="skip", max_nonfinite_steps=3))
    assert [skip.check(s, float("inf"), float("inf"), False) for s in (1, 2)] == [None, None]
    assert skip.check(3, 0.4, 0.9, True) is None  # a finite step ends the row
    assert [skip.check(s, 0.4, float("nan"), False) for s in (4, 5)] == [None, None]
    err = skip.check(6, 0.4, float("nan"), False)
    assert isinstance(err, DivergenceError) and "3 in a row, training.max_nonfinite_steps=3" in str(err)
    assert skip.total == 5
    # An update that was applied (DeepSpeed's) stops the run even under skip.
    ds = NonFiniteSteps(TrainingConfig(on_nonfinite="skip"))
    assert "the update was applied, so the run stops" in str(ds.check(1, float("nan"), float("nan"), True))
