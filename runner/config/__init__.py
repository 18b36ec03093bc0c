"""Experiment files: the schema and run identity (`schema`), the values allowed (`rules`), and
reading files, includes, `--set` and grids into runs (`loading`)."""

from runner.config.loading import load_runs, parse_override, parse_yaml
from runner.config.rules import build_experiment
from runner.config.schema import (
    NOT_IDENTITY,
    RECORDED_TENSORS,
    CorpusConfig,
    Experiment,
    ModelConfig,
    RecordConfig,
    ResourcesConfig,
    Run,
    TrainConfig,
    identity,
    introduced_with,
    non_identity_keys,
    point_label,
)

__all__ = ["NOT_IDENTITY", "RECORDED_TENSORS", "CorpusConfig", "Experiment", "ModelConfig", "RecordConfig",
           "ResourcesConfig", "Run", "TrainConfig", "build_experiment", "identity", "introduced_with", "load_runs",
           "non_identity_keys", "parse_override", "parse_yaml", "point_label"]
