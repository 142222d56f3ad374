"""The study that decides the paper's claims on one arrangement (a target and its sources): LoRA and X-Cross at
every fraction of the target's training users, merge and ensemble, popularity and every source zero-shot, for each
training seed, all evaluated on the same users; then the paired differences against a reference and a verdict per
claim. Every run is an ordinary run directory, so an interrupted study continues where it stopped; every scored
method leaves its evidence beside the report (`xcross.evidence`), from which the report is rebuilt anywhere."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import evidence
from .data import domain_digest, load_domain
from .experiment import (
    eval_examples, evaluate_popularity, evaluate_run, evaluate_source, finished_results, prepare, run, source_config,
)
from .files import atomic_write, file_sha256
from .metrics import METRICS, paired_difference, per_user_metrics, summarise, verdict
from .reporting import MixedEvaluation, plot_curve, same_scored
from .rundir import RunDir
from .settings import TRAINING, RunConfig, UsageError, available_domains, settings_of
from .training import EvalResult, scored_digest

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
CURVE_METHODS = ("lora", "xcross")  # trained at every fraction
FULL_METHODS = ("merge", "ensemble")  # trained on every target user
METHODS = (*CURVE_METHODS, *FULL_METHODS)
MATCH_MARGIN = 0.02  # "matches LoRA": not worse by more than 2 Hit@1 points


@dataclass(frozen=True)
class Study:
    base: RunConfig  # target, sources, data, model and training settings shared by every run
    fractions: tuple[float, ...] = FRACTIONS
    seeds: tuple[int, ...] = (0,)
    reference: str = "lora@1"  # what every method is compared with, paired
    directory: str | None = None  # where the report and its evidence go (default <out>/<target>/study)
    methods: tuple[str, ...] = METHODS  # the trained methods of the study (X-Cross always among them)

    def check(self) -> None:
        """Refuse, before anything trains, what the report would refuse after: a reference that is not part of the
        study, fractions or seeds named twice, no fraction 1."""
        if len(set(self.fractions)) != len(self.fractions):
            raise UsageError(f"--fractions names a fraction twice ({','.join(f'{f:g}' for f in self.fractions)})")
        if len(set(self.seeds)) != len(self.seeds):
            raise UsageError(f"--seeds names a seed twice ({','.join(map(str, self.seeds))})")
        if 1.0 not in self.fractions:
            raise UsageError("--fractions must include 1 (the reference LoRA and X-Cross on every target user)")
        if unknown := [m for m in self.methods if m not in METHODS]:
            raise UsageError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods) or "xcross" not in self.methods:
            raise UsageError(f"--methods must name each method once and include xcross, which every claim is about "
                             f"(got {','.join(self.methods)})")
        known = ["popularity", *(f"source:{s}" for s in self.sources), *self.labels()]
        if self.reference not in known:
            raise UsageError(f"--reference {self.reference!r} is not part of the study; choose from {', '.join(known)}")

    @property
    def out(self) -> Path:
        return Path(self.directory) if self.directory else Path(self.base.out) / self.base.target / "study"

    @property
    def evidence(self) -> Path:
        return self.out / "evidence"

    @property
    def sources(self) -> tuple[str, ...]:
        """The source domains, filled in from the data where the config leaves them at their default (every other
        domain)."""
        if self.base.sources:
            return self.base.sources
        if not available_domains(self.base.data.data_dir):
            raise UsageError(f"name the sources with --sources: the data that would list them is not in "
                             f"{self.base.data.data_dir}")
        return prepare(self.base).sources

    def labels(self) -> list[str]:
        """Every trained method's label, in the report's order: the curve from all users down, then merge and
        ensemble."""
        curve = [f"{m}@{f:g}" for f in sorted(self.fractions, reverse=True) for m in CURVE_METHODS
                 if m in self.methods]
        return [*curve, *(m for m in FULL_METHODS if m in self.methods)]

    def scored(self) -> list[tuple[str, int | None, RunConfig | None]]:
        """(label, seed, the settings of the run it is) of everything the report scores, in the report's order:
        popularity (no seed, no run), each source zero-shot per seed (its source LoRA run), the trained runs."""
        base = replace(self.base, sources=self.sources)
        out = [("popularity", None, None)]
        for seed in self.seeds:
            seeded = base.with_values({"train.seed": seed})
            out += [(f"source:{s}", seed, source_config(seeded, s)) for s in base.sources]
        return out + [(label, config.train.seed, config) for label, config in self.runs()]

    def runs(self) -> list[tuple[str, RunConfig]]:
        """(label, config) of every trained run, in the order they are trained: per seed, first what the claims on
        all target users need (LoRA, X-Cross, merge, ensemble), then the smaller fractions, so that a study cut
        short by a session's end has decided what it could."""
        planned = []
        base = replace(self.base, sources=self.sources)
        for seed in self.seeds:
            seeded = base.with_values({"train.seed": seed})
            first = [(f"{m}@1", replace(seeded, method=m, fraction=1.0)) for m in CURVE_METHODS]
            first += [(m, replace(seeded, method=m, fraction=1.0)) for m in FULL_METHODS]
            planned += first
            planned += [(f"{m}@{f:g}", replace(seeded, method=m, fraction=f))
                        for f in sorted(self.fractions, reverse=True) if f != 1.0 for m in CURVE_METHODS]
        return [(label, config) for label, config in planned if config.method in self.methods]


