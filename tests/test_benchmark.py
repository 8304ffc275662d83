"""The benchmark command: runs, resumes, aggregates over seeds, tests differences; the cost
and reconstruction figures it reports, each against an independent computation."""

import csv
import importlib
import io
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uadjax import metrics
from uadjax.benchmark import cli, entries, ranking, running
from uadjax.data import phantom
from uadjax.methods import get_method
from uadjax.models import unet as unet_module

# Config -> names of the networks in its declared count that are guided-diffusion UNets
# (the counter below sees UNet passes only).
UNET_NETWORKS = {
    "ddpm:tiny,ens": ("unet",), "ddpm:tiny,anoddpm": ("unet",), "pddpm:tiny": ("unet",),
    "cddpm:tiny": ("unet",), "maediff:tiny": ("unet+mae",),
    "disyre:tiny": ("restorer (window)",), "mmccd:tiny": ("f", "g"),
    "mmccd:tiny,cyclic": ("f", "g"), "ldm:tiny": ("latent unet",), "dae:tiny": ("unet",),
}


@pytest.mark.parametrize("spec", sorted(UNET_NETWORKS))
def test_declared_network_evaluations_match_the_unet_passes_counted_at_run_time(
        spec, monkeypatch):
    """Every UNet pass reports its rows through a debug callback (batched under vmap, once
    per scan step): rows / slices must equal the method's declared count."""
    rows = []
    original = unet_module.UNet.__call__

    def counted(self, x, *args, **kwargs):
        marker = jnp.zeros((x.shape[0],))
        for a in (x, *args):
            if isinstance(a, jax.Array) and a.ndim and a.shape[0] == x.shape[0]:
                marker = marker + 0 * a.reshape(a.shape[0], -1)[:, 0]
        jax.debug.callback(lambda m: rows.append(np.size(m)), marker)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(unet_module.UNet, "__call__", counted)
    name, _, arg = spec.partition(":")
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    method = get_method(config.method)
    models = {s.name: s.make_model(config, nnx.Rngs(0)) for s in method.scoring_stages(config)}
    h, w = config.data.image_size
    batch = {"image": jnp.full((2, h, w, len(config.data.modalities)), 0.5),
             "brain_mask": jnp.ones((2, h, w), jnp.uint8)}
    jax.block_until_ready(jax.jit(lambda b, k: method.score_fn(models, b, k, config))(
        batch, jax.random.key(0)))
    jax.effects_barrier()
    declared = method.network_evaluations(config)
    assert sum(rows) / 2 == sum(declared[n] for n in UNET_NETWORKS[spec])


def test_every_method_declares_its_network_evaluations():
    from uadjax.methods import available_methods

    for name in available_methods():
        assert get_method(name).network_evaluations is not None, name


def _exact_sign_flip_p(a, b) -> float:
    """Two-sided p of the mean paired difference, enumerating every sign flip."""
    d = np.asarray(a) - np.asarray(b)
    observed = abs(d.mean())
    flips = [abs((d * np.array(signs)).mean())
             for signs in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean([f >= observed - 1e-12 for f in flips]))


def test_paired_permutation_p_equals_the_exact_sign_flip_test():
    rng = np.random.default_rng(0)
    a = rng.random(9)
    b = a - 0.1 + 0.15 * rng.standard_normal(9)
    assert ranking.paired_permutation_p(a, b) == pytest.approx(_exact_sign_flip_p(a, b),
                                                               abs=1e-9)
    assert ranking.paired_permutation_p(a, a) == 1.0


def test_reconstruction_quality_against_closed_forms():
    rng = np.random.default_rng(0)
    image = rng.random((9, 12, 10, 1))
    mask = np.zeros((9, 12, 10), bool)
    mask[2:8, 3:10, 2:9] = True
    rec = image + 0.05 * rng.standard_normal(image.shape)
    q = metrics.reconstruction_quality(image, rec, mask)
    x, r = np.where(mask[..., None], image, 0), np.where(mask[..., None], rec, 0)
    data_range = image[mask].max() - min(image[mask].min(), 0)
    assert q["psnr"] == pytest.approx(10 * np.log10(data_range ** 2 / np.mean((x - r) ** 2)))
    assert q["l1"] == pytest.approx(np.abs(image - rec)[mask].mean())
    same = metrics.reconstruction_quality(image, image, mask)
    assert same["ssim"] == pytest.approx(1.0) and same["l1"] == 0.0
    assert 0 < q["ssim"] < 1


