"""The plate-solving phase: every frame without a usable WCS gets one, solving few, matching many.

Plate-solving a Seestar sub costs far more than matching its stars to a solved frame, and a
night is hundreds of subs of a few pointings. So the frames are grouped by their pointing,
one frame per group is plate-solved (or a frame whose file already has a WCS serves), the others
get the WCS their star match to it implies, checked against a plate solution of another frame of
the group (one it already has, or one more solve). Matches that fail the check are dropped and
their frames solved on their own; a frame whose match fails is solved on its own; one that cannot
be solved is skipped with its reason. Each frame is solved and matched at most once per run. Only
WCSs that passed their checks go to the cache (keyed by the file's content), so a rerun solves
nothing it solved before and uses the same frames. The solvers, star lists, matching and cache are
:mod:`zemosaic_astrometry`'s; this module decides which frame gets which, and where the work runs:
the frames' star lists on the run's executor (worker processes or Dask: loading and detection hold
the GIL), the groups, their solver runs and their matches in threads meanwhile.

Frames are the pipeline's records (``path``, ``info``, ``ra``/``dec``, ``wcs``, ``wcs_source``,
``set_wcs``...); ``run`` is the run's :class:`zemosaic_worker.Run` (settings, report, progress,
cancellation).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import zemosaic_astrometry as zastro
import zemosaic_executor as zexec
import zemosaic_fits as zfits
from zemosaic_quality import centre_order
from zemosaic_utils import map_threads

logger = logging.getLogger(__name__)

NO_SOLVER = "no plate solver"
# A group's matched WCS is checked against one more solve; beyond this they disagree.
_CHECK_TOLERANCE_PX = 1.0
# Frames tried as a group's solved anchor before the group is given up.
_ANCHOR_ATTEMPTS = 3
# Frames per star-list task: enough that a task's trip to a worker costs little beside its
# frames' loading and detection (~40 ms each), few enough that the groups waiting for their
# frames' stars get them soon.
_STAR_TASK_FRAMES = 4


def load_raw(path: str) -> np.ndarray:
    """Return a frame's raw pixels as the solve phase uses them."""
    # Hot pixels sit at the same place in every frame: left in, they match each other.
    return zfits.load_frame(path, debayer=False, hot_pixels=True, require_wcs=False).data


@dataclass
class StarLists:
    """The star lists of a few frames, by path, and why the others have none (unreadable file)."""

    stars: dict
    errors: dict


def star_lists_task(paths, ctx) -> StarLists:
    """Executor task: return the solve-phase star lists of the frames at ``paths``."""
    found, errors = {}, {}
    for path in paths:
        ctx.check_cancel()
        try:
            found[path] = zastro.frame_stars(load_raw(path))
        except zfits.FrameError as exc:
            errors[path] = str(exc)
    return StarLists(found, errors)


class _StarsStopped(Exception):
    """A group's star lists will not come: the star-finding tasks stopped (their error goes on)."""


