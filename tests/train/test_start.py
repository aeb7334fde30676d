"""Where a fine-tune starts (--init NAME|PATH|none, --pretrained, the <variant>.fcmae default) and how recipe
values that do not fit a small run adapt, with a notice, unless --strict-recipe keeps them. No training here:
the runs that download the default start and adapt to a small folder are in test_readme_lines.py."""
import json

import pytest

from convnextv2_hub.cli.train import main
from convnextv2_hub.train import config as C
from convnextv2_hub.train.start import Start, resolve_start

IMAGENET_TRAIN_IMAGES = 1_281_167


@pytest.mark.parametrize("mode, model, init, pretrained, expected", [
    ("finetune", "tiny", None, False, Start("checkpoint", "tiny.fcmae", default=True)),  # the paper's start
    ("finetune", "tiny.fcmae_ft_in1k", None, False, Start("checkpoint", "tiny.fcmae_ft_in1k", default=True)),
    ("finetune", "tiny", "tiny.fcmae_ft_in22k_in1k", False, Start("checkpoint", "tiny.fcmae_ft_in22k_in1k")),
    ("finetune", "tiny", "convnextv2_tiny.fcmae", False, Start("checkpoint", "tiny.fcmae")),  # timm spelling
    ("finetune", "tiny", "none", False, Start("random", None)),
    ("finetune", "tiny", "None", False, Start("random", None)),
    ("finetune", "atto", None, True, Start("checkpoint", "atto.fcmae_ft_in1k")),
    ("pretrain", "base", None, False, Start("random", None, default=True)),
])
def test_start_from_the_flags(mode, model, init, pretrained, expected):
    assert resolve_start(mode, model, init, pretrained) == expected


def test_a_path_is_a_file_start(tmp_path):
    weights = tmp_path / "tiny.fcmae"  # a file wins over the checkpoint name it happens to spell
    weights.write_bytes(b"x")
    assert resolve_start("finetune", "tiny", str(weights), False) == Start("file", str(weights))


@pytest.mark.parametrize("mode, init, pretrained, says", [
    ("finetune", "nope.safetensors", False, "no such file, and not a checkpoint name (convnextv2 list tiny"),
    ("finetune", "base.fcmae", False, "is a base checkpoint but --model is 'tiny'"),
    ("finetune", "tiny.fcmae", True, "--init and --pretrained both say where to start"),
    ("pretrain", "tiny.fcmae", False, "pre-training cannot continue from them"),
])
def test_bad_starts_are_refused_with_the_fix(mode, init, pretrained, says):
    with pytest.raises(C.ConfigError) as err:
        resolve_start(mode, "tiny", init, pretrained)
    assert says in str(err.value)


def _dry_run(capsys, *argv):
    assert main([*argv, "--dry-run"]) == 0
    return json.loads(capsys.readouterr().out)


def test_warmup_longer_than_the_run_keeps_its_share_with_a_notice(capsys):
    out = _dry_run(capsys, "finetune", "--model", "tiny", "--data", ".", "--set", "epochs=30", "--set", "lr=1e-4")
    assert out["config"]["warmup_epochs"] == 4.0  # Tiny's recipe: 40 of 300 epochs
    [notice] = out["adapted"]
    assert "the recipe's 40 is longer than epochs=30, so 4 is used" in notice and "--strict-recipe" in notice
    assert out["start"] == {"kind": "checkpoint", "source": "tiny.fcmae", "default": True}
    # The user's own warm-up is never changed: a contradiction of the user's is an error.
    assert main(["finetune", "--model", "tiny", "--data", ".", "--set", "epochs=30", "--set", "warmup_epochs=40",
                 "--dry-run"]) == 2
    assert "warmup_epochs must be in [0, epochs=30], got 40" in capsys.readouterr().err


def test_strict_recipe_refuses_instead_of_adapting(capsys):
    assert main(["finetune", "--model", "tiny", "--data", ".", "--set", "epochs=30", "--strict-recipe", "--dry-run"]) == 2
    assert "--set warmup_epochs=N with N at most 30" in capsys.readouterr().err
    with pytest.raises(C.ConfigError, match="--strict-recipe"):
        C.fit_batch(C.resolve("finetune", "atto", "finetune_in1k", {})[0], 1, 40, (), strict=True)


def test_unmodified_recipes_are_never_adapted_for_a_paper_reproduction():
    """Every row of every recipe, as written, on ImageNet-1K with one process or 8 x 8 GPUs: not one value
    changes, and the effective batch is the paper's."""
    for name in C.list_recipes():
        recipe = C.load_recipe(name)
        for variant in recipe.sizes or ["atto"]:
            strict, _ = C.resolve(recipe.mode, variant, name, {})
            adapted: list = []
            cfg, _ = C.resolve(recipe.mode, variant, name, {}, adapted=adapted)
            assert adapted == [] and cfg == strict, (name, variant)
            for world in (1, 64):
                per_process = IMAGENET_TRAIN_IMAGES // world
                assert C.fit_batch(cfg, world, per_process, (), strict=False) is None, (name, variant, world)
                if cfg["eff_batch_size"] is not None:  # the mini recipes state batch_size, not an effective batch
                    assert C.effective_batch(cfg, world)[1] >= cfg["eff_batch_size"]


def test_a_batch_larger_than_the_data_adapts_but_the_users_does_not():
    cfg, _ = C.resolve("finetune", "tiny", "finetune_in1k", {})  # 32 per step, 1024 effective
    small = dict(cfg)
    notice = C.fit_batch(small, 1, 40, (), strict=False)
    assert (small["batch_size"], small["update_freq"], C.effective_batch(small, 1)) == (32, 1, (1, 32))
    assert "effective batch 1024" in notice and "40 training images" in notice and "--strict-recipe" in notice
    tiny_set = dict(cfg)
    C.fit_batch(tiny_set, 1, 20, (), strict=False)
    assert (tiny_set["batch_size"], tiny_set["update_freq"]) == (20, 1)  # one batch of the whole folder
    mid = dict(cfg)
    C.fit_batch(mid, 1, 100, (), strict=False)
    assert (mid["batch_size"], mid["update_freq"]) == (32, 3)  # the most accumulation that still fits
    with pytest.raises(C.ConfigError, match=r"--set update_freq=1 \(or eff_batch_size=null\) and --set batch_size=32"):
        C.fit_batch(dict(cfg), 1, 40, ("eff_batch_size",), strict=False)
    with pytest.raises(C.ConfigError, match="fewer than one optimiser step"):
        C.fit_batch(dict(cfg, update_freq=1), 1, 20, ("batch_size", "update_freq"), strict=False)


def test_offline_the_default_start_says_what_to_pass(hf_env, monkeypatch, two_digit_classes, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an empty cache and no network: atto.fcmae cannot be had
    out = tmp_path / "run"
    assert main(["finetune", "--model", "atto", "--data", str(two_digit_classes), "--output", str(out),
                 "--num-workers", "0", "--set", "input_size=32"]) == 1
    err = capsys.readouterr().err
    assert "atto.fcmae is the default start of a fine-tune and could not be downloaded" in err
    assert "--init PATH" in err and "--init none" in err
    assert not out.exists()  # nothing written by a run that never started
