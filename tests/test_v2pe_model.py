from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tests import v2pe_cases
from tests.v2pe_helpers import encoded, tiny_config, tiny_model
from workloads.v2pe.model import LMHead, V2PEModel
from workloads.v2pe.packing import pack
from workloads.v2pe.train import TrainStepConfig, chunked_cross_entropy, forward_loss, parallelize

# float32 throughout. Context parallelism changes only the order of additions (attention
# merged per ring step, loss summed per rank, gradients all-reduced), so results agree
# to float32 rounding accumulated over a few layers: ~1e-6 relative, asserted at 1e-5
# (atol 1e-6 for gradients that are near zero).
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-6, rtol=1e-4)


def test_chunked_loss_equals_full_loss():
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)
    head = LMHead(16, 30)
    weight = head.weight
    targets = torch.randint(0, 30, (50,))
    targets[::3] = -100
    lw = torch.ones(50)
    s, n = chunked_cross_entropy(hidden, head, targets, lw, chunk=7)
    s.backward()
    g = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    full.backward()
    assert n.item() == (targets != -100).sum().item()
    torch.testing.assert_close(s, full)  # same math in float32, chunk sums reassociated
    torch.testing.assert_close(g[0], hidden.grad)
    torch.testing.assert_close(g[1], weight.grad)


def _batch(tmp_path, multiple, mode="v2pe_rnd"):
    samples, tok = encoded(str(tmp_path))
    return pack(samples, tokenizer=tok, tokens_per_tile=4, multiple=multiple, mode=mode,
                generator=torch.Generator().manual_seed(3))


def _reference(batch, checkpointing=False, config=None):
    model = tiny_model()
    if config is not None:  # the same weights under another config (e.g. rope scaling)
        state, model = model.state_dict(), V2PEModel(config)
        model.load_state_dict(state)
    cfg = TrainStepConfig(loss_chunk_tokens=16, activation_checkpointing=checkpointing)
    parallelize(model, cfg)
    loss, stats = forward_loss(model, batch, cfg=cfg)
    loss.backward()
    return model, loss.detach(), {n: p.grad for n, p in model.named_parameters()}, stats


def test_batch_has_images_documents_and_supervision(tmp_path):
    batch = _batch(tmp_path, multiple=8)
    assert batch.cu_seqlens.numel() == 4  # three documents
    assert batch.num_tiles == 1 + 3 + 1  # one, then a wide image (2 tiles + thumbnail), then one
    assert int((batch.visual_index >= 0).sum()) == batch.num_tiles * 4
    assert int((batch.targets != -100).sum()) > 0
    assert all(int(d) % 8 == 0 for d in torch.diff(batch.cu_seqlens))


# (world, all-to-all degree): plain rings, hybrid 2 x ring 2, and all-to-all only.
@pytest.mark.parametrize("world_size,a2a", [(2, 1), (4, 1), (4, 2), (2, 2)])
def test_context_parallel_model_matches_single_process(gloo_world, tmp_path, world_size, a2a):
    batch = _batch(tmp_path, multiple=2 * world_size)
    model, loss, grads, _ = _reference(batch)
    res = gloo_world(world_size).run(v2pe_cases.cp_loss_and_grads, model.state_dict(), batch, True, a2a)
    cp_loss, cp_grads = res[0]
    torch.testing.assert_close(cp_loss, loss, **LOSS_TOL)
    assert set(cp_grads) == set(grads)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"{name} got no gradient in the reference"
        torch.testing.assert_close(cp_grads[name], g, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def test_dynamic_rope_scaling_under_context_parallelism(gloo_world, tmp_path):
    """Plain positions with InternLM2's dynamic NTK scaling past 32 positions: the row's
    longest document (rope_len) travels with every shard, so each rank scales alike."""
    batch = _batch(tmp_path, multiple=4, mode="default")
    assert batch.rope_len > 32 and _batch(tmp_path, multiple=4).rope_len == 0  # V2PE positions: no scaling
    scaled = replace(tiny_config(), llm=replace(tiny_config().llm, rope_scaling="dynamic", rope_scaling_factor=2.0,
                                                 max_position_embeddings=32))
    model, loss, grads, _ = _reference(batch, config=scaled)
    _, plain_loss, _, _ = _reference(batch)
    assert abs(loss - plain_loss) > 1e-4  # the scaling is in effect
    cp_loss, cp_grads = gloo_world(2).run(v2pe_cases.cp_loss_and_grads, model.state_dict(), batch, False, 1,
                                          scaled)[0]
    torch.testing.assert_close(cp_loss, loss, **LOSS_TOL)
    for name, g in grads.items():
        torch.testing.assert_close(cp_grads[name], g, **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def test_activation_checkpointing_changes_nothing(tmp_path):
    batch = _batch(tmp_path, multiple=2)
    _, loss_a, grads_a, _ = _reference(batch, checkpointing=False)
    _, loss_b, grads_b, _ = _reference(batch, checkpointing=True)
    assert torch.equal(loss_a, loss_b)  # same ops in the same order: bit-identical
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
