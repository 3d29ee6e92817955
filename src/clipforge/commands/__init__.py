"""Thin CLI commands: each parses flags into a config and calls one library function."""
