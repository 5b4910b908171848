"""Past searches under a storage location, read from their folders: what `sharetune list` shows.

A search folder holds its spec (written once Ray has started, so its time is the search's start), Tune's
state (each trial's status and last results) and, while a driver runs it, that driver's lease: a search
with a live lease is `running`; one with trials left and no driver is `incomplete`, and `sharetune
resume` continues it; one its time limit ended with trials cut short is `out of time` (a resume does not renew
the limit); one Tune records no trial of has `no trials` (none met the constraints, or it stopped
before its first), and there is nothing to resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pyarrow import fs

from sharetune.search.lease import running_driver
from sharetune.search.outcome import CUT, ENDED, FAILED
from sharetune.search.report import TRAINED, configurations, converged, proposed, trials_from_folder
from sharetune.search.searcher import CONFIGURATION
from sharetune.search.storage import SPEC_FILE, SearchFolder, StateError, canonical
from sharetune.spaces import SpecError
from sharetune.spaces.locations import DEFAULT_STORAGE
from sharetune.text import number


@dataclass(frozen=True)
class PastSearch:
    folder: SearchFolder
    name: str
    started: datetime | None
    planned: int  # trials the budget asks for (num_samples x repeats), or a finite space's feasible ones where it ran out first
    done: int  # trials that ended, failed ones included
    failed: int
    pending: int  # trials Tune has but that have not ended
    cut: int  # trials the search's time limit ended before their last epoch (the limit is spent: resume trains no more)
    best: dict[str, float]  # objective -> its best last value over the configurations that converged (their seeds' mean)
    damaged: str = ""  # why the folder cannot be read, where it cannot
    running: bool = False  # a driver holds its lease now

    @property
    def status(self) -> str:
        if self.damaged:
            return "damaged"
        if self.running:
            return "running"
        if self.done == self.pending == 0:
            return "no trials"
        if self.pending:
            return "incomplete"
        if self.cut:  # ended by the time limit, with trials it cut short
            return "out of time"
        return "finished" if self.done >= self.planned else "incomplete"


def describe(folder: SearchFolder, started: datetime | None = None) -> PastSearch:
    """The search in `folder` as the report's table has it: the best of each objective is the summary's
    (over the configurations that trained to their end, by their seeds' mean)."""
    spec = folder.spec()
    running = running_driver(folder) is not None
    try:
        table = trials_from_folder(folder)
    except FileNotFoundError:  # no trial yet
        return PastSearch(folder, spec.name, started, spec.planned_trials(), done=0, failed=0, pending=0, cut=0, best={},
                          running=running)
    trials = table[table["trial_id"].notna()]
    ended = trials["status"].isin(ENDED)
    done = converged(configurations(trials[trials["status"].isin(TRAINED)]))  # a diverged net's accuracy is no one's best
    best = {objective: float(done[objective].max() if mode == "max" else done[objective].min())
            for objective, mode in spec.objectives.items() if objective in done and done[objective].notna().any()}
    trained = trials[CONFIGURATION].nunique() if CONFIGURATION in trials else len(trials)
    planned = trained * spec.repeats if spec.ran_out(proposed(table)) else spec.planned_trials()  # all a finite space held
    return PastSearch(folder, spec.name, started, planned, done=int(ended.sum()), failed=int((trials["status"] == FAILED).sum()),
                      pending=int((~ended).sum()), cut=int((trials["status"] == CUT).sum()), best=best,
                      running=running)


def past_searches(storage: str | None = None) -> list[PastSearch]:
    """The searches under `storage` (a path or URI; default DEFAULT_STORAGE), newest first.
    FileNotFoundError when `storage` does not exist, ValueError where it is a file or a search folder."""
    where = canonical(storage or DEFAULT_STORAGE)
    filesystem, root = fs.FileSystem.from_uri(where)
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.File:
        raise ValueError(f"{where} is a file; give the folder that holds the search folders")
    if kind != fs.FileType.Directory:
        raise FileNotFoundError(f"--storage: no folder {where}")
    if filesystem.get_file_info(f"{root}/{SPEC_FILE}").type == fs.FileType.File:
        raise ValueError(f"{where} is a search folder; give the folder that holds it, {where.rpartition('/')[0]}")
    searches = []
    for entry in filesystem.get_file_info(fs.FileSelector(root)):
        spec_file = filesystem.get_file_info(f"{entry.path}/{SPEC_FILE}")
        if entry.type == fs.FileType.Directory and spec_file.type == fs.FileType.File:
            folder = SearchFolder.at(storage or DEFAULT_STORAGE, entry.base_name)
            started = spec_file.mtime.astimezone() if spec_file.mtime else None
            try:
                searches.append(describe(folder, started))
            except (SpecError, StateError) as err:  # one damaged folder is listed as such; the others still are
                searches.append(PastSearch(folder, entry.base_name, started, planned=0, done=0, failed=0, pending=0, cut=0,
                                           best={}, damaged=str(err)))
    return sorted(searches, key=lambda s: s.started.timestamp() if s.started else 0.0, reverse=True)


def table_rows(searches: list[PastSearch]) -> list[dict[str, str]]:
    """One row of text per search, for the console (a damaged one's reason goes below the table)."""
    return [{
        "name": s.name, "started": s.started.strftime("%Y-%m-%d %H:%M") if s.started else "?", "status": s.status,
        "trials": f"{s.done}/{s.planned}" + (f" ({s.failed} failed)" if s.failed else ""),
        "best": ", ".join(f"{k} {number(v)}" for k, v in s.best.items()) or "-", "folder": str(s.folder),
    } for s in searches]
