"""``convnextv2-train reproduce``: run one of the paper's ablation tables, row by row and seed by seed.

Each row and seed is one pre-training -> fine-tuning pair (or one stage, see ``ablations``), run by the
trainer itself: in this process at the mini scale, through the launcher (torchrun) at the full scale.
Runs go to ``OUTPUT/runs/<row>/seed<k>/<stage>``; after every finished row ``results.json``,
``results.md`` and the table's figure are rewritten (``report``), so a table still running is readable.

Resuming is by folder: a stage that finished holds ``reproduce.json`` (what it ran, how long, its
evaluation) and is skipped, and its training state ``checkpoint-last.pt`` is removed (its weights stay);
any other stage runs with ``--resume auto``, which continues an interrupted run from its last checkpoint
and starts a missing one. A stage whose loss became NaN is recorded as
diverged, once, not retried (Table 16's X·N(X) is expected to). A folder that holds a stage run with
other settings (another budget, recipe or seed) is refused: mixing them would make a table of
different budgets. Seeds go in the outer loop, so every row has one seed before any has two.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..files import atomic_write_json
from . import ablations as A
from . import config as C
from . import report

MARKER = "reproduce.json"
STATE_FILE = "checkpoint-last.pt"  # the trainer's training state (engine.STATE_FILE)
COSINE_FILE = "cosine_distance.json"
ANALYSIS_IMAGES = 1000  # Fig. 4: 1,000 images of the validation set, round-robin over classes
BUILTIN_DATA = "digits"

# Runs a ``convnextv2-train pretrain|finetune`` argument list in this process, raising the trainer's errors.
TrainFn = Callable[[List[str]], Any]


class ReproduceError(ValueError):
    """The table cannot run as asked (data, output folder, rows); the message says what to change."""


@dataclass
class Options:
    table: str
    data: str
    output: Path
    scale: str = "mini"
    seeds: Optional[int] = None
    rows: Optional[Sequence[str]] = None
    sets: Sequence[str] = ()
    launcher: Optional[str] = None
    dry_run: bool = False


@dataclass
class Plan:
    """Everything a call needs, worked out before anything runs."""

    table: A.Table
    scale: A.Scale
    seeds: List[int]
    selected: List[str]  # row ids to run
    data: str
    data_text: str
    builtin_size: Optional[int]  # the image size of the built-in digits set; None for a user's folder
    plans: List[A.RowPlan]  # every row of the table, every seed (the unselected ones are only read)
    budget: str


def _data_path(opts: Options, size: int) -> Tuple[str, str, Optional[int]]:
    """(data folder, its description, the size to write it at): ``digits`` is the built-in set, written at
    the fine-tuning size into ``OUTPUT/data``; any other value is the user's folder, used as it is."""
    if opts.data != BUILTIN_DATA:
        return opts.data, opts.data, None
    folder = opts.output / "data" / f"digits-{size}px"
    return str(folder), f"scikit-learn digits at {size} px, 10 classes, 80/20 train/val split (--data digits)", size


def prepare(opts: Options) -> Plan:
    """The table, its rows and seeds, and every stage command, each config resolved (so checked)."""
    if opts.scale not in A.SCALES:
        raise C.ConfigError(f"--scale must be one of {list(A.SCALES)}, got {opts.scale!r}")
    table, scale = A.load_table(opts.table), A.SCALES[opts.scale]
    n = opts.seeds if opts.seeds is not None else table.seeds.get(scale.name, 1)
    if n < 1:
        raise C.ConfigError(f"--seeds must be at least 1, got {n}")
    selected = [table.row(r).id for r in opts.rows] if opts.rows else [r.id for r in table.rows]
    sets = A.parse_stage_sets(opts.sets)
    for stage_sets in sets.values():
        if "seed" in stage_sets:
            raise C.ConfigError("--set seed: the seeds are 0 .. --seeds - 1, one run each")
    launcher = A.launch_prefix(scale, opts.launcher)
    # The budget every row shares: the scale's recipes with the table's and the command line's values.
    configs = {m: C.resolve(m, scale.model, scale.recipes[m], A.budget_values(table, scale, sets, m))[0] for m in A.STAGES}
    data, data_text, builtin = _data_path(opts, configs["finetune"]["input_size"])
    seeds = list(range(n))
    plans = [A.plan_row(table, row, scale, s, data, opts.output, sets, launcher) for s in seeds for row in table.rows]
    return Plan(table, scale, seeds, selected, data, data_text, builtin, plans, A.budget_text(configs))


