import pytest
import torch

from tests import v2pe_cases
from tests.v2pe_helpers import TILE, data_config, tiny_model
from workloads.v2pe.data import load_samples
from workloads.v2pe.evaluate import accuracy_table, format_table, score_sample
from workloads.v2pe.model import AttentionSpec
from workloads.v2pe.packing import pack
from workloads.v2pe.synth import SynthConfig, write_dataset
from workloads.v2pe.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def synth_samples(tmp_path, lengths=(384, 512), per_length=2):
    out = []
    for n in lengths:
        path = write_dataset(str(tmp_path / f"len{n}"), SynthConfig(tokens=n, images=3, task="marked", tile=TILE,
                                                                   tokens_per_tile=4, seed=n), per_length)
        out += load_samples(path, tokenizer=TOK, cfg=data_config(max_tokens=n))
    return out


@pytest.mark.parametrize("world_size,a2a", [(2, 1), (4, 1), (4, 2)])
def test_one_sample_over_the_group_scores_like_one_process(gloo_world, tmp_path, world_size, a2a):
    samples = synth_samples(tmp_path)
    model = tiny_model()
    want = [score_sample(model, s, tokenizer=TOK, mode="v2pe_fix", stride=64, argmax=True) for s in samples]
    got = gloo_world(world_size).run(v2pe_cases.cp_score, model.state_dict(), samples, 64, a2a)
    for rank_scores in got:  # every rank reports the same, all-reduced score
        for g, w in zip(rank_scores, want):
            assert g.answer_tokens == w.answer_tokens > 0
            # float32 model, float64 sums: ring vs plain attention differ by ~1e-6 per logit.
            assert g.log_likelihood == pytest.approx(w.log_likelihood, rel=1e-5, abs=1e-4)
            assert g.exact_match == w.exact_match
            # the argmax token at every answer position (MM-NIAH's teacher-forced check): the
            # inputs are fixed, so a near-tie flipping one would fail every run, not some
            assert g.chosen == w.chosen and len(g.chosen) == g.answer_tokens


def test_exact_match_means_greedy_agrees_everywhere(tmp_path):
    sample = synth_samples(tmp_path, lengths=(384,), per_length=1)[0]
    model = tiny_model()
    # Make the answer key equal to the model's own greedy choices, then spoil one.
    batch = pack([sample], tokenizer=TOK, tokens_per_tile=4, multiple=2, mode="v2pe_fix", stride=64)
    with torch.no_grad():
        h = model.forward_hidden(batch.input_ids, batch.positions, model.encode_images(batch.pixels),
                                 batch.visual_index, AttentionSpec(cu_seqlens=batch.cu_seqlens))[0]
        greedy = model.decoder.lm_head(h).argmax(-1)
    answer = (sample.targets != -100).nonzero().flatten()
    sample.targets[answer] = greedy[answer]
    assert score_sample(model, sample, tokenizer=TOK, mode="v2pe_fix", stride=64).exact_match
    sample.targets[answer[-1]] = (greedy[answer[-1]] + 1) % TOK.vocab_size
    assert not score_sample(model, sample, tokenizer=TOK, mode="v2pe_fix", stride=64).exact_match


def test_accuracy_table_has_a_row_per_length_and_delta(tmp_path):
    samples = synth_samples(tmp_path, lengths=(384, 512))
    rows = accuracy_table(tiny_model(), samples, tokenizer=TOK, strides=[256, 64])
    assert [(r.tokens, r.delta, r.samples) for r in rows] == [(384, "1", 2), (512, "1", 2), (384, "1/4", 2), (512, "1/4", 2)]
    assert all(0.0 <= r.accuracy <= 1.0 and r.mean_log_likelihood < 0 for r in rows)
    assert "| 384 | 1/4 | 2 |" in format_table(rows)
    # δ reaches the model: the same samples score differently under another stride.
    assert rows[0].mean_log_likelihood != pytest.approx(rows[2].mean_log_likelihood, rel=1e-6)


def test_wilson_interval_matches_the_formula_and_stays_in_range():
    from workloads.stats import wilson_interval

    # 50 of 100: p = 0.5, centre 0.5, half width 1.96 * sqrt(0.25/100 + 1.96²/40000) / (1 + 1.96²/100)
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 100)[0] == 0.0 and wilson_interval(100, 100)[1] == pytest.approx(1.0)
    assert wilson_interval(100, 100)[0] == pytest.approx(0.9630, abs=1e-4)  # all right is not certainty
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_experiment_table_and_figure_put_the_two_modes_side_by_side():
    import io

    from PIL import Image

    from orchestrator.config import load_config
    from orchestrator.experiment import arm_config
    from workloads.fields import FieldError

    cfg = load_config("configs/v2pe-length.yaml")
    evaluation = cfg.spec.evaluation()
    rec = lambda n, d, a: {"tokens": n, "delta": d, "samples": 100, "accuracy": a, "low": a - 0.05,  # noqa: E731
                           "high": min(1.0, a + 0.05), "mean_log_likelihood": -1.0}
    results = {"v2pe_rnd": {"records": [rec(512, "1", 1.0), rec(1024, "1/4", 0.9)]},
               "default": {"records": [rec(512, "1", 0.8), rec(1024, "1/4", 0.1)]}}
    table, png = evaluation.compare(cfg, results)
    assert "| 1024 | 2 | 1/4 | 0.90 (0.85–0.95) | 0.10 (0.05–0.15) |" in table
    assert "Samples per cell: 100" in table
    assert Image.open(io.BytesIO(png)).size[0] > 500
    comparison = evaluation.comparison(cfg)
    assert comparison.arms == {"v2pe_rnd": {"data.position_mode": "v2pe_rnd"},
                               "default": {"data.position_mode": "default"}}
    arm = arm_config(cfg, "default", comparison.arms["default"])  # only the name and the position mode differ
    assert (arm.name, arm.data.position_mode) == ("v2pe-length-default", "default")
    assert arm.training == cfg.training and arm.data.synthetic == cfg.data.synthetic
    assert cfg.evaluation.images_at(8192) == 256 and cfg.evaluation.images_at(512) == 16
    with pytest.raises(FieldError, match=r"data.position_mode: 'default' is the baseline"):
        evaluation.comparison(arm)


@pytest.mark.parametrize("world_size,cp", [(2, 1), (4, 2)])
def test_groups_that_share_the_samples_give_the_one_process_table(gloo_world, tmp_path, world_size, cp):
    """evaluation.cp < workers: each group scores its share of the samples (ring inside a
    group of 2), the scores are gathered, and every rank holds the single-process rows."""
    samples = synth_samples(tmp_path, per_length=3)
    model = tiny_model()
    want = accuracy_table(model, samples, tokenizer=TOK, strides=[256, 64])
    got = gloo_world(world_size).run(v2pe_cases.replicated_table, model.state_dict(), samples, [256, 64], cp)
    for rows in got:
        assert [(r.tokens, r.delta, r.samples, r.accuracy) for r in rows] == \
            [(r.tokens, r.delta, r.samples, r.accuracy) for r in want]
        # Sums over the same samples in another order; ring vs plain attention (cp 2) differ
        # by ~1e-6 per logit in float32.
        assert [r.mean_log_likelihood for r in rows] == pytest.approx([r.mean_log_likelihood for r in want],
                                                                     rel=1e-5, abs=1e-4)
