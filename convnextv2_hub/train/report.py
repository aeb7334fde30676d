"""The results of ``convnextv2-train reproduce``: per row of a table the paper's number beside ours (mean
and spread over seeds), as ``results.json`` and ``results.md``, and the table's figure where the paper
has one. Everything is rewritten, atomically, after every finished row, so a table that is still
running can be read at any time.

``render_markdown(results)`` is the only writer of the Markdown: ``results.md`` is its output, and a
README block between ``<!-- reproduce: PATH -->`` and ``<!-- /reproduce -->`` must be the same function
applied to the results.json at PATH (``readme_blocks`` finds them; a test checks them).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..files import PathLike, atomic_write, atomic_write_json

METRIC_TEXT = {
    "top1": "fine-tuning top-1 (%) on the held-out split",
    "cosine_distance": "feature cosine distance (mean over blocks; higher = more diverse)",
}
DIGITS = {"top1": 1, "cosine_distance": 3}
README_BLOCK = re.compile(r"^<!-- reproduce: (?P<path>\S+) -->\n(?P<body>.*?)^<!-- /reproduce -->", re.S | re.M)


def summarize(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, sample standard deviation (null for fewer than two values), min, max, count."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def row_result(row: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """A row of results.json: the row's description, its runs per seed and their summary."""
    done = [r["value"] for r in runs.values() if r.get("status") == "done" and r.get("value") is not None]
    out = dict(row, runs=dict(runs), **summarize(done))
    out["diverged"] = sum(1 for r in runs.values() if r.get("status") == "diverged")
    out["failed"] = sum(1 for r in runs.values() if r.get("status") == "failed")
    times = [r.get("seconds", {}).get("pretrain") for r in runs.values() if r.get("status") == "done"]
    times = [t for t in times if t is not None]
    out["pretrain_seconds"] = sum(times) / len(times) if times else None
    if runs and all("per_stage" in r for r in runs.values() if r.get("status") == "done") and done:
        stages = [r["per_stage"] for r in runs.values() if r.get("status") == "done"]
        out["per_stage"] = [sum(s[i] for s in stages) / len(stages) for i in range(len(stages[0]))]
    return out


def _num(x: Optional[float], digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ours(r: Mapping[str, Any], digits: int) -> str:
    if r["mean"] is None:
        return "–"
    return _num(r["mean"], digits) + (f" ± {_num(r['std'], digits)}" if r["std"] is not None else "")


def _seeds_cell(r: Mapping[str, Any], seeds: Sequence[int]) -> str:
    text = f"{r['n']}/{len(seeds)}"
    extra = [f"{r[k]} {k}" for k in ("diverged", "failed") if r[k]]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _per_seed(r: Mapping[str, Any], seeds: Sequence[int], digits: int) -> str:
    cells = []
    for s in seeds:
        run = r["runs"].get(str(s))
        if run is None:
            continue
        cells.append(_num(run.get("value"), digits) if run.get("status") == "done" else run.get("status", "?"))
    return ", ".join(cells) if cells else "–"


def _paper(r: Mapping[str, Any]) -> str:
    text = "" if r["paper"] is None else f"{r['paper']:.1f}"
    note = r.get("paper_note") or ""
    return f"{text} ({note})" if text and note else (text or note or "–")


def _table_lines(results: Mapping[str, Any]) -> List[str]:
    rows, seeds, metric = results["rows"], results["seeds"], results["metric"]
    digits = DIGITS[metric]
    has_parts = any(r.get("parts") for r in rows)
    stages = max((len(r.get("per_stage") or []) for r in rows), default=0)
    head = (["part"] if has_parts else []) + ["row", "switches", "paper", "ours (mean ± std)"]
    head += [f"stage {i + 1}" for i in range(stages)]
    head += (["pre-training s"] if results.get("show_time") else []) + ["seeds", "per seed"]
    align = {"paper", "ours (mean ± std)", "pre-training s", "seeds"} | {f"stage {i + 1}" for i in range(stages)}
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h in align else "---" for h in head) + "|"]
    for r in rows:
        cells = ([", ".join(r.get("parts") or [])] if has_parts else []) + [r["label"], r["switches"] or "(default)", _paper(r), _ours(r, digits)]
        per_stage = r.get("per_stage") or []
        cells += [_num(per_stage[i], digits) if i < len(per_stage) else "–" for i in range(stages)]
        if results.get("show_time"):
            cells.append(_num(r.get("pretrain_seconds"), 0))
        cells += [_seeds_cell(r, seeds), _per_seed(r, seeds, digits)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: the table's heading, its budget, the rows (paper beside ours), the notes, the figure."""
    seeds = results["seeds"]
    finished = sum(1 for r in results["rows"] for run in r["runs"].values() if run.get("status") in ("done", "diverged"))
    total = len(results["rows"]) * len(seeds)
    lines = [
        f"**{results['table']}**: {results['title']} ({results['source']}).",
        "",
        f"Scale `{results['scale']}`: {results['scale_text']}; {results['budget']}. Data: {results['data']}. "
        f"Seeds {', '.join(str(s) for s in seeds)}; {finished} of {total} runs finished.",
        f"Ours: {METRIC_TEXT[results['metric']]}, mean ± sample standard deviation over seeds.",
        "",
        *_table_lines(results),
        "",
    ]
    lines += [f"- {n}" for n in results.get("notes", [])]
    if results.get("figure"):
        lines += ["", f"Figure: `{results['figure']}`."]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_results(folder: PathLike, results: Mapping[str, Any]) -> Tuple[Path, Path]:
    """``results.json`` then ``results.md`` in ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "results.json", results)
    text = render_markdown(results).encode("utf-8")
    atomic_write(folder / "results.md", lambda f: f.write(text))
    return folder / "results.json", folder / "results.md"


def readme_blocks(text: str) -> List[Tuple[str, str]]:
    """(results.json path, block text) of every block from a line ``<!-- reproduce: PATH -->`` to a line
    ``<!-- /reproduce -->``."""
    return [(m["path"], m["body"]) for m in README_BLOCK.finditer(text)]