class _Solving:
    """What the solve phase shares: solver, cache, the run and the frames' star lists."""

    def __init__(self, solver, run, total, cache_folder):
        self.solver, self.run, self.config = solver, run, run.config
        self.cache = zastro.WcsCache(cache_folder)
        self._stars: dict[str, np.ndarray] = {}
        self._star_errors: dict[str, str] = {}
        # Frames whose star lists are being found elsewhere (find_stars): set once they arrive.
        self._coming: dict[str, threading.Event] = {}
        self._stopped = False
        self._advanced: set[str] = set()
        self._lock = threading.Lock()  # groups are solved in threads: the counts and progress
        self._solve_tried: set[str] = set()
        self.total, self.solves = total, 0
        # Solver runs at once: one per core (a solve-field run is a process of its own).
        self.threads = zexec.resolve_workers(self.config.num_processing_workers)

    def digest(self, record) -> str:
        return record.content_digest()

    def _raw(self, record):
        """Return a frame's raw pixels (its star list is kept on the way)."""
        raw = load_raw(record.path)
        if record.path not in self._stars:
            self._stars[record.path] = zastro.frame_stars(raw)
        return raw

    def stars(self, record) -> np.ndarray:
        """Return a frame's star list (full-resolution pixels), detected once per run.

        A frame whose list :meth:`find_stars` is finding elsewhere waits for it; an unreadable
        file raises :class:`zemosaic_fits.FrameError`."""
        coming = self._coming.get(record.path)
        if coming is not None and record.path not in self._stars:
            coming.wait()
            if self._stopped:  # find_stars ended early (a cancel, lost workers): so does the group
                self.run.check_cancel()
                raise _StarsStopped(record.path)
        if record.path in self._star_errors:
            raise zfits.FrameError(self._star_errors[record.path])
        if record.path not in self._stars:
            self._raw(record)
        return self._stars[record.path]

    def find_stars(self, records, cancel_folder: str) -> None:
        """Find the star lists of ``records`` on the run's executor (worker processes, or Dask),
        a few frames per task in their order, handing each to the groups waiting for it.

        Loading and detection hold the GIL, so only processes run them on every core. The
        plate solves and the matching go on in the groups' threads meanwhile.
        """
        paths = [r.path for r in records if r.path not in self._stars]
        for path in paths:
            self._coming[path] = threading.Event()
        tasks = [paths[i:i + _STAR_TASK_FRAMES] for i in range(0, len(paths), _STAR_TASK_FRAMES)]
        executor = zexec.make_executor(self.config.dask_scheduler, self.config.num_processing_workers,
                                       len(tasks))
        flag = zexec.CancelFlag(os.path.join(cancel_folder, ".cancel-stars"))
        try:
            for outcome in executor.run(star_lists_task, tasks, self.run, flag):
                found = outcome.result
                for path, stars in found.stars.items():
                    self._stars.setdefault(path, stars)
                self._star_errors.update(found.errors)
                for path in tasks[outcome.index]:
                    self._coming[path].set()
        except BaseException:
            self._stopped = True
            raise
        finally:
            executor.close()
            for event in self._coming.values():  # after a cancel or an error, no group waits on
                event.set()

    def solve(self, record) -> bool:
        """Plate-solve one frame, once per run; True when it got a WCS (the reason is logged
        otherwise, and a second call answers from the first)."""
        self.run.check_cancel()
        if record.path in self._solve_tried:
            return record.wcs is not None
        self._solve_tried.add(record.path)
        if self.solver is None:
            record.solve_error = NO_SOLVER
            return False
        t0 = time.perf_counter()
        try:
            raw = self._raw(record)
            n_stars = len(self.stars(record))
            if n_stars < zastro.MIN_STARS_TO_SOLVE:
                raise zastro.SolveError(f"only {n_stars} star(s) detected")
            with self._lock:
                self.solves += 1
            hints = zastro.hints_from_header(record.info.header)
            wcs = zastro.solve_frame(self.solver, raw, hints, self.config.plate_solve_timeout_s)
        except (zastro.SolveError, zfits.FrameError) as exc:
            record.solve_error = str(exc)
            logger.info("Plate solving %s failed: %s", os.path.basename(record.path), exc)
            return False
        self.keep(record, wcs, "solved", time.perf_counter() - t0)
        return True

    def solve_tried(self, record) -> bool:
        """Return True once :meth:`solve` ran for a frame."""
        return record.path in self._solve_tried

    def match(self, record, anchor, guess=None):
        """Return the WCS of a frame's star match to a solved anchor, or None (logged at DEBUG).

        ``guess``: the frame -> anchor transform to try first (see
        :func:`zemosaic_astrometry.match_stars`). The frame does not get the WCS yet: a match is
        kept once its group's check passed."""
        self.run.check_cancel()
        try:
            return zastro.wcs_from_star_match(self.stars(record), record.info.shape_hw,
                                              self.stars(anchor), anchor.wcs, guess)
        except (zastro.MatchError, zfits.FrameError) as exc:
            logger.debug("%s: %s; solving it on its own", os.path.basename(record.path), exc)
            return None

    def keep(self, record, wcs, source, solve_s):
        """Give a frame a WCS that passed its checks, and cache it."""
        record.set_wcs(wcs, source, solve_s)
        self.cache.put(self.digest(record), wcs, source, solve_s)
        self.advance(record)

    def advance(self, record):
        """Count a frame as done (once) and report progress."""
        with self._lock:
            self._advanced.add(record.path)
            self.run.advance("solve", len(self._advanced), self.total,
                        f"{os.path.basename(record.path)}: {record.wcs_source or 'failed'}")


