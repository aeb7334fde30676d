"""``convnextv2-train reproduce``: every table lists the paper's rows with their switches and numbers;
a mini run of a few rows goes end to end on real images (scikit-learn digits), writes results.md /
results.json with the paper's number beside ours, and a second call redoes nothing."""
import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import write_digits

from convnextv2_hub.cli.train import main, train_command
from convnextv2_hub.train import ablations as A
from convnextv2_hub.train import report
from convnextv2_hub.train.reproduce import MARKER, Options, reproduce

import sklearn  # noqa: F401,E402  (test extra: the data set comes from it)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]

# The paper's numbers (Tables 1, 2, 3, 16 and the section 3 inline tables), row by row.
PAPER = {
    "sec3-sparse-conv": {"dense": 79.3, "sparse": 83.7, "sup-100": 82.7, "sup-300": 83.8},
    "table1-decoder": {"convnext-d1-w512": 83.7, "unet": 83.7, "unet-noskip": 83.5, "transformer": 83.4, "depth-2": 83.5,
                       "depth-4": 83.7, "depth-8": 83.6, "depth-12": 83.3, "width-128": 83.5, "width-256": 83.7,
                       "width-768": 83.6, "width-1024": 83.5},
    "table2-grn": {"baseline-v1": 83.7, "grn": 84.6, "agg-mean": 83.7, "agg-l1": 84.3, "norm-standardize": 84.5,
                   "norm-inverse-sum": 83.8, "no-residual": 84.0, "lrn": 83.2, "bn": 80.5, "ln": 83.8, "se": 84.4,
                   "cbam": 84.5, "grn-pretrain-only": 78.8, "grn-finetune-only": 80.6},
    "table3-codesign": {"v1-sup": 83.8, "v1-fcmae": 83.7, "v2-sup": 84.3, "v2-fcmae": 84.6},
    "table16-grn-parts": {"base-v1": 83.7, "affine": 83.9, "x-g": 83.9, "x-n": None, "grn": 84.6},
    "fig8-mask-ratio": {f"ratio-0.{i}": None for i in range(1, 10)},
    "fig4-collapse": {"v1-fcmae": None, "v2-fcmae": None, "v1-sup": None, "v2-sup": None},
}


