"""Pruning an artifact store: the outputs only old runs used, and those runs' records.

Outputs are content-addressed (`ARTIFACTS/<kind>/<key>/`), so a store that CI
retrains into on every commit only grows: each changed setting leaves the old
adapter, generations and evaluation behind. A prune keeps the newest runs and
every output any of them recorded (made, found up to date or reused), so the
next retrain still reuses them; it deletes the rest of the key folders and the
older runs' records. It never deletes a folder that is not a stage output's
(no 16-hex key, or not under a stage kind), the records and outputs of a run
that may still be running, or an output whose lease someone holds.
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clipforge.orchestrate.kinds import KINDS
from clipforge.orchestrate.lease import LEASE_NAME
from clipforge.orchestrate.runs import list_runs, read_run
from clipforge.storage import uri as storage

log = logging.getLogger("clipforge.prune")

KEY = re.compile(r"^[0-9a-f]{16}$")  # a stage output's key (pipeline.resolve_stage): nothing else is touched
LIVE = ("at ", "incomplete")  # states of a run that may still be running (`lost` ones are known not to be)


@dataclass
class Plan:
    """What a prune keeps and deletes; `bytes` maps each output or run folder to delete to its size."""

    kept_runs: list[str] = field(default_factory=list)
    pruned_runs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # outputs nothing recorded but a lease is on: someone writes them
    bytes: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"kept_runs": self.kept_runs, "pruned_runs": self.pruned_runs, "held": self.held,
                "outputs": [{"uri": uri, "bytes": self.bytes[uri]} for uri in self.outputs],
                "bytes": sum(self.bytes.values())}


def plan_prune(artifacts: str, keep: int) -> Plan:
    """Keep the newest `keep` runs (by creation) and every run that may still be running; the outputs any kept
    run recorded stay. Every other stage output under ARTIFACTS, and the other runs' records, are to go."""
    runs = list_runs(artifacts)  # oldest first; a run.json that does not read is left out there, and left alone
    newest = {run["run_id"] for run in runs[-keep:]}
    plan = Plan()
    for run in runs:
        kept = run["run_id"] in newest or run["state"].startswith(LIVE)
        (plan.kept_runs if kept else plan.pruned_runs).append(run["run_id"])
    used = set()
    for run_id in plan.kept_runs:
        for entry in (read_run(artifacts, run_id).get("stages") or {}).values():
            if entry.get("output"):
                used.add(entry["output"].rstrip("/"))
    candidates = [storage.join(artifacts, kind, key) for kind in sorted(KINDS)
                  for key in storage.list_folders(storage.join(artifacts, kind)) if KEY.match(key)]
    unused = [uri for uri in candidates if uri not in used]
    with ThreadPoolExecutor(16) as pool:
        trees = dict(zip(unused, pool.map(storage.list_tree, unused), strict=True))
    for uri in unused:
        if LEASE_NAME in trees[uri]:
            plan.held.append(uri)
        else:
            plan.outputs.append(uri)
            plan.bytes[uri] = sum(trees[uri].values())
    for run_id in plan.pruned_runs:
        folder = storage.join(artifacts, "runs", run_id)
        plan.bytes[folder] = sum(storage.list_tree(folder).values())
    return plan


def apply_prune(artifacts: str, plan: Plan) -> None:
    """Delete what `plan` lists: the run records first, so a prune stopped half-way leaves outputs no run
    names (the next prune finds them) rather than runs naming outputs that are gone."""
    for run_id in plan.pruned_runs:
        storage.delete_tree(storage.join(artifacts, "runs", run_id))
        log.info("deleted run %s", run_id)
    for uri in plan.outputs:
        storage.delete_tree(uri)
        log.info("deleted %s (%s)", uri, human_bytes(plan.bytes[uri]))


def human_bytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"
