"""Forward-only evaluation of long samples spread over a context-parallel group.

One sample (up to 1M tokens) is zigzag-sharded over all ranks of the group; the
answer is scored by teacher forcing: its log-likelihood under the model, and exact
match (the model's greedy choice equals the answer at every answer position, which is
what greedy decoding would produce). `accuracy_table` runs a set of samples under each
δ (V2PE stride) and reports accuracy per (context length, δ), the paper's central
analysis, including lengths beyond the training length.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallelism.dims import ParallelDims
from parallelism.zigzag import IGNORE_INDEX

from ..fields import FieldError
from ..files import FileCache, read_jsonl
from ..spec import Comparison, EvalResult, Evaluation, EvaluationByConfig
from ..stats import wilson_interval
from .data import EncodedSample, encode_sample
from .generate import ShardedSample
from .hf_checkpoint import load_pretrained, read_config
from .inputs import job_model_config, job_tokenizer
from .model import V2PEModel
from .synth import SynthConfig, write_dataset
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class SampleScore:
    sample_id: str
    tokens: int
    answer_tokens: int
    log_likelihood: float
    exact_match: bool
    visual: torch.Tensor | None = field(default=None, repr=False)  # for the next δ of the same sample
    # With argmax=True: the argmax token at each answer position (the answer's tokens
    # and its `<|im_end|>`), in sequence order, the same on every rank.
    chosen: list[int] | None = None


@torch.no_grad()
def score_sample(
    model: V2PEModel,
    sample: EncodedSample,
    *,
    tokenizer: Tokenizer,
    mode: str,
    stride: int | None = None,
    cp_group=None,
    hybrid: tuple | None = None,
    kernel: str = "auto",
    chunk: int = 4096,
    visual: torch.Tensor | None = None,
    argmax: bool = False,
) -> SampleScore:
    """Teacher-forced score of one sample's supervised (answer) tokens.

    hybrid: (a2a_group, ring_group) to lay the sample out for hybrid context
    parallelism over cp_group (see `forward_loss`); None: cp_group is one ring.
    visual: the sample's visual tokens from an earlier call (the result's `visual`):
    positions change with δ, the image encodings do not. argmax: also say which token
    the model ranks first at each answer position (the V2PE authors' MM-NIAH check)."""
    lay = ShardedSample(model, sample, tokenizer=tokenizer, mode=mode, stride=stride, cp_group=cp_group,
                        hybrid=hybrid)
    hidden, visual = lay.hidden(kernel, visual=visual)  # (S_local, C)
    device = lay.device
    targets = lay.local.targets[0].to(device)
    keep = (targets != IGNORE_INDEX).nonzero().flatten()
    loglik = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.float64, device=device)
    # + 1: 0 means "another rank's" in the sum below
    chosen = torch.zeros(lay.total if argmax else 0, dtype=torch.long, device=device)
    for i in range(0, keep.numel(), chunk):  # logits for answer tokens only, a chunk at a time
        idx = keep[i : i + chunk]
        logp = torch.log_softmax(model.decoder.lm_head(hidden[idx]), dim=-1)
        t = targets[idx]
        loglik += logp.gather(1, t[:, None]).sum().double()
        wrong += (logp.argmax(-1) != t).sum().double()
        if argmax:
            chosen[lay.index[idx.cpu()].to(device)] = logp.argmax(-1) + 1
    n = torch.tensor(float(keep.numel()), dtype=torch.float64, device=device)
    stats = torch.stack([loglik, wrong, n])
    if lay.group is not None:  # answer tokens may sit on any rank
        dist.all_reduce(stats, group=lay.group)
        if argmax:
            dist.all_reduce(chosen, group=lay.group)  # each position is held by exactly one rank
    loglik, wrong, n = stats.tolist()
    answer = (lay.batch.targets[0] != IGNORE_INDEX).nonzero().flatten()
    said = (chosen[answer.to(device)] - 1).tolist() if argmax else None
    return SampleScore(sample.sample_id, len(sample), int(n), loglik, wrong == 0 and n > 0, visual, said)


@dataclass
class AccuracyRow:
    tokens: int
    delta: str
    samples: int
    accuracy: float
    mean_log_likelihood: float
    low: float = 0.0  # 95% Wilson score interval of the accuracy
    high: float = 1.0


