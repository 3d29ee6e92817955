"""`_manifest.json`: the commit record of a stage's output prefix.

It is written last, after everything it lists. A prefix without one is
incomplete, never "done"; a prefix whose manifest matches the current config
and inputs is up to date.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import clipforge
from clipforge.storage import uri as storage

MANIFEST_NAME = "_manifest.json"


def manifest_uri(prefix: str) -> str:
    return storage.join(prefix, MANIFEST_NAME)


def read_manifest(prefix: str) -> dict[str, Any] | None:
    target = manifest_uri(prefix)
    return storage.read_json(target) if storage.exists(target) else None


def write_manifest(prefix: str, *, kind: str, config: dict, config_fingerprint: str, inputs: dict, **fields) -> dict:
    """Commit the prefix. Call only after every file it names is written."""
    manifest = {
        "kind": kind,
        "config_fingerprint": config_fingerprint,
        "config": config,
        "inputs": inputs,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "clipforge_version": clipforge.__version__,
        **fields,
    }
    storage.write_json(manifest_uri(prefix), manifest)
    return manifest


def digest(value: Any) -> str:
    """A short stable hash of JSON-like data: how a manifest, or part of one, stands for an output."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_fingerprint(output: str) -> str | None:
    """A finished output's identity: a hash of its manifest's config fingerprint and inputs."""
    manifest = read_manifest(output)
    if manifest is None:
        return None
    return digest({"config": manifest.get("config_fingerprint"), "inputs": manifest.get("inputs")})


def is_up_to_date(manifest: dict | None, config_fingerprint: str, inputs: dict) -> bool:
    return (
        manifest is not None
        and manifest.get("config_fingerprint") == config_fingerprint
        and manifest.get("inputs") == inputs
    )
