"""Report files: ``report.json``, ``report.md`` and the PNG plots, from the report dictionary.

The dictionary (built by :mod:`cloud_jax.cli.evaluate`) holds ``settings``, and ``rewardbench``
and/or ``best_of_n``, each with a ``by_k`` map from K (as a string) to its scores. Plots are drawn
on matplotlib ``Figure`` objects with the Agg canvas, so no global backend or pyplot state is
touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from cloud_jax import storage

log = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SECTIONS_PNG = "accuracy_by_section.png"
K_PNG = "accuracy_vs_k.png"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _ks(by_k: Mapping[str, Any]) -> List[str]:
    return sorted(by_k, key=int)


def _rewardbench_md(rb: Mapping[str, Any]) -> List[str]:
    ks = _ks(rb["by_k"])
    top = rb["by_k"][ks[-1]]
    out = [f"## Pairwise accuracy (RewardBench format), K = {ks[-1]}", "",
           f"{rb['num_rows']} pairs; accuracy in %; a tie scores {top['tie_credit']:g}. "
           "`weighted` is RewardBench's example-count weighting; `score` is the mean of the "
           "weighted sections.", ""]
    skipped, rejects = rb.get("rejected_rows", 0), rb.get("rejects_path")
    if skipped or rejects is not None:  # a lenient load: say how many rows it left out
        listed = f", listed in `{rejects}`" if rejects is not None else ""
        out += [f"{skipped} input rows were bad and skipped (`--lenient`){listed}; the numbers "
                "below leave them out." if skipped else
                "No input row was skipped (`--lenient`).", ""]
    rows = [[name, str(s["n"]), _pct(s["accuracy"]), _pct(s["weighted"]), str(s["ties"])]
            for name, s in top["sections"].items()]
    rows.append(["**all rows** (weighted: score)", str(top["all_rows"]["n"]), _pct(top["accuracy"]),
                 _pct(top["score"]), str(top["all_rows"]["ties"])])
    out += _table(["section", "pairs", "accuracy", "weighted", "ties"], rows)
    partial = [f"{name}: {', '.join(s['missing_subsets'])}" for name, s in top["sections"].items()
               if s.get("missing_subsets")]
    if partial:  # a weighted number over part of a section: say which subsets it lacks
        out += ["", "Subsets with no rows in the file, left out of their section's `weighted` "
                    "(as RewardBench leaves them out): " + "; ".join(partial) + "."]
    if top.get("missing_sections") and top.get("score_official") is not None:
        out += ["", f"Sections with no rows in the file: {', '.join(top['missing_sections'])}. "
                    f"`score` leaves them out; the rewardbench package scores them 0, which "
                    f"gives {_pct(top['score_official'])}."]
    if len(ks) > 1:
        sections = list(top["sections"])
        out += ["", "### Accuracy against K (self-consistency: mean reward of the first K "
                    "critiques)", ""]
        rows = [[k] + [_pct(rb["by_k"][k]["sections"][s]["accuracy"]) for s in sections]
                + [_pct(rb["by_k"][k]["accuracy"]), _pct(rb["by_k"][k]["score"]),
                   str(rb["by_k"][k]["all_rows"]["ties"])] for k in ks]
        out += _table(["K"] + sections + ["all rows", "score", "ties"], rows)
    if rb.get("truncated_fraction") is not None:
        out += ["", f"Critiques cut at the token budget: {100 * rb['truncated_fraction']:.1f}% "
                    "of samples."]
    out += ["", f"### Subsets, K = {ks[-1]}", ""]
    rows = [[name, s["section"], str(s["n"]), str(s["correct"]), str(s["ties"]), str(s["wrong"]),
             _pct(s["accuracy"])] for name, s in top["subsets"].items()]
    out += _table(["subset", "section", "pairs", "correct", "ties", "wrong", "accuracy"], rows)
    return out


def _best_of_n_md(bon: Mapping[str, Any]) -> List[str]:
    level = bon["confidence"]
    out = ["## Best-of-N", "",
           f"{bon['num_prompts']} prompts; baseline pick: `{bon['baseline']}`; "
           f"{100 * level:g}% intervals (win rate: percentile bootstrap, "
           f"{bon['bootstrap_resamples']} resamples, seed {bon['seed']}; oracle match: Wilson).",
           ""]
    rows = []
    for k in _ks(bon["by_k"]):
        m = bon["by_k"][k]
        b, o, q = m["against_baseline"], m["against_oracle"], m["mean_quality"]
        rows.append([k, f"{_pct(b['win_rate'])} [{_pct(b['ci'][0])}, {_pct(b['ci'][1])}]",
                     f"{b['wins']}/{b['ties']}/{b['losses']}",
                     f"{_pct(o['match_rate'])} [{_pct(o['ci'][0])}, {_pct(o['ci'][1])}]",
                     f"{o['mean_regret']:.4g}", f"{q['model']:.4g}", f"{q['baseline']:.4g}",
                     f"{q['oracle']:.4g}", f"{q['all_candidates']:.4g}"])
    out += _table(["K", "win rate vs baseline %", "W/T/L", "oracle match %", "mean regret",
                   "quality: model", "baseline", "oracle", "all candidates"], rows)
    if bon.get("truncated_fraction") is not None:
        out += ["", f"Critiques cut at the token budget: {100 * bon['truncated_fraction']:.1f}% "
                    "of samples."]
    return out


def markdown(report: Mapping[str, Any]) -> str:
    s = report["settings"]
    model = ("classic reward model (no critiques)" if s.get("classic") else
             f"critiques: K = {', '.join(map(str, s['num_samples']))}, temperature "
             f"{s['temperature']:g}, at most {s['max_critique_tokens']} tokens, seed {s['seed']}")
    # A checkpoint the command names; a Python caller's settings may name none.
    head = (f"checkpoint `{s['checkpoint']}`; {model}" if s.get("checkpoint") else
            model[0].upper() + model[1:])
    lines = ["# Evaluation", "", head, ""]
    if "rewardbench" in report:
        lines += _rewardbench_md(report["rewardbench"]) + [""]
    if "best_of_n" in report:
        lines += _best_of_n_md(report["best_of_n"]) + [""]
    return "\n".join(lines)


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_sections(rb: Mapping[str, Any], path: str) -> None:
    """Grouped bars: per-prompt and weighted accuracy of each section, at the largest K."""
    import numpy as np

    k = _ks(rb["by_k"])[-1]
    top = rb["by_k"][k]
    names = list(top["sections"]) + ["all rows"]
    plain = [top["sections"][s]["accuracy"] for s in top["sections"]] + [top["accuracy"]]
    weighted = [top["sections"][s]["weighted"] for s in top["sections"]] + [top["score"]]
    weighted = [math.nan if w is None else w for w in weighted]
    fig = _figure()
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - 0.2, [100 * v for v in plain], 0.4, label="per prompt")
    ax.bar(x + 0.2, [100 * v for v in weighted], 0.4, label="weighted (official) / score")
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Pairwise accuracy by section (K = {k})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.savefig(path)


def plot_accuracy_vs_k(report: Mapping[str, Any], path: str) -> None:
    """Accuracy against K: each section and all rows (pairwise), and the Best-of-N win rate."""
    fig = _figure()
    ax = fig.add_subplot()
    all_ks: set = set()
    if "rewardbench" in report:
        by_k = report["rewardbench"]["by_k"]
        ks = _ks(by_k)
        # One section alone would only repeat the all-rows line.
        sections = list(by_k[ks[-1]]["sections"])
        sections = sections if len(sections) > 1 else []
        all_ks.update(int(k) for k in ks)
        for s in sections:
            ax.plot([int(k) for k in ks], [100 * by_k[k]["sections"][s]["accuracy"] for k in ks],
                    marker="o", label=s)
        ax.plot([int(k) for k in ks], [100 * by_k[k]["accuracy"] for k in ks], marker="s",
                color="black", lw=2, label="all rows")
    if "best_of_n" in report:
        by_k = report["best_of_n"]["by_k"]
        ks = _ks(by_k)
        all_ks.update(int(k) for k in ks)
        ax.plot([int(k) for k in ks],
                [100 * by_k[k]["against_baseline"]["win_rate"] for k in ks], marker="^", ls=":",
                label="Best-of-N win rate")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_xlabel("K (critiques per response)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Accuracy against the number of critique samples")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.savefig(path)


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(report: Dict[str, Any], output_dir: str) -> Dict[str, str]:
    """Writes the markdown, the plots and then the JSON, which marks a finished report (a run
    stopped before it leaves none); returns {kind: path}. Without matplotlib (a requirement, but
    an environment may lack it) the plots are skipped with a warning: the numbers are all in the
    JSON and the markdown."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"json": os.path.join(output_dir, REPORT_JSON),
             "markdown": os.path.join(output_dir, REPORT_MD)}
    # Whole or absent (a temporary file, then a rename): a kill mid-write leaves no cut report.
    storage.write_text_atomic(paths["markdown"], markdown(report))
    if not _have_matplotlib():
        log.warning("matplotlib is not installed: %s and %s written, the PNG plots skipped "
                    "(pip install -r requirements.txt installs it)", REPORT_JSON, REPORT_MD)
    else:
        paths["accuracy_vs_k"] = os.path.join(output_dir, K_PNG)
        if "rewardbench" in report:
            paths["accuracy_by_section"] = os.path.join(output_dir, SECTIONS_PNG)
            plot_sections(report["rewardbench"], paths["accuracy_by_section"])
        plot_accuracy_vs_k(report, paths["accuracy_vs_k"])
    storage.write_text_atomic(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    return paths