def accuracy_table(
    model: V2PEModel,
    samples: Iterable[EncodedSample],
    *,
    tokenizer: Tokenizer,
    strides: Sequence[int],
    cp_group=None,
    hybrid: tuple | None = None,
    kernel: str = "auto",
    replicas: tuple[int, int] = (0, 1),
) -> list[AccuracyRow]:
    """Accuracy per (sample length, δ = stride/256): rows by stride as given, then length
    ascending. `samples` is read once, one at a time (a generator holds one sample in
    memory, not all of them); each is scored under every δ, its images encoded once.

    replicas: (this replica's index, replica count) when several context-parallel groups
    share the samples: `samples` is then this replica's share (`share_of` picks it), and
    the scores are gathered over the default group, so every rank returns the same rows."""
    count = replicas[1]
    scores: dict[tuple[int, int], list[tuple[bool, float]]] = {}
    seen = []
    # Every rank walks the same cells: the job's first rank says each line, once.
    say = not dist.is_initialized() or dist.get_rank() == 0
    for s in samples:
        if len(s) not in seen and say:
            seen.append(len(s))
            log.info("evaluating %d-token samples under δ = %s", len(s), ", ".join(_delta_name(x) for x in strides))
        visual = None
        for stride in strides:
            score = score_sample(model, s, tokenizer=tokenizer, mode="v2pe_fix", stride=stride, cp_group=cp_group,
                                 hybrid=hybrid, kernel=kernel, visual=visual)
            visual = score.visual  # kept for this sample's next δ only
            scores.setdefault((len(s), stride), []).append((score.exact_match, score.log_likelihood))
    if count > 1:
        # Every rank of a context-parallel group holds its group's scores: take them once,
        # from the group's first rank.
        first = cp_group is None or dist.get_rank(cp_group) == 0
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, scores if first else None)
        scores = {}
        for part in filter(None, parts):
            for key, got in part.items():
                scores.setdefault(key, []).extend(got)
    lengths = sorted({n for n, _ in scores})
    rows = []
    for stride in strides:
        for n in lengths:
            group = scores[(n, stride)]
            correct = sum(ok for ok, _ in group)
            low, high = wilson_interval(correct, len(group))
            rows.append(AccuracyRow(tokens=n, delta=_delta_name(stride), samples=len(group),
                                    accuracy=correct / len(group),
                                    mean_log_likelihood=sum(ll for _, ll in group) / len(group), low=low, high=high))
            r = rows[-1]
            if say:
                log.info("evaluated %d tokens, δ = %s: accuracy %.3f over %d samples (%d of %d cells)", n,
                         r.delta, r.accuracy, r.samples, len(rows), len(strides) * len(lengths))
    return rows


def share_of(items: Iterable, replicas: tuple[int, int]) -> Iterator:
    """Item i goes to replica i mod count: the samples one replica scores."""
    index, count = replicas
    return (x for i, x in enumerate(items) if i % count == index)


def _delta_name(stride: int) -> str:
    from fractions import Fraction

    return str(Fraction(stride, 256))


def format_table(rows: Sequence[AccuracyRow]) -> str:
    lines = ["| tokens | δ | samples | accuracy | 95% interval | mean log-likelihood |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.tokens} | {r.delta} | {r.samples} | {r.accuracy:.3f} | {r.low:.2f}–{r.high:.2f} | "
              f"{r.mean_log_likelihood:.3f} |" for r in rows]
    return "\n".join(lines)


def metric_key(name: str, delta: str) -> str:
    """MLflow's key of a (quantity, δ) curve: `accuracy_delta_1_4` for δ = 1/4."""
    return f"{name}_delta_{delta.replace('/', '_')}"


def accuracy_figure(curves: dict[str, Sequence[dict]], title: str) -> bytes:
    """A PNG of accuracy against context length: one line per (label, δ), a colour per δ
    and a line style per label (e.g. the training position mode), each point with its
    95% interval. curves: {label: AccuracyRow dicts}."""
    from ..figures import png_bytes, pyplot

    plt = pyplot()

    styles = ["-", "--", ":", "-."]
    deltas = sorted({r["delta"] for rows in curves.values() for r in rows}, key=lambda d: -delta_value(d))
    colours = {d: plt.get_cmap("viridis")(i / max(1, len(deltas) - 1)) for i, d in enumerate(deltas)}
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for i, (label, rows) in enumerate(curves.items()):
        for d in deltas:
            pts = sorted((r for r in rows if r["delta"] == d), key=lambda r: r["tokens"])
            if not pts:
                continue
            x = [r["tokens"] for r in pts]
            y = [r["accuracy"] for r in pts]
            err = [[r["accuracy"] - r.get("low", r["accuracy"]) for r in pts],
                   [r.get("high", r["accuracy"]) - r["accuracy"] for r in pts]]
            ax.errorbar(x, y, yerr=err, color=colours[d], linestyle=styles[i % len(styles)], marker="o",
                        markersize=3, capsize=2, label=f"{label}, δ = {d}")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tokens"] for rows in curves.values() for r in rows})
    ax.set_xticks(ticks, [f"{t // 1024}K" if t % 1024 == 0 else str(t) for t in ticks])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return png_bytes(fig)


