"""What a trained run learnt, as plots beside it (<run>/inspect/*.png) and a short summary.md: the integrators'
coefficients per block and stream pair, their growth over training, the stream weights, the loss and validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import collate, load_domain, pack
from .experiment import eval_examples, locate_sources, prompt_builder
from .files import atomic_write
from .methods import get_method
from .recommender import Recommender
from .runlog import read_records
from .rundir import RunDir, source_inputs
from .settings import RunConfig, UsageError
from .training import length_multiple
from .weights import load_tensors

PLOT_HINT = "matplotlib is not installed (pip install matplotlib, or the extra: pip install \"xcross-rec[plot]\")"


@dataclass
class Findings:
    """Everything one inspection found, read from the run's files (and, for the coefficient map, its model)."""

    run: Path
    config: RunConfig
    results: dict | None
    loss: list[dict]  # log.jsonl's training records: step, loss, (integrators)
    valid: list[dict]  # its validation records: step, valid {metric: mean}
    streams: list[str]  # the name of each stream (its source domain); one unnamed stream for lora/head/merge
    stream_weights: np.ndarray | None  # (n,) from best.safetensors, for methods that train w
    coefficients: dict[str, np.ndarray] = field(default_factory=dict)  # "z1", "z2": (L, P)
    coefficient_users: int = 0
    missing: list[str] = field(default_factory=list)  # what a method or a run does not have, and why

    @property
    def pairs(self) -> list[str]:
        """The ordered stream pairs of the integrators' coefficients, in their order: "m ← m'" (m takes from m')."""
        n = len(self.streams)
        return [f"{self.streams[m]} ← {self.streams[k]}" for m in range(n) for k in range(n) if k != m]


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's log.jsonl (a torn line, which a killed write leaves, is
    left out)."""
    records, _ = read_records(path)
    return [r for r in records if "loss" in r], [r for r in records if "valid" in r]


@torch.no_grad()
def coefficient_map(rec: Recommender, examples, builder) -> dict[str, np.ndarray]:
    """Mean |z¹| and |z²| per block and ordered stream pair over every real token of `examples` (their stored
    candidates after their history), from the model's own integrators: {"z1": (L, P), "z2": (L, P)}."""
    model, pad = rec.model, builder.tokenizer.pad_id or 0
    sums, tokens = 0, 0
    for start in range(0, len(examples), rec.batch_size):
        chunk = examples[start:start + rec.batch_size]
        packed = [pack(builder.prefix(e.history), [builder.candidate(c) for c in e.candidates]) for e in chunk]
        batch = collate(packed, pad, multiple=length_multiple(rec.device)).to(rec.device)
        valid = batch.token_mask()  # (B, T)
        sums = sums + torch.stack([z[valid].abs().float().sum(0) for z in model(batch).coefficients]).cpu()  # (L, 2P)
        tokens += int(valid.sum())
    pairs = sums.shape[1] // 2
    return {"z1": (sums[:, :pairs] / tokens).numpy(), "z2": (sums[:, pairs:] / tokens).numpy()}


def collect(run_dir: str | Path, users: int = 8, device="cpu", data_dir: str | Path | None = None) -> Findings:
    """Read a run's log, results and trained weights; with integrators, run the best model on the first `users`
    validation users of the run's own evaluation subsample for the coefficient map (its data from `data_dir`, by
    default the run's own)."""
    run = RunDir.load(run_dir)
    config = run.config()
    if run.file("inputs.json").is_file():  # what it was built on must still be there: else it is not this run
        run.check_inputs({"sources": source_inputs(locate_sources(run, config))}, "inspecting it")
    results = run.results() if run.finished() else None
    loss, valid = read_log(run.file("log.jsonl"))
    method = config.method
    multi = get_method(method).streams_per_source
    found = Findings(run.path, config, results, loss, valid, list(config.sources) if multi else [method], None)
    if not loss and not valid:
        found.missing.append(f"no training log: {run.file('log.jsonl')} is missing or empty")
    if not run.best.is_file():
        found.missing.append(f"no best.safetensors in {run.path}: the run has not validated yet")
        return found
    try:
        best, _ = load_tensors(run.best)
    except Exception as err:  # noqa: BLE001 - a cut or foreign file: safetensors' own error types too
        raise UsageError(f"{run.best} cannot be read ({type(err).__name__}); train the run again: xcross-train "
                         f"--config {run.file('config.json')} --replace") from None
    if "stream_weights" in best:
        found.stream_weights = best["stream_weights"].float().numpy()
    else:
        found.missing.append(f"stream weights: method {method} has one stream, so no weights w to pool streams")
    if not any(k.startswith("integrators.") for k in best):
        why = "its streams are never mixed (z ≡ 0)" if method == "ensemble" else "it has one stream, nothing to mix"
        found.missing.append(f"integrators: method {method} has none ({why}): no coefficient heatmap, no growth "
                             "plot")
        return found
    try:
        rec = Recommender.from_run(run.path, device)
        domain = load_domain(Path(data_dir or config.data.data_dir) / config.target)
    except (UsageError, FileNotFoundError) as err:
        found.missing.append(f"coefficient heatmap: its model or validation users could not be read ({err}); "
                             "give the data with --data-dir")
        return found
    examples = eval_examples(domain, "valid", config)[:users]
    found.coefficients = coefficient_map(rec, examples, prompt_builder(config, domain))
    found.coefficient_users = len(examples)
    if not any("integrators" in r for r in loss):
        found.missing.append("integrator growth: log.jsonl has no integrator statistics")
    return found


