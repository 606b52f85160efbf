"""Handshake fields that client and server compare before they run a program, and length buckets.

The server announces its terms in the ``welcome`` message and the client repeats the values it
computed itself in ``ready``. Either side rejects the session on any difference, with a message
that names each differing field and the value on each side.

Length buckets hide the prompt length: the client pads its tokens to the smallest bucket that
fits, so the server learns only the bucket. The server compiles one program per bucket.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from cipherprompt.plan import OperatorPlan

# Fields of the ``ready`` message that must equal the server's own values.
READY_FIELDS = (
    "model",
    "weights_sha256",
    "tokenizer_sha256",
    "plan",
    "plan_sha256",
    "buckets",
    "batch",
    "program_sha256",
)

# Expectations a client may pin in ``hello``, with the welcome field each one is checked against.
PINNABLE_FIELDS = ("model", "weights_sha256", "plan")

# [CLS], one text token and [SEP].
MIN_BUCKET = 3


class HandshakeError(RuntimeError):
    """Client and server disagree on the program they would run; the session is not started."""


def plan_sha256(plan: OperatorPlan) -> str:
    """Hash the plan's canonical JSON (which operator runs in which layer) with SHA-256."""
    return hashlib.sha256(plan.canonical_json().encode()).hexdigest()


def program_set_sha256(programs: Mapping[int, str]) -> str:
    """Hash the program digests of all buckets, in bucket order, into one SHA-256."""
    digest = hashlib.sha256()
    for bucket in sorted(programs):
        digest.update(f"{bucket}:{programs[bucket]}\n".encode())
    return digest.hexdigest()


def parse_buckets(text: str) -> tuple[int, ...]:
    """Parse a comma-separated list such as ``16,32,64``; raise ValueError naming the value."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(part.isdigit() for part in parts):
        raise ValueError(
            f"invalid bucket list {text!r}; expected token counts separated by commas, "
            "e.g. 16,32,64"
        )
    return tuple(int(part) for part in parts)


def validate_buckets(buckets: Iterable[int], max_positions: int) -> tuple[int, ...]:
    """Return the buckets sorted; raise ValueError on duplicates or lengths the model cannot run."""
    buckets = tuple(buckets)
    if not buckets:
        raise ValueError("at least one length bucket is needed, e.g. --buckets 32")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"length buckets {buckets} contain duplicates")
    for bucket in buckets:
        if not MIN_BUCKET <= bucket <= max_positions:
            raise ValueError(
                f"length bucket {bucket} is outside {MIN_BUCKET}..{max_positions} "
                "(the model's position table); choose buckets in that range"
            )
    return tuple(sorted(buckets))


def pick_bucket(num_tokens: int, buckets: Iterable[int]) -> int | None:
    """Return the smallest bucket of at least ``num_tokens`` tokens, or None when none fits."""
    fitting = [bucket for bucket in buckets if bucket >= num_tokens]
    return min(fitting) if fitting else None


def _show(value) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(item) for item in value) + "]"
    return repr(value)


def _normalise(value):
    # JSON turns tuples into lists; compare both the same way.
    return json.loads(json.dumps(value)) if value is not None else None


def find_differences(
    local: Mapping, remote: Mapping, fields: Iterable[str], local_side: str, remote_side: str
) -> list[str]:
    """List each field whose value differs, e.g. ``plan differs: server 'exact', client 'x'``."""
    lines = []
    for name in fields:
        ours, theirs = _normalise(local.get(name)), _normalise(remote.get(name))
        if ours != theirs:
            lines.append(
                f"{name} differs: {local_side} {_show(ours)}, {remote_side} {_show(theirs)}"
            )
    return lines


def check_pins(terms: Mapping, pins: Mapping, pinning_side: str, serving_side: str) -> list[str]:
    """Lines for each pinned expectation (model, weights_sha256, plan) that ``terms`` breaks."""
    lines = []
    for name in PINNABLE_FIELDS:
        expected = pins.get(name)
        if expected is not None and terms.get(name) != expected:
            lines.append(
                f"{name} differs: {pinning_side} expects {_show(expected)}, "
                f"{serving_side} has {_show(terms.get(name))}"
            )
    return lines