def print_plan(plan: Plan, out: Callable[[str], None] = print) -> None:
    """``--dry-run``: every command of the selected rows, in the order they would run."""
    t = plan.table
    out(f"# {t.name}: {t.title} ({t.source})")
    out(f"# scale {plan.scale.name}: {plan.scale.description}; {plan.budget}")
    out(f"# data: {plan.data_text}; seeds {', '.join(map(str, plan.seeds))}; rows {', '.join(plan.selected)}")
    for p in plan.plans:
        if p.row.id not in plan.selected:
            continue
        paper = "" if p.row.paper is None else f"{p.row.paper:g}"
        note = f" ({p.row.paper_note})" if p.row.paper_note else ""
        out(f"# seed {p.seed}, row {p.row.id}: {p.row.label} [{p.row.switch_text() or 'default'}]; paper {paper or '-'}{note}")
        for st in p.stages:
            out(shlex.join(st.command))


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def _read_marker(stage: A.Stage) -> Optional[Dict[str, Any]]:
    path = stage.folder / MARKER
    if not path.is_file():
        return None
    marker = json.loads(path.read_text(encoding="utf-8"))
    if marker.get("settings") != stage.settings:
        raise ReproduceError(
            f"{stage.folder} holds a {stage.mode} run with other settings ({json.dumps(marker.get('settings'))}) than "
            f"this call's ({json.dumps(stage.settings)}): a table mixes no budgets. Use another --output, or remove "
            f"that folder to run it again")
    return marker


