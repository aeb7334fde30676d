"""The model card (``README.md``) of a model pushed to the Hugging Face Hub: YAML front matter that the Hub
reads (licence, base model, tags, metrics as ``model-index``) written by huggingface_hub's ``ModelCardData``,
then what a reader needs: where the weights started, recipe and overrides, data set, evaluation, files, and
how to load them with this package, timm and transformers.

The licence is decided here (``choose_license``): weights trained from the released ConvNeXt V2 weights keep
their CC BY-NC 4.0 (non-commercial); weights trained from random initialisation get what the uploader names,
by default this package's own licence (MIT); where the start is not recorded, CC BY-NC 4.0 is assumed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

RELEASED_LICENSE = "cc-by-nc-4.0"  # every released ConvNeXt V2 weight (the manifest's "license")
OWN_WEIGHTS_LICENSE = "mit"  # this package's code licence: the default for weights owing nothing to the releases
LIBRARY_NAME = "convnextv2-hub"


@dataclass
class CardInfo:
    """What the card says beyond the model itself (which ``render_card`` reads from the repo's ``config.json``).

    ``from_release``: True when training started from released weights, False when from random weights,
    None when not recorded. ``started_from``: that start in words (a checkpoint name, a file, "random weights").
    ``metrics``: the ``eval.json`` entries (top1, top5, loss, num_images, epoch). ``training``: facts of the run
    (epochs, lr, effective batch, train images). ``overrides``: config keys whose value differs from the recipe's.
    """

    repo_id: str
    license: str
    license_note: str
    from_release: Optional[bool] = None
    started_from: str = "not recorded"
    base_hub_id: Optional[str] = None
    recipe: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)
    dataset: Optional[str] = None
    metrics: Dict[str, Any] = field(default_factory=dict)


def choose_license(from_release: Optional[bool], requested: Optional[str], started_from: str = "") -> Tuple[str, str]:
    """(licence id, why) for weights that started ``from_release`` (True / False / None: not recorded).

    Weights trained from the released weights stay CC BY-NC 4.0: another ``requested`` licence is refused
    (ValueError), since the non-commercial term travels with them.
    """
    requested = requested.strip().lower() if requested else None
    if from_release:
        if requested and requested != RELEASED_LICENSE:
            raise ValueError(
                f"training started from the released ConvNeXt V2 weights ({started_from}), which are CC BY-NC 4.0 "
                f"(non-commercial): weights trained from them cannot be published as {requested!r}. Omit --license "
                "(they keep cc-by-nc-4.0), or train from random weights or your own FCMAE pre-training")
        return RELEASED_LICENSE, (f"inherited: training started from the released weights {started_from}, which "
                                  "the authors publish under CC BY-NC 4.0 (non-commercial use only)")
    if requested:
        return requested, "chosen by the uploader" + ("" if from_release is False else
                                                      "; where training started is not recorded")
    if from_release is False:
        return OWN_WEIGHTS_LICENSE, ("trained from random weights: this package's own licence (MIT) by default; "
                                     "`convnextv2 push --license ID` chooses another")
    return RELEASED_LICENSE, ("where training started is not recorded, so the released weights' CC BY-NC 4.0 is "
                              "assumed; `convnextv2 push --license ID` states otherwise for weights that owe "
                              "nothing to them")


def card_data(config: Mapping[str, Any], info: CardInfo) -> Any:
    """The front matter as huggingface_hub's ``ModelCardData``."""
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    dataset = info.dataset or "image folder"
    for key, metric in (("top1", "accuracy"), ("top5", "top_5_accuracy")):
        if isinstance(info.metrics.get(key), (int, float)):
            results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                      dataset_name=dataset, metric_type=metric, metric_name=f"{key} (%)",
                                      metric_value=round(float(info.metrics[key]), 4)))
    tags = ["convnextv2", "image-classification", LIBRARY_NAME]
    tags += [f for f in ("timm", "transformers") if _peer(config, "timm" if f == "timm" else "hf")]
    return ModelCardData(
        license=info.license,
        library_name=LIBRARY_NAME,
        pipeline_tag="image-classification",
        tags=tags,
        base_model=info.base_hub_id,
        base_model_relation="finetune" if info.base_hub_id else None,
        model_name=info.repo_id.split("/")[-1],
        eval_results=results or None,
    )


def render_card(config: Mapping[str, Any], info: CardInfo) -> str:
    """The whole ``README.md``: front matter, then the sections."""
    body = "\n".join([
        f"# {info.repo_id.split('/')[-1]}",
        "",
        f"ConvNeXt V2-{str(config['variant']).capitalize()} ({_classes_line(config)}), published with "
        f"[convnextv2-hub](https://pypi.org/project/convnextv2-hub/).",
        "",
        *_training_section(config, info),
        *_evaluation_section(info),
        *_preprocessing_section(config),
        *_loading_section(config, info),
        *_files_section(config),
        "## Licence",
        "",
        f"`{info.license}`: {info.license_note}.",
        "",
    ])
    return f"---\n{card_data(config, info).to_yaml()}\n---\n\n{body}"


