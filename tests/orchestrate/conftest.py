"""S3 as a user without credentials, or with an endpoint nobody answers on, meets it: no server needed."""

import pytest

from clipforge.storage import s3
from clipforge.storage.local_s3 import free_port


@pytest.fixture
def unreachable_s3(monkeypatch, tmp_path) -> str:
    """AWS_* point at a loopback port nobody listens on, with keys; no profile, no instance metadata. Clients
    made before (with other variables) are forgotten. Delete the keys for a user who has none."""
    monkeypatch.setattr(s3, "_clients", {})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return endpoint