def solve_frames(run, records, cache_folder, group_by_pointing):
    """Phase 1b: give every frame without a usable WCS one; returns the frames that have one.

    WCSs come from the cache first (keyed by file content). The others are grouped by their
    commanded pointing; per group one frame is plate-solved (or a frame with a WCS already serves)
    and the rest get the WCS their star match to it implies, with one more frame solved as a
    check. A frame whose match fails is solved on its own; one that cannot be solved is skipped.
    """
    config, report = run.config, run.report
    pending = [r for r in records if r.wcs is None]
    if not pending:
        _record_wcs_sources(records, report)
        return records
    solver, reason = zastro.solver_from_config(config)
    state = _Solving(solver, run, len(pending), cache_folder)
    # The cache is keyed by each file's SHA-256: hashing (and reading) releases the GIL.
    map_threads(lambda r: r.content_digest(), pending, state.threads)
    pending = [r for r in pending if not _from_cache(r, state)]
    if pending:
        logger.info("Plate solving: %d frame(s) without WCS, %s", len(pending),
                    solver.name if solver else f"star matching only ({reason})")
    groups = _solve_groups(records, pending, group_by_pointing)
    _solve_all_groups(groups, state, os.path.dirname(cache_folder))
    unsolved = [r for r in pending if r.wcs is None and r.solve_error == NO_SOLVER]
    if unsolved:
        # One WARNING for all of them: the fix is the same (install a solver), not per frame.
        names = ", ".join(os.path.basename(r.path) for r in unsolved[:10])
        more = f" and {len(unsolved) - 10} more" if len(unsolved) > 10 else ""
        logger.warning("%d frame(s) have no WCS and no plate solver can run (%s): %s%s are "
                       "skipped; to use them, %s", len(unsolved), reason, names, more,
                       zastro.INSTALL_HINT)
    for r in pending:
        if r.wcs is None:
            no_solver = r.solve_error == NO_SOLVER
            why = f"no plate solver ({reason})" if no_solver \
                else f"could not be plate-solved: {r.solve_error or 'no solution'}"
            report.skip(r.path, f"{r.info.wcs_problem or 'WCS not used'}; {why}", quiet=no_solver)
    used = _record_wcs_sources([r for r in records if r.wcs is not None], report)
    logger.info("Plate solving: %d solver run(s), %d frame(s) matched, %d from the cache",
                state.solves, sum(r.wcs_source.startswith("matched") for r in used),
                sum(r.wcs_source == "cache" for r in used))
    return used


def _solve_all_groups(groups, state, cancel_folder) -> None:
    """Solve every group, their star lists found on the executor meanwhile.

    Groups share no frame, so they are solved at once, one per core (``num_processing_workers``):
    a solve-field run waits in its own process while another group matches its frames.
    """
    threads = min(len(groups), state.threads) or 1
    to_detect = list({id(r): r for g in groups for r in g if r.wcs is None}.values())
    with ThreadPoolExecutor(1, thread_name_prefix="zemosaic-solve") as side:
        solving = side.submit(map_threads, lambda group: _solve_group(group, state), groups, threads)
        try:
            state.find_stars(to_detect, cancel_folder)
        finally:
            # Finding stars stopped (a cancel, lost workers, a bug): the groups waiting for stars
            # end with _StarsStopped, and that error goes on once they have.
            solving.exception()
        solving.result()


def _record_wcs_sources(records, report) -> list:
    """Write how each frame got its WCS into the report; returns ``records``."""
    for r in records:
        entry = {"wcs": r.wcs_source, "solve_s": None if r.solve_s is None else round(r.solve_s, 3)}
        if r.cache_origin:
            entry["cached_from"] = r.cache_origin
        report.frame_wcs[r.path] = entry
    return records


def _from_cache(record, state) -> bool:
    """Give a frame its cached WCS; True on a hit."""
    hit = state.cache.get(state.digest(record))
    if hit is None:
        return False
    record.set_wcs(hit.wcs, "cache", hit.solve_s)
    record.cache_origin = hit.source
    state.advance(record)
    return True


def _solve_groups(records, pending, group_by_pointing) -> list[list]:
    """Return groups (by pointing) holding frames to solve, each with the group's solved frames.

    A frame with no pointing in its header is a group of its own (solved blind).
    """
    placed = [r for r in records if r.ra is not None]
    groups = group_by_pointing(placed) if placed else []
    todo = {id(r) for r in pending}
    out = [[placed[i] for i in g] for g in groups if any(id(placed[i]) in todo for i in g)]
    return out + [[r] for r in pending if r.ra is None]


def _wcs_origin(record) -> str | None:
    """Return how a frame's WCS was first obtained (``header``, ``solved``, ``matched to NAME``;
    through the cache too), or None without one."""
    if record.wcs is None:
        return None
    return record.cache_origin if record.wcs_source == "cache" else record.wcs_source


def _can_anchor(record) -> bool:
    """Return True for a frame whose WCS is its header's or a plate solution, not a star match."""
    return _wcs_origin(record) in ("header", "solved")


