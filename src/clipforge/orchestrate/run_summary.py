"""How a run reads to a person at its end: one line per stage, its notes, what to run next, the exit code."""

from __future__ import annotations

import logging
import signal

from clipforge.config.pipeline import PipelineSpec, order_stages
from clipforge.errors import EXIT_RUN_FAILED
from clipforge.orchestrate.run_record import FINISHED, RunRecord
from clipforge.tables import text_table

log = logging.getLogger("clipforge.run")


def exit_description(code: int) -> str:
    """A stage's exit code as a person reads it: a negative one (a local process) names its signal."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}"
    return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")


def headline(manifest: dict | None) -> dict:
    """A few numbers worth a summary line: the stage's own choice (an evaluation's: adapter against zero-padding,
    CLIPScore per configuration), else the first of its metrics."""
    chosen = (manifest or {}).get("headline")
    if isinstance(chosen, dict):
        return chosen
    metrics = (manifest or {}).get("metrics") or {}
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, int | float)})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[key] = value
    return dict(list(flat.items())[:8])


def recorded_spec(run: dict) -> PipelineSpec:
    """The spec a run.json recorded, as it ran (overrides applied)."""
    return PipelineSpec.model_validate(run["spec"])


def summary_table(run: dict) -> str:
    """A run.json's stages in order, one line each, then its notes and warnings."""
    order = [stage.name for stage in order_stages(recorded_spec(run))]
    stages = run.get("stages") or {}
    rows = [("stage", "kind", "status", "seconds", "output")]
    for name in order:
        entry = stages.get(name) or {}
        rows.append((name, entry.get("kind", ""), entry.get("status", "not started"),
                     str(entry.get("seconds") or ""), entry.get("output") or entry.get("message", "")))
    lines = text_table(rows).splitlines()
    for name in order:
        entry = stages.get(name) or {}
        for note in entry.get("notes") or []:
            lines.append(f"NOTE [{name}] {note}")
        if entry.get("status") == "failed-continued":
            lines.append(f"WARNING [{name}] failed and the run went on without it: {entry.get('message')}")
        elif entry.get("status") == "failed":
            lines.append(f"FAILED [{name}] {entry.get('message')}")
    return "\n".join(lines)


def next_steps(run: dict) -> list[str]:
    """What to look at or run with a run's outputs: the evaluation's pictures, the model, the folder's search."""
    from clipforge.data.image_folder import is_image_collection

    lines = []
    for stage in recorded_spec(run).stages:
        entry = (run.get("stages") or {}).get(stage.name) or {}
        if entry.get("status") == "interrupted":
            lines.append(f"[{stage.name}] stopped: resume the run with --run-id {run['run_id']} (it goes on from "
                         "the progress the stage saved)")
        elif entry.get("status") == "failed":
            lines.append(f"[{stage.name}] failed: fix what it says, then rerun with --run-id {run['run_id']} (the "
                         "stages that finished are reused)")
        out = (entry.get("output") or "").rstrip("/")
        if entry.get("status") not in FINISHED or not out:
            continue
        if stage.kind == "evaluate":
            sheet = f"contact sheet {out}/contact_sheet.png, " if stage.with_.get("generated") else ""
            lines.append(f"[{stage.name}] {sheet}metrics {out}/metrics.png")
        elif stage.kind == "cache" and is_image_collection(str(stage.with_.get("source") or ".h5")):
            lines.append(f"[{stage.name}] search it: clipforge search --index {out} \"TEXT\"   "
                         f"(or in the browser: clipforge serve --index {out})")
        elif stage.kind == "finetune":
            lines.append(f"[{stage.name}] the model: {out}/model.pt; "
                         f"clipforge models list --dir {out.rsplit('/', 1)[0]}")
    return lines


def exit_code(record: RunRecord) -> int:
    """What the runner exits with: EXIT_RUN_FAILED (3) if a stage failed (not 1, a crash's code, which a driver
    Job retries); a stopped stage's own code (75 SIGTERM, 130 Ctrl-C), so that whoever restarts the runner (a
    driver Job's retry, a CI step) knows a rerun resumes; else 0."""
    stages = record.data["stages"].values()
    if any(s.get("status") == "failed" for s in stages):
        return EXIT_RUN_FAILED
    stopped = record.stopped
    return next((s["exit_code"] for s in stages if s.get("status") == "interrupted"), stopped)


def log_summary(record: RunRecord) -> None:
    """The end of a run, whoever ran it: the summary table, then what to do next."""
    log.info("run %s summary (%s):\n%s", record.data["run_id"], record.uri, summary_table(record.data))
    steps = next_steps(record.data)
    if steps:
        log.info("next:\n%s", "\n".join(steps))