def test_methods_are_compared_with_their_own_thresholds_and_the_papers_orderings():
    """MMCCD reads FLAIR and T2: its baseline is the better of the two thresholds; DDPM reads
    T2 only. The difference of mean Dice and the exact sign-flip test of per-volume Dice;
    the same for the papers' orderings."""
    from types import SimpleNamespace

    protocol = entries.Protocol(size="tiny", budget="")
    listed = entries.parse_entries("ddpm,mmccd,mmccd:cyclic,threshold,threshold:flair")
    rng = np.random.default_rng(1)
    subjects = [f"sub-{i}" for i in range(7)]
    dice = {"ddpm": rng.random(7), "mmccd": rng.random(7), "mmccd:cyclic": rng.random(7),
            "threshold": rng.random(7) * 0.5, "threshold:flair": 0.3 + rng.random(7) * 0.5}
    records, rows = {}, []
    for entry in listed:
        csv_rows = [{"method": entry.config, "kind": "tumour", "threshold_source": "val",
                     "subject_id": s, "dice": str(d)} for s, d in zip(subjects, dice[entry.key])]
        records[entry.key] = [{"results": SimpleNamespace(method=entry.config),
                               "subjects": csv_rows}]
        rows.append({"key": entry.key, "label": entry.name(), "kinds": {"tumour": {
            "dice": {"mean": float(np.mean(dice[entry.key]))}}}})
    reads = {e.key: tuple(entries.build_config(e, protocol, 0).data.modalities) for e in listed}
    assert reads["mmccd"] == ("flair", "t2")
    ranking._compare_with_own_threshold(listed, reads, records, rows, "tumour")
    by_key = {r["key"]: r["kinds"]["tumour"] for r in rows}
    for key, baseline, modality in (("ddpm", "threshold", "t2"),
                                    ("mmccd", "threshold:flair", "flair")):
        versus = by_key[key]["vs_threshold"]
        assert (versus["key"], versus["modality"]) == (baseline, modality)
        assert versus["delta_dice"] == pytest.approx(dice[key].mean() - dice[baseline].mean())
        assert versus["p"] == pytest.approx(_exact_sign_flip_p(dice[key], dice[baseline]),
                                            abs=1e-9)
    assert "vs_threshold" not in by_key["threshold"]
    assert ranking._threshold_cell(by_key["mmccd"]["vs_threshold"]).endswith(
        f"FLAIR (p {by_key['mmccd']['vs_threshold']['p']:.3f})")

    # The papers' orderings whose two methods are listed, better minus worse.
    orderings = ranking.paper_orderings(listed, records, rows, ["tumour"])
    assert [(o["better"], o["worse"]) for o in orderings] == [("mmccd", "mmccd:cyclic"),
                                                              ("mmccd:cyclic", "ddpm")]
    for o in orderings:
        got = o["kinds"]["tumour"]
        assert got["delta_dice"] == pytest.approx(dice[o["better"]].mean()
                                                  - dice[o["worse"]].mean())
        assert got["p"] == pytest.approx(_exact_sign_flip_p(dice[o["better"]],
                                                            dice[o["worse"]]), abs=1e-9)
    md = ranking.to_markdown({"kinds": ["tumour"], "rows": [], "orderings": orderings})
    assert "| MMCCD > Cyclic UNet | MMCCD paper Table 1" in md


def test_paper_numbers_only_under_the_reproduced_protocol():
    ddpm = entries.parse_entry("ddpm")
    brats = {"modalities": ["t2"], "kinds": {"tumour": ["brats2021"]}}
    paper = entries.Protocol(size="paper", budget="")
    assert ranking.paper_number(ddpm, "tumour", paper, brats)["dice"] == 44.25
    assert ranking.paper_number(ddpm, "tumour", entries.Protocol(), brats) is None
    assert ranking.paper_number(ddpm, "tumour", paper, None) is None  # the phantom
    assert ranking.paper_number(ddpm, "tumour", paper,
                                  {"modalities": ["t1"], "kinds": {"tumour": ["brats2021"]}}) is None


def test_parse_entries():
    assert [e.key for e in entries.parse_entries("all")] == [e.key for e in entries.ENTRIES]
    entry = entries.parse_entry("disyre:t1+multistep")
    assert (entry.config, entry.train_modifiers, entry.test_modifiers) == ("disyre", "t1",
                                                                          "multistep")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        entries.parse_entry("nope")


def _bench_args(tiny_data, root, seeds="0,1"):
    return ["--methods=ddpm,ddpm+ens,ae,threshold", "--size=tiny", "--budget=full",
            f"--seeds={seeds}", f"--root={root}", f"--data_dir={tiny_data.data_dir}",
            f"--override=data.phantom_dir={tiny_data.phantom_dir}"]


