"""Successive halving's rungs kept in the search folder as they change.

Tune saves no scheduler state: a resumed search rebuilds its scheduler as it was when the search
started (from tuner.pkl), so without a copy it would rank its next trials against empty rungs and
stop none of them until new trials filled the rungs again.
"""

from __future__ import annotations

import json
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from sharetune.errors import first_line
from sharetune.search.storage import StateError
from sharetune.spaces.spec import joined
from sharetune.storage_filesystem import FileStore


class RungsFile(BaseModel):
    """What a scheduler's RUNGS_FILE holds, each scheduler's records added; read strictly (a string where
    a number belongs is damage, not a number), so that a damaged file is refused before Tune's loop."""

    model_config = ConfigDict(strict=True, extra="forbid")
    stopped: int  # how many trials the scheduler stopped


class KeptRungs:
    """A scheduler's rungs, written to `store` whenever they change and read back once in a resumed
    search; a scheduler has `_rung_state` (JSON-ready), `_load_rungs` (its inverse, from its
    `RungsFile` model) and `Rungs`, that model."""

    RUNGS_FILE: ClassVar[str]
    Rungs: ClassVar[type[RungsFile]]
    store: FileStore | None = None  # a scheduler an earlier version pickled has neither: it keeps its rungs in memory
    restored = True
    written: str | None = None  # what the store holds, so that a result that changes no rung writes nothing

    def keep_rungs_in(self, store: FileStore | None) -> None:
        self.store, self.restored = store, store is None

    def _rung_state(self) -> dict:
        raise NotImplementedError  # each scheduler's own records

    def _load_rungs(self, state: RungsFile) -> None:
        raise NotImplementedError

    def save_rungs(self) -> None:
        state = json.dumps(self._rung_state())
        if self.store is not None and state != self.written:
            self.store.write(self.RUNGS_FILE, state.encode())
            self.written = state

    def restore_rungs(self) -> None:
        """Once, in a resumed search's scheduler: the rungs as the folder holds them (none in a new search)."""
        if self.restored:
            return
        self.restored = True
        saved = self.store.read(self.RUNGS_FILE)
        if saved is not None:
            self._load_rungs(self.Rungs.model_validate_json(saved))

    def check_kept(self) -> None:
        """StateError, naming the file, where the rungs kept in the store do not read back (damaged):
        `resume` checks them so, with the search's own scheduler, before anything starts; inside Tune's
        loop the same error was a traceback."""
        try:
            self.restore_rungs()
        except ValueError as err:  # not JSON; JSON of another shape or with values of another type
            why = _problems(err) if isinstance(err, ValidationError) else first_line(err)
            raise StateError(f"{self.store}: {self.RUNGS_FILE} is damaged ({why}); "
                             "move it away to resume with empty rungs (the scheduler then ranks the next trials "
                             "against new ones)") from None


def _problems(err: ValidationError) -> str:
    """A validation error in one line: the first problems' places in the file and what is wrong there."""
    return joined([f"{'.'.join(map(str, problem['loc']))}: {problem['msg']}" if problem["loc"] else problem["msg"]
                   for problem in err.errors()])
