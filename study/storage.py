"""Where a study lives, and the recovery of trials whose worker died.

An SQLite file in the output folder by default; any Optuna RDB URL (PostgreSQL) or a journal file lets several
workers share one study. RDB heartbeats fail a silent trial after the grace period and
RetryHeartbeatStaleTrialCallback re-enqueues its settings; the journal has no heartbeats, so a worker on the
same host fails a trial at once when the process that owns it is gone.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

from adaflex.retrofit import io
from adaflex.retrofit.errors import AdaflexError, UsageError

WORKER = {"host": socket.gethostname(), "pid": os.getpid()}


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def journal_path(url: str) -> str | None:
    if url.startswith("journal:"):
        return url.removeprefix("journal:")
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


def open_storage(url: str | None, out: Path, heartbeat: int):
    """(storage, printable URL). Journal files have no heartbeats; RDB storages retry stale trials."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if url is None:
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    jpath = journal_path(url)
    if jpath is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(jpath).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(Path(jpath).expanduser()))), f"journal:{jpath}"
    if "://" not in url:
        raise UsageError(
            f"--storage {url}: neither an RDB URL (postgresql://..., sqlite:///...) nor a journal file "
            "(journal:PATH or a path ending .log)"
        )
    import sqlalchemy.exc

    def connect():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                failed_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )

    try:
        for attempt in range(5):
            try:
                storage = connect()
                break
            except sqlalchemy.exc.IntegrityError:
                # workers started together on an empty database race to create Optuna's tables: the loser
                # sees a duplicate key; the tables exist a moment later
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ImportError as e:
        raise UsageError(
            f"--storage {_redact(url)}: missing database driver ({e}; e.g. pip install psycopg2-binary)"
        ) from None
    except sqlalchemy.exc.ArgumentError as e:
        raise UsageError(f"--storage {_redact(url)}: invalid URL ({str(e).splitlines()[0]})") from None
    except sqlalchemy.exc.SQLAlchemyError as e:
        raise AdaflexError(f"--storage {_redact(url)}: cannot open ({str(e).splitlines()[0][:200]})") from None
    return storage, _redact(url)


def retry(study, frozen) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=3)(study, frozen)


def recover_dead_local(study, log) -> int:
    """Fail and re-enqueue RUNNING trials of processes on this host that are gone (a SIGKILLed worker)."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w = t.user_attrs.get("worker") or {}
        if w.get("host") == WORKER["host"] and w.get("pid") != WORKER["pid"] and not io.alive(int(w.get("pid", 0))):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # another worker got there first
                continue
            retry(study, study.trials[t.number])
            log(f"trial {t.number}: its worker (pid {w.get('pid')}) is gone; failed and re-enqueued")
            n += 1
    return n
