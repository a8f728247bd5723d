import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from workloads.piip.flops import backbone_flops
from workloads.piip.model import PIIP, DeformableCrossAttention, make_pyramid, piip_config


def counted_macs(model: PIIP, images) -> float:
    """Multiply-adds of the backbone as PyTorch's operator counter sees them (it counts 2 per MAC).

    Attention runs on SDPA's math backend here, as explicit matrix products the counter
    sees (it has no formula for the fused CPU kernel).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
        model.forward_features(images)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize(
    "variant, resolutions, kw",
    [
        ("vit-t", [96], {}),  # baseline layout: windowed blocks (padded 6x6 grid -> 14x14 windows) + 4 global
        ("vit-s", [256], {"window_size": 7}),  # 16x16 grid, windows of 7 with padding
        ("piip-tsb", [64, 96, 128], {"interactions": 3}),  # deformable interactions
        ("piip-tsb", [64, 96, 128], {"interactions": 2, "attn_type": "plain"}),
        ("piip-sbl", [32, 48, 64], {"interactions": 4}),  # L has 24 blocks: 6 per interaction
    ],
)
def test_flop_count_matches_pytorch_counter(variant, resolutions, kw):
    cfg = piip_config(variant, resolutions, **kw)
    model = PIIP(cfg)
    images = make_pyramid(torch.randn(1, 3, max(resolutions), max(resolutions)), cfg)
    # Exact: the analytic count walks the same matrix products the model runs (bilinear
    # sampling, normalisation and activations are in neither).
    assert backbone_flops(cfg)["total"] == pytest.approx(counted_macs(model, images), rel=1e-9)


def test_zero_gates_leave_each_branch_a_plain_vit():
    """Interaction gates start at zero: every branch computes what it computes alone."""
    cfg = piip_config("piip-tsb", [64, 96, 128], interactions=3)
    model = PIIP(cfg).eval()
    images = make_pyramid(torch.randn(2, 3, 128, 128), cfg)
    with torch.no_grad():
        xs, _ = model.forward_features(images)
        for i, (br, im) in enumerate(zip(model.branches, images)):
            x, cls = br.embed(im)
            x, _ = br.run_blocks(x, cls, 0, br.cfg.depth)
            torch.testing.assert_close(xs[i], x, rtol=0, atol=0)  # same ops, same order: identical
        for u in model.units[0]:
            torch.nn.init.constant_(u.into_a.attn_gate, 0.5)
        xs2, _ = model.forward_features(images)
    assert not torch.allclose(xs2[0], xs[0])  # once opened, the gate lets branch b in


def test_heads_and_merge_shapes_and_gradients():
    cfg = piip_config("piip-tsb", [64, 96, 128], interactions=2, num_classes=10, seg_classes=5, merge_dim=64)
    model = PIIP(cfg)
    out = model(make_pyramid(torch.randn(2, 3, 128, 128), cfg))
    assert out["logits"].shape == (2, 10) and out["seg"].shape == (2, 5, 8, 8)  # finest grid: 128/16
    (out["logits"].sum() + out["seg"].mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == [], no_grad


def test_deformable_attention_matches_direct_bilinear_sampling():
    torch.manual_seed(0)
    dim, heads, points, hq, hf = 16, 2, 3, 3, 5
    att = DeformableCrossAttention(dim, heads, points, ratio=1.0)
    with torch.no_grad():
        att.offsets.weight.normal_(0, 0.5)
    q, feat = torch.randn(1, hq * hq, dim), torch.randn(1, hf * hf, dim)
    got = att(q, hq, feat, hf)
    # Direct: sample value map at (x, y) in pixel units with bilinear weights, zero outside.
    value = att.value(feat)[0].view(hf, hf, heads, dim // heads)  # (y, x, h, dh)
    off = att.offsets(q)[0].view(hq * hq, heads, points, 2)
    w = att.weights(q)[0].view(hq * hq, heads, points).softmax(-1)
    out = torch.zeros(hq * hq, heads, dim // heads)
    for i in range(hq * hq):
        ry, rx = (i // hq + 0.5) / hq, (i % hq + 0.5) / hq
        for h in range(heads):
            for p in range(points):
                x = (rx + off[i, h, p, 0] / hf) * hf - 0.5  # continuous pixel coordinates
                y = (ry + off[i, h, p, 1] / hf) * hf - 0.5
                x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                acc = torch.zeros(dim // heads)
                for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                    if 0 <= yy < hf and 0 <= xx < hf:
                        acc = acc + (1 - abs(x - xx)) * (1 - abs(y - yy)) * value[yy, xx, h]
                out[i, h] += w[i, h, p] * acc
    want = att.out(out.reshape(1, hq * hq, dim))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # float32 sums in another order


def test_published_backbone_flops():
    """Within 5% of the paper's table (ViT baselines in the authors' layout: every third
    block global, eight of ViT-L's 24)."""
    published = {("vit-b", (1024,)): 463, ("vit-l", (1024,)): 1542, ("piip-tsb", (448, 896, 1568)): 287,
                 ("piip-tsb", (448, 896, 1120)): 243,
                 ("piip-sbl", (448, 896, 1344)): 1002}
    for (variant, res), gflops in published.items():
        got = backbone_flops(piip_config(variant, list(res)))["total"] / 1e9
        assert abs(got / gflops - 1) < 0.05, (variant, res, got, gflops)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="resolution 100 is not divisible by the patch size 16"):
        piip_config("piip-tsb", [64, 96, 100])
    with pytest.raises(ValueError, match="piip-tsb has 3 branches but 2 resolutions were given"):
        piip_config("piip-tsb", [64, 96])
    with pytest.raises(ValueError, match="variant 'piip-xyz' is unknown"):
        piip_config("piip-xyz", [64])
    with pytest.raises(ValueError, match="depth 12 is not a multiple of interactions=5"):
        piip_config("piip-tsb", [64, 96, 128], interactions=5)
    cfg = piip_config("piip-tsb", [64, 96, 128], interactions=2)
    with pytest.raises(ValueError, match=r"branch b expects 64x64 images, got \(96, 96\)"):
        PIIP(cfg).forward_features([torch.zeros(1, 3, 96, 96)] * 3)


