"""The paper's ablation tables as data (``tables/*.json``) and the trainer commands of their rows.

A table file holds ``name``, ``title``, ``source`` (where in the paper), ``metric`` (``top1``: fine-tuning
top-1 on the held-out split; ``cosine_distance``: Fig. 4's feature cosine distance of the row's final
weights), ``seeds`` (how many by default, per scale), ``notes``, optionally ``mini_set`` (config values
for every stage at the mini scale, e.g. a larger image for the mask-ratio sweep), ``figure`` and ``rows``.
A row holds ``id``, ``label``, ``parts`` (the paper's sub-tables it appears in), ``paper`` (the paper's
number, or null where the paper gives a figure or a word: then ``paper_note``), ``stages`` (default
``["pretrain", "finetune"]``; ``["finetune"]`` is a supervised run from random initialisation,
``["pretrain"]`` an encoder analysed as pre-trained), ``switches`` (config keys for every stage),
``pretrain`` / ``finetune`` (keys of that stage only), ``recipe`` (a stage's recipe at the full scale,
where the paper's row used another one) and ``mini_epochs_factor`` (a stage's epochs times this at the
mini scale, where the paper's row trained longer than the others).

A scale fixes what every row shares: the model, the two recipes, and how a command is launched. Rows
differ only by their switches, so every row of a table gets the same budget.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import config as C

STAGES = ("pretrain", "finetune")
METRICS = ("top1", "cosine_distance")
WEIGHTS_FILE = "checkpoint-last.safetensors"  # what the trainer writes (engine.WEIGHTS_FILE; engine loads torch)


@dataclass(frozen=True)
class Scale:
    """What every row of a table shares at one scale."""

    name: str
    model: str
    recipes: Mapping[str, str]  # stage -> recipe
    launcher: Optional[str]  # command prefix for ``-m convnextv2_hub.train``; None: this process
    description: str


SCALES: Dict[str, Scale] = {
    "mini": Scale("mini", "atto", {"pretrain": "mini_pretrain", "finetune": "mini_finetune"}, None,
                  "Atto on a 2-core CPU: the recipes mini_pretrain and mini_finetune, one process"),
    "full": Scale("full", "base", {"pretrain": "fcmae_pretrain", "finetune": "finetune_in1k"}, "torchrun --nproc_per_node gpu",
                  "the paper's recipe: ConvNeXt-Base, FCMAE 800 epochs (Table 8), fine-tuning 100 epochs (Table 11), torchrun"),
}


@dataclass(frozen=True)
class Row:
    id: str
    label: str
    parts: Tuple[str, ...]
    paper: Optional[float]
    paper_note: str
    stages: Tuple[str, ...]
    switches: Mapping[str, Any]
    stage_keys: Mapping[str, Mapping[str, Any]]  # stage -> keys of that stage only
    recipe: Mapping[str, str]  # stage -> recipe at the full scale
    mini_epochs_factor: Mapping[str, int]

    def keys(self, stage: str) -> Dict[str, Any]:
        """The row's config keys for ``stage``: its switches, then that stage's own keys."""
        return {**self.switches, **self.stage_keys.get(stage, {})}

    def switch_text(self) -> str:
        """``block=v1; pretrain: encoder_masking=dense; supervised`` (empty for the default model)."""
        parts = [_kv(self.switches)] if self.switches else []
        parts += [f"{s}: {_kv(self.stage_keys[s])}" for s in STAGES if self.stage_keys.get(s)]
        if self.stages == ("finetune",):
            parts.append("supervised from scratch")
        elif self.stages == ("pretrain",):
            parts.append("pre-trained encoder")
        return "; ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    source: str
    metric: str
    seeds: Mapping[str, int]
    notes: Tuple[str, ...]
    mini_set: Mapping[str, Any]
    figure: Mapping[str, Any]
    show_time: bool  # a column with each row's pre-training time (Table 1 compares decoders' cost)
    rows: Tuple[Row, ...]
    path: str

    def row(self, row_id: str) -> Row:
        for r in self.rows:
            if r.id == row_id:
                return r
        raise C.ConfigError(f"table {self.name} has no row {row_id!r}; its rows: {', '.join(r.id for r in self.rows)}")


@dataclass
class Stage:
    """One trainer command of one row and seed."""

    mode: str
    folder: Path
    argv: List[str]  # convnextv2-train arguments
    command: List[str]  # the full command line as launched
    settings: Dict[str, Any]  # what makes the stage this stage: model, recipe, --set values, start weights
    config: Dict[str, Any] = field(default_factory=dict)  # resolved


@dataclass
class RowPlan:
    row: Row
    seed: int
    folder: Path
    stages: List[Stage]


def _kv(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={set_value(v)}" for k, v in d.items())


def set_value(v: Any) -> str:
    """A value as ``--set`` parses it back (``C.parse_set``): JSON, except plain strings."""
    return v if isinstance(v, str) else json.dumps(v)


def list_tables() -> List[str]:
    folder = resources.files(__package__).joinpath("tables")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_table(name: str) -> Table:
    """A packaged table by name (``table2-grn``), its rows checked: known stages, known config keys."""
    res = resources.files(__package__).joinpath("tables", f"{name}.json")
    if not res.is_file():
        raise C.ConfigError(f"unknown table {name!r}; the tables: {', '.join(list_tables())}")
    raw = json.loads(res.read_text(encoding="utf-8"))
    where = f"table {name}"
    if raw.get("metric") not in METRICS:
        raise C.ConfigError(f"{where}: metric must be one of {METRICS}")
    rows = tuple(_row(r, where, raw["metric"]) for r in raw["rows"])
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise C.ConfigError(f"{where}: row ids repeat: {ids}")
    mini_set = {k: C.coerce(k, v, where) for k, v in raw.get("mini_set", {}).items()}
    return Table(name, raw["title"], raw["source"], raw["metric"], dict(raw.get("seeds", {})), tuple(raw.get("notes", ())),
                 mini_set, dict(raw.get("figure", {})), bool(raw.get("show_time", False)), rows, str(res))


def _row(raw: Mapping[str, Any], where: str, metric: str) -> Row:
    where = f"{where}, row {raw.get('id')!r}"
    stages = tuple(raw.get("stages", STAGES))
    if stages not in (STAGES, ("finetune",), ("pretrain",)):
        raise C.ConfigError(f"{where}: stages must be [pretrain, finetune], [finetune] or [pretrain], got {list(stages)}")
    stage_keys = {s: dict(raw.get(s, {})) for s in STAGES if raw.get(s)}
    for keys in [raw.get("switches", {})] + list(stage_keys.values()):
        for k, v in keys.items():
            C.coerce(k, v, where)  # an unknown key or a wrong type is an error now, not after hours of training
    if metric == "top1" and stages[-1] != "finetune":
        raise C.ConfigError(f"{where}: a top-1 table's rows must end with fine-tuning")
    for s in list(raw.get("recipe", {})) + list(raw.get("mini_epochs_factor", {})):
        if s not in stages:
            raise C.ConfigError(f"{where}: 'recipe' / 'mini_epochs_factor' name stage {s!r}, which the row does not run")
    return Row(raw["id"], raw["label"], tuple(raw.get("parts", ())), raw.get("paper"), raw.get("paper_note", ""), stages,
               dict(raw.get("switches", {})), stage_keys, dict(raw.get("recipe", {})), dict(raw.get("mini_epochs_factor", {})))


def parse_stage_sets(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["epochs=2", "pretrain.mask_ratio=0.75"]`` -> {stage: {key: value}}; a key without a stage
    prefix goes to both stages."""
    out: Dict[str, Dict[str, Any]] = {s: {} for s in STAGES}
    for item in items:
        key, sep, value = item.partition("=")
        stage, dot, bare = key.partition(".")
        targets = [stage] if dot else list(STAGES)
        if dot and stage not in STAGES:
            raise C.ConfigError(f"--set {item!r}: the prefix must be pretrain. or finetune., got {stage!r}")
        parsed = C.parse_set([f"{bare if dot else key}={value}" if sep else item])
        for s in targets:
            out[s].update(parsed)
    return out


