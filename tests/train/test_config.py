"""Trainer pieces that need no training run: recipes vs the paper's tables, config keys, layer-decay
ids and no-weight-decay sets vs the authors' rules, the lr schedule, data helpers."""
import json
import math

import pytest
import torch

from convnextv2_hub.models.convnextv2 import convnextv2
from convnextv2_hub.train import config as C
from convnextv2_hub.train import optim as O

# ------------------------------------------------------------------------------------------------
# Recipes = the paper's Tables 8-13, transcribed here by hand.
# ------------------------------------------------------------------------------------------------
# (blr, weight_decay, layer_decay, layer_decay_type, warmup, epochs, smoothing, mixup, cutmix, drop_path)
TABLES_9_11 = {
    "atto": (2e-4, 0.3, 0.9, "single", 0, 600, 0.2, 0.0, 0.0, 0.1),
    "femto": (2e-4, 0.05, 0.9, "single", 0, 600, 0.2, 0.3, 0.3, 0.0),
    "pico": (2e-4, 0.3, 0.9, "single", 0, 600, 0.2, 0.3, 0.3, 0.0),
    "nano": (2e-4, 0.3, 0.9, "single", 0, 600, 0.2, 0.5, 0.5, 0.1),
    "tiny": (8e-4, 0.05, 0.9, "single", 40, 300, 0.1, 0.8, 1.0, 0.2),
    # Base/Large: 6.25e-4 (authors' command), not the 6.25e-3 the paper prints (the recipe's note says why).
    "base": (6.25e-4, 0.05, 0.6, "group", 20, 100, 0.1, 0.8, 1.0, 0.1),
    "large": (6.25e-4, 0.05, 0.6, "group", 20, 100, 0.1, 0.8, 1.0, 0.2),
    # Appendix A.2: layer-wise decay is the default, group-wise is named for Base and Large only.
    "huge": (1.25e-3, 0.05, 0.75, "single", 10, 50, 0.1, 0.8, 1.0, 0.3),
}
# (layer_decay, drop_path) for Table 12; (layer_decay, epochs, drop_path, ema) for Table 13
TABLE_12 = {"nano": (0.9, 0.0), "tiny": (0.9, 0.0), "base": (0.8, 0.1), "large": (0.8, 0.1), "huge": (0.8, 0.3)}
TABLE_13 = {
    "nano": (0.9, 90, 0.1, True), "tiny": (0.9, 90, 0.1, True), "base": (0.8, 30, 0.2, True),
    "large": (0.8, 30, 0.3, True), "huge": (0.85, 30, 0.5, False),
}


def row(recipe, variant):
    return C.load_recipe(recipe).row(variant)[0]


def test_recipe_table_8_fcmae_pretrain():
    for v in ("atto", "tiny", "huge"):  # the same for every model
        r = row("fcmae_pretrain", v)
        assert r["blr"] == 1.5e-4 and r["weight_decay"] == 0.05 and r["opt_betas"] == [0.9, 0.95]
        assert r["eff_batch_size"] == 4096 and r["warmup_epochs"] == 40 and r["epochs"] == 800
        assert r["mask_ratio"] == 0.6 and r["patch_size"] == 32 and r["decoder_embed_dim"] == 512
        assert r["decoder_depth"] == 1 and r["norm_pix_loss"] is True and r["train_crop_scale"] == [0.2, 1.0]
        assert r["min_lr"] == 0.0 and r["layer_decay"] == 1.0
        assert r["encoder_masking"] == "sparse" and r["decoder"] == "convnext"  # section 3's method


@pytest.mark.parametrize("variant", list(TABLES_9_11))
def test_recipe_tables_9_to_11_finetune_in1k(variant):
    blr, wd, ld, ldt, warm, ep, sm, mix, cut, dp = TABLES_9_11[variant]
    r = row("finetune_in1k", variant)
    assert (r["blr"], r["weight_decay"], r["layer_decay"], r["warmup_epochs"], r["epochs"]) == (blr, wd, ld, warm, ep)
    assert (r["smoothing"], r["mixup"], r["cutmix"], r["drop_path"]) == (sm, mix, cut, dp)
    assert r["layer_decay_type"] == ldt
    # shared: AdamW (0.9, 0.999), batch 1024, RandAug(9, 0.5), head init 0.001, EMA 0.9999
    assert r["opt_betas"] == [0.9, 0.999] and r["eff_batch_size"] == 1024
    assert r["aa"].startswith("rand-m9-mstd0.5") and r["head_init_scale"] == 0.001
    assert r["model_ema"] is True and r["model_ema_decay"] == 0.9999