def test_benchmark_runs_resumes_and_aggregates_over_seeds(tiny_data, tmp_path, capsys):
    root = tmp_path / "bench"
    assert cli.main(_bench_args(tiny_data, root)) == 0
    out = capsys.readouterr().out
    assert "[1/8] DDPM seed 0: started" in out
    assert "[8/8] intensity threshold seed 1: done" in out  # an ordinary, untrained run
    assert "about" in out and "left" in out  # the estimate of what remains
    board = json.loads((root / "leaderboard.json").read_text())
    for name in board["figures"]:
        assert (root / name).stat().st_size > 0
    assert {"maps_tumour.png", "pr_tumour.png", "speed_accuracy.png"} <= set(board["figures"])

    # Every aggregate equals the mean (and sample std) of the per-seed results files.
    rows = {r["key"]: r for r in board["rows"]}
    for key, folder, source, eval_name in (
            ("ddpm", "ddpm-tiny", "ddpm", "eval_benchmark"),
            ("ddpm+ens", "ddpm-tiny", "ddpm", "eval_benchmark_ens"),
            ("threshold", "threshold-tiny", "threshold", "eval_benchmark")):
        per_seed = []
        for seed in (0, 1):
            res = json.loads((root / folder / f"seed{seed}" / eval_name /
                              "results.json").read_text())
            per_seed.append(res["results"][source]["kinds"]["tumour"]["val"]["per_volume"])
        got = rows[key]["kinds"]["tumour"]
        dice = [p["dice"]["mean"] for p in per_seed]
        assert got["dice"]["mean"] == pytest.approx(np.mean(dice))
        assert got["dice"]["std"] == pytest.approx(np.std(dice, ddof=1))
        assert got["auprc"]["mean"] == pytest.approx(np.mean([p["ap"]["mean"] for p in per_seed]))
    # DDPM reads T2: the T2 threshold is its baseline (the paired test: the unit test below).
    versus = rows["ddpm+ens"]["kinds"]["tumour"]["vs_threshold"]
    assert (versus["key"], versus["modality"]) == ("threshold", "t2")
    assert versus["delta_dice"] == pytest.approx(rows["ddpm+ens"]["kinds"]["tumour"]["dice"][
        "mean"] - rows["threshold"]["kinds"]["tumour"]["dice"]["mean"])
    assert "vs_threshold" not in rows["threshold"]["kinds"]["tumour"]
    assert rows["ddpm+ens"]["network_evaluations_per_volume"] == pytest.approx(
        3 * rows["ddpm"]["network_evaluations_per_volume"])
    assert rows["ddpm"]["reconstruction"]["ssim"]["n"] == 2
    assert "reconstruction" not in rows["threshold"] or not rows["threshold"]["reconstruction"]
    # The threshold run scores what the baseline beside the DDPM scores: the same numbers.
    for seed in (0, 1):
        own = json.loads((root / "threshold-tiny" / f"seed{seed}" / "eval_benchmark" /
                          "results.json").read_text())["results"]["threshold"]
        beside = json.loads((root / "ddpm-tiny" / f"seed{seed}" / "eval_benchmark" /
                             "results.json").read_text())["results"]["threshold"]
        for kind, entry in beside["kinds"].items():  # its own run adds the PR curve
            assert {k: v for k, v in own["kinds"][kind].items() if k != "pr_curve"} == entry
    table = list(csv.DictReader(io.StringIO((root / "leaderboard.csv").read_text())))
    assert {r["metric"] for r in table} >= {"dice", "auprc", "auroc", "dice_oracle",
                                            "healthy_fp_ml", "seconds_per_volume", "ssim",
                                            "l1_ratio", "network_evaluations_per_volume"}
    md = (root / "leaderboard.md").read_text()
    assert "best" in md and "### Reconstruction of healthy test subjects" in md
    assert f"{100 * versus['delta_dice']:+.1f} T2 (p " in md
    # Exactly one best per lesion kind; the others carry a p-value.
    for kind in board["kinds"]:
        marks = [r["kinds"][kind].get("best") for r in board["rows"]
                 if math.isfinite(r["kinds"][kind]["dice"]["mean"])]
        assert marks.count(True) == 1

    # A rerun trains and evaluates nothing: the same leaderboard, read back from disk.
    stamp = (root / "ddpm-tiny" / "seed0" / "eval_benchmark" / "results.json").stat().st_mtime
    assert cli.main(_bench_args(tiny_data, root)) == 0
    assert (root / "ddpm-tiny" / "seed0" / "eval_benchmark" /
            "results.json").stat().st_mtime == stamp
    again = json.loads((root / "leaderboard.json").read_text())
    assert again["rows"] == board["rows"]
    assert again["machine"]["cpus"] == os.cpu_count()

    # Publishing copies everything and regenerates only the README's marked section.
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{cli.README_START}\nold\n{cli.README_END}\nafter\n")
    cli.publish(str(root), str(tmp_path / "docs" / "lb"), str(readme))
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{cli.README_END}\nafter\n")
    assert "\nold\n" not in text and "(docs/lb/speed_accuracy.png)" in text and "DDPM-ENS" in text
    for name in ("leaderboard.md", "leaderboard.csv", *board["figures"]):
        assert (tmp_path / "docs" / "lb" / name).is_file()