def _peer(config: Mapping[str, Any], fmt: str) -> Optional[str]:
    return (config.get("peer_formats") or {}).get(fmt)


def _classes_line(config: Mapping[str, Any]) -> str:
    n = int(config["num_classes"])
    if n == 0:
        return "an encoder without a classifier head"
    names: Optional[List[str]] = config.get("label_names")
    if not names:
        return f"{n} classes"
    shown = ", ".join(f"`{x}`" for x in names[:20]) + (f", ... ({n} in all)" if n > 20 else "")
    return f"{n} classes: {shown}"


def _training_section(config: Mapping[str, Any], info: CardInfo) -> List[str]:
    lines = ["## Training", "", f"- Started from: {info.started_from}"]
    if info.recipe:
        lines.append(f"- Recipe: `{info.recipe}`")
    if info.overrides:
        changed = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(info.overrides.items()))
        lines.append(f"- Changed from the recipe: {changed}")
    if info.dataset:
        lines.append(f"- Data set: image folder `{info.dataset}` ({_classes_line(config)})")
    for key, value in info.training.items():
        lines.append(f"- {key}: {value}")
    return lines + [""]


def _evaluation_section(info: CardInfo) -> List[str]:
    if not info.metrics:
        return ["## Evaluation", "", "No evaluation was recorded with these weights.", ""]
    rows = [f"| {k} | {round(v, 4) if isinstance(v, float) else v} |" for k, v in info.metrics.items()
            if isinstance(v, (int, float, str))]
    return ["## Evaluation", "", "On the run's validation images (`eval.json`):", "", "| metric | value |",
            "|---|---|", *rows, ""]


def _preprocessing_section(config: Mapping[str, Any]) -> List[str]:
    p = config["preprocessing"]
    return ["## Preprocessing", "",
            f"Resolution {p['resolution']}, crop `{p['crop_mode']}` (crop_pct {p['crop_pct']}), "
            f"`{p['interpolation']}` interpolation, mean {list(p['mean'])}, std {list(p['std'])}; the loaders "
            "below bind it to the model (`model.checkpoint.transforms()`).", ""]


def _loading_section(config: Mapping[str, Any], info: CardInfo) -> List[str]:
    repo, n = info.repo_id, int(config["num_classes"])
    lines = ["## Use", "", "With convnextv2-hub (head, labels and preprocessing come with it):", "", "```python",
             "import convnextv2_hub as cvh", f'model = cvh.create("hf-hub:{repo}", pretrained=True)',
             'cvh.predict(model, ["image.jpg"], topk=3)', "", "from convnextv2_hub import ConvNeXtV2",
             f'model = ConvNeXtV2.from_pretrained("{repo}")', "```", "",
             f"`convnextv2 predict image.jpg --model hf-hub:{repo}` does the same from the shell.", ""]
    timm_file = _peer(config, "timm")
    if timm_file:
        from .io import timm_load_hint

        marker = "\0path\0"
        hint = timm_load_hint(marker, str(config["variant"]), n).replace(repr(marker), "path")
        lines += ["With timm:", "", "```python", "import timm", "from huggingface_hub import hf_hub_download",
                  f'path = hf_hub_download("{repo}", "{timm_file}")', f"model = {hint}", "```", ""]
    hf_folder = _peer(config, "hf")
    if hf_folder:
        cls = "ConvNextV2ForImageClassification" if n else "ConvNextV2Model"
        lines += ["With transformers (`backend=\"pil\"` preprocesses exactly as convnextv2-hub does):", "",
                  "```python", f"from transformers import AutoImageProcessor, {cls}",
                  f'model = {cls}.from_pretrained("{repo}", subfolder="{hf_folder}")',
                  f'processor = AutoImageProcessor.from_pretrained("{repo}", subfolder="{hf_folder}", '
                  'backend="pil")', "```", ""]
    if not (timm_file and hf_folder):
        lines += ["Other formats: `convnextv2 convert model.safetensors --to timm|hf|authors --out PATH`.", ""]
    return lines


def _files_section(config: Mapping[str, Any]) -> List[str]:
    weights = config["weights"]
    lines = ["## Files", "", f"- `{weights['file']}`, `config.json`: convnextv2-hub (sha256 {weights['sha256']})"]
    for fmt, where in sorted((config.get("peer_formats") or {}).items()):
        shown = where if where.endswith(".safetensors") else f"{where}/"
        lines.append(f"- `{shown}`: the same weights for {'timm' if fmt == 'timm' else 'transformers'}")
    return lines + ["", "All files are uploaded in one commit; `config.json` states the sha256 of the weights, "
                        "and convnextv2-hub refuses weights that do not match it.", ""]


__all__ = ["LIBRARY_NAME", "OWN_WEIGHTS_LICENSE", "RELEASED_LICENSE", "CardInfo", "card_data", "choose_license",
           "render_card"]
