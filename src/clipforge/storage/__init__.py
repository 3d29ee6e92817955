"""Artifact storage by URI: local paths and s3://bucket/key."""