def test_benchmark_reports_a_failed_run_and_ranks_the_others(tiny_data, tmp_path, capsys,
                                                              monkeypatch):
    root = tmp_path / "bench"
    args = _bench_args(tiny_data, root, seeds="0")
    args[0] = "--methods=ddpm,ae"
    run_one = running.run_one

    def ae_fails(entry, *rest):
        if entry.key == "ae":
            raise RuntimeError("disk on fire")
        return run_one(entry, *rest)

    monkeypatch.setattr(running, "run_one", ae_fails)
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "AE seed 0: FAILED (RuntimeError: disk on fire)" in out
    board = json.loads((root / "leaderboard.json").read_text())
    # DDPM and AE read T2 and no threshold row is listed: the T2 threshold row joins.
    assert [(r["key"], r["seeds"]) for r in board["rows"]] == [
        ("ddpm", 1), ("ae", 0), ("threshold:t2", 1)]


def test_a_budget_list_trains_each_budget_and_writes_the_curve(tiny_data, tmp_path):
    """--budget=full,short: one run folder per budget; the curve's rows are those runs'
    results, at their step counts; the leaderboard is the first budget's."""
    root = tmp_path / "bench"
    args = _bench_args(tiny_data, root, seeds="0")
    args[0], args[2] = "--methods=ae", "--budget=full,short"
    assert cli.main(args) == 0
    curve = json.loads((root / "budget_curve.json").read_text())
    rows = {(r["budget"], r["kind"]): r for r in curve["rows"] if r["method"] == "AE"}
    # AE reads T2: its threshold row joins, untrained (0 steps) at every budget.
    assert {r["steps"] for r in curve["rows"] if r["method"] != "AE"} == {0}
    for budget, folder, steps in (("full", "ae-tiny", 2), ("short", "ae-tiny_short", 300)):
        res = json.loads((root / folder / "seed0" / "eval_benchmark" /
                          "results.json").read_text())
        for kind, entry in res["results"]["ae"]["kinds"].items():
            row = rows[(budget, kind)]
            assert row["steps"] == steps and row["seeds"] == 1
            assert row["dice"]["mean"] == pytest.approx(entry["val"]["per_volume"]["dice"]["mean"])
            assert row["auprc"]["mean"] == pytest.approx(entry["val"]["per_volume"]["ap"]["mean"])
    assert (root / "budget_curve.png").stat().st_size > 0
    assert "| AE |" in (root / "budget_curve.md").read_text()
    board = json.loads((root / "leaderboard.json").read_text())
    assert board["protocol"]["budget"] in ("", "full")
    assert board["protocol"]["phantom_generator"] == phantom.GENERATOR_VERSION
    assert cli.main([*args[:2], "--budget=short,short", *args[3:]]) == 2


def test_every_modality_a_method_reads_gets_its_threshold_row(tiny_data, tmp_path):
    """MMCCD reads FLAIR and T2: the FLAIR threshold joins the T2 baseline; a list without
    the baseline gets a T2 row of its own. A threshold row runs untrained."""
    protocol = entries.Protocol(size="tiny", budget="")
    keys = [e.key for e in entries.with_threshold_rows(
        entries.parse_entries("ddpm,mmccd,threshold"), protocol)]
    assert keys == ["ddpm", "mmccd", "threshold", "threshold:flair"]
    keys = [e.key for e in entries.with_threshold_rows(
        entries.parse_entries("disyre"), protocol)]
    assert keys == ["disyre", "threshold:t2"]
    assert entries.parse_entry("threshold:flair").label == "intensity threshold, FLAIR"
    root = tmp_path / "bench"
    args = _bench_args(tiny_data, root, seeds="0")
    args[0] = "--methods=threshold:flair"
    assert cli.main(args) == 0
    board = json.loads((root / "leaderboard.json").read_text())
    assert [r["label"] for r in board["rows"]] == ["intensity threshold, FLAIR"]
    res = json.loads((root / "threshold-tiny_flair" / "seed0" / "eval_benchmark" /
                      "results.json").read_text())
    assert res["modalities"] == ["flair"]


