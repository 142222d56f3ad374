"""Reporting a comparison: the table printed (mean and 95% interval per metric), the same rows as JSON and CSV,
and the data-efficiency curve as a plot."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_write
from .metrics import METRICS
from .training import EvalResult


class MixedEvaluation(ValueError):
    """Scores of one table that were not all scored on the same users and candidates."""


def same_scored(results: dict[str, EvalResult]) -> None:
    """Refuse scores of different evaluations in one comparison: every one must have ranked the same candidates for
    the same users (their identity's "scored" digest), else their rows do not compare, paired or not."""
    digests = {name: r.identity.get("scored") for name, r in results.items()}
    if None in digests.values() or len(set(digests.values())) > 1:
        groups: dict = {}
        for name, r in results.items():
            groups.setdefault(r.identity.get("scored"), []).append(f"{name} ({len(r.labels)} users)")
        raise MixedEvaluation("scores of different test users or candidates in one table: "
                              + " | ".join(", ".join(names) for names in groups.values()))


def comparison_rows(entries: dict[str, tuple[EvalResult, dict]], seed: int = 0) -> list[dict]:
    """One row per method: each metric's mean and interval, the users and candidates scored, and what it trained.
    Every entry must have scored the same users and candidates (`same_scored`)."""
    same_scored({name: result for name, (result, _) in entries.items()})
    rows = []
    for name, (result, described) in entries.items():
        metrics = result.metrics(seed=seed)
        rows.append({"method": name, **{k: metrics[k] for k in METRICS}, "users": len(result.labels),
                     "candidates": result.scores.shape[1], "scored": result.identity["scored"], **described})
    return rows


def scored_on(rows: list[dict]) -> str:
    """What a table's rows were scored on, for its caption: "384 users, 20 candidates each (scored 1a2b3c4d5e6f)"."""
    r = rows[0]
    return f"{r['users']} users, {r['candidates']} candidates each (scored {r['scored'][:12]})"


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: each metric as mean [95% interval]."""
    header = f"{'method':<22}" + "".join(f"{m:>22}" for m in METRICS) + f"{'trainable':>12}{'train ex.':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(f"{r[m]['mean']:>8.3f} [{r[m]['low']:.3f},{r[m]['high']:.3f}]" for m in METRICS)
        lines.append(f"{r['method']:<22}{cells}{r['trainable']:>12,}{r['train_examples']:>10,}")
    return "\n".join(lines)


def write_rows(rows: list[dict], stem: Path) -> None:
    """`<stem>.json` and `<stem>.csv` (mean, low, high per metric), written atomically."""
    atomic_write(stem.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    columns = ["method", *[f"{m}_{part}" for m in METRICS for part in ("mean", "low", "high")],
               "users", "candidates", "scored", "trainable", "train_examples"]
    extra = sorted({k for r in rows for k in r} - set(columns) - set(METRICS))
    lines = [",".join(columns + extra)]
    for r in rows:
        flat = {**r, **{f"{m}_{p}": r[m][p] for m in METRICS for p in ("mean", "low", "high")}}
        lines.append(",".join(_csv_cell(flat.get(c, "")) for c in columns + extra))
    atomic_write(stem.with_suffix(".csv"), "\n".join(lines) + "\n")


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return f'"{text}"' if "," in text else text


def plot_curve(rows: list[dict], path: Path, target: str) -> bool:
    """Hit@1 (with 95% intervals) against the fraction of target training users; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))
    curves = sorted({r["method"] for r in rows if not r.get("baseline")})
    for k, method in enumerate(curves):  # baselines: lines, below
        pts = sorted((r["fraction"], r["hit@1"]) for r in rows if r["method"] == method)
        x = [p[0] for p in pts]
        y = [p[1]["mean"] for p in pts]
        low, high = [p[1]["low"] for p in pts], [p[1]["high"] for p in pts]
        (line,) = ax.plot(x, y, marker="o", label=method)
        ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
        # also as bars, set a little apart per method: a band needs two fractions, a study still running may have one
        dodge = 1.025 ** (k - (len(curves) - 1) / 2)
        below, above = [m - lo for m, lo in zip(y, low)], [hi - m for m, hi in zip(y, high)]
        ax.errorbar([v * dodge for v in x], y, yerr=[below, above], fmt="none", ecolor=line.get_color(), capsize=3,
                    linewidth=1)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for i, r in enumerate(r for r in rows if r.get("baseline")):  # in the legend: labels of close lines collide
        ax.axhline(r["hit@1"]["mean"], linestyle=styles[i % len(styles)], linewidth=1.2, color=f"C{i + 2}",
                   label=f"{r['method']} (all users)" if r.get("trainable") else r["method"])
    fractions = sorted({r["fraction"] for r in rows if not r.get("baseline")})
    ax.set_xscale("log")
    if len(fractions) == 1:  # log autoscale around one point would spread the bars' small offsets across the axes
        ax.set_xlim(fractions[0] / 1.5, fractions[0] * 1.5)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of target training users")
    ax.set_ylabel("test Hit@1 (95% CI)")
    ax.set_title(f"data efficiency on {target}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True