def _run_stage(stage: A.Stage, train_fn: Optional[TrainFn]) -> Dict[str, Any]:
    """Run one stage (``--resume auto`` continues an interrupted one); its marker, written unless the
    launcher failed (then the next call tries again)."""
    stage.folder.mkdir(parents=True, exist_ok=True)
    status, message = "done", ""
    started = time.perf_counter()
    with open(stage.folder / "console.log", "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(stage.command)}\n")
        log.flush()
        if train_fn is None:
            rc = subprocess.run(stage.command, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                status, message = "failed", f"exit status {rc}; see {stage.folder / 'console.log'}"
        else:
            from .engine import NonFiniteLossError

            try:
                with contextlib.redirect_stdout(log):
                    train_fn(stage.argv)
            except NonFiniteLossError as e:
                status, message = "diverged", str(e)
    marker = {"status": status, "message": message, "settings": stage.settings, "command": shlex.join(stage.command),
              "seconds": time.perf_counter() - started}
    if status == "done" and stage.mode == "finetune":
        marker["eval"] = json.loads((stage.folder / "eval.json").read_text(encoding="utf-8"))
    if status != "failed":
        atomic_write_json(stage.folder / MARKER, marker)
    if status == "done":
        # The full training state (optimiser moments, RNG) is only needed to continue this stage, which is
        # finished: 2/3 of a row's disk. Its weights stay in checkpoint-last.safetensors.
        (stage.folder / STATE_FILE).unlink(missing_ok=True)
    return marker


def _cosine_distance(stage: A.Stage, data: str, label: str) -> Dict[str, Any]:
    """Fig. 4's measure for the weights a stage ended with (an FCMAE: its encoder), on the validation
    images; computed once and kept in the stage folder."""
    path = stage.folder / COSINE_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    import dataclasses

    import torch

    from ..analysis.measures import compute_cosine_distance
    from .data import eval_preprocessing, eval_transform, find_split
    from .models import load_trained_model

    val = find_split(data, "val")
    if val is None or not val.is_dir():
        raise ReproduceError(f"the cosine-distance analysis reads the images of {data}/val/ (an ImageFolder); there is none")
    model = load_trained_model(stage.folder)
    model = getattr(model, "encoder", model)
    c = stage.config
    transform = eval_transform(eval_preprocessing(stage.settings["model"], c["input_size"], c["crop_pct"], c["imagenet_default_mean_and_std"]))
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    res = compute_cosine_distance(model, val, num_images=ANALYSIS_IMAGES, transform=transform, batch_size=64,
                                  name=label, progress=False)
    out = dataclasses.asdict(res)
    atomic_write_json(path, out)
    return out


def _per_stage(curve: Dict[str, Any]) -> List[float]:
    """The mean distance of each network stage's blocks (block labels are "stage.block")."""
    groups: Dict[str, List[float]] = {}
    for label, d in zip(curve["layers"], curve["distance"]):
        groups.setdefault(label.split(".")[0], []).append(d)
    return [sum(v) / len(v) for v in groups.values()]


def _entry(plan: Plan, rp: A.RowPlan, markers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """A run of results.json from the markers of its stages: all of them, or those up to the first that did
    not finish (a diverged pre-training has no fine-tuning)."""
    seconds = {st.mode: m["seconds"] for st, m in zip(rp.stages, markers)}
    bad = next((m for m in markers if m["status"] != "done"), None)
    if bad is not None:
        return {"status": bad["status"], "message": bad["message"], "seconds": seconds}
    entry: Dict[str, Any] = {"status": "done", "seconds": seconds}
    if plan.table.metric == "top1":
        ev = markers[-1]["eval"]
        entry.update(value=ev["top1"], top5=ev.get("top5"), ema_value=(ev.get("ema") or {}).get("top1"))
    else:
        curve = _cosine_distance(rp.stages[-1], plan.data, rp.row.label)
        entry.update(value=sum(curve["distance"]) / len(curve["distance"]), per_stage=_per_stage(curve),
                     curve={k: curve[k] for k in ("layers", "modules", "channels", "distance", "num_images", "grn")})
    return entry


def _finished(plan: Plan, rp: A.RowPlan) -> Optional[Dict[str, Any]]:
    """The run of a row and seed as far as earlier calls got: its entry when every stage is finished (or
    one diverged), else None."""
    markers = []
    for st in rp.stages:
        m = _read_marker(st)
        if m is None:
            return None
        markers.append(m)
        if m["status"] != "done":
            break
    return _entry(plan, rp, markers)


def run_row(plan: Plan, rp: A.RowPlan, train_fn: Optional[TrainFn], say: Callable[[str], None]) -> Dict[str, Any]:
    """Run the stages of one row and seed that are not finished yet; the row's entry."""
    markers = []
    for st in rp.stages:
        m = _read_marker(st)
        if m is None:
            resumed = (st.folder / STATE_FILE).is_file()
            say(f"  {st.mode}: {'resuming' if resumed else 'running'} in {st.folder}")
            m = _run_stage(st, train_fn)
            what = f"top-1 {m['eval']['top1']:.2f}" if m.get("eval") else m["status"]
            say(f"  {st.mode}: {what} ({m['seconds']:.0f} s)" + (f": {m['message']}" if m["message"] else ""))
        else:
            say(f"  {st.mode}: finished earlier ({m['status']}), skipped")
        markers.append(m)
        if m["status"] != "done":
            break
    if markers[-1]["status"] == "failed":
        return {"status": "failed", "message": markers[-1]["message"]}
    return _entry(plan, rp, markers)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def _figure(plan: Plan, output: Path, rows: List[Dict[str, Any]], say: Callable[[str], None]) -> Optional[str]:
    """The table's figure from the rows so far (``figure.kind``: ``cosine_distance`` = Fig. 4's curves,
    mean over seeds; ``curve`` = the metric against a swept switch); its file name, or None."""
    kind = plan.table.figure.get("kind")
    done = [r for r in rows if r["n"]]
    if not kind or not done:
        return None
    try:
        import matplotlib  # noqa: F401  (only to say clearly what is missing)
    except ImportError:
        say("note: no figure: matplotlib is not installed (pip install matplotlib)")
        return None
    from ..analysis import figures

    name = f"{plan.table.name}.png"
    if kind == "cosine_distance":
        from ..analysis.measures import CosineDistanceResult

        curves = []
        for r in done:
            runs = [run["curve"] for run in r["runs"].values() if run.get("status") == "done"]
            mean = [sum(c["distance"][i] for c in runs) / len(runs) for i in range(len(runs[0]["distance"]))]
            first = runs[0]
            curves.append(CosineDistanceResult(f"{r['label']} ({len(runs)} seed{'s' * (len(runs) > 1)})", first["grn"],
                                               first["layers"], first["modules"], first["channels"], mean, first["num_images"]))
        figures.plot_cosine_distance(curves, output / name)
    else:
        key = plan.table.figure["x"]
        points = [(plan.table.row(r["id"]).keys("pretrain")[key], r["mean"], r["std"], r["n"]) for r in done]
        figures.plot_metric_curve(points, output / name, plan.table.figure.get("xlabel", key),
                                  report.METRIC_TEXT[plan.table.metric], title=plan.table.title,
                                  reference=plan.table.figure.get("reference"))
    return name


def build_results(plan: Plan, output: Path, entries: Dict[Tuple[str, int], Dict[str, Any]],
                  say: Callable[[str], None]) -> Dict[str, Any]:
    """results.json's content: every row of the table with its runs so far; the figure is redrawn."""
    rows = []
    for row in plan.table.rows:
        runs = {str(s): entries[(row.id, s)] for s in plan.seeds if (row.id, s) in entries}
        first = next(p for p in plan.plans if p.row.id == row.id)
        desc = {"id": row.id, "label": row.label, "parts": list(row.parts), "switches": row.switch_text(), "paper": row.paper,
                "paper_note": row.paper_note, "commands_seed0": [shlex.join(st.command) for st in first.stages]}
        rows.append(report.row_result(desc, runs))
    t = plan.table
    results = {
        "table": t.name, "title": t.title, "source": t.source, "metric": t.metric, "scale": plan.scale.name,
        "scale_text": plan.scale.description, "model": plan.scale.model, "budget": plan.budget, "data": plan.data_text,
        "seeds": plan.seeds, "notes": list(t.notes), "show_time": t.show_time, "rows": rows,
        "complete": all(r["n"] + r["diverged"] == len(plan.seeds) for r in rows),
    }
    results["figure"] = _figure(plan, output, rows, say)
    return results


def reproduce(opts: Options, train_fn: Optional[TrainFn], say: Callable[[str], None] = print) -> int:
    """Run (or with ``dry_run`` print) a table; 0 when every run finished (a diverged run is a result),
    1 when a launched command failed (run again to retry it)."""
    plan = prepare(opts)
    if opts.dry_run:
        print_plan(plan, say)
        return 0
    if plan.builtin_size is not None:
        from .digits import digits_folder

        digits_folder(Path(plan.data).parent, plan.builtin_size)
    from .data import find_split

    for split in ("train", "val"):
        if find_split(plan.data, split) is None:
            raise ReproduceError(f"{plan.data} has no {split}/ folder (or {split}.txt): the tables train on train/ "
                                 f"and report top-1 on the held-out val/")
    in_process = A.launch_prefix(plan.scale, opts.launcher) is None
    entries = {(p.row.id, p.seed): e for p in plan.plans if (e := _finished(plan, p)) is not None}
    report.write_results(opts.output, build_results(plan, opts.output, entries, say))
    todo = [p for p in plan.plans if p.row.id in plan.selected and (p.row.id, p.seed) not in entries]
    failed = 0
    for i, p in enumerate(todo, 1):
        say(f"[{plan.table.name} {i}/{len(todo)}] seed {p.seed}, row {p.row.id}: {p.row.label}")
        entry = run_row(plan, p, train_fn if in_process else None, say)
        failed += entry["status"] == "failed"
        if entry["status"] != "failed":
            entries[(p.row.id, p.seed)] = entry
        report.write_results(opts.output, build_results(plan, opts.output, entries, say))
    say(f"wrote {opts.output / 'results.md'} and results.json" + (f"; {failed} run(s) failed: run again to retry" if failed else ""))
    return 1 if failed else 0
