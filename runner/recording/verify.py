"""Reading recordings back: metadata, tensors, and `verify` (header, layout, values, Adam's relation).

Reads go through the safetensors library: memory-mapped, nothing executed. (`rows` streams rows
without torch, for analyses whose memory must stay bounded.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from runner.config import Experiment
from runner.layout import recording_of
from runner.recording.format import (
    FORMAT_VERSION,
    expected_layout,
    experiment_of,
    recorded_steps,
    recorded_tensors,
)
from runner.storage.location import Local, Location


def layout_problems(path: Path, expected: dict) -> list[str]:
    """Problems with a recording's header: missing file, unreadable header, wrong names/dtypes/shapes."""
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {name: f.get_slice(name) for name in f.keys()}
    except FileNotFoundError:
        return [f"{path}: missing"]
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        return [f"{path}: unreadable safetensors header: {e}"]
    problems = [f"{path}: {name}: missing" for name in expected if name not in found]
    problems += [f"{path}: {name}: unexpected tensor" for name in found if name not in expected]
    for name, (dtype, shape) in expected.items():
        if name in found:
            got = (found[name].get_dtype(), tuple(found[name].get_shape()))
            if got != (dtype, shape):
                problems.append(f"{path}: {name}: {got[0]}{list(got[1])}, expected {dtype}{list(shape)}")
    return problems


REQUIRED_METADATA = ("format_version", "run_id", "config", "seed", "precision", "device", "steps", "record_every",
                     "n_params", "git_commit", "corpus_sha256", "token_counts", "final_loss", "steps_per_s")
ADAM_SAMPLES = 8  # steps at which `verify` checks the Adam relation between rows


def adam_violations(m_next: torch.Tensor, v_next: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
                    g: torch.Tensor, betas: tuple[float, float], precision: str) -> int:
    """Entries breaking m' = b1 m + (1-b1) g, v' = b2 v + (1-b2) g^2 beyond rounding: g is stored in
    bf16 (unit roundoff 2^-8), arithmetic is fp32, and bf16-true's moments are bf16 tensors updated
    in place (one rounding for exp_avg, two for exp_avg_sq; we allow two for both)."""
    b1, b2 = betas
    bf16_u, fp32_u = 2.0 ** -8, 2.0 ** -24
    slack = 2 * bf16_u if precision == "bf16-true" else 0.0
    g = g.float()
    m_pred, v_pred = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    m_tol = (1 - b1) * g.abs() * bf16_u + (slack + 4 * fp32_u) * m_pred.abs()
    v_tol = (1 - b2) * g * g * 3 * bf16_u + (slack + 4 * fp32_u) * v_pred.abs()
    return int(((m_next - m_pred).abs() > m_tol).sum() + ((v_next - v_pred).abs() > v_tol).sum())


def verify(path: Path, full: bool = True) -> list[str]:
    """Problems with a recording (or a run directory's), one line each; [] when it is valid.

    Always: the header parses, the metadata is there, names/shapes/dtypes match the recorded
    config, and Adam's relation holds between rows at a sample of steps. `full` also scans every
    value for NaN/Inf (reads the whole file)."""
    path = recording_of(Local(Path(path))).path
    try:
        meta = read_metadata(path)
    except FileNotFoundError:
        return [f"{path}: missing"]
    except Exception as e:  # safetensors raises its own error types for a corrupt or truncated file
        return [f"{path}: not a readable safetensors file: {e}"]
    problems = [f"{path}: metadata: {key} missing" for key in REQUIRED_METADATA if key not in meta]
    if meta.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        problems.append(f"{path}: format_version {meta['format_version']}, expected {FORMAT_VERSION}")
    try:
        exp = experiment_of(meta)
    except (KeyError, ValueError) as e:
        return problems + [f"{path}: metadata: config unusable ({e})"]
    wrong_layout = layout_problems(path, expected_layout(exp))
    if wrong_layout:
        return problems + wrong_layout
    with safe_open(str(path), framework="pt") as f:
        if full:
            for name in f.keys():
                tensor = f.get_slice(name)
                rows = tensor.get_shape()[0] if tensor.get_shape() else 1
                for start in range(0, rows, 1024):  # bounded memory on a 1 GB file
                    block = tensor[start:start + 1024] if tensor.get_shape() else f.get_tensor(name)
                    if not torch.isfinite(block.float()).all():
                        problems.append(f"{path}: {name}: NaN or Inf in rows {start}..{start + len(block) - 1}")
                        break
        recorded = set(recorded_tensors(exp))
        for moments in (("momentum", "variance", "grads"), ("E_momentum", "E_variance", "E_grads")):
            if exp.record.every == 1 and set(moments) <= recorded:
                problems += _adam_problems(path, exp, *(f.get_slice(n) for n in moments))
        if "lr" in recorded:
            problems += _lr_problems(path, exp, f.get_tensor("lr"))
    return problems


def _adam_problems(path: Path, exp: Experiment, m, v, g) -> list[str]:
    """Adam's moment relation between rows at ADAM_SAMPLES steps (with the gradient as recorded:
    clipped, when clipping is on)."""
    steps, problems = exp.train.steps, []
    for t in sorted({1 + (steps - 2) * i // (ADAM_SAMPLES - 1) for i in range(ADAM_SAMPLES)} if steps > 1 else set()):
        bad = adam_violations(m[t + 1], v[t + 1], m[t], v[t], g[t], exp.train.betas, exp.train.precision)
        if bad:
            problems.append(f"{path}: rows {t}->{t + 1}: {bad} entries break Adam's update rule")
    return problems


def _lr_problems(path: Path, exp: Experiment, lr: torch.Tensor) -> list[str]:
    """Each row's learning rate is the schedule's for its step, in fp32 (0 at row 0: no update)."""
    steps = recorded_steps(exp.train.steps, exp.record.every)
    expected = torch.tensor([exp.train.learning_rate(s) for s in steps], dtype=torch.float32)
    wrong = (lr != expected).nonzero().flatten().tolist()
    return [f"{path}: lr: rows {wrong[:5]} differ from train.lr_schedule's"] if wrong else []


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def verify_at(recording: Location) -> list[str]:
    """`verify` of a recording (or a run directory's) wherever it is (one in a bucket is fetched to
    a temporary file, as a full check reads every byte); problems name the recording where it is."""
    recording = recording_of(recording)
    with recording.local_copy() as local:
        return [problem.replace(str(local), str(recording)) for problem in verify(local)]