def dry_run(capsys, *args: str) -> list:
    assert main(["reproduce", *args, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def commands(lines: list) -> dict:
    """{(seed, row id): [command argv, ...]} from a dry run's output."""
    out: dict = {}
    key = None
    for line in lines:
        if line.startswith("# seed "):
            seed, row = line[len("# seed "):].split(":")[0].split(", row ")
            key = (int(seed), row)
            out[key] = []
        elif not line.startswith("#"):
            out[key].append(shlex.split(line))
    return out


def sets(argv: list) -> dict:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


def test_every_table_lists_the_papers_rows_and_numbers(capsys, tmp_path):
    assert set(A.list_tables()) == set(PAPER)
    for name, numbers in PAPER.items():
        table = A.load_table(name)
        assert {r.id: r.paper for r in table.rows} == numbers, name
        seeds = table.seeds["mini"]
        found = commands(dry_run(capsys, name, "--data", "digits", "--output", str(tmp_path)))
        assert sorted(found) == sorted((s, r.id) for s in range(seeds) for r in table.rows), name
        for (seed, row_id), argvs in found.items():
            row = table.row(row_id)
            assert [a[1] for a in argvs] == list(row.stages)
            for argv in argvs:
                assert argv[0] == "convnextv2-train" and argv[argv.index("--model") + 1] == "atto"
                expected = {k: A.set_value(v) for k, v in row.keys(argv[1]).items()}
                assert sets(argv)["seed"] == str(seed) and expected.items() <= sets(argv).items(), (name, row_id)
    assert "x_n" in {r.switches.get("grn_form") for r in A.load_table("table16-grn-parts").rows}


def test_switches_go_to_the_stage_the_paper_changes(capsys, tmp_path):
    t2 = commands(dry_run(capsys, "table2-grn", "--data", "d", "--output", str(tmp_path)))
    for row, switch in (("lrn", "grn=lrn"), ("grn-pretrain-only", "grn_at=pretrain_only"), ("baseline-v1", "block=v1"),
                        ("no-residual", "grn_residual=false"), ("agg-l1", "grn_aggregation=l1")):
        pt, ft = t2[(0, row)]
        assert pt[1] == "pretrain" and ft[1] == "finetune"
        assert switch in pt and switch in ft  # the same model in both stages; grn_at itself says where GRN is
        assert ft[ft.index("--init") + 1] == str(tmp_path / "runs" / row / "seed0" / "pretrain" / A.WEIGHTS_FILE)
    s3 = commands(dry_run(capsys, "sec3-sparse-conv", "--data", "d", "--output", str(tmp_path), "--seeds", "1"))
    pt, ft = s3[(0, "dense")]
    assert "encoder_masking=dense" in pt and "encoder_masking=dense" not in ft
    (sup,) = s3[(0, "sup-100")]
    (sup300,) = s3[(0, "sup-300")]
    assert sup[sup.index("--init") + 1] == "none" and "epochs=15" in sup300 and "epochs=15" not in sup  # 3x the 5-epoch mini budget
    f8 = commands(dry_run(capsys, "fig8-mask-ratio", "--data", "d", "--output", str(tmp_path)))
    assert [sets(f8[(0, f"ratio-0.{i}")][0])["mask_ratio"] for i in range(1, 10)] == [f"0.{i}" for i in range(1, 10)]
    assert all("mask_ratio" not in sets(f8[key][1]) and sets(f8[key][1])["input_size"] == "96" for key in f8)
    t1 = commands(dry_run(capsys, "table1-decoder", "--data", "d", "--output", str(tmp_path), "--rows", "unet,width-128"))
    assert sorted(t1) == [(0, "unet"), (0, "width-128")]
    assert "decoder=unet" in t1[(0, "unet")][0] and "decoder_embed_dim=128" in t1[(0, "width-128")][0]


def test_full_scale_is_the_papers_recipe_through_torchrun(capsys, tmp_path):
    t3 = commands(dry_run(capsys, "table3-codesign", "--data", "/imagenet", "--output", str(tmp_path), "--scale", "full"))
    assert sorted(t3) == [(0, r) for r in sorted(PAPER["table3-codesign"])]  # one seed at full scale
    pt, ft = t3[(0, "v2-fcmae")]
    assert pt[:5] == ["torchrun", "--nproc_per_node", "gpu", "-m", "convnextv2_hub.train"]
    assert pt[pt.index("--model") + 1] == "base" and pt[pt.index("--recipe") + 1] == "fcmae_pretrain"
    assert ft[ft.index("--recipe") + 1] == "finetune_in1k" and (sup := t3[(0, "v1-sup")][0])[sup.index("--recipe") + 1] == "supervised_in1k"
    plan = A.plan_row(A.load_table("table3-codesign"), A.load_table("table3-codesign").row("v2-fcmae"), A.SCALES["full"], 0,
                      "/imagenet", tmp_path, A.parse_stage_sets([]), None)
    pt_cfg, ft_cfg = (st.config for st in plan.stages)
    assert (pt_cfg["epochs"], pt_cfg["eff_batch_size"], ft_cfg["epochs"], ft_cfg["eff_batch_size"]) == (800, 4096, 100, 1024)
    lines = dry_run(capsys, "table3-codesign", "--data", "/i", "--output", str(tmp_path), "--scale", "full",
                    "--launcher", "torchrun --nnodes 8 --nproc_per_node 8")
    assert any(line.startswith("torchrun --nnodes 8 --nproc_per_node 8 -m convnextv2_hub.train pretrain") for line in lines)


def test_bad_rows_and_sets_are_refused(capsys, tmp_path):
    assert main(["reproduce", "table3-codesign", "--data", "d", "--output", str(tmp_path), "--rows", "v3", "--dry-run"]) == 2
    assert "no row 'v3'" in capsys.readouterr().err
    assert main(["reproduce", "table3-codesign", "--data", "d", "--output", str(tmp_path), "--set", "epoch=2", "--dry-run"]) == 2
    assert "unknown config key 'epoch'" in capsys.readouterr().err


# A budget of a few steps: 3 digit classes, 12 training images at 64 px (2x2 mask patches), batch 6.
TINY = ["--set", "epochs=1", "--set", "warmup_epochs=0", "--set", "batch_size=6", "--set", "pretrain.decoder_embed_dim=32",
        "--set", "log_interval=1", "--set", "save_ckpt_freq=1"]


def test_mini_rows_run_end_to_end_write_results_and_resume(tmp_path, capsys):
    data = write_digits(tmp_path / "digits", [0, 1, 2], 4, 2)
    out = tmp_path / "t3"
    args = ["reproduce", "table3-codesign", "--data", str(data), "--output", str(out), "--seeds", "1", *TINY, "--rows", "v2-fcmae"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in results["rows"]}
    assert [r["id"] for r in results["rows"]] == ["v1-sup", "v1-fcmae", "v2-sup", "v2-fcmae"]
    run, ft = rows["v2-fcmae"]["runs"]["0"], out / "runs/v2-fcmae/seed0/finetune"
    assert run["status"] == "done" and run["value"] == json.loads((ft / "eval.json").read_text())["top1"]
    assert rows["v2-fcmae"]["mean"] == run["value"] and rows["v2-fcmae"]["n"] == 1 and rows["v2-fcmae"]["std"] is None
    assert json.loads((ft / "config.json").read_text())["run"]["finetune"] == str(ft.parent / "pretrain" / A.WEIGHTS_FILE)
    assert rows["v1-sup"]["n"] == 0 and not (out / "runs" / "v1-sup").exists()  # not selected: listed, not run
    md = (out / "results.md").read_text()
    assert md == report.render_markdown(results) and not results["complete"]
    assert f"| V2 + FCMAE | (default) | 84.6 | {run['value']:.1f} | 1/1 | {run['value']:.1f} |" in md
    assert "| V1 supervised | block=v1; supervised from scratch | 83.8 | – | 0/1 | – |" in md and "1 of 4 runs finished" in md

    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint-last.safetensors")}
    assert len(stamps) == 2 and not list(out.rglob("checkpoint-last.pt"))  # finished: training states removed
    assert main(args) == 0  # nothing left to do
    assert capsys.readouterr().out.count("running in") == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoint-last.safetensors")} == stamps
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    # Another budget in the same folder would mix budgets in one table: refused.
    capsys.readouterr()
    assert main([*args, "--set", "finetune.log_interval=2"]) == 1
    assert "holds a finetune run with other settings" in capsys.readouterr().err


def test_a_stage_killed_after_training_is_completed_without_training_again(tmp_path):
    data = write_digits(tmp_path / "digits", [0, 1], 4, 2)
    opts = Options("table3-codesign", str(data), tmp_path / "t3", seeds=1, rows=["v2-sup"], sets=[s for s in TINY if s != "--set"])

    def killed_after_training(argv):
        train_command(argv)
        raise KeyboardInterrupt  # as a kill between the trainer's last save and the runner's bookkeeping

    with pytest.raises(KeyboardInterrupt):
        reproduce(opts, killed_after_training, say=lambda s: None)
    ft = tmp_path / "t3/runs/v2-sup/seed0/finetune"
    assert (ft / "checkpoint-last.pt").is_file() and not (ft / MARKER).exists()
    weights = (ft / "checkpoint-last.safetensors").stat().st_mtime_ns
    lines = []
    assert reproduce(opts, train_command, say=lines.append) == 0  # --resume auto: at the last epoch, trains nothing
    assert "  finetune: resuming in " + str(ft) in lines
    assert (ft / "checkpoint-last.safetensors").stat().st_mtime_ns == weights and (ft / MARKER).is_file()
    row = json.loads((tmp_path / "t3/results.json").read_text())["rows"][2]
    assert row["id"] == "v2-sup" and row["mean"] == json.loads((ft / "eval.json").read_text())["top1"]


def test_fig4_rows_are_analysed_and_plotted(tmp_path):
    data = write_digits(tmp_path / "digits", [0, 1, 2], 4, 2)
    out = tmp_path / "f4"
    # v1-sup: a supervised run is re-read for the analysis without its (random) start being fetched or
    # checked against its switches.
    opts = Options("fig4-collapse", str(data), out, seeds=1, rows=["v1-fcmae", "v1-sup"],
                   sets=[s for s in TINY if s != "--set"])
    assert reproduce(opts, train_command, say=lambda s: None) == 0
    results = json.loads((out / "results.json").read_text())
    sup = next(r for r in results["rows"] if r["id"] == "v1-sup")
    assert sup["runs"]["0"]["status"] == "done" and len(sup["runs"]["0"]["curve"]["distance"]) == 12
    row = results["rows"][0]
    run = row["runs"]["0"]
    assert row["id"] == "v1-fcmae" and run["status"] == "done" and len(run["curve"]["distance"]) == 12  # atto: 2+2+6+2 blocks
    assert 0 < row["mean"] < 0.5 and len(row["per_stage"]) == 4
    assert results["figure"] == "fig4-collapse.png" and (out / "fig4-collapse.png").stat().st_size > 1000
    assert "| V1 + FCMAE (pre-trained) | block=v1; pre-trained encoder | figure only: collapses (low) |" in (out / "results.md").read_text()


def test_a_diverged_run_is_recorded_once_and_not_retried(tmp_path):
    from convnextv2_hub.train.engine import NonFiniteLossError

    data = write_digits(tmp_path / "digits", [0, 1], 2, 1)
    calls = []

    def diverges(argv):
        calls.append(argv[0])
        raise NonFiniteLossError("loss is nan at epoch 0")

    opts = Options("table16-grn-parts", str(data), tmp_path / "t16", seeds=1, rows=["x-n"])
    assert reproduce(opts, diverges, say=lambda s: None) == 0
    assert reproduce(opts, diverges, say=lambda s: None) == 0
    assert calls == ["pretrain"]  # diverged in pre-training: no fine-tuning, and not run again
    row = json.loads((tmp_path / "t16" / "results.json").read_text())["rows"][3]
    assert row["id"] == "x-n" and row["diverged"] == 1 and row["runs"]["0"]["status"] == "diverged"
    assert "| (c) X·N(X): normalisation, no aggregation | grn_form=x_n | unstable (training diverges) | – | 0/1 (1 diverged) | diverged |" \
        in (tmp_path / "t16" / "results.md").read_text()


def test_results_summary_and_curve_figure(tmp_path):
    assert report.summarize([80.0, 82.0, 84.0]) == {"mean": 82.0, "std": 2.0, "min": 80.0, "max": 84.0, "n": 3}
    from convnextv2_hub.analysis.figures import plot_metric_curve

    summary = plot_metric_curve([(0.6, 90.0, 1.0, 2), (0.1, 85.0, None, 1)], tmp_path / "f8.png", "mask ratio", "top-1", reference=0.6)
    assert [p["x"] for p in summary["points"]] == [0.1, 0.6] and (tmp_path / "f8.png").stat().st_size > 1000
    assert (tmp_path / "f8.csv").read_text().splitlines()[1:] == ["0.1,85.000000,,1", "0.6,90.000000,1.000000,2"]


def test_readme_tables_are_the_commands_output():
    """A README block between ``<!-- reproduce: PATH -->`` and ``<!-- /reproduce -->`` is results.md of PATH."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = report.readme_blocks(text)
    assert len(re.findall("^<!-- reproduce:", text, re.M)) == len(blocks)  # every opened block is closed
    for path, body in blocks:
        assert body == report.render_markdown(json.loads((REPO / path).read_text(encoding="utf-8"))), path
    fake = "x\n<!-- reproduce: a/results.json -->\n| table |\n<!-- /reproduce -->\ny"
    assert report.readme_blocks(fake) == [("a/results.json", "| table |\n")]


def test_builtin_digits_are_written_once(tmp_path):
    from convnextv2_hub.train.digits import COMPLETE_FILE, digits_folder

    root = digits_folder(tmp_path, 8)
    info = json.loads((root / COMPLETE_FILE).read_text())
    assert info["images"] == {"train": 1438, "val": 359} and len(list((root / "val").iterdir())) == 10
    stamp = (root / COMPLETE_FILE).stat().st_mtime_ns
    assert digits_folder(tmp_path, 8) == root and (root / COMPLETE_FILE).stat().st_mtime_ns == stamp


def test_a_launcher_runs_each_stage_as_a_command_and_a_failure_is_retried(tmp_path, monkeypatch):
    """--launcher: each stage is the launcher + ``-m convnextv2_hub.train ...`` (torchrun at full scale). A
    stand-in launcher writes what the trainer would (eval.json) and fails once: the failed run is reported,
    not recorded, and the next call runs it again."""
    data = write_digits(tmp_path / "digits", [0, 1], 2, 1)
    fake = tmp_path / "launch.sh"
    fake.write_text('out=$(echo "$@" | sed "s/.*--output \\([^ ]*\\).*/\\1/")\n'
                    'echo "$*" >> "$LOG"\n'
                    '[ -f "$FAIL_ONCE" ] && { rm "$FAIL_ONCE"; exit 3; }\n'
                    'echo \'{"top1": 55.5, "top5": 100.0}\' > "$out/eval.json"\n')
    log, fail = tmp_path / "calls.txt", tmp_path / "fail"
    fail.touch()
    monkeypatch.setenv("LOG", str(log))
    monkeypatch.setenv("FAIL_ONCE", str(fail))
    opts = Options("table3-codesign", str(data), tmp_path / "t3", seeds=1, rows=["v2-fcmae"], launcher=f"sh {fake}")
    assert reproduce(opts, train_fn=None, say=lambda s: None) == 1
    row = json.loads((tmp_path / "t3" / "results.json").read_text())["rows"][3]
    assert row["n"] == 0 and not (tmp_path / "t3/runs/v2-fcmae/seed0/pretrain" / MARKER).exists()
    assert reproduce(opts, train_fn=None, say=lambda s: None) == 0
    calls = log.read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["pretrain", "pretrain", "finetune"]
    assert all(c.startswith("-m convnextv2_hub.train ") and "--resume auto" in c for c in calls)
    row = json.loads((tmp_path / "t3" / "results.json").read_text())["rows"][3]
    assert row["mean"] == 55.5 and row["runs"]["0"]["status"] == "done"