def run_study(study: Study, progress: bool = True, report_only: bool = False) -> dict:
    """Train what neither the evidence nor the runs directory holds (a run interrupted before is resumed from its
    checkpoint), score everything on the same test users (writing each one's evidence), write the report; return
    it. `report_only` trains nothing: the report covers what is held so far, lists the missing, and a claim that
    needs one of them is "not yet measured"."""
    study.check()
    if not report_only:
        expected, base = expected_evaluation(study), _prepared(study)
        scored = {(label, seed): config for label, seed, config in study.scored()}
        for label, config in study.runs():
            seed = config.train.seed
            held = evidence.read(study.evidence, label, seed)
            if held is not None and held.holds(config, expected):
                continue
            config = prepare(config)
            if finished_results(config) is None:
                print(f"study: training {label} (seed {seed}) into {RunDir.of(config).path}")
                run(config, resume=True, progress=progress)
            # its evidence at once (and its seed's zero-shots once their adapters exist): what a machine lost
            # after this point does not take the run with it
            for (other, other_seed), other_config in scored.items():
                if other == label and other_seed == seed or (other.startswith("source:") and other_seed == seed):
                    _held_or_scored(study, other, other_seed, other_config, expected, base, progress,
                                    finished_only=True)
    results, missing, records = collect(study, progress, finished_only=report_only)
    report = build_report(study, results, missing, records)
    write_report(study, report)
    return report


def _prepared(study: Study):
    """The study's base settings checked against the data and model (what scoring needs), once, when first asked."""
    prepared: dict[str, RunConfig] = {}

    def base() -> RunConfig:
        if "base" not in prepared:
            prepared["base"] = prepare(study.base)
        return prepared["base"]
    return base


def expected_evaluation(study: Study) -> dict:
    """What every score of the study must have scored: the test users and candidates its settings draw (with the
    data here, their digest; without it, the settings that draw them)."""
    base = study.base
    expected = {"target": base.target, "eval_seed": base.data.eval_seed, "max_eval_users": base.data.max_eval_users,
                "num_candidates": base.data.num_candidates}
    domain_dir = Path(base.data.data_dir) / base.target
    if base.target in available_domains(base.data.data_dir):
        expected["data"] = domain_digest(domain_dir)
        expected["scored"] = scored_digest(eval_examples(load_domain(domain_dir), "test", base))
    return expected


def collect(study: Study, progress: bool = True, finished_only: bool = False
            ) -> tuple[dict[str, list[EvalResult]], list[str], dict[str, list[dict]]]:
    """label -> one test result per seed (one for popularity), every one on the same users and candidates in the
    same order, and the evidence record of each; and the labels left out because a seed's run (or source adapter)
    is neither in the evidence nor finished, which `finished_only` allows. What the evidence holds (the same run,
    scored on the same users) is read from it; the rest is scored and its evidence written."""
    expected = expected_evaluation(study)
    base = _prepared(study)
    found: dict[str, list] = {}
    records: dict[str, list] = {}
    for label, seed, config in study.scored():
        held = _held_or_scored(study, label, seed, config, expected, base, progress, finished_only)
        found.setdefault(label, []).append(held.result() if held else None)
        records.setdefault(label, []).append(held.record if held else None)
    out, missing = {}, []
    order = ["popularity", *(f"source:{s}" for s in study.sources), *study.labels()]
    for label, results in sorted(found.items(), key=lambda item: order.index(item[0])):
        if None in results:
            missing.append(label)
        else:
            out[label] = results
    try:
        same_scored({f"{label} #{i}": r for label, results in out.items() for i, r in enumerate(results)})
    except MixedEvaluation as err:
        raise RuntimeError(f"the study's scores are not paired: {err}") from None
    return out, missing, {label: records[label] for label in out}


