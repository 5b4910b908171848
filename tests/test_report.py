"""Reports without a search: fronts against a fixed reference point, fronts with nothing to trade, legends."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_spec

from sharetune.analysis.figures import save_figure
from sharetune.search import console, report
from sharetune.spaces import SpecError, parse_spec
from sharetune.text import number, plural

# What report.py draws in: trials in C0 at alpha 0.5 (on white), the front in C3; lines and labels take C0, C1, ...
TRIALS, FRONT = (143, 187, 218), (214, 39, 40)
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def spots(png, colour) -> int:
    """Separate patches of `colour` in a saved figure: a marker, a line or a legend entry each (scraps of
    anti-aliasing under 5 pixels are left out)."""
    from PIL import Image
    from scipy import ndimage

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    patches, _ = ndimage.label(np.abs(pixels - colour).max(axis=-1) <= 3)
    return int((np.bincount(patches.ravel())[1:] >= 5).sum())


def trials(accuracy, unique, virtual=2000, macs=5000) -> pd.DataFrame:
    count = len(accuracy)
    return pd.DataFrame({"trial_id": [f"t{i}" for i in range(count)], "status": ["TERMINATED"] * count, "diverged": [0] * count,
                         "test_accuracy": accuracy, "unique_params": unique, "virtual_params": [virtual] * count,
                         "macs": [macs] * count if np.isscalar(macs) else macs, "sparsity": np.linspace(0, 0.9, count)})


def test_the_hypervolume_is_measured_from_the_dense_models_cost_whatever_the_results():
    one = report.pareto(trials([0.9], [1000]), "unique_params")[1]
    assert one == pytest.approx(0.9 * (2000 - 1000) / 2000)
    # another search of the same problem found other trials; its reference (accuracy 0, 2000) is the same
    other = report.pareto(trials([0.9, 0.5], [1000, 1900]), "unique_params")[1]
    assert other == pytest.approx(one)  # the second point adds nothing: it is dominated
    assert report.pareto(trials([0.9], [1000]), "unique_params", {"unique_params": 4000})[1] == pytest.approx(0.9 * 3000 / 4000)


def test_a_front_whose_cost_never_changes_is_not_plotted_and_says_why(tmp_path):
    built = report.build_report(trials([0.5, 0.7, 0.9], [300, 600, 1200]), tmp_path)
    assert "macs" not in built.hypervolume and not (tmp_path / "pareto_macs.png").exists()
    assert built.skipped["macs"] == "every trial has macs 5000: no trade-off against it to plot or measure"
    assert "Pareto front, test_accuracy against macs: none; every trial has macs 5000" in console.fronts(built)
    assert (tmp_path / "pareto_unique_params.png").is_file() and 0 < built.hypervolume["unique_params"] <= 1


def test_the_front_plot_shows_every_trial_and_the_front_as_a_step(tmp_path):
    """A file is not a plot: the figure must hold the points and the front it is about."""
    built = report.build_report(trials([0.5, 0.8, 0.6, 0.9, 0.7], [300, 600, 900, 1200, 1500]), tmp_path)
    assert list(built.fronts["unique_params"]["trial_id"]) == ["t0", "t1", "t3"]
    png = tmp_path / "pareto_unique_params.png"
    assert spots(png, TRIALS) == 3  # t2 and t4, off the front, and the legend's marker (the front's own are drawn over)
    assert spots(png, FRONT) >= 2  # the step through t0, t1, t3 and its legend entry


def test_a_search_gets_the_plots_its_settings_warrant_one_colour_per_group(tmp_path):
    """ArbNet's figures: accuracy against alpha and entropy (dirichlet), radius (neighborhood), one line
    per sparsity; and against parameters by whatever distinguishes the trials (here the hash)."""
    table = trials([0.5, 0.8, 0.6, 0.9, 0.7], [300, 600, 900, 1200, 1500]).assign(
        hash=["dirichlet"] * 3 + ["uniform"] * 2, alpha=[0.01, 1.0, 100.0, np.nan, np.nan], entropy=[1.0, 3.0, 4.0, 4.5, 4.6])
    constant = report.build_report(table.assign(hash="dirichlet", alpha=1.0), tmp_path / "one-alpha")
    assert "accuracy_vs_alpha.png" not in [p.name for p in constant.files]  # every point at one x: no plot
    built = report.build_report(table, tmp_path / "dirichlet")
    assert [p.name for p in built.files] == ["trials.csv", "trials.parquet", "pareto_unique_params.png", "accuracy_vs_alpha.png",
                                             "accuracy_vs_entropy.png", "accuracy_vs_params_by_hash.png"]
    alpha, entropy, by_hash = built.files[3:]
    # a line (a slanted one comes in pieces) and a legend entry per sparsity: the 3 dirichlet trials' own, then
    # the 5 trials' in LEGEND_GROUPS ranges
    assert [spots(alpha, colour) >= 2 for colour in COLOURS] == [True, True, True, False]
    assert [spots(entropy, colour) >= 2 for colour in COLOURS] == [True, True, True, True]
    assert [spots(by_hash, colour) for colour in COLOURS] == [4, 3, 0, 0]  # a point per trial and a legend entry per hash
    # entropy is plotted beside alpha only; a neighborhood search gets radius, and no label (one hash)
    neighborhood = trials([0.5, 0.8, 0.6], [300, 600, 900]).assign(hash="neighborhood", radius=[0, 2, 8], entropy=[1.0, 2.0, 3.0])
    built = report.build_report(neighborhood, tmp_path / "neighborhood")
    assert [p.name for p in built.files] == ["trials.csv", "trials.parquet", "pareto_unique_params.png", "accuracy_vs_radius.png"]
    assert [spots(built.files[3], colour) >= 2 for colour in COLOURS] == [True, True, True, False]


def test_a_search_where_no_trial_trained_measures_no_hypervolume(tmp_path):
    failed = trials([np.nan, np.nan], [300, 600]).assign(status="ERROR")
    built = report.build_report(failed, tmp_path)
    assert built.hypervolume == {} and set(built.skipped.values()) == {"no trial trained to its end: nothing to plot or measure"}
    assert "Pareto front, test_accuracy against unique_params: none; no trial trained to its end" in console.fronts(built)


def test_continuous_settings_get_a_few_readable_legend_groups():
    labels = report.legend_groups(pd.Series(np.random.default_rng(0).uniform(0, 0.9, 17)))
    assert labels.nunique() == report.LEGEND_GROUPS and max(map(len, labels.unique())) <= 11
    assert report.legend_groups(pd.Series([0.1, 0.30000000000000004])).tolist() == ["0.1", "0.3"]
    assert report.legend_groups(pd.Series(["uniform", "dirichlet"])).tolist() == ["uniform", "dirichlet"]


def test_a_spec_may_set_the_reference_costs_and_only_those():
    spec = parse_spec(tiny_spec(hypervolume_reference={"unique_params": 2e5}))
    assert spec.hypervolume_reference == {"unique_params": 2e5}
    with pytest.raises(SpecError, match="hypervolume_reference: flops: 1.0; give a cost above 0 for any of unique_params, macs"):
        parse_spec(tiny_spec(hypervolume_reference={"flops": 1.0}))


def test_repeated_seeds_become_one_row_per_configuration_with_their_spread(tmp_path):
    seeds = trials([0.6, 0.8, 0.3, 0.5], [300, 300, 900, 900]).assign(
        configuration=[0, 0, 1, 1], seed=[0, 1, 0, 1], val_accuracy=[0.7, 0.9, 0.2, 0.4])
    skipped = pd.DataFrame({"status": ["INFEASIBLE"], "configuration": [2], "unique_params": [5000]})
    built = report.build_report(pd.concat([seeds, skipped], ignore_index=True), tmp_path)
    table = built.configurations.set_index("configuration")
    assert table.loc[0, "test_accuracy"] == pytest.approx(0.7) and table.loc[0, "test_accuracy_std"] == pytest.approx(0.02 ** 0.5)
    assert table.loc[1, "repeats"] == 2 and table.loc[1, "trial_id"] == "t2,t3" and table.loc[1, "seed"] == "0,1"
    resumed = report.configurations(seeds.iloc[::-1])  # a resumed search's folder lists the trials in another order
    assert resumed.set_index("configuration").loc[1, ["trial_id", "seed"]].tolist() == ["t2,t3", "0,1"]
    assert table.loc[2, "status"] == "INFEASIBLE"  # kept, but no front or plot point
    assert list(built.fronts["unique_params"]["configuration"]) == [0]  # the means: 0.7 at 300 dominates 0.4 at 900
    assert (tmp_path / "configurations.csv").is_file() and (tmp_path / "pareto_unique_params.png").is_file()
    # the parent run gets the best configuration by val accuracy: its accuracies, mean and spread
    assert report.best_configuration(built) == pytest.approx({
        "best_val_accuracy_mean": 0.8, "best_val_accuracy_std": 0.02 ** 0.5,
        "best_test_accuracy_mean": 0.7, "best_test_accuracy_std": 0.02 ** 0.5})
    assert "repeats" in console.top_trials(built.configurations, parse_spec(tiny_spec()))


def test_with_repeated_seeds_the_plots_say_a_point_is_a_configurations_mean_and_its_bar_the_spread(tmp_path, monkeypatch):
    """A walk read 'trials' on points that were configuration means, with nothing saying what the bars were."""
    drawn = {}

    def record(fig, path):
        axes = fig.axes[0]
        drawn[Path(path).name] = (axes.get_ylabel(), [text.get_text() for text in axes.get_legend().get_texts()])
        return save_figure(fig, path)

    monkeypatch.setattr(report, "save_figure", record)
    seeds = trials([0.6, 0.8, 0.3, 0.5], [300, 300, 900, 900]).assign(configuration=[0, 0, 1, 1], seed=[0, 1, 0, 1])
    report.build_report(seeds, tmp_path / "repeated")
    assert drawn["pareto_unique_params.png"] == ("test_accuracy: mean ± sample std over 2 seeds", ["Pareto front", "configurations"])
    report.build_report(trials([0.6, 0.8], [300, 900]), tmp_path / "single")
    assert drawn["pareto_unique_params.png"] == ("test_accuracy", ["Pareto front", "trials"])


def test_the_summary_shows_spin_costs_in_the_papers_units():
    built = trials([0.6, 0.8], [2_300_000, 9_100_000]).assign(macs=[1.2e9, 4.5e9], status="TERMINATED")
    spec = parse_spec(tiny_spec(family="spin", fixed={"dim": 16, "depth": 4, "epochs": 1}, dimensions={"share_rate": {"choice": [1, 2]}}))
    lines = console.top_trials(built, spec).splitlines()
    assert lines[1].split()[:5] == ["trial_id", "status", "test_accuracy", "params_M", "macs_G"]
    assert lines[2].split()[2:5] == ["0.8", "9.1", "4.5"] and lines[3].split()[2:5] == ["0.6", "2.3", "1.2"]
    spec = spec.model_copy(update={"objectives": {"test_accuracy": "max", "unique_params": "min"}})
    assert console.top_trials(built, spec).splitlines()[1].split()[:5] == ["trial_id", "status", "test_accuracy", "unique_params", "macs_G"]
    fused = parse_spec(tiny_spec(family="spin", fixed={"share_rate": 2, "pretrain_epochs": 1, "epochs": 2},
                                 dimensions={"fusion": {"choice": [None, "mean"]}}))
    rows = console.top_trials(built.assign(fusion=[None, "mean"]), fused).splitlines()[2:]
    assert [row.split()[-1] for row in rows] == ["mean", "none"]  # a null choice is none, not NaN
    # a trial a scheduler stopped early: its accuracy is from fewer epochs, shown beside it
    assert "epochs_done" not in console.top_trials(built.assign(epochs_done=[3, 3]), spec)
    lines = console.top_trials(built.assign(epochs_done=[1, 3]), spec).splitlines()
    assert lines[1].split()[:4] == ["trial_id", "status", "epochs_done", "test_accuracy"] and lines[3].split()[2:4] == ["1", "0.6"]


def test_a_front_table_shows_the_settings_the_trials_differ_in(tmp_path):
    table = trials([0.6, 0.8, 0.7], [300, 900, 600]).assign(compression=[0.1, 0.3, 0.2], hash="uniform", hidden=[[16]] * 3)
    header = console.fronts(report.build_report(table, tmp_path)).splitlines()[2].split()
    assert header == ["trial_id", "test_accuracy", "unique_params", "sparsity", "compression"]  # not hash nor hidden: all alike


def test_the_comparison_is_coloured_by_the_first_searched_setting_every_trial_has():
    from sharetune.search.comparison import colour_column

    table = pd.DataFrame({"radius": [1.0, 2.0, None, None], "hash": ["neighborhood"] * 2 + ["dirichlet"] * 2, "seed": [0] * 4})
    assert colour_column(table, ["radius", "hash", "seed"]) == "hash"  # radius: the neighborhood trials' alone
    assert colour_column(table, ["seed", "radius"]) == "radius"  # the only one that varies
    assert colour_column(table, ["seed"]) is None


def test_images_a_trial_could_not_decode_get_a_line_on_the_console():
    """The warning naming them goes to the trial's log on its node, where no one looks."""
    folders = pd.DataFrame({"trial_id": ["a", "b"], "unreadable_images": [3.0, 2.0]})
    assert console.unreadable_note(folders) == ("unreadable images: a trial skipped up to 3 it could not decode "
                                                "(the metric unreadable_images; the trials' logs name the files)")
    assert console.unreadable_note(folders.assign(unreadable_images=[0.0, 0.0])) is None
    assert console.unreadable_note(folders.assign(unreadable_images=float("nan"))) is None  # sets in memory
    assert console.unreadable_note(folders.drop(columns="unreadable_images")) is None


def test_whole_numbers_read_as_themselves_in_the_tables_and_lines():
    """`list` showed 63831 parameters as 6.383e+04, and a table's column of them 1.046e+04."""
    assert [number(v) for v in (458573.0, 0.58134, 1.0, float("nan"), 3.0155e7 + 0.5)] == ["458573", "0.5813", "1", "nan", "3.016e+07"]
    assert [number(63831), number(np.int64(63831))] == ["63831", "63831"]  # a result's unique_params is an int
    assert [plural(1, "epoch"), plural(0, "epoch"), plural(3, "trial")] == ["1 epoch", "0 epochs", "3 trials"]
    table = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2, "test_accuracy": [0.5, 0.75],
                          "unique_params": [10460.0, 63831.0]})
    assert console.top_trials(table, parse_spec(tiny_spec())).splitlines()[1:] == [
        "trial_id     status  test_accuracy  unique_params", "       b TERMINATED           0.75          63831",
        "       a TERMINATED            0.5          10460"]
