"""The pipeline's results for people: ``report.md`` (markdown) and the terminal summary."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from cloud_jax.data.schema import PreferenceRow
from cloud_jax.experiments.cloud_vs_classic.diagnostics import oracle_critique


def _pct(x: Optional[float]) -> str:
    """0.123 -> "12.3%"; None (not measured) -> "n/a"."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def markdown_report(results: Dict[str, Any], records: List[dict], rows: Sequence[PreferenceRow],
                    num_examples: int) -> str:
    """What ``report.md`` holds: the accuracy table, the diagnostics, the stage times and the
    first ``num_examples`` rows' greedy critiques (``records``: the greedy arm's critiques.jsonl)
    beside the oracle's."""
    c, k = results["classic"], results["cloud"]
    d = results["diagnostics"]
    gap = k["accuracy"] - c["accuracy"]
    arms = results.get("num_arm_train_rows", results["num_train_rows"])
    trained = {name: ((results.get("stages", {}).get(name) or {}).get("data") or {})
               .get("train", {}).get("pairs") for name in ("cloud", "classic")}
    dropped = ""
    if trained["cloud"] is not None and trained["classic"] is not None \
            and trained["cloud"] != trained["classic"]:
        # The cloud stage skips rows whose self-critique is unusable (empty): say so.
        dropped = (f"; trained on: cloud {trained['cloud']}, classic {trained['classic']} "
                   f"(rows whose self-critique is unusable are left out of cloud)")
    lines = ["# CLoud vs classic: pipeline results", "",
             f"Train pairs: {results['num_train_rows']} (cloud and classic: {arms}{dropped}). "
             f"Held-out pairs: {results['num_eval_rows']}. Pairwise accuracy (a tie counts as "
             "wrong):", "",
             "| model | accuracy |", "|---|---|",
             f"| classic reward model | {_pct(c['accuracy'])} |",
             f"| CLoud, greedy critique (K = 1) | {_pct(k['accuracy'])} |"]
    for kk, a in k["self_consistency"].items():
        lines.append(f"| CLoud, K = {kk} sampled critiques (T = {k['temperature']}) | {_pct(a)} |")
    lines += [f"| CLoud given the oracle critiques (the reward head's ceiling) | "
              f"{_pct(d['cloud_accuracy_with_oracle_critiques'])} |", "",
              f"CLoud (greedy) minus classic: **{100 * gap:+.1f} points**.", "",
              "## Diagnostics", "",
              "| critiques | verdict agrees with the oracle | no verdict | pairs judged right | "
              "word for word the oracle's | truncated |", "|---|---|---|---|---|---|"]
    for name in ("sft_self_critique_train", "critiques_greedy", "critiques_sampled"):
        if name not in d:
            continue
        x = d[name]
        lines.append(f"| {name} | {_pct(x.get('agreement'))} | {_pct(x.get('no_verdict'))} | "
                     f"{_pct(x.get('pairs_judged_right'))} | "
                     f"{_pct(x.get('exact_match_with_oracle'))} | "
                     f"{_pct(x.get('truncated_fraction'))} |")
    timed = (results.get("timing") or {}).get("stages") or {
        n: {"seconds": s, "ran": "this_run"} for n, s in results["seconds"].items()
        if n != "total"}
    stages = [f"{n} {_seconds(t['seconds'])}" + (" (reused from an earlier run: its time then)"
                                                  if t["ran"] == "earlier_run" else "")
              for n, t in timed.items()]
    lines += ["", "Stage times (s): " + ", ".join(stages) + "; " + _totals(results), "",
              "## Sample critiques (greedy)", ""]
    for rec, row in list(zip(records, rows))[:num_examples]:
        lines += [f"### {row.id} ({rec['outcome']})", "", f"- prompt: `{row.prompt}`"]
        for side in ("chosen", "rejected"):
            lines += [f"- {side}: `{getattr(row, side)}`, reward {rec[side + '_reward']:+.3f}",
                      f"  - model:  `{rec[side + '_critiques'][0]}`",
                      f"  - oracle: `{oracle_critique(row, side)}`"]
        lines.append("")
    return "\n".join(lines) + "\n"


def summary_table(results: Dict[str, Any]) -> str:
    """The accuracies and the headline diagnostics as plain text, for the terminal."""
    c, k = results["classic"], results["cloud"]
    lines = [f"{'model':<44}accuracy", f"{'classic':<44}{_pct(c['accuracy'])}",
             f"{'CLoud, greedy critique (K=1)':<44}{_pct(k['accuracy'])}"]
    temperature = k["temperature"]
    lines += [f"{f'CLoud, K={kk} sampled (T={temperature})':<44}{_pct(a)}"
              for kk, a in k["self_consistency"].items()]
    d = results["diagnostics"]
    lines += [f"{'CLoud given oracle critiques (ceiling)':<44}"
              f"{_pct(d['cloud_accuracy_with_oracle_critiques'])}",
              f"CLoud - classic: {100 * results['cloud_minus_classic']:+.1f} points; "
              f"greedy critiques reach the oracle's verdict "
              f"{_pct(d['critiques_greedy']['agreement'])} of the time; "
              + _totals(results, unit=" s")]
    return "\n".join(lines)


def _seconds(s: Optional[float]) -> str:
    return "unknown" if s is None else f"{s:.0f}"


def _totals(results: Dict[str, Any], unit: str = "") -> str:
    """"total 12 s" for a run that ran every stage; a rerun that reused stages says this run's
    total and the total across runs (the reused stages' earlier seconds added)."""
    timing = results.get("timing") or {}
    total = f"total {results['seconds']['total']:.0f}{unit}"
    if not results.get("reused_stages"):
        return total
    return (f"{total} this run, {_seconds(timing.get('total_across_runs'))}{unit} across runs "
            f"(with the reused stages)")