def test_base_lr_disagreement_is_documented_in_the_recipe():
    notes = C.load_recipe("finetune_in1k").row("base")[1]
    assert "6.25e-3" in notes["blr"] and "6.25e-4" in notes["blr"]


@pytest.mark.parametrize("variant", list(TABLE_12))
def test_recipe_tables_12_13(variant):
    r = row("finetune_in22k", variant)
    assert (r["blr"], r["weight_decay"], r["eff_batch_size"], r["warmup_epochs"], r["epochs"]) == (2.5e-4, 0.05, 4096, 5, 90)
    assert (r["smoothing"], r["mixup"], r["cutmix"], r["head_init_scale"], r["model_ema"]) == (0.1, 0.8, 1.0, 0.001, False)
    assert (r["layer_decay"], r["drop_path"]) == TABLE_12[variant]
    r = row("finetune_in22k_in1k", variant)
    assert (r["blr"], r["weight_decay"], r["eff_batch_size"], r["warmup_epochs"]) == (2.5e-5, 1e-8, 512, 0)
    assert (r["smoothing"], r["mixup"], r["cutmix"], r["head_init_scale"]) == (0.1, 0.0, 0.0, 0.001)
    ld, ep, dp, ema = TABLE_13[variant]
    assert (r["layer_decay"], r["epochs"], r["drop_path"], r["model_ema"]) == (ld, ep, dp, ema)
    if ema:
        assert r["model_ema_decay"] == 0.9999


@pytest.mark.parametrize("variant", list(TABLE_12))
def test_in22k_recipes_layer_decay_type_and_resolution(variant):
    # Appendix A.2: group-wise layer decay for Base and Large, layer-wise for every other size.
    ldt = "group" if variant in ("base", "large") else "single"
    inter, last = row("finetune_in22k", variant), row("finetune_in22k_in1k", variant)
    assert inter["layer_decay_type"] == last["layer_decay_type"] == ldt
    # Section 5: 384x384 images in the IN-22K pipeline; the last stage runs at its Table 15 row's size
    # (224 rows for N/T/B/L, Huge has 384 and 512 only).
    assert inter["input_size"] == 384
    assert last["input_size"] == (384 if variant == "huge" else 224)
    # Pre-training: 224 (Table 14's IN-1K models); its note says what the IN-22K pipeline uses.
    assert row("fcmae_pretrain", variant)["input_size"] == 224
    assert "384" in C.load_recipe("fcmae_pretrain").row(variant)[1]["input_size"]


def test_recipe_notes_cite_the_paper_not_files_outside_the_package():
    for name in C.list_recipes():
        r = C.load_recipe(name)
        for v in r.sizes or ["atto"]:
            notes = r.row(v)[1]
            for key, text in notes.items():
                assert "docs/" not in text and "README" not in text, (name, v, key, text)
    notes = C.load_recipe("finetune_in1k").row("huge")[1]
    assert "Appendix A.2" in notes["layer_decay_type"] and "[UNCERTAIN]" not in notes["layer_decay_type"]
    assert "section 5" in C.load_recipe("finetune_in22k").row("tiny")[1]["input_size"]


def test_recipe_file_notes_key_holds_notes_not_values(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"mode": "finetune", "common": {"epochs": 7, C.NOTES_KEY: {"epochs": "my choice"}},
                                "sizes": {"atto": {"blr": 1e-3, C.NOTES_KEY: {"blr": "tuned"}}}}))
    values, notes = C.load_recipe(str(path)).row("atto")
    assert values == {"epochs": 7, "blr": 1e-3} and notes == {"epochs": "my choice", "blr": "tuned"}
    path.write_text(json.dumps({"mode": "finetune", "common": {"sources": {}}}))
    with pytest.raises(C.ConfigError, match="unknown config key 'sources'"):
        C.load_recipe(str(path))


def test_recipes_without_a_row_for_a_size_say_so():
    with pytest.raises(C.ConfigError, match="no row for 'atto'"):
        C.load_recipe("finetune_in22k").row("atto")


def test_every_packaged_recipe_loads_and_uses_known_keys():
    assert set(C.list_recipes()) == {"fcmae_pretrain", "finetune_in1k", "finetune_in22k", "finetune_in22k_in1k",
                                     "supervised_in1k", "mini_pretrain", "mini_finetune"}
    for name in C.list_recipes():
        r = C.load_recipe(name)
        for v in r.sizes or ["atto"]:
            cfg, _ = C.resolve(r.mode, v, name, {})
            assert set(cfg) == set(C.KEYS)


