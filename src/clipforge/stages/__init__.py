"""Pipeline stages: each a function of (config, inputs) -> outputs + manifest."""
