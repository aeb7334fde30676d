"""The checkpoint registry against the reference docs, the model code and every accepted name spelling."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import convnextv2_hub.checkpoints.registry as manifest_mod
from convnextv2_hub.checkpoints.registry import (
    default_tag,
    get_checkpoint,
    imagenet_class_names,
    list_checkpoints,
    list_models,
    load_manifest,
    parse_model_name,
)
from convnextv2_hub.models.convnextv2 import convnextv2, count_params

REPO_TOP = Path(__file__).resolve().parents[2] / "weights_manifest.json"
VARIANTS = ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"]
PREFIX = "https://dl.fbaipublicfiles.com/convnext/convnextv2/"

# peer_implementations.md §6.1, timm results-imagenet.csv at the train resolution: (top-1, top-5).
TIMM_RESULTS = {
    "atto.fcmae_ft_in1k": (76.644, 93.042),
    "femto.fcmae_ft_in1k": (78.476, 93.984),
    "pico.fcmae_ft_in1k": (80.304, 95.082),
    "nano.fcmae_ft_in1k": (81.856, 95.740),
    "nano.fcmae_ft_in22k_in1k": (82.038, 96.174),
    "nano.fcmae_ft_in22k_in1k_384": (83.366, 96.740),
    "tiny.fcmae_ft_in1k": (82.948, 96.286),
    "tiny.fcmae_ft_in22k_in1k": (83.904, 96.964),
    "tiny.fcmae_ft_in22k_in1k_384": (85.098, 97.632),
    "base.fcmae_ft_in1k": (84.890, 97.088),
    "base.fcmae_ft_in22k_in1k": (86.752, 98.020),
    "base.fcmae_ft_in22k_in1k_384": (87.638, 98.416),
    "large.fcmae_ft_in1k": (85.762, 97.574),
    "large.fcmae_ft_in22k_in1k": (87.266, 98.240),
    "large.fcmae_ft_in22k_in1k_384": (88.180, 98.520),
    "huge.fcmae_ft_in1k": (86.260, 97.752),
    "huge.fcmae_ft_in22k_in1k_384": (88.666, 98.734),
    "huge.fcmae_ft_in22k_in1k_512": (88.860, 98.740),
}
# authors_implementation.md §1.1 (README; = paper Tables 14/15): IN-1K FT @224, IN-22K FT @224/@384/@512.
README_TOP1 = {
    "atto": (76.7, None, None, None),
    "femto": (78.5, None, None, None),
    "pico": (80.3, None, None, None),
    "nano": (81.9, 82.1, 83.4, None),
    "tiny": (83.0, 83.9, 85.1, None),
    "base": (84.9, 86.8, 87.7, None),
    "large": (85.8, 87.3, 88.2, None),
    "huge": (86.3, None, 88.7, 88.9),
}
# authors_implementation.md §1 table: exact params with the 1000-class head, and encoder only.
PARAMS = {
    "atto": (3_708_400, 3_386_760),
    "femto": (5_233_240, 4_847_472),
    "pico": (9_066_280, 8_552_256),
    "nano": (15_623_800, 14_981_520),
    "tiny": (28_635_496, 27_864_960),
    "base": (88_717_800, 87_690_752),
    "large": (197_956_840, 196_416_768),
    "huge": (660_289_640, 657_467_008),
}
# peer_implementations.md §0 (timm benchmark CSVs) and paper_tables.md §1 (README FLOPs), by resolution.
GMACS_TIMM = {
    224: dict(atto=0.55, femto=0.79, pico=1.37, nano=2.46, tiny=4.47, base=15.38, large=34.4, huge=115.0),
    384: dict(nano=7.22, tiny=13.14, base=45.21, large=101.1, huge=337.96),
    512: dict(huge=600.81),
}
GMACS_PAPER = {
    224: dict(atto=0.55, femto=0.78, pico=1.37, nano=2.45, tiny=4.47, base=15.4, large=34.4, huge=115.0),
    384: dict(nano=7.21, tiny=13.1, base=45.2, large=101.1, huge=337.9),
    512: dict(huge=600.8),
}
EXPECTED_TAGS = {
    **{v: ["fcmae", "fcmae_ft_in1k"] for v in ("atto", "femto", "pico")},
    **{
        v: ["fcmae", "fcmae_ft_in1k", "fcmae_ft_in22k_in1k", "fcmae_ft_in22k_in1k_384"]
        for v in ("nano", "tiny", "base", "large")
    },
    "huge": ["fcmae", "fcmae_ft_in1k", "fcmae_ft_in22k_in1k_384", "fcmae_ft_in22k_in1k_512"],
}


def test_exactly_the_26_released_checkpoints_in_listing_order():
    m = load_manifest()
    assert len(m) == 26
    assert sum(c.tag == "fcmae" for c in m.values()) == 8
    assert sum(c.tag == "fcmae_ft_in1k" for c in m.values()) == 8
    assert sum(c.tag.startswith("fcmae_ft_in22k_in1k") for c in m.values()) == 10
    assert list_models() == VARIANTS
    expected = [f"{v}.{t}" for v in VARIANTS for t in EXPECTED_TAGS[v]]
    assert list_checkpoints() == expected
    for v in VARIANTS:
        assert list_checkpoints(v) == [f"{v}.{t}" for t in EXPECTED_TAGS[v]]
    assert list_checkpoints("tiny") == [
        "tiny.fcmae", "tiny.fcmae_ft_in1k", "tiny.fcmae_ft_in22k_in1k", "tiny.fcmae_ft_in22k_in1k_384"
    ]
    assert list_checkpoints("convnextv2_huge") == list_checkpoints("huge")
    with pytest.raises(ValueError, match="variant"):
        list_checkpoints("tiny.fcmae")


def test_sources_urls_and_hub_ids():
    urls = set()
    for name, c in load_manifest().items():
        assert name == f"{c.variant}.{c.tag}"
        assert c.hf_hub_id == f"timm/convnextv2_{c.variant}.{c.tag}" == f"timm/{c.timm_name}"
        assert (c.hf_hub_filename, c.hf_format, c.sha256) == ("model.safetensors", "timm", None)
        assert c.meta["license"] == "cc-by-nc-4.0"
        if c.tag == "fcmae":
            url = f"{PREFIX}pt_only/convnextv2_{c.variant}_1k_224_fcmae.pt"
            assert c.meta["hf_transformers_id"] is None
        elif c.tag == "fcmae_ft_in1k":
            url = f"{PREFIX}im1k/convnextv2_{c.variant}_1k_224_ema.pt"
            assert c.meta["hf_transformers_id"] == f"facebook/convnextv2-{c.variant}-1k-224"
        else:
            url = f"{PREFIX}im22k/convnextv2_{c.variant}_22k_{c.resolution}_ema.pt"
            assert c.meta["hf_transformers_id"] == f"facebook/convnextv2-{c.variant}-22k-{c.resolution}"
        assert c.url == url
        urls.add(c.url)
    assert len(urls) == 26
    # Two URLs copied verbatim from authors_implementation.md §2, so a systematic pattern error shows.
    assert get_checkpoint("atto.fcmae").url == (
        "https://dl.fbaipublicfiles.com/convnext/convnextv2/pt_only/convnextv2_atto_1k_224_fcmae.pt"
    )
    assert get_checkpoint("huge.fcmae_ft_in22k_in1k_512").url == (
        "https://dl.fbaipublicfiles.com/convnext/convnextv2/im22k/convnextv2_huge_22k_512_ema.pt"
    )


def test_preprocessing_and_heads_by_resolution():
    for c in load_manifest().values():
        expected_res = int(c.tag.rsplit("_", 1)[1]) if c.tag[-3:] in ("384", "512") else 224
        assert c.resolution == expected_res
        assert (c.crop_pct, c.crop_mode) == ((0.875, "center") if c.resolution == 224 else (1.0, "squash"))
        assert c.interpolation == "bicubic"
        assert c.mean == (0.485, 0.456, 0.406) and c.std == (0.229, 0.224, 0.225)
        assert c.num_classes == (0 if c.tag == "fcmae" else 1000)
        table = {"fcmae": "Table 8 (pre-training)", "fcmae_ft_in1k": "Table 14"}.get(c.tag, "Table 15")
        assert c.meta["paper_table"] == table
        assert c.meta["pretraining"].startswith("FCMAE")


def test_accuracy_matches_timm_results_and_paper():
    for name, c in load_manifest().items():
        if c.tag == "fcmae":
            assert c.meta["top1"] is None and c.meta["top5"] is None and c.meta["top1_paper"] is None
            continue
        assert (c.meta["top1"], c.meta["top5"]) == TIMM_RESULTS[name]
        column = {"fcmae_ft_in1k": 0, "fcmae_ft_in22k_in1k": 1, "fcmae_ft_in22k_in1k_384": 2,
                  "fcmae_ft_in22k_in1k_512": 3}[c.tag]
        assert c.meta["top1_paper"] == README_TOP1[c.variant][column]
        # The 1-decimal paper value is the rounding of timm's re-evaluation, within 0.1 (peer §6.1).
        assert abs(c.meta["top1"] - c.meta["top1_paper"]) <= 0.1 + 1e-9
    assert len(TIMM_RESULTS) == sum(c.num_classes == 1000 for c in load_manifest().values())


def test_params_and_macs_match_the_model():
    """Exact params on the meta device (no memory); conv+linear MACs within 2% below the published GMACs."""
    m = load_manifest()
    for v in VARIANTS:
        with torch.device("meta"):
            model = convnextv2(v, num_classes=1000).eval()
        full = count_params(model)
        encoder = full - count_params(model.norm) - count_params(model.head)
        assert (full, encoder) == PARAMS[v]
        for c in (c for c in m.values() if c.variant == v):
            assert c.meta["params"] == (encoder if c.tag == "fcmae" else full)
            assert c.meta["gmacs"] == GMACS_TIMM[c.resolution][v]
            assert c.meta["gmacs_paper"] == GMACS_PAPER[c.resolution][v]
        with FlopCounterMode(display=False) as counter, torch.device("meta"):
            model(torch.empty(1, 3, 224, 224))
        macs224 = counter.get_total_flops() / 2e9  # conv/linear only: norms, GELU and GRN come on top
        head = model.head.in_features * model.head.out_features / 1e9
        for res in sorted({c.resolution for c in m.values() if c.variant == v}):
            # Every map is (res/224)^2 larger at 384/512 (7 -> 12 -> 16 cells at stride 32); the head is not.
            macs = (macs224 - head) * (res / 224) ** 2 + head
            assert 0.98 <= macs / GMACS_TIMM[res][v] <= 1.0, (v, res, macs)


def test_defaults_per_variant():
    expected = dict(atto="fcmae_ft_in1k", femto="fcmae_ft_in1k", pico="fcmae_ft_in1k",
                    nano="fcmae_ft_in22k_in1k", tiny="fcmae_ft_in22k_in1k", base="fcmae_ft_in22k_in1k",
                    large="fcmae_ft_in22k_in1k", huge="fcmae_ft_in22k_in1k_384")
    assert {v: default_tag(v) for v in VARIANTS} == expected
    assert json.loads(REPO_TOP.read_text())["defaults"] == expected
    for v in VARIANTS:
        assert get_checkpoint(v).name == f"{v}.{expected[v]}"
    with pytest.raises(ValueError, match="variant"):
        default_tag("tiny.fcmae")


@pytest.mark.parametrize(
    "spelling, expected",
    [
        ("tiny", "tiny.fcmae_ft_in22k_in1k"),
        ("  TINY ", "tiny.fcmae_ft_in22k_in1k"),
        ("tiny.fcmae_ft_in1k", "tiny.fcmae_ft_in1k"),
        ("Tiny.FCMAE", "tiny.fcmae"),
        ("convnextv2_tiny.fcmae_ft_in1k", "tiny.fcmae_ft_in1k"),
        ("convnextv2_tiny", "tiny.fcmae_ft_in22k_in1k"),
        ("convnextv2_huge", "huge.fcmae_ft_in22k_in1k_384"),
        ("timm/convnextv2_base.fcmae_ft_in22k_in1k_384", "base.fcmae_ft_in22k_in1k_384"),
        ("hf-hub:timm/convnextv2_atto.fcmae", "atto.fcmae"),
        ("facebook/convnextv2-tiny-1k-224", "tiny.fcmae_ft_in1k"),
        ("facebook/convnextv2-tiny-22k-224", "tiny.fcmae_ft_in22k_in1k"),
        ("facebook/convnextv2-tiny-22k-384", "tiny.fcmae_ft_in22k_in1k_384"),
        ("Facebook/ConvNeXtV2-Huge-22K-512", "huge.fcmae_ft_in22k_in1k_512"),
        ("convnextv2-atto-1k-224", "atto.fcmae_ft_in1k"),
        ("convnextv2_large_22k_384_ema.pt", "large.fcmae_ft_in22k_in1k_384"),
        (PREFIX + "pt_only/convnextv2_pico_1k_224_fcmae.pt", "pico.fcmae"),
        (PREFIX + "im1k/convnextv2_nano_1k_224_ema.pt", "nano.fcmae_ft_in1k"),
    ],
)
def test_name_spellings_resolve(spelling, expected):
    assert get_checkpoint(spelling).name == expected


def test_every_manifest_url_and_id_resolves_back_to_its_entry():
    for name, c in load_manifest().items():
        assert get_checkpoint(name) is c
        assert get_checkpoint(c.timm_name) is c
        assert get_checkpoint(c.hf_hub_id) is c
        assert get_checkpoint(c.url) is c
        if c.meta["hf_transformers_id"]:
            assert get_checkpoint(c.meta["hf_transformers_id"]) is c
    assert get_checkpoint(get_checkpoint("tiny")) is get_checkpoint("tiny")


def test_parse_model_name():
    assert parse_model_name("tiny") == ("tiny", None)
    assert parse_model_name("convnextv2_base.fcmae") == ("base", "fcmae")
    assert parse_model_name("facebook/convnextv2-nano-22k-384") == ("nano", "fcmae_ft_in22k_in1k_384")
    with pytest.raises(TypeError):
        parse_model_name(224)  # type: ignore[arg-type]


def test_unknown_names_fail_with_suggestions():
    with pytest.raises(ValueError) as e:
        get_checkpoint("tinny")
    msg = str(e.value)
    assert "'tinny'" in msg and "'tiny'" in msg and "convnextv2_hub.list_checkpoints()" in msg
    with pytest.raises(ValueError, match="'base'"):
        parse_model_name("convnextv2_bse")
    with pytest.raises(ValueError, match="tiny.fcmae_ft_in1k"):
        get_checkpoint("tiny.fcmae_ft_in1kk")
    # A known variant with an unknown tag lists that variant's tags, and only those.
    with pytest.raises(ValueError) as e:
        get_checkpoint("atto.fcmae_ft_in22k_in1k")
    msg = str(e.value)
    assert "['fcmae', 'fcmae_ft_in1k']" in msg and "384" not in msg
    for unreleased in ("facebook/convnextv2-huge-22k-224", "facebook/convnextv2-tiny-1k-384",
                       "facebook/convnextv2-atto-22k-224", "resnet50", "", "small"):
        with pytest.raises(ValueError, match="list_checkpoints"):
            get_checkpoint(unreleased)


def test_checkpoint_is_immutable_and_hashable():
    c = get_checkpoint("tiny.fcmae_ft_in1k")
    with pytest.raises(Exception):
        c.resolution = 384  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.meta["top1"] = 99.0  # type: ignore[index]
    assert {c: 1}[get_checkpoint("convnextv2_tiny.fcmae_ft_in1k")] == 1
    m = load_manifest()
    m.clear()
    assert len(load_manifest()) == 26


def test_class_names_and_label_names():
    import torchvision.models._meta as tv_meta

    names = imagenet_class_names()
    assert names == list(tv_meta._IMAGENET_CATEGORIES)
    assert len(set(names)) == 1000
    assert names[281] == "tabby" and names[0] == "tench"
    names.append("mutated")
    assert len(imagenet_class_names()) == 1000
    assert get_checkpoint("tiny.fcmae_ft_in1k").label_names == imagenet_class_names()
    assert get_checkpoint("huge.fcmae_ft_in22k_in1k_512").label_names == imagenet_class_names()
    assert get_checkpoint("tiny.fcmae").label_names is None


def test_manifest_file_shipped_in_package_equals_repo_top():
    packaged = resources.files("convnextv2_hub").joinpath("weights_manifest.json").read_bytes()
    assert packaged == REPO_TOP.read_bytes()
    raw = json.loads(packaged)
    assert set(raw) - {"_comment", "defaults"} == set(load_manifest())
    assert raw["_comment"]
    for f in ("data/imagenet_classes.txt", "data/sample.jpg", "data/README.md"):
        assert resources.files("convnextv2_hub").joinpath(f).is_file(), f


def test_symlink_less_checkout_falls_back_to_repo_top(monkeypatch):
    # Where git cannot make symlinks the package copy is a text file holding the link target.
    monkeypatch.setattr(manifest_mod, "_read_package_text",
                        lambda *parts: "../weights_manifest.json" if parts[-1].endswith(".json") else None)
    manifest_mod._manifest_json.cache_clear()
    try:
        assert manifest_mod._manifest_json() == json.loads(REPO_TOP.read_text())
    finally:
        manifest_mod._manifest_json.cache_clear()

