"""Pruning an artifact store: the outputs only old runs used, and those runs' records.

Outputs are content-addressed (`ARTIFACTS/<kind>/<key>/`), so a store that CI
retrains into on every commit only grows: each changed setting leaves the old
adapter, generations and evaluation behind. A prune keeps the newest runs, every
run that may still be running, and every output any of them names (made, found
up to date, reused, or read by its path under whatever spelling), so the next
retrain still reuses them. It deletes the other key folders (and a cache's
`.faiss` index beside it) and the older runs' records.

What it never deletes: a folder that is no stage output's (no 16-hex key, or not
under a stage kind), and an output whose lease someone holds. Before deleting an
output it takes that output's lease itself, then reads the runs again: a run
that started meanwhile and reused the output keeps it, and one that wants it
while it goes waits for the lease, then finds no manifest and makes it again.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipforge.errors import UserError
from clipforge.orchestrate.kinds import KINDS
from clipforge.orchestrate.lease import LEASE_NAME, StageLease, holder_gone, lease_holder
from clipforge.orchestrate.pipeline import read_run_record
from clipforge.orchestrate.runs import list_runs
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.prune")

KEY = r"[0-9a-f]{16}"  # a stage output's key (pipeline.resolve_stage)
OUTPUT_FOLDER = re.compile(rf"^({KEY})(\.faiss)?$")  # a key folder, or the faiss index `search --faiss` puts beside it
# An output named anywhere in a run record, however the store was spelled: `.../<kind>/<key>` as a whole segment.
NAMED_OUTPUT = re.compile(rf"(?:^|/)({'|'.join(KINDS)})/({KEY})(?:\.faiss)?(?=/|$)")
LIVE = ("at ", "incomplete")  # states of a run that may still be running (`lost` ones are known not to be)
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
    """Keep the newest `keep` runs (by creation; runs created in the same second as the last of them too) and
    every run that may still be running. Every other stage output under ARTIFACTS, and the other runs'
    records, are to go. A run record that does not read stops the prune: its outputs cannot be told."""
    runs = readable_runs(artifacts)
    candidates = output_folders(artifacts)
    if not runs and candidates:
        raise UserError(f"no runs recorded under {storage.join(artifacts, 'runs')}, so nothing says which of the "
                        f"{len(candidates)} outputs there are in use: prune keeps what runs name")
    last_kept = (runs[-min(keep, len(runs))]["created"] or "") if runs else ""
    newest = {run["run_id"] for run in runs if (run["created"] or "") >= last_kept}
    plan = Plan(identities=candidates)
    kept_records = []
    for run in runs:
        if run["run_id"] in newest or run["state"].startswith(LIVE):
            plan.kept_runs.append(run["run_id"])
            kept_records.append(run["record"])
        else:
            plan.pruned_runs[run["run_id"]] = run["updated"]
    used = named_outputs(kept_records)
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


def readable_runs(artifacts: str) -> list[dict]:
    """Every run under ARTIFACTS/runs/ with its record (oldest first). A folder without run.json is a run
    that is just starting (its stage holds its output's lease meanwhile); one whose run.json does not read
    is a UserError naming it."""
    root = storage.join(artifacts, "runs")
    listed = {run["run_id"]: run for run in list_runs(artifacts)}
    unreadable = []
    for run_id in storage.list_folders(root):
        uri = storage.join(root, run_id, "run.json")
        if run_id not in listed and storage.exists(uri):
            unreadable.append(uri)
    if unreadable:
        raise UserError(f"{unreadable[0]} is not a run record that reads"
                        f"{f' (and {len(unreadable) - 1} more)' if len(unreadable) > 1 else ''}: prune cannot tell "
                        "which outputs that run uses; mend or remove it first")
    runs = list(listed.values())
    with ThreadPoolExecutor(16) as pool:
        records = pool.map(lambda run: read_run_record(storage.join(root, run["run_id"], "run.json")), runs)
        for run, record in zip(runs, records, strict=True):
            run["record"] = record
    return runs


def output_folders(artifacts: str) -> dict[str, tuple[str, str]]:
    """Each stage output folder under ARTIFACTS (and faiss index beside one) -> (kind, key)."""
    found = {}
    for kind in sorted(KINDS):
        for name in storage.list_folders(storage.join(artifacts, kind)):
            match, uri = OUTPUT_FOLDER.match(name), storage.join(artifacts, kind, name)
            if match and not (storage.scheme(uri) == "file" and storage.local_path(uri).is_symlink()):
                found[uri] = (kind, match.group(1))  # a link to elsewhere is someone's own arrangement
    return found


def named_outputs(records: list[dict]) -> set[tuple[str, str]]:
    """(kind, key) of every output the records name anywhere: a stage's output, a path a setting gives
    (`pretrained: …/finetune/<key>/model.pt`), a pinned `output:` or `reuse_existing`."""
    return {match.groups() for record in records for text in strings_in(record)
            for match in NAMED_OUTPUT.finditer(text)}


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
    """Who holds the output's lease (`run R (stage S) on HOST, renewed T`), or None when nobody does or its
    holder was a process of this machine that is gone. Reads only: a dry run writes nothing."""
    current = storage.read_versioned(storage.join(output, LEASE_NAME))
    if current is None:
        return None
    holder = lease_holder(current[0])
    if holder_gone(holder):
        return None
    return (f"run {holder.get('run_id', '?')} (stage {holder.get('stage', '?')}) on {holder.get('host', '?')}, "
            f"renewed {holder.get('renewed', '?')}")


def apply_prune(artifacts: str, plan: Plan) -> tuple[list[str], list[str], list[str]]:
    """Delete what `plan` lists: (outputs deleted, outputs kept after all, outputs that could not be deleted),
    the last two as `URI: why`.

    The run records go first, so a prune stopped half-way leaves outputs no run names (the next prune finds
    them) rather than runs naming outputs that are gone. A pruned run that changed since the plan (resumed)
    keeps its record, and so its outputs. Then, CHUNK outputs at a time: take their leases, read the runs
    again, and delete what still no run names, its lease last."""
    for run_id, updated in plan.pruned_runs.items():
        uri = storage.join(artifacts, "runs", run_id, "run.json")
        if storage.exists(uri) and read_run_record(uri).get("updated") != updated:
            log.warning("run %s changed since the plan (resumed?): its record and outputs are kept", run_id)
            continue
        storage.delete_tree(storage.join(artifacts, "runs", run_id))
        log.info("deleted the record of run %s", run_id)
    deleted, kept, failed = [], [], []
    for start in range(0, len(plan.outputs), CHUNK):
        leases = {}
        try:
            for uri in plan.outputs[start : start + CHUNK]:
                lease = StageLease(uri, "prune", "prune")
                if lease.try_take():
                    leases[uri] = lease
                else:
                    kept.append(f"{uri}: a writer took its lease since the plan")
            used = named_outputs([run["record"] for run in readable_runs(artifacts)])
            for uri, lease in leases.items():
                if plan.identities[uri] in used:
                    kept.append(f"{uri}: a run named it since the plan")
                    lease.__exit__(None, None, None)
                    continue
                storage.delete_objects(uri, [name for name in storage.list_tree(uri) if name != LEASE_NAME])
                left = [name for name in storage.list_tree(uri) if name != LEASE_NAME]
                lease.__exit__(None, None, None)  # a run waiting for it finds no manifest, and makes it again
                if left:
                    failed.append(f"{uri}: {len(left)} files are still there (e.g. {left[0]})")
                    continue
                storage.remove_empty_folders(uri)
                deleted.append(uri)
                log.info("deleted %s (%s)", uri, human_bytes(plan.bytes[uri]))
        finally:
            for lease in leases.values():  # released already, unless something above raised
                lease.__exit__(None, None, None)
    return deleted, kept, failed


def human_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"

