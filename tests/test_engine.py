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