def test_benchmark_refuses_bad_arguments_before_running(tiny_data, tmp_path, capsys):
    root = tmp_path / "bench"
    assert cli.main([*_bench_args(tiny_data, root), "--override=train.nope=1"]) == 2
    assert "the config has no key 'nope'" in capsys.readouterr().err
    assert cli.main([*_bench_args(tiny_data, root), "--methods=ddpm,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not list(root.glob("*/seed*"))  # nothing was started


def test_logged_train_seconds_of_runs_trained_elsewhere(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"train": {"batch_size": 16}, "stage_train": {"pretrain": {"batch_size": 8}}}))
    for stage, lines in (("pretrain", [(50, 8.0), (100, 16.0)]), ("diffusion", [(100, 32.0)])):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "metrics.jsonl").write_text("\n".join(
            json.dumps({"step": s, "split": "train", "slices_per_s": v}) for s, v in lines)
            + "\n" + json.dumps({"step": 100, "split": "val", "loss": 1.0}) + "\n")
    expected = 50 * 8 / 8.0 + 50 * 8 / 16.0 + 100 * 16 / 32.0
    assert running.logged_train_seconds(str(tmp_path)) == pytest.approx(expected)
    assert running.logged_train_seconds(str(tmp_path / "missing")) is None


def test_a_run_folder_is_not_reused_under_another_dataset_or_overrides(tmp_path):
    phantom = entries.Protocol()
    real = entries.Protocol(dataset_dir="data/ixi_brats")
    running.check_protocol(str(tmp_path / "a"), phantom)
    running.check_protocol(str(tmp_path / "a"), phantom)  # same protocol: fine
    with pytest.raises(ValueError, match="use another --root"):
        running.check_protocol(str(tmp_path / "a"), real)
    (tmp_path / "old").mkdir()  # a run made before protocols were recorded (the phantom)
    (tmp_path / "old" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="use another --root"):
        running.check_protocol(str(tmp_path / "old"), real)
    running.check_protocol(str(tmp_path / "old"), phantom)


def test_published_budget_curves_accumulate_across_commands(tmp_path):
    """A second benchmark command's budget curve joins the published one: its rows replace
    those of the same method, budget and kind; the others stay, each with its command."""
    stat = {"mean": 0.5, "std": 0.0, "n": 1}

    def row(method, budget, kind, steps, dice=0.5):
        return {"method": method, "budget": budget, "kind": kind, "steps": steps, "seeds": 1,
                "dice": {**stat, "mean": dice}, "auprc": stat}

    published = {"rows": [row("DISYRE", "short", "tumour", 300),
                          row("MMCCD", "short", "tumour", 300, dice=0.1)],
                 "command": "bench --methods=disyre", "phantom_generator": 3}
    new = {"rows": [row("MMCCD", "short", "tumour", 300, dice=0.2),
                    row("MMCCD", "long", "tumour", 3000, dice=0.4)],
           "command": "bench --methods=mmccd", "phantom_generator": 3}
    merged = cli.merge_budget_curves(published, new)
    got = {(r["method"], r["budget"]): (r["dice"]["mean"], r["command"]) for r in merged["rows"]}
    assert got == {("DISYRE", "short"): (0.5, "bench --methods=disyre"),
                   ("MMCCD", "short"): (0.2, "bench --methods=mmccd"),
                   ("MMCCD", "long"): (0.4, "bench --methods=mmccd")}
    root, target = tmp_path / "root", tmp_path / "docs"
    root.mkdir()
    target.mkdir()
    (root / "budget_curve.json").write_text(json.dumps(new))
    (target / "budget_curve.json").write_text(json.dumps(published))
    cli.publish_budget_curve(str(root), str(target))
    on_disk = json.loads((target / "budget_curve.json").read_text())
    assert len(on_disk["rows"]) == 3
    text = (target / "budget_curve.md").read_text()
    assert "`bench --methods=disyre`" in text and "`bench --methods=mmccd`" in text
    assert "| DISYRE |" in text and (target / "budget_curve.png").stat().st_size > 0