def test_flops_command_prints_json():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "flops", "piip-tsb", "--resolutions",
                          "1568,896,448", "--json"], capture_output=True, text=True, timeout=120, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["variant"] == "piip-tsb" and got["resolutions"] == [1568, 896, 448]
    assert got["gflops"] == pytest.approx(backbone_flops(piip_config("piip-tsb", [448, 896, 1568]))["total"] / 1e9,
                                          abs=0.01)


def _single_process(cfg, state, images, labels, masks=None):
    from workloads.piip.parallel import segmentation_criterion

    model = PIIP(cfg)
    model.load_state_dict(state)
    xs, cls = model.forward_features(make_pyramid(images, cfg))
    if masks is None:
        logits = torch.stack([h(c[:, 0]) for h, c in zip(model.cls_heads, cls)]).mean(0)
        loss = torch.nn.functional.cross_entropy(logits, labels)
    else:
        loss = segmentation_criterion(model, xs, masks)
    loss.backward()
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("ranks_per_branch", [(1, 1, 1), (2, 1, 1)])
def test_branch_parallel_matches_single_process(gloo_world, ranks_per_branch, task):
    from tests import piip_cases

    torch.manual_seed(0)
    cfg = piip_config("piip-tsb", [32, 48, 64], interactions=3, num_classes=7, seg_classes=4, merge_dim=32)
    model = PIIP(cfg)
    with torch.no_grad():  # open the gates fully so the interactions weigh in the result
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(1.0)
            elif p.abs().sum() == 0:
                p.normal_(0, 0.1)
    state = model.state_dict()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([1, 3, 0, 6])
    masks = torch.randint(0, 4, (4, 64, 64)) if task == "segmentation" else None
    want_loss, want = _single_process(cfg, state, images, labels, masks)
    res = gloo_world(sum(ranks_per_branch)).run(piip_cases.branch_parallel_step, cfg, state, images, labels,
                                               list(ranks_per_branch), masks)
    # float32; only summation order differs (per-slice loss sums, gradient all-reduce).
    assert res[0][1] == pytest.approx(want_loss, rel=1e-5)
    got = {}
    for _, _, grads in res:
        for name, g in grads.items():
            assert name not in got or torch.allclose(got[name], g), name
            got[name] = g
    assert set(got) == set(want)  # every parameter that learns in one process learns on its group
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_branch_layout_must_match_the_world():
    from parallelism.dims import BranchLayout

    with pytest.raises(ValueError, match=r"ranks per branch \[2, 1, 1\] add up to 4, not the world size 3"):
        BranchLayout(ranks_per_branch=(2, 1, 1), world_size=3)
    with pytest.raises(ValueError, match="positive integers"):
        BranchLayout(ranks_per_branch=(1, 0, 2), world_size=3)