def _held_or_scored(study: Study, label: str, seed: int | None, config: RunConfig | None, expected: dict, base,
                    progress: bool, finished_only: bool) -> evidence.Evidence | None:
    """The evidence of one scored method: as held, or scored now and written (`_score`)."""
    held = evidence.read(study.evidence, label, seed)
    if held is not None and held.holds(config, expected):
        return held
    return _score(study, label, seed, config, base, progress, finished_only)


def _score(study: Study, label: str, seed: int | None, config: RunConfig | None, base, progress: bool,
           finished_only: bool) -> evidence.Evidence | None:
    """Score one method of the study and write its evidence; None where it cannot be scored yet (`finished_only`:
    its run or source adapter has not finished)."""
    if label == "popularity":
        result = evaluate_popularity(base())[0]
        return evidence.write(study.evidence, label, None, result, {"method": "popularity"})
    prepared = prepare(replace(config, out=base().out))
    run_dir = RunDir.of(prepared)
    if label.startswith("source:"):
        if not run_dir.finished():
            if finished_only:
                return None
            raise UsageError(f"{label}: the source adapter {run_dir.best} has not finished")
        seeded = base().with_values({"train.seed": seed})
        source = label.split(":", 1)[1]
        partial = run_dir.file(f"zero-shot-{base().target}.partial.npz")
        result = evaluate_source(seeded, source, progress, partial)[0]
        return evidence.write(study.evidence, label, seed, result, _run_record(run_dir, scored_only=True))
    if finished_only and finished_results(prepared) is None:
        return None
    result = evaluate_run(base(), run_dir, progress)[0]
    return evidence.write(study.evidence, label, seed, result, _run_record(run_dir))


def _run_record(run_dir: RunDir, scored_only: bool = False) -> dict:
    """What a study's evidence keeps of a run: its settings, what it was built on (by content), its weights'
    digest, and (for a trained method) its parameters, timings and machine."""
    config, results = run_dir.config(), run_dir.results()
    inputs = run_dir.inputs()
    record = {"method": "source" if scored_only else config.method, "fraction": config.fraction,
              "settings": settings_of(config, (TRAINING,)),
              "inputs": {"base": inputs["base"], "data": inputs["data"],
                         "sources": [{"domain": s["domain"], "sha256": s["sha256"]} for s in inputs["sources"]]},
              "weights": file_sha256(run_dir.best), "machine": results.get("machine")}
    if not scored_only:
        training = results["training"]
        record.update({"parameters": {k: results["parameters"][k] for k in ("trainable", "target_lora_equivalent",
                                                                            "ratio_to_target_lora")},
                       "train_examples": training["train_examples"], "steps": training["steps"],
                       "best_step": training["best_step"],
                       "seconds": {"train": training["train_seconds"], "test": results["test_seconds"],
                                   "all": results["seconds"]}})
    return record


def _per_user(results: list[EvalResult]) -> dict[str, np.ndarray]:
    """Each metric per user, averaged over the seeds' runs (pairing is kept: the same users in the same order)."""
    per_seed = [per_user_metrics(r.scores, r.labels) for r in results]
    return {m: np.mean([p[m] for p in per_seed], axis=0) for m in METRICS}


def _crossing(fractions: list[float], values: list[float], level: float) -> float:
    """The smallest fraction where the piecewise-linear (in log fraction) curve first reaches `level`; inf when
    it never does within the measured range, the smallest fraction when it starts above."""
    if values[0] >= level:
        return fractions[0]
    for (f0, v0), (f1, v1) in zip(zip(fractions, values), zip(fractions[1:], values[1:])):
        if v1 >= level > v0:
            t = (level - v0) / (v1 - v0)
            return float(math.exp(math.log(f0) + t * (math.log(f1) - math.log(f0))))
    return math.inf


