"""Pruning an artifact store: the outputs only old runs used, and those runs' records.

Outputs are content-addressed (`ARTIFACTS/<kind>/<key>/`), so a store that CI
retrains into on every commit only grows: each changed setting leaves the old
adapter, generations and evaluation behind. A prune keeps the newest runs that
have an output (runs that failed before making one take no place), every run
that may still be running, the newest complete run of each spec (whose outputs
a run still going, or one that failed half-way, reuses for the stages it has not
reached), and every output any of them names (made, found
up to date, reused, or read by its path under whatever spelling), so the next
retrain still reuses them. It deletes the other key folders (and a cache's
`.faiss` index beside it) and the older runs' records.

What it never deletes: a folder that is no stage output's (no 16-hex key, or not
under a stage kind), and an output whose lease someone holds. Before deleting an
output it takes that output's lease itself, then reads the runs again. A run
writes its record as it starts, and a stage takes the lease of an output it
makes or reuses, or waits while prune holds that of one it reads by path; so
either prune sees the run and keeps the output, or the run sees prune, waits,
and finds the output gone (it makes it again, or says it is not there).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipforge.errors import UserError
from clipforge.orchestrate.kinds import KINDS, NAMED_OUTPUT, OUTPUT_KEY, spellings
from clipforge.orchestrate.lease import LEASE_NAME, PRUNER, StageLease, holder_gone, holder_words, lease_holder
from clipforge.orchestrate.runs import read_runs, record_or_problem, stages_done
from clipforge.storage import conditional, folders
from clipforge.storage import uri as storage
from clipforge.storage.manifest import MANIFEST_NAME, read_manifest

log = logging.getLogger("clipforge.prune")

OUTPUT_FOLDER = re.compile(rf"^({OUTPUT_KEY})(\.faiss)?$")  # a key folder, or the faiss index `search --faiss` adds
# States of a run that may still be running (`lost` ones are known not to be).
LIVE = ("at ", "waiting at ", "incomplete")
# A Kubernetes run stopped, lost or crashed (at a stage, or between two) is resumed by the driver Job's next pod.
LIVE_ON_KUBERNETES = (*LIVE, "stopped", "lost", "crashed")
CHUNK = 64  # outputs leased, checked and deleted at a time


@dataclass
class Plan:
    """What a prune keeps and deletes; `bytes` maps each output or run folder to delete to its size."""

    kept_runs: list[str] = field(default_factory=list)
    pruned_runs: dict[str, str | None] = field(default_factory=dict)  # run id -> its `updated` when planned
    outputs: list[str] = field(default_factory=list)
    identities: dict[str, tuple[str, str]] = field(default_factory=dict)  # output -> (kind, key)
    held: dict[str, str] = field(default_factory=dict)  # output -> who holds its lease
    bytes: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"kept_runs": self.kept_runs, "pruned_runs": list(self.pruned_runs), "held": self.held,
                "outputs": [{"uri": uri, "bytes": self.bytes[uri]} for uri in self.outputs],
                "bytes": sum(self.bytes.values())}


def plan_prune(artifacts: str, keep: int) -> Plan:
    """Keep the newest `keep` runs that have an output (a stage done, up to date or reused), every run created
    since the oldest of them (in the same second too), every run that may still be running, and the newest
    complete run of each spec; with fewer such runs, all of them. A run with none (one that failed before its
    first stage, or at it) takes no place: three failed attempts do not cost the last good run its outputs.
    Every other stage output under ARTIFACTS, and the other runs' records, are to go. A run record that does
    not read stops the prune: its outputs cannot be told."""
    runs = readable_runs(artifacts)
    candidates = output_folders(artifacts)
    if not runs and candidates:
        raise UserError(f"no runs recorded under {storage.join(artifacts, 'runs')}, so nothing says which of the "
                        f"{len(candidates)} outputs there are in use: prune keeps what runs name")
    counted = [run for run in runs if stages_done(run["record"])]
    last_kept = (counted[-keep]["created"] or "") if len(counted) >= keep else ""
    newest = {run["run_id"] for run in runs if (run["created"] or "") >= last_kept}
    newest |= set(newest_complete(runs).values())
    plan = Plan(identities=candidates)
    kept_records = []
    for run in runs:
        if run["run_id"] in newest or may_still_run(run):
            plan.kept_runs.append(run["run_id"])
            kept_records.append(run["record"])
        else:
            plan.pruned_runs[run["run_id"]] = run["updated"]
    used = outputs_in_use(kept_records, candidates)
    unused = [uri for uri, identity in candidates.items() if identity not in used]
    with ThreadPoolExecutor(16) as pool:
        trees = dict(zip(unused, pool.map(storage.list_tree, unused), strict=True))
        for uri, holder in zip(unused, pool.map(lease_of, unused), strict=True):
            if holder:
                plan.held[uri] = holder
            else:
                plan.outputs.append(uri)
                plan.bytes[uri] = sum(trees[uri].values())
        folders = [storage.join(artifacts, "runs", run_id) for run_id in plan.pruned_runs]
        for folder, tree in zip(folders, pool.map(storage.list_tree, folders), strict=True):
            plan.bytes[folder] = sum(tree.values())
    return plan


def newest_complete(runs: list[dict]) -> dict[tuple[str, ...], str]:
    """The newest complete run of each spec (its stages' names), oldest first in `runs`: what a run of that spec
    that is still going, or one that failed half-way, will reuse for the stages it has not reached."""
    found = {}
    for run in runs:
        if run["state"].startswith("complete"):  # `complete without` a stage a policy let it go on without too
            stages = (run["record"].get("spec") or {}).get("stages") or []
            found[tuple(stage.get("name") for stage in stages if isinstance(stage, dict))] = run["run_id"]
    return found


def readable_runs(artifacts: str) -> list[dict]:
    """`runs.read_runs`, where a run.json that does not read is a UserError naming it: its outputs cannot be
    told apart from the ones nobody uses."""
    runs, unreadable = read_runs(artifacts)
    if unreadable:
        raise UserError(f"{unreadable[0]}{f' (and {len(unreadable) - 1} more)' if len(unreadable) > 1 else ''}: "
                        "prune cannot tell which outputs that run uses; mend or remove it first")
    return runs


def may_still_run(run: dict) -> bool:
    return run["state"].startswith(LIVE_ON_KUBERNETES if run["runner"] == "kubernetes" else LIVE)


def output_folders(artifacts: str) -> dict[str, tuple[str, str]]:
    """Each stage output folder under ARTIFACTS (and faiss index beside one) -> (kind, key)."""
    found = {}
    for kind in sorted(KINDS):
        for name in storage.list_folders(storage.join(artifacts, kind)):
            match, uri = OUTPUT_FOLDER.match(name), storage.join(artifacts, kind, name)
            if match and not (storage.scheme(uri) == "file" and storage.local_path(uri).is_symlink()):
                found[uri] = (kind, match.group(1))  # a link to elsewhere is someone's own arrangement
    return found


def outputs_in_use(records: list[dict], candidates: dict[str, tuple[str, str]]) -> set[tuple[str, str]]:
    """(kind, key) of the outputs the records name, and of those their manifests name, and so on: a cache a
    kept run reused names the fine-tuned weights it was built with, which that run may name nowhere."""
    where = {identity: uri for uri, identity in candidates.items()}
    used = named_outputs(records)
    todo = [where[identity] for identity in used if identity in where]
    with ThreadPoolExecutor(16) as pool:
        while todo:
            manifests = [m for m in pool.map(read_manifest, todo) if m is not None]
            found = named_outputs(manifests) - used
            used |= found
            todo = [where[identity] for identity in found if identity in where]
    return used


def named_outputs(records: list[dict]) -> set[tuple[str, str]]:
    """(kind, key) of every output the records name anywhere: a stage's output, a path a setting gives
    (`pretrained: …/finetune/<key>/model.pt`), a pinned `output:` or `reuse_existing`; as written, with `.`
    and `..` taken out, and, for a local path, through the symbolic links it passes (from the run's directory)."""
    found = set()
    for record in records:
        directory = record.get("directory") if isinstance(record.get("directory"), str) else os.getcwd()
        for text in strings_in(record):
            found |= {match.groups() for spelling in spellings(text, directory)
                      for match in NAMED_OUTPUT.finditer(spelling)}
    return found


def strings_in(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def lease_of(output: str) -> str | None:
    """Who holds the output's lease (`run R (on HOST), stage S, renewed T`), or None when nobody does or its
    holder was a process of this machine that is gone. Reads only: a dry run writes nothing."""
    current = conditional.read_versioned(storage.join(output, LEASE_NAME))
    if current is None:
        return None
    holder = lease_holder(current[0])
    if holder_gone(holder):
        return None
    return f"{holder_words(holder)}, stage {holder.get('stage', '?')}, renewed {holder.get('renewed', '?')}"


def apply_prune(artifacts: str, plan: Plan) -> tuple[list[str], list[str], list[str], int]:
    """Delete what `plan` lists: (outputs deleted, outputs kept after all, outputs not deleted because of an
    error, run records deleted); the middle two as `URI: why`.

    The run records go first, so a prune stopped half-way leaves outputs no run names (the next prune finds
    them) rather than runs naming outputs that are gone. A pruned run that changed since the plan (resumed)
    keeps its record, and so its outputs. Then, CHUNK outputs at a time: take their leases, read the runs
    again, and delete what still no run names: its manifest first (what is left is never "done"), its lease
    last. A stage that reads an output by path waits while prune holds that lease (`wait_while_pruned`)."""
    records = 0
    for run_id, updated in plan.pruned_runs.items():
        uri = storage.join(artifacts, "runs", run_id, "run.json")
        record, _ = record_or_problem(uri)
        if record is not None and record.get("updated") != updated:
            log.warning("run %s changed since the plan (resumed?): its record and outputs are kept", run_id)
            continue
        delete_run_record(storage.join(artifacts, "runs", run_id))
        records += 1
        log.info("deleted the record of run %s", run_id)
    deleted, kept, failed = [], [], []
    for start in range(0, len(plan.outputs), CHUNK):
        chunk, leases = plan.outputs[start : start + CHUNK], {}
        try:
            for uri in chunk:
                lease = StageLease(uri, PRUNER, "prune")
                if lease.try_take():
                    leases[uri] = lease
                else:
                    kept.append(f"{uri}: a writer took its lease since the plan")
            try:
                used = outputs_in_use([run["record"] for run in readable_runs(artifacts)], plan.identities)
            except UserError as exc:  # a record that stopped reading: nothing more can be told safely
                kept += [f"{uri}: stopped, {exc}" for uri in leases] + [f"{uri}: stopped" for uri in
                                                                        plan.outputs[start + CHUNK :]]
                break
            for uri, lease in leases.items():
                if plan.identities[uri] in used:
                    kept.append(f"{uri}: a run named it since the plan")
                elif why := delete_output(uri):
                    failed.append(f"{uri}: {why}")
                else:
                    deleted.append(uri)
                lease.__exit__(None, None, None)  # a run waiting for it finds no manifest, and makes it again
                if uri in deleted:
                    folders.remove_empty_folders(uri)
                    log.info("deleted %s (%s)", uri, human_bytes(plan.bytes[uri]))
        finally:
            for lease in leases.values():  # released already, unless something above raised
                lease.__exit__(None, None, None)
    return deleted, kept, failed, records


def delete_run_record(folder: str) -> None:
    """A run's folder, its run.json last: a prune stopped part-way leaves a record the next one prunes, not a
    folder of configs that no listing shows as a run."""
    storage.delete_objects(folder, [name for name in storage.list_tree(folder) if name != "run.json"])
    storage.delete_objects(folder, ["run.json"])
    folders.remove_empty_folders(folder)


def delete_output(uri: str) -> str | None:
    """Delete an output but its lease, the manifest first; why it could not, or None."""
    try:
        storage.delete_objects(uri, [MANIFEST_NAME])
        storage.delete_objects(uri, [name for name in storage.list_tree(uri) if name != LEASE_NAME])
        left = [name for name in storage.list_tree(uri) if name != LEASE_NAME]
    except (UserError, OSError) as exc:
        return str(exc)
    return f"{len(left)} files are still there (e.g. {left[0]})" if left else None


def human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"