# -- the plots -------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


def plot_training(found: Findings, path: Path, plt) -> Path:
    """Training loss (left) and validation metrics (right) against the step; the selected step marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([r["step"] for r in found.loss], [r["loss"] for r in found.loss], marker=".")
    left.set_xlabel("step")
    left.set_ylabel("training loss (listwise cross-entropy)")
    left.ticklabel_format(axis="y", useOffset=False)
    for metric in (found.valid[-1]["valid"] if found.valid else {}):
        steps, values = [r["step"] for r in found.valid], [r["valid"][metric] for r in found.valid]
        (line,) = right.plot(steps, values, marker="o", label=metric)
        if len(found.valid) <= 3:  # a run validated once (one epoch) shows points, not curves: give their values
            for x, y in zip(steps, values):
                right.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(6, 0), fontsize=7,
                               color=line.get_color(), va="center")
    best = (found.results or {}).get("training", {}).get("best_step")
    if best is not None and best >= 0:
        right.axvline(best, color="grey", linestyle=":", label=f"selected (step {best})")
    right.set_xlabel("step")
    right.set_ylabel(f"validation ({len(found.valid)} validation{'s' if len(found.valid) != 1 else ''})")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if found.valid:
        right.legend(fontsize=8)
    fig.suptitle(f"{found.config.method} on {found.config.target}: loss and validation ({found.run.name})")
    return _save(fig, path, plt)


def plot_coefficients(found: Findings, path: Path, plt) -> Path:
    """Heatmaps of the mean |z| per block (rows) and ordered stream pair (columns), one panel per coefficient."""
    names = list(found.coefficients)
    layers = found.coefficients[names[0]].shape[0]
    top = max(float(v.max()) for v in found.coefficients.values()) or 1.0  # one colour scale: z¹ and z² compare
    fig, axes = plt.subplots(1, len(names), figsize=(1.2 + 2.6 * len(names) + 0.35 * len(found.pairs) * len(names),
                                                     1.6 + 0.32 * layers), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = found.coefficients[name]
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_xticks(range(len(found.pairs)), found.pairs, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=7)
        ax.set_ylabel("block")
        ax.set_title(f"mean |{name.replace('z1', 'z¹').replace('z2', 'z²')}|")
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.5 * top else "black")
        fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
    fig.suptitle(f"integrator coefficients of the best checkpoint, per block and stream pair m ← m' (m takes from "
                 f"m'):\nmean |z| over all tokens of {found.coefficient_users} validation users of "
                 f"{found.config.target}", fontsize=9)
    return _save(fig, path, plt)


def plot_growth(found: Findings, path: Path, plt) -> Path:
    """Mean |z¹| and |z²| of every block against the training step (log.jsonl), with the largest |z| of any block."""
    records = [r for r in found.loss if "integrators" in r]
    steps = [r["step"] for r in records]
    layers = len(records[0]["integrators"])
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, layers))
    depth = plt.cm.ScalarMappable(plt.Normalize(-0.5, layers - 0.5), plt.get_cmap("viridis", layers))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, z in zip(axes, ("z1", "z2")):
        for layer in range(layers):
            ax.plot(steps, [r["integrators"][layer][f"{z}_mean"] for r in records], color=colours[layer])
        ax.plot(steps, [max(b[f"{z}_max"] for b in r["integrators"]) for r in records], color="black",
                linestyle="--", label="largest |z| of any block")
        ax.set_xlabel("step")
        ax.set_ylabel(f"|{z.replace('z1', 'z¹').replace('z2', 'z²')}|")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
        bar = fig.colorbar(depth, ax=ax, label="block", ticks=range(0, layers, max(1, layers // 6)))
        bar.ax.tick_params(labelsize=7)
    fig.suptitle("integrator coefficients during training (log.jsonl): mean |z| per block over the logged batch's "
                 "tokens (colour: block depth)", fontsize=9)
    return _save(fig, path, plt)


def plot_stream_weights(found: Findings, path: Path, plt) -> Path:
    """The pooling weights w of the streams (best checkpoint), against their initial value 1/n."""
    w = found.stream_weights
    start = 1 / len(w)
    # How far each weight moved from 1/n: drawn from 0, the weights themselves (all near 1/n) look identical.
    fig, ax = plt.subplots(figsize=(1.8 + 0.9 * len(w), 3.2))
    bars = ax.bar(range(len(w)), w - start, color=[f"C{i}" for i in range(len(w))])
    ax.bar_label(bars, [f"w = {v:.4f}" for v in w], fontsize=8)
    ax.axhline(0, color="grey", linestyle="--", label=f"initial w = 1/n = {start:.4g}")
    ax.set_xticks(range(len(w)), found.streams)
    ax.set_ylabel("w − 1/n (change from the start)")
    top = max(float(abs(w - start).max()), 1e-6) * 1.6
    ax.set_ylim(-top, top)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_title(f"stream weights of {found.config.method} on {found.config.target}", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path, plt)


# -- the summary -----------------------------------------------------------------------------------------------------


def summary(found: Findings, written: list[Path]) -> str:
    """A short markdown account of what `collect` found and which plots show it."""
    c, res = found.config, found.results or {}
    lines = [f"# {c.method} on {c.target}: inspection", "", f"Run `{found.run}`"
             + (f", sources {', '.join(c.sources)}" if get_method(c.method).reads_sources else "") + "."]
    training = res.get("training", {})
    if training:
        lines.append(f"{training['steps']} steps on {training['train_examples']} training examples; best validation "
                     f"MRR {training['best_valid']['mrr']:.3f} at step {training['best_step']}.")
    if res.get("test"):
        lines.append(f"Test ({res['test_users']} users): " + ", ".join(f"{k} {v['mean']:.3f}"
                                                                       for k, v in res["test"].items()) + ".")
    if found.loss:
        lines.append(f"Training loss {found.loss[0]['loss']:.3f} at step {found.loss[0]['step']} -> "
                     f"{found.loss[-1]['loss']:.3f} at step {found.loss[-1]['step']}.")
    if found.coefficients:
        lines += ["", f"## Integrator coefficients (best checkpoint, {found.coefficient_users} validation users)", "",
                  "| block | " + " | ".join(f"mean \\|{n}\\|" for n in found.coefficients) + " | largest pair |",
                  "|---|" + "---|" * (len(found.coefficients) + 1)]
        first = next(iter(found.coefficients.values()))
        for layer in range(first.shape[0]):
            both = sum(v[layer] for v in found.coefficients.values())
            lines.append(f"| {layer} | " + " | ".join(f"{v[layer].mean():.4f}" for v in found.coefficients.values())
                         + f" | {found.pairs[int(both.argmax())]} |")
        for name, values in found.coefficients.items():
            layer, pair = np.unravel_index(values.argmax(), values.shape)
            lines.append(f"\nLargest mean |{name}|: {values.max():.4f}, block {layer}, {found.pairs[pair]}.")
    growth = [r for r in found.loss if "integrators" in r]
    if growth:
        largest = [max(max(b["z1_max"], b["z2_max"]) for b in r["integrators"]) for r in growth]
        lines += ["", f"During training the largest |z| of any block went from {largest[0]:.4f} (step "
                      f"{growth[0]['step']}) to {largest[-1]:.4f} (step {growth[-1]['step']})."]
    if found.stream_weights is not None:
        lines += ["", "## Stream weights", "", "| stream | w |", "|---|---|"]
        lines += [f"| {s} | {w:.6f} |" for s, w in zip(found.streams, found.stream_weights)]
        lines.append(f"\n(initial value 1/n = {1 / len(found.stream_weights):.4f})")
    lines += ["", "## Plots", ""]
    lines += [f"- `{p.name}`" for p in written if p.suffix == ".png"] or ["- none"]
    if found.missing:
        lines += ["", "## Not available", ""] + [f"- {m}" for m in found.missing]
    return "\n".join(lines) + "\n"


def inspect_run(run_dir: str | Path, out_dir: str | Path | None = None, users: int = 8, device="cpu",
                data_dir: str | Path | None = None) -> list[Path]:
    """Write the plots of `collect(run_dir)` that the run's method has (training.png always; coefficients.png
    and growth.png with integrators; stream_weights.png with several streams) and summary.md into `out_dir`
    (default <run>/inspect/); returns the paths written, summary.md last. Without matplotlib only summary.md."""
    found = collect(run_dir, users, device, data_dir)
    out = Path(out_dir) if out_dir is not None else found.run / "inspect"
    written = []
    plt = _pyplot()
    if plt is None:
        found.missing.append(f"plots: {PLOT_HINT}")
    else:
        if found.loss or found.valid:
            written.append(plot_training(found, out / "training.png", plt))
        if found.coefficients:
            written.append(plot_coefficients(found, out / "coefficients.png", plt))
        if any("integrators" in r for r in found.loss):
            written.append(plot_growth(found, out / "growth.png", plt))
        if found.stream_weights is not None:
            written.append(plot_stream_weights(found, out / "stream_weights.png", plt))
    written.append(atomic_write(out / "summary.md", summary(found, written)))
    return written