def data_efficiency(study: Study, per_user: dict[str, dict[str, np.ndarray]], at: float, bootstrap: int = 1000,
                    seed: int = 0) -> dict:
    """The fraction of target users LoRA needs to reach X-Cross's Hit@1 at fraction `at` (interpolated on LoRA's
    curve), with a 95% interval from resampling users (the same resample for every point of both curves). A
    fraction is +inf where LoRA stays below at every measured fraction (null in report.json)."""
    fractions = sorted(study.fractions)
    lora = np.stack([per_user[f"lora@{f:g}"]["hit@1"] for f in fractions])  # (F, N)
    target = per_user[f"xcross@{at:g}"]["hit@1"]
    estimate = _crossing(fractions, lora.mean(1).tolist(), float(target.mean()))
    rng = np.random.default_rng(seed)
    n = lora.shape[1]
    draws = []
    for idx in rng.integers(0, n, size=(bootstrap, n)):
        draws.append(_crossing(fractions, lora[:, idx].mean(1).tolist(), float(target[idx].mean())))
    # No interpolation between draws: a resample that never reaches the level is +inf ("more than the largest
    # fraction"), and an interval bound among those draws is +inf too, not inf - inf.
    low, high = np.percentile(draws, [2.5, 97.5], method="inverted_cdf")
    return {"xcross_fraction": at, "xcross_hit@1": float(target.mean()), "lora_fraction_needed": estimate,
            "low": float(low), "high": float(high), "never_reached_share": float(np.mean(np.isinf(draws))),
            "data_saving": 1 - at / estimate if math.isfinite(estimate) else 1.0}