def _solve_group(group, state) -> None:
    """Solve one frame of a group (its anchor), match the rest to it, check the matches.

    Matches are kept (and cached) only when their check passes (:func:`_check_matches`); the
    frames of a failed check, and those whose match failed, are solved on their own. No frame is
    solved or matched twice.
    """
    ordered = group
    if group[0].ra is not None:  # nearest the group's mean pointing first
        ordered = [group[i] for i in centre_order([r.ra for r in group], [r.dec for r in group])]
    anchor = next((r for r in ordered if _can_anchor(r)), None)
    tries = 0
    for r in ordered:
        if anchor is not None or tries >= _ANCHOR_ATTEMPTS:
            break
        if r.wcs is None:
            tries += 1
            anchor = r if state.solve(r) else None
    todo = [r for r in ordered if r.wcs is None]
    if anchor is None:
        for r in todo:
            r.solve_error = NO_SOLVER if state.solver is None else \
                f"no frame of its group could be plate-solved ({tries} tried)"
            state.advance(r)
        return
    matches = _match_to_anchor(todo, anchor, state)
    if matches and _check_matches(group, todo, matches, anchor, state):
        source = f"matched to {os.path.basename(anchor.path)}"
        for r in todo:
            if id(r) in matches and r.wcs is None:  # the check frames keep their plate solutions
                state.keep(r, matches[id(r)], source, None)
    # The rest are solved on their own, as many at once as the solve phase has threads: a group
    # whose check failed is 40 solver runs, which one thread would run one after the other.
    alone = [r for r in todo if r.wcs is None]
    map_threads(lambda r: state.solve(r) or state.advance(r), alone, state.threads)


def _match_to_anchor(todo, anchor, state) -> dict:
    """Return ``{id(frame): WCS}`` of the frames whose stars match the anchor's.

    In time order, each frame's match starts from the one before it: consecutive subs differ by
    a dither or drift, which :func:`zemosaic_astrometry.match_stars` finds from that guess at a
    small fraction of the cost of matching triangles (a frame the guess does not fit, such as the
    first of another night, is matched by its triangles and guides the next).
    """
    matches, guess = {}, None
    for r in sorted(todo, key=lambda r: (r.info.date_obs or "", r.path)):
        wcs = state.match(r, anchor, guess)
        if wcs is not None:
            matches[id(r)] = wcs
            guess = zastro.wcs_affine(wcs, r.info.shape_hw, anchor.wcs)
    return matches


def _check_matches(group, todo, matches, anchor, state) -> bool:
    """Return False (and a WARNING) when the group's matches disagree with a plate solution.

    The matches are compared with the plate solutions the group's other frames already have
    (:func:`_solved_pairs`), else with one more solve of a matched frame not tried yet. Nothing to
    compare with (no such frame, or its solve fails): the matches stand. A check solve made here
    that disagrees gets a second one: when that agrees, the first plate solution is the odd one
    (a solver can settle on a few px off in a sparse field, as the star match of 40 frames to one
    anchor does not): its frame takes its match and the group's matches stand.
    """
    pairs = _solved_pairs(group, anchor, state)
    fresh = not pairs
    if fresh:
        pair = _check_solve(todo, matches, state)
        if pair is None:
            return True
        pairs = [pair]
    offset = _largest_offset(pairs)
    if offset <= _CHECK_TOLERANCE_PX:
        return True
    if fresh:
        second = _check_solve(todo, matches, state)
        if second is not None and _largest_offset([second]) <= _CHECK_TOLERANCE_PX:
            odd, match = pairs[0]
            logger.warning("The plate solution of %s is %.1f px from its star match to %s, which a "
                           "second check (%s) confirms: %s takes its star match", os.path.basename(odd.path),
                           offset, os.path.basename(anchor.path), os.path.basename(second[0].path),
                           os.path.basename(odd.path))
            state.keep(odd, match, f"matched to {os.path.basename(anchor.path)}", None)
            return True
    logger.warning("Star-matched WCSs of the group of %s disagree with a plate solution by %.1f px;"
                   " solving its frames one by one", os.path.basename(anchor.path), offset)
    return False


def _check_solve(todo, matches, state):
    """Plate-solve one matched frame not tried yet (the middle one); returns ``(frame, its match)``,
    or None when there is none or its solve fails."""
    untried = [r for r in todo if id(r) in matches and not state.solve_tried(r)]
    if not untried:
        return None
    check = untried[len(untried) // 2]
    return (check, matches[id(check)]) if state.solve(check) else None


def _largest_offset(pairs) -> float:
    """Return the largest distance (px) between the frames' WCSs and their matches, logged at DEBUG."""
    offset = max(zastro.wcs_pixel_offset(wcs, r.wcs, r.info.shape_hw) for r, wcs in pairs)
    logger.debug("Plate solving check on %s: matched and solved WCSs up to %.2f px apart",
                 ", ".join(os.path.basename(r.path) for r, _ in pairs), offset)
    return offset


def _solved_pairs(group, anchor, state) -> list:
    """Return ``(frame, its match to the anchor)`` for the group's other plate-solved frames.

    On a rerun these are the frames the cache holds solutions for, the check frame of a failed
    check among them: matched again, they give the first run's verdict without a solve.
    """
    pairs = [(r, state.match(r, anchor)) for r in group if r is not anchor and _wcs_origin(r) == "solved"]
    return [(r, wcs) for r, wcs in pairs if wcs is not None]