# ------------------------------------------------------------------------------------------------
# Config keys
# ------------------------------------------------------------------------------------------------
def test_set_parsing_and_types():
    s = C.parse_set(["lr=1e-4", "epochs=30", "model_ema=true", "aa=none", "opt_betas=0.9,0.95", "layer_decay_type=group", "clip_grad=null"])
    assert s == {"lr": 1e-4, "epochs": 30, "model_ema": True, "aa": None, "opt_betas": [0.9, 0.95], "layer_decay_type": "group", "clip_grad": None}
    with pytest.raises(C.ConfigError, match="epochs must be int"):
        C.parse_set(["epochs=abc"])


def test_unknown_key_is_an_error_listing_known_keys(capsys):
    with pytest.raises(C.ConfigError) as e:
        C.parse_set(["warmup_epoch=5"])
    msg = str(e.value)
    assert "warmup_epochs" in msg and "Known keys" in msg and "layer_decay_type" in msg
    from convnextv2_hub.cli.train import main

    assert main(["finetune", "--model", "atto", "--data", ".", "--set", "lrr=1", "--dry-run"]) == 2
    assert "unknown config key 'lrr'" in capsys.readouterr().err


def test_cli_dry_run_resolves_recipe_row_and_overrides(capsys):
    from convnextv2_hub.cli.train import main

    assert main(["finetune", "--model", "base", "--data", ".", "--set", "epochs=30", "--batch-size", "8", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = out["config"]
    assert cfg["epochs"] == 30 and cfg["batch_size"] == 8 and cfg["blr"] == 6.25e-4 and cfg["layer_decay_type"] == "group"
    assert "blr" in out["sources"]


def test_effective_batch_reaches_recipe_batch_by_accumulation():
    cfg = C.resolve("finetune", "base", "finetune_in1k", {})[0]  # 32 per process, 1024 effective
    assert C.effective_batch(cfg, 8) == (4, 1024)
    assert C.effective_batch(cfg, 32) == (1, 1024)
    assert C.effective_batch(dict(cfg, update_freq=2), 8) == (2, 512)
    assert O.absolute_lr(cfg, 1024) == pytest.approx(6.25e-4 * 4)


# ------------------------------------------------------------------------------------------------
# Layer decay (the authors' layer ids, as train/optim.py's docstring lists them)
# ------------------------------------------------------------------------------------------------
# First block index of each stage, written out per depth layout (sum(depths[:s])).
STAGE_STARTS = {(2, 2, 6, 2): (0, 2, 4, 10), (2, 2, 8, 2): (0, 2, 4, 12), (3, 3, 9, 3): (0, 3, 6, 15), (3, 3, 27, 3): (0, 3, 6, 33)}
TOTAL = {(2, 2, 6, 2): 12, (2, 2, 8, 2): 14, (3, 3, 9, 3): 18, (3, 3, 27, 3): 36}


def expected_single(name, depths):
    p = name.split(".")
    starts = STAGE_STARTS[depths]
    if p[0] == "downsample_layers":
        return starts[int(p[1])] + 1
    if p[0] == "stages":
        return starts[int(p[1])] + int(p[2]) + 1
    return TOTAL[depths] + 1


def expected_group(name):
    p = name.split(".")
    if p[0] == "downsample_layers":
        return {"0": 0, "1": 2, "2": 3, "3": 12}[p[1]]
    if p[0] == "stages":
        s, b = int(p[1]), int(p[2])
        return {0: 1, 1: 2, 2: 3 + b // 3, 3: 12}[s]
    return 13


def meta_model(variant):
    with torch.device("meta"):
        return convnextv2(variant, num_classes=10)


@pytest.mark.parametrize("variant", ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"])
def test_layer_ids_single_and_group(variant):
    m = meta_model(variant)
    depths = tuple(m.depths)
    for name, _ in m.named_parameters():
        assert O.layer_id(name, depths, "single") == expected_single(name, depths), name
        assert O.layer_id(name, depths, "group") == expected_group(name), name
    assert O.num_layers(depths, "single") == TOTAL[depths] and O.num_layers(depths, "group") == 12


def test_layer_id_examples():
    atto = (2, 2, 6, 2)
    assert O.layer_id("downsample_layers.0.0.weight", atto, "single") == 1
    assert O.layer_id("stages.0.0.dwconv.weight", atto, "single") == 1
    assert O.layer_id("stages.3.1.pwconv2.weight", atto, "single") == 12
    assert O.layer_id("head.weight", atto, "single") == 13
    base = (3, 3, 27, 3)
    assert O.layer_id("downsample_layers.0.1.weight", base, "group") == 0
    assert O.layer_id("stages.2.26.grn.gamma", base, "group") == 3 + 26 // 3 == 11
    assert O.layer_id("downsample_layers.3.1.weight", base, "group") == 12
    assert O.layer_id("head.bias", base, "group") == 13


def test_param_groups_scales_and_no_weight_decay_finetune():
    m = meta_model("base")
    groups = O.param_groups(m, 0.05, 0.6, "group", "finetune")
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["head.weight"]["lr_scale"] == 1.0 and by_name["norm.weight"]["lr_scale"] == 1.0
    assert by_name["downsample_layers.0.0.weight"]["lr_scale"] == pytest.approx(0.6**13)
    assert by_name["stages.2.4.pwconv1.weight"]["lr_scale"] == pytest.approx(0.6 ** (13 - 4))
    no_wd = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    expected = {n for n, p in m.named_parameters() if p.ndim == 1 or n.endswith((".bias", ".grn.gamma", ".grn.beta"))}
    assert no_wd == expected
    assert all(n.endswith(("grn.gamma", "grn.beta")) for n in expected if m.get_parameter(n).ndim > 1)
    assert any(n.endswith("grn.gamma") for n in no_wd)
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert all(g["name"] == f"layer_{int(g['name'].split('_')[1])}_{'no_decay' if g['weight_decay'] == 0 else 'decay'}" for g in groups)


def test_no_weight_decay_pretrain_follows_timm_add_weight_decay():
    from convnextv2_hub.models.fcmae import FCMAE

    m = FCMAE("atto", decoder_dim=64)
    groups = O.param_groups(m, 0.05, 1.0, "single", "pretrain")
    no_wd = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    expected = {n for n, p in m.named_parameters() if p.ndim == 1 or n.endswith(".bias")}
    assert no_wd == expected
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]}
    assert "mask_token" in decayed and "encoder.stages.0.0.grn.gamma" in decayed and "decoder.0.grn.beta" in decayed


def test_lr_schedule_warmup_then_cosine_to_min_lr():
    f = lambda e: O.lr_at(e, 1.0, 0.01, 5, 25)  # noqa: E731
    assert f(0) == 0.0 and f(2.5) == pytest.approx(0.5) and f(5) == pytest.approx(1.0)
    assert f(15) == pytest.approx(0.01 + 0.99 * 0.5) and f(25) == pytest.approx(0.01)
    assert O.lr_at(0, 1.0, 0.0, 0, 10) == 1.0  # no warmup: full lr at step 0


# ------------------------------------------------------------------------------------------------
# Data helpers
# ------------------------------------------------------------------------------------------------
def test_mixup_cutmix_targets_fold_in_label_smoothing():
    from convnextv2_hub.train.data import MixupCutmix

    torch.manual_seed(0)
    mixer = MixupCutmix(0.8, 1.0, 1.0, 0.5, 0.1, num_classes=10)
    x, t = mixer(torch.randn(8, 3, 16, 16), torch.arange(8))
    assert t.shape == (8, 10) and torch.allclose(t.sum(1), torch.ones(8))
    assert float(t.min()) >= 0.1 / 10 - 1e-7  # every class keeps the smoothing floor s / K


def test_per_sample_seeded_augmentation_is_order_independent(tmp_path):
    from PIL import Image

    from convnextv2_hub.train.data import ImageDataset, finetune_train_transform

    p = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (120, 30, 200)).save(p)
    tf = finetune_train_transform(32, (0.5,) * 3, (0.5,) * 3)
    ds = ImageDataset([(str(p), 0)], ["a"], tf)
    a = ds[(0, 123)][0]
    torch.rand(100)  # the global RNG state must not matter, nor be changed
    state = torch.get_rng_state()
    b = ds[(0, 123)][0]
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(a, ds[(0, 124)][0])


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    from PIL import Image

    from convnextv2_hub.train.data import build_dataset, collate, file_list_samples

    (tmp_path / "c0").mkdir()
    Image.new("L", (8, 8), 50).save(tmp_path / "c0" / "good.png")
    (tmp_path / "c0" / "bad.png").write_bytes(b"not a png at all")
    ds = build_dataset(tmp_path, lambda im: torch.tensor(im.size))
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [ds[i] for i in range(len(ds))]
    imgs, labels, skipped = collate(items)
    assert skipped == 1 and imgs.tolist() == [[8, 8], [8, 8]]
    # file-list format: "<path> <label>", relative to the list's folder, '#' comments
    lst = tmp_path / "train.txt"
    lst.write_text("# comment\nc0/good.png 3\nc0/bad.png 1\n")
    samples, classes = file_list_samples(lst)
    assert samples == [(str(tmp_path / "c0/good.png"), 3), (str(tmp_path / "c0/bad.png"), 1)] and len(classes) == 4


def test_eval_preprocessing_comes_from_the_manifest():
    from convnextv2_hub.train.data import eval_preprocessing

    p = eval_preprocessing("tiny", 224, None)
    assert (p.crop_pct, p.crop_mode, p.interpolation) == (0.875, "center", "bicubic")
    p = eval_preprocessing("tiny", 384, None)  # the 384 checkpoint's squash resize
    assert (p.crop_pct, p.crop_mode) == (1.0, "squash")
    assert math.isclose(eval_preprocessing("atto", 32, None).crop_pct, 0.875)


# ----------------------------------------------------------------------------------------------------------
# GPU defaults: resolved per device type (no GPU needed to check what a CUDA run would get)
# ----------------------------------------------------------------------------------------------------------
def test_device_keys_are_on_for_cuda_and_off_for_cpu():
    cfg = C.defaults()
    assert all(cfg[k] is None for k in C.DEVICE_KEYS)  # "the device's best" until the device is known
    assert all(C.device_defaults(cfg, "cuda")[k] is True for k in C.DEVICE_KEYS)
    assert all(C.device_defaults(cfg, "cpu")[k] is False for k in C.DEVICE_KEYS)  # CPUs: as before
    assert set(C.DEVICE_KEYS) == {"channels_last", "tf32", "cudnn_benchmark", "fused_adamw"}


def test_device_keys_set_by_the_user_are_kept():
    cfg, _ = C.resolve("finetune", "atto", None, C.parse_set(["tf32=false", "channels_last=true"]))
    on_gpu = C.device_defaults(cfg, "cuda")
    assert on_gpu["tf32"] is False and on_gpu["channels_last"] is True and on_gpu["fused_adamw"] is True
    assert C.device_defaults(cfg, "cpu")["channels_last"] is True


def test_device_keys_are_listed_with_their_rule():
    text = C.known_keys_text()
    for k in C.DEVICE_KEYS:
        assert f"  {k} (default null): " in text and "null: on for CUDA devices" in text.split(f"  {k} (default null): ")[1].splitlines()[0]


def test_fused_adamw_builds_the_fused_optimiser():
    from torch import nn

    from convnextv2_hub.train.optim import build_optimizer

    cfg = C.device_defaults(C.defaults(), "cpu")
    assert not build_optimizer(nn.Linear(2, 2), cfg, "finetune", 1e-3).defaults["fused"]
    fused = build_optimizer(nn.Linear(2, 2), dict(cfg, fused_adamw=True), "finetune", 1e-3)
    assert fused.defaults["fused"] is True


def test_a_float32_recipe_on_a_gpu_says_tf32_is_on(capsys):
    # What a CUDA run sets, checked without a GPU: the backend flags are plain settings.
    from convnextv2_hub.train.distributed import DistEnv
    from convnextv2_hub.train.engine import set_backends
    from convnextv2_hub.train.runlog import Logger

    flags = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), (torch.backends.cudnn, "benchmark"))
    saved = [getattr(mod, attr) for mod, attr in flags]  # cuBLAS's flags are not monkeypatchable attributes
    try:
        env = DistEnv(0, 1, 0, torch.device("cuda", 0), False)
        cfg, _ = C.resolve("pretrain", "atto", None, {})
        set_backends(C.device_defaults(cfg, "cuda"), env, Logger(None, env, False))
        assert all(getattr(mod, attr) for mod, attr in flags)
        assert "a float32 recipe (use_amp=false) with TF32 matmuls and convolutions" in capsys.readouterr().out
        set_backends(C.device_defaults(dict(cfg, use_amp=True), "cuda"), env, Logger(None, env, False))
        assert "TF32" not in capsys.readouterr().out  # autocast recipes: nothing to say
    finally:
        for (mod, attr), value in zip(flags, saved):
            setattr(mod, attr, value)