def _paired(method: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Paired Hit@1 and MRR differences of one method's per-user metrics against another's."""
    return {m: paired_difference(method[m], reference[m], seed=0) for m in ("hit@1", "mrr")}


def build_report(study: Study, results: dict[str, list[EvalResult]], missing: list[str] = (),
                 records: dict[str, list[dict]] | None = None) -> dict:
    per_user = {label: _per_user(r) for label, r in results.items()}
    rows = []
    for label, res in results.items():
        summary = summarise(per_user[label], bootstrap=1000, seed=0)
        seed_means = [float(per_user_metrics(r.scores, r.labels)["hit@1"].mean()) for r in res]
        rows.append({"method": label, **{m: summary[m] for m in METRICS}, "seeds": len(res),
                     "hit@1_per_seed": seed_means, "hit@1_seed_sd": float(np.std(seed_means)),
                     "users": len(res[0].labels)})
    if study.reference in missing:
        raise UsageError(f"the reference {study.reference} has not finished yet: nothing to compare with; run the "
                         "study without --report-only to train it")
    if study.reference not in per_user:
        raise UsageError(f"reference {study.reference!r} is not part of the study ({', '.join(per_user)})")
    ref = per_user[study.reference]
    paired = []
    for label in per_user:
        if label != study.reference:
            paired.append({"method": label, "reference": study.reference, **_paired(per_user[label], ref)})
    # X-Cross against LoRA trained on the same users: the data-efficiency question fraction by fraction.
    same_fraction = [{"fraction": f, **_paired(per_user[f"xcross@{f:g}"], per_user[f"lora@{f:g}"])}
                     for f in sorted(study.fractions) if f"xcross@{f:g}" in per_user and f"lora@{f:g}" in per_user]
    claims = judge(study, per_user, list(missing))
    first = results["popularity"][0]
    base = study.base
    return {"target": base.target, "sources": list(study.sources), "fractions": list(study.fractions),
            "methods": list(study.methods), "seeds": list(study.seeds), "reference": study.reference,
            "test_users": rows[0]["users"],
            "candidates": first.scores.shape[1], "eval_seed": base.data.eval_seed, "scored": first.identity["scored"],
            "rows": rows, "paired": paired, "same_fraction": same_fraction, "claims": claims, "missing": list(missing),
            "parameters": _parameters(records or {}), "provenance": provenance(study, records or {})}


def _parameters(records: dict[str, list[dict]]) -> dict | None:
    if not records.get("xcross@1"):
        return None
    report = records["xcross@1"][0]["parameters"]
    return {"xcross_trainable": report["trainable"], "target_lora_equivalent": report["target_lora_equivalent"],
            "ratio": report["ratio_to_target_lora"]}


def provenance(study: Study, records: dict[str, list[dict]]) -> dict:
    """Where the evidence comes from: the machines, torch versions and dtypes that computed it, and per seed whether
    every run built on source adapters was built on the very adapters scored zero-shot (their sha256, recorded in
    the evidence: a source trained again elsewhere is another file, even where its metrics are the same)."""
    machines = sorted({json.dumps({k: (r.get("machine") or {}).get(k) for k in ("processor", "torch", "dtype")},
                                  sort_keys=True) for rs in records.values() for r in rs if r.get("machine")})
    seeds = {}
    for i, seed in enumerate(study.seeds):
        zero_shot = {label.split(":", 1)[1]: rs[i]["weights"] for label, rs in records.items()
                     if label.startswith("source:")}
        built = {label: [s["sha256"] for s in rs[i]["inputs"]["sources"]] for label, rs in records.items()
                 if not label.startswith(("source:", "popularity")) and rs[i]["inputs"]["sources"]}
        same = all(sha == zero_shot.get(d) for label, shas in built.items()
                   for d, sha in zip(study.sources, shas))
        seeds[str(seed)] = {"runs_built_on_the_zero_shot_adapters": same}
    return {"machines": [json.loads(m) for m in machines], "seeds": seeds}


NOT_MEASURED = "not yet measured"


def judge(study: Study, per_user: dict[str, dict[str, np.ndarray]], missing: list[str] = ()) -> list[dict]:
    """A verdict per claim of the paper, each with the paired evidence it rests on; a claim whose runs are among
    `missing` is "not yet measured", naming them."""
    match_claim = ("X-Cross matches a LoRA fine-tuned on the target (Hit@1 not lower by more than "
                   f"{MATCH_MARGIN:g})")
    data_claim = ("X-Cross needs 50-75% less target data than LoRA (LoRA needs >= 2x X-Cross's fraction to reach "
                  "its Hit@1)")
    compared = [m for m in FULL_METHODS if m in study.methods]
    named = ", ".join([*compared, "each source zero-shot"])
    baseline_claim = f"X-Cross beats the other cross-domain baselines ({named}) in Hit@1"
    at_fractions = [at for at in (0.1, 0.25) if at in study.fractions and "lora" in study.methods]

    def unmeasured(claim: str, needs: list[str]) -> dict | None:
        if lacking := [label for label in needs if label in missing]:
            return {"claim": claim, "evidence": {}, "verdict": NOT_MEASURED, "missing": lacking}
        return None

    claims = []
    if "lora" in study.methods:  # a study without LoRA judges X-Cross against the baselines only
        if not (claim := unmeasured(match_claim, ["xcross@1", "lora@1"])):
            match = paired_difference(per_user["xcross@1"]["hit@1"], per_user["lora@1"]["hit@1"], seed=0)
            claim = {"claim": match_claim, "evidence": {"xcross@1 - lora@1": match},
                     "verdict": verdict(match, -MATCH_MARGIN)}
        claims.append(claim)
    if at_fractions:
        needs = [*(f"lora@{f:g}" for f in study.fractions), *(f"xcross@{f:g}" for f in at_fractions)]
        claims.append(unmeasured(data_claim, needs) or _data_claim(study, per_user, data_claim, at_fractions))
    baselines = [*compared, *[f"source:{s}" for s in study.sources]]
    if claim := unmeasured(baseline_claim, ["xcross@1", *baselines]):
        claims.append(claim)
    else:
        xc = per_user["xcross@1"]["hit@1"]
        versus = {b: paired_difference(xc, per_user[b]["hit@1"], seed=0) for b in baselines}
        claims.append({"claim": baseline_claim, "evidence": {f"xcross@1 - {b}": d for b, d in versus.items()},
                       "verdict": _combine([verdict(d) for d in versus.values()])})
    return claims


def _data_claim(study: Study, per_user: dict[str, dict[str, np.ndarray]], claim: str,
                at_fractions: list[float]) -> dict:
    efficiency = {f"{at:g}": data_efficiency(study, per_user, at) for at in at_fractions}
    # "50-75% less data": LoRA needs at least twice the data X-Cross uses to reach the same Hit@1.
    verdicts = ["holds" if e["low"] >= 2 * float(at) else "does not hold" if e["high"] < 2 * float(at) else
                "undecided at this size" for at, e in efficiency.items()]
    return {"claim": claim, "evidence": efficiency, "verdict": _combine(verdicts)}


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    if any(v == "does not hold" for v in verdicts):
        return "does not hold"
    return "undecided at this size"


def _paired_row(name: str, paired: dict) -> str:
    h, m = paired["hit@1"], paired["mrr"]
    return (f"| {name} | {h['diff']:+.3f} [{h['low']:+.3f}, {h['high']:+.3f}] | {h['p']:.3g} | "
            f"{m['diff']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}] | {m['p']:.3g} |")


def format_markdown(report: dict) -> str:
    lines = [f"# Study: {', '.join(report['sources'])} -> {report['target']}", "",
             f"{report['test_users']} test users of {report['target']} (drawn with eval seed {report.get('eval_seed')}), "
             f"{report.get('candidates')} candidates each, the same for every method (scored "
             f"{(report.get('scored') or '?')[:12]}); "
             f"training seeds {report['seeds']}; means over seeds of per-user metrics, 95% bootstrap intervals over "
             "users.", ""]
    if report.get("missing"):
        lines += [f"**Partial report**: not finished yet: {', '.join(report['missing'])}. Run the study command "
                  "without --report-only to train them.", ""]
    lines += ["| method | Hit@1 | MRR | Hit@1 per seed | sd over seeds |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [f"{r[m]['mean']:.3f} [{r[m]['low']:.3f}, {r[m]['high']:.3f}]" for m in ("hit@1", "mrr")]
        spread = f"{r['hit@1_seed_sd']:.3f}" if r["seeds"] > 1 else "–"
        lines.append(f"| {r['method']} | {cells[0]} | {cells[1]} | "
                     f"{', '.join(f'{v:.3f}' for v in r['hit@1_per_seed'])} | {spread} |")
    lines += ["", f"Paired differences against {report['reference']} (same users; paired bootstrap 95% interval, "
              "sign-flip test p):", "", "| method | ΔHit@1 | p | ΔMRR | p |", "|---|---|---|---|---|"]
    for p in report["paired"]:
        lines.append(_paired_row(p["method"], p))
    if report.get("same_fraction"):
        lines += ["", "X-Cross against LoRA trained on the same fraction of the target users (paired, as above):", "",
                  "| fraction | ΔHit@1 | p | ΔMRR | p |", "|---|---|---|---|---|"]
        for p in report["same_fraction"]:
            lines.append(_paired_row(f"{p['fraction']:g}", p))
    if params := report["parameters"]:
        lines += ["", f"X-Cross trains {params['xcross_trainable']:,} parameters, {params['ratio']:.0%} of a target "
                  f"LoRA + head ({params['target_lora_equivalent']:,})."]
    lines += ["", "## Claims", ""]
    for c in report["claims"]:
        lines.append(f"- **{c['verdict']}**: {c['claim']}")
        if c.get("missing"):
            lines.append(f"  - waits for: {', '.join(c['missing'])}")
        for name, e in c["evidence"].items():
            if "diff" in e:
                lines.append(f"  - {name}: {e['diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}], p = {e['p']:.3g}")
            else:
                needed = [_fraction(e[k], max(report["fractions"])) for k in ("lora_fraction_needed", "low", "high")]
                lines.append(f"  - X-Cross at {name} of the users (Hit@1 {e['xcross_hit@1']:.3f}): LoRA needs "
                             f"{needed[0]} [{needed[1]}, {needed[2]}] of them "
                             f"(never within the measured range in {e['never_reached_share']:.0%} of resamples)")
    if origin := report.get("provenance"):
        lines += ["", "## Evidence", "", "One file per method and seed in `evidence/` (each user's outcome and the run's "
                  "identity); `xcross-study --report-only --study-dir <this directory>` rebuilds this report from "
                  "them alone. Computed on: " + "; ".join(
                      f"{m['processor']}, torch {m['torch']}, {m['dtype']}" for m in origin["machines"]) + "."]
        same = [seed for seed, s in origin["seeds"].items() if s["runs_built_on_the_zero_shot_adapters"]]
        other = [seed for seed in origin["seeds"] if seed not in same]
        lines.append(f"Every run built on source adapters was built on the adapters scored zero-shot: seeds "
                     f"{', '.join(same) or 'none'}" + (f"; not for seeds {', '.join(other)} (their sources were "
                                                         "trained again, see the evidence's sha256)" if other else "")
                     + ".")
    return "\n".join(lines) + "\n"


def _fraction(value: float, largest: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else f"> {largest:g}"


def _strict_json(value):
    """`value` with every non-finite float as None: JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


def write_report(study: Study, report: dict) -> None:
    """report.json, report.md, curve.png (Hit@1 against the fraction, with intervals) in the study directory."""
    atomic_write(study.out / "report.json", json.dumps(_strict_json(report), indent=2, allow_nan=False) + "\n")
    atomic_write(study.out / "report.md", format_markdown(report))
    rows = []
    for r in report["rows"]:
        method, _, fraction = r["method"].partition("@")
        rows.append({**r, "method": method, "fraction": float(fraction) if fraction else 1.0,
                     "baseline": not fraction, "trainable": method in FULL_METHODS})
    plot_curve(rows, study.out / "curve.png", report["target"])