def test_layout_proposal_balances_flops():
    from workloads.piip.flops import branch_macs, propose_layout

    cfg = piip_config("piip-sbl", [448, 896, 1344])
    assert propose_layout(cfg, 3) == (1, 1, 1)
    layout = propose_layout(cfg, 16)
    assert sum(layout) == 16 and min(layout) >= 1
    # Per-rank work of the busiest group is within one rank's worth of the ideal split.
    per_rank = [branch_macs(b) / r for b, r in zip(cfg.branches, layout)]
    ideal = sum(branch_macs(b) for b in cfg.branches) / 16
    assert max(per_rank) < 1.6 * ideal, (layout, per_rank, ideal)
    with pytest.raises(ValueError, match="3 branches need at least 3 ranks"):
        propose_layout(cfg, 2)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_procedural_shapes_read_back_through_image_folders(tmp_path, where):
    from workloads.piip.data import SHAPES, ImageFolder, batch, write_shapes

    url = str(tmp_path / "shapes") if where == "local" else "memory://piip-shapes"
    counts = write_shapes(url, 12, size=48, seed=3)
    cls = ImageFolder(url + "/classification", "classification")
    seg = ImageFolder(url + "/segmentation", "segmentation")
    assert len(cls) == len(seg) == 12
    assert cls.classes == sorted(s for s in SHAPES if counts[s])
    assert sum(1 for _, label in cls.items if cls.classes[label] == "disc") == counts["disc"]
    ex = seg[0]
    # The mask marks the shape with 1 + class and the shape's pixels are the bright ones.
    ids = ex.mask.unique().tolist()
    assert ids[0] == 0 and len(ids) == 2
    bright = ex.image.mean(0) > 0.1
    assert (bright == (ex.mask > 0)).float().mean() > 0.97  # edges may differ by anti-aliasing
    imgs, labels, masks = batch([seg[i] for i in range(4)], 64)
    assert imgs.shape == (4, 3, 64, 64) and masks.shape == (4, 64, 64) and labels.tolist() == [-1] * 4


def test_image_folder_errors_name_the_file(tmp_path):
    from workloads.piip.data import DataError, ImageFolder

    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"a.png has no mask"):
        ImageFolder(str(tmp_path), "segmentation")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"image .*a.png cannot be read"):
        ImageFolder(str(tmp_path), "segmentation")[0]
    with pytest.raises(DataError, match="no images in the classification layout"):
        ImageFolder(str(tmp_path / "masks"), "classification")


@pytest.mark.parametrize("ranks_per_branch", [(1, 1, 1), (2, 1, 1)])
def test_branch_parallel_optimizer_step_matches_single_process(gloo_world, ranks_per_branch):
    """Per-group gradient reduction and global-norm clipping give the one-process update."""
    from tests import piip_cases
    from workloads.engine import TrainingConfig, build_engine

    torch.manual_seed(1)
    cfg = piip_config("piip-tiny", [32, 48, 64], num_classes=5)
    model = PIIP(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(1.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([1, 3, 0, 4])
    engine = build_engine(model, TrainingConfig(lr=1e-2, eps=1e-3, grad_clip=0.5, steps=10, sharding="none"))
    features = model.forward_features(make_pyramid(images, cfg))[1]
    logits = torch.stack([h(c[:, 0]) for h, c in zip(model.cls_heads, features)]).mean(0)
    engine.backward(torch.nn.functional.cross_entropy(logits, labels))
    engine.step()
    res = gloo_world(sum(ranks_per_branch)).run(piip_cases.branch_parallel_engine_step, cfg, state, images, labels,
                                               list(ranks_per_branch))
    assert engine.last_grad_norm > 0.5  # the clip is active, so the global norm matters
    assert all(r[0] == pytest.approx(engine.last_grad_norm, rel=1e-5) for r in res)
    got = {}
    for _, params in res:
        got.update(params)
    trained = {n for n, p in model.named_parameters() if not n.startswith(("merge.", "seg_head."))}
    assert set(got) >= trained
    for name in trained:  # eps=1e-3 keeps Adam linear in small gradients (see test_engine)
        torch.testing.assert_close(got[name], dict(model.named_parameters())[name].detach(), atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
