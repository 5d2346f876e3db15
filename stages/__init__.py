"""Curation stages: one module per stage, each a `lafid.stage.Stage` subclass."""
