"""Reading runs in a bucket without downloading recordings: a recording is checked by its size
and header (one ranged read), as `verify`'s quick check does for a local one's layout."""

from __future__ import annotations

import json

from runner.config import build_experiment
from runner.errors import ConfigError, UserError
from runner.recording.format import expected_layout
from runner.recording.rows import RowReader
from runner.storage.uri import S3Uri


def remote_recording_ok(uri: S3Uri) -> bool:
    """The recording object exists, its header parses, its tensors are those its own config records
    (names, dtypes, shapes), and the object is as long as the header says."""
    try:
        with RowReader(str(uri)) as f:
            exp = build_experiment(json.loads(f.metadata["config"]))
            layout = {name: (info["dtype"], tuple(info["shape"])) for name, info in f.tensors.items()}
            return layout == expected_layout(exp)
    except (UserError, ConfigError, KeyError, ValueError):
        return False