def launch_prefix(scale: Scale, launcher: Optional[str]) -> Optional[List[str]]:
    """The command before ``-m convnextv2_hub.train``; None runs the trainer in this process."""
    text = launcher if launcher is not None else scale.launcher
    return shlex.split(text) if text else None


def budget_values(table: Table, scale: Scale, sets: Mapping[str, Mapping[str, Any]], mode: str) -> Dict[str, Any]:
    """The config values every row of ``table`` shares in stage ``mode`` on top of the scale's recipe: the
    table's ``mini_set`` at the mini scale, then the command line's ``--set``."""
    return {**(table.mini_set if scale.name == "mini" else {}), **sets.get(mode, {})}


def plan_row(table: Table, row: Row, scale: Scale, seed: int, data: str, output: Path,
             sets: Mapping[str, Mapping[str, Any]], launcher: Optional[List[str]]) -> RowPlan:
    """The trainer commands of ``row`` for ``seed``: one per stage, in ``output/runs/<row>/seed<seed>/<stage>``,
    each config resolved (and so checked) as the trainer will resolve it."""
    folder = output / "runs" / row.id / f"seed{seed}"
    stages: List[Stage] = []
    for mode in row.stages:
        recipe = row.recipe.get(mode, scale.recipes[mode]) if scale.name == "full" else scale.recipes[mode]
        values: Dict[str, Any] = {"seed": seed, **budget_values(table, scale, sets, mode), **row.keys(mode)}
        cfg, _ = C.resolve(mode, scale.model, recipe, values)
        factor = row.mini_epochs_factor.get(mode, 1) if scale.name == "mini" else 1
        if factor != 1:
            values["epochs"] = cfg["epochs"] * factor
            cfg, _ = C.resolve(mode, scale.model, recipe, values)
        stage_dir = folder / mode
        argv = [mode, "--model", scale.model, "--data", data, "--output", str(stage_dir), "--recipe", recipe, "--resume", "auto"]
        init = None
        if mode == "finetune" and "pretrain" in row.stages:
            init = str(folder / "pretrain" / WEIGHTS_FILE)
            argv += ["--init", init]
        elif mode == "finetune":
            argv += ["--init", "none"]  # the paper's supervised rows train from scratch (a fine-tune's default is FCMAE weights)
        for k, v in values.items():
            argv += ["--set", f"{k}={set_value(v)}"]
        command = (launcher + ["-m", "convnextv2_hub.train"] if launcher else ["convnextv2-train"]) + argv
        settings = {"model": scale.model, "recipe": recipe, "set": {k: v for k, v in values.items()},
                    "init": "pretrain stage" if init else None}
        stages.append(Stage(mode, stage_dir, argv, command, json.loads(json.dumps(settings)), cfg))
    return RowPlan(row, seed, folder, stages)


def budget_text(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """The budget every row shares, in words, from the resolved config of each stage."""
    parts = []
    for mode in STAGES:
        c = configs.get(mode)
        if c is None:
            continue
        batch = c["eff_batch_size"] or c["batch_size"] * (c["update_freq"] or 1)
        lr = c["lr"] if c["lr"] is not None else c["blr"] * batch / 256
        epochs = f"{c['epochs']} epoch" + ("s" if c["epochs"] != 1 else "")
        parts.append(f"{mode} {epochs} at {c['input_size']} px, batch {batch}, lr {lr:.3g}")
    return "; ".join(parts)