def delta_value(delta: str) -> float:
    """δ as a number, from its name ("1/4" -> 0.25)."""
    from fractions import Fraction

    return float(Fraction(delta))


# --- `longview eval` for V2PE (workloads.spec.Evaluation) -----------------------------------------


class NeedleEvaluation(Evaluation):
    """Accuracy per (context length, δ) on synthetic needle samples of the configured
    lengths (up to and beyond the training length). By default all workers form one
    context-parallel group (`cp_a2a` splits it for hybrid attention): each sample is
    spread over every rank; `evaluation.cp` smaller than the worker count splits them into
    groups that score different samples (no ring where the samples fit one worker)."""

    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        """Writes each length's evaluation set under <run>/data/eval-<n> once; {n: jsonl}.
        Tiles and token counts are those of the model evaluated and its tokenizer."""
        import fsspec

        mc, e = read_config(model_url), cfg.evaluation
        tokenizer = job_tokenizer(cfg, checkpoint=model_url, model_cfg=mc)
        paths = {}
        pool = e.image_pool
        for n in e.lengths:
            # named by what it holds: a changed evaluation section writes a new set
            url = (f"{run_root.rstrip('/')}/data/eval-{n}-{e.task}-{e.images_at(n)}img-{e.samples_per_length}"
                   + (f"-pool{pool}" if pool else ""))
            fs, root = fsspec.core.url_to_fs(url)
            if not fs.exists(f"{root}/data.jsonl"):
                write_dataset(url, SynthConfig(tokens=n, images=e.images_at(n), task=e.task, tile=mc.vision.image_size,
                                               tokens_per_tile=mc.tokens_per_tile, seed=10_000 + n, image_pool=pool),
                              e.samples_per_length, tokenizer)
            paths[str(n)] = f"{url}/data.jsonl"
        return paths

    def run(self, cfg, ctx, model_url: str, prepared: dict[str, str]):
        """Scores every sample under every δ; the same result on every rank."""
        model = load_pretrained(model_url).eval()
        tok = job_tokenizer(cfg, checkpoint=model_url, model_cfg=model.cfg)

        def samples(replicas: tuple[int, int]) -> Iterator[EncodedSample]:
            """This replica's samples, read and encoded one at a time (a 1M-token sample's
            tiles are GBs); the others' are never read."""
            images = FileCache()  # samples drawn from an image pool share their files
            for n, path in sorted(prepared.items(), key=lambda kv: int(kv[0])):
                loader = cfg.data.loader(model.cfg, max_tokens=int(n))
                base = loader.image_base(path)
                for line, rec in share_of(read_jsonl(path), replicas):
                    yield encode_sample(rec, tokenizer=tok, cfg=loader, base_dir=base,
                                        sample=f"{rec.get('id', '?')} ({path}:{line})", files=images)

        world = ctx.world_size
        cp = cfg.evaluation.cp or world
        if world % cp:
            raise ValueError(f"evaluation.cp: {cp} does not divide the {world} workers")
        groups = ParallelDims.infer(world_size=world, cp=cp, cp_a2a=cfg.parallelism.cp_a2a if cp > 1 else 1).build(
            cfg.parallelism.timeout_s)
        replicas = (groups.dp_rank, world // cp)
        rows = accuracy_table(model, samples(replicas), tokenizer=tok, strides=needle_strides(cfg),
                              cp_group=groups.cp_group if cp > 1 else None, hybrid=groups.hybrid if cp > 1 else None,
                              kernel=cfg.parallelism.kernel, replicas=replicas)
        curves: dict[str, dict[int, float]] = {}
        for r in rows:
            curves.setdefault(metric_key("accuracy", r.delta), {})[r.tokens] = r.accuracy
            curves.setdefault(metric_key("log_likelihood", r.delta), {})[r.tokens] = r.mean_log_likelihood
        mean = {"mean_accuracy": sum(r.accuracy for r in rows) / len(rows)}
        return EvalResult(table=format_table(rows), records=[r.__dict__ for r in rows], metrics=mean, curves=curves)

    def params(self, cfg) -> dict[str, str]:
        e = cfg.evaluation
        return {"eval.lengths": ",".join(map(str, e.lengths)),
                "eval.deltas": ",".join(_delta_name(s) for s in needle_strides(cfg)),
                "eval.samples_per_length": str(e.samples_per_length), "eval.task": e.task,
                "eval.images": ",".join(str(e.images_at(n)) for n in e.lengths),
                "trained.position_mode": trained_mode(cfg)}

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        return accuracy_figure({f"trained with {trained_mode(cfg)}": records},
                               f"{cfg.name}: accuracy by context length") if records else None

    def figure_name(self, cfg) -> str:
        return "accuracy_by_length.png"

    def comparison(self, cfg) -> Comparison:
        """V2PE's length-generalisation claim: the job as trained (its `data.position_mode`,
        V2PE's `v2pe_rnd`) against a baseline that differs only in plain positions."""
        mode = trained_mode(cfg)
        if mode == BASELINE:
            raise FieldError("data.position_mode", f"{BASELINE!r} is the baseline; train the job with v2pe_rnd")
        if not cfg.evaluation.lengths:
            raise FieldError("evaluation.lengths", "empty; the experiment evaluates at several lengths")
        e = cfg.evaluation
        return Comparison(
            name="length-generalisation",
            arms={m: {"data.position_mode": m} for m in (mode, BASELINE)},
            description=(f"Length generalisation: {cfg.name}-{mode} against {cfg.name}-{BASELINE}, trained at "
                         f"{cfg.data.synthetic.tokens} tokens for {cfg.training.steps} steps; evaluated at "
                         f"{', '.join(map(str, e.lengths))} tokens."),
            params={"train_tokens": str(cfg.data.synthetic.tokens), "eval.lengths": ",".join(map(str, e.lengths)),
                    "eval.samples_per_length": str(e.samples_per_length)})

    def compare(self, cfg, results: dict[str, dict]) -> tuple[str, bytes | None]:
        figure = accuracy_figure({f"trained with {m}": r["records"] for m, r in results.items()},
                                 f"trained at {cfg.data.synthetic.tokens} tokens: accuracy by context length")
        return joint_table(results, cfg.data.synthetic.tokens), figure


BASELINE = "default"  # the experiment's baseline position mode: δ = 1, plain positions


def needle_strides(cfg) -> list[int]:
    """The needle evaluation's strides: the configured ones, else δ = 1 and 1/4."""
    return cfg.evaluation.strides or [256, 64]


class V2PEEvaluation(EvaluationByConfig):
    """The benchmark `evaluation.benchmark` names: longview's needle task (`NeedleEvaluation`)
    or MM-NIAH (`mmniah_eval.MMNIAHEvaluation`)."""

    def pick(self, cfg) -> Evaluation:
        if cfg.evaluation.benchmark == "mm-niah":
            from .mmniah_eval import MMNIAHEvaluation

            return MMNIAHEvaluation()
        return NeedleEvaluation()


def trained_mode(cfg) -> str:
    """The position mode the job trains with (its config's, else its checkpoint's)."""
    return cfg.data.positions(job_model_config(cfg)).mode


def joint_table(results: dict[str, dict], train_tokens: int) -> str:
    """One row per (context length, δ), a column pair per training mode."""
    modes = list(results)
    rows = {(r["tokens"], r["delta"]): {} for res in results.values() for r in res["records"]}
    for mode, res in results.items():
        for r in res["records"]:
            rows[(r["tokens"], r["delta"])][mode] = r
    head = "| tokens | × train | δ | " + " | ".join(f"{m}: accuracy (95% interval)" for m in modes) + " |"
    lines = [head, "|" + "---|" * (3 + len(modes))]
    order = sorted(rows, key=lambda k: (k[0], -delta_value(k[1])))
    for tokens, delta in order:
        cells = []
        for m in modes:
            r = rows[(tokens, delta)].get(m)
            cells.append(f"{r['accuracy']:.2f} ({r['low']:.2f}–{r['high']:.2f})" if r else "-")
        lines.append(f"| {tokens} | {tokens / train_tokens:g} | {delta} | " + " | ".join(cells) + " |")
    n = {r["samples"] for res in results.values() for r in res["records"]}
    lines.append("")
    lines.append(f"Samples per cell: {', '.join(map(str, sorted(n)))}; intervals are 95% Wilson score intervals.")
    return "\n".join(lines)
