"""One party's side of a two-party SPU session: link, runtime, infeed, staged runs, outfeed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import spu
import spu.libspu as libspu

from cipherprompt.secure.cost import ProfileReader, QueryCost, parse_run, route_spu_log
from cipherprompt.secure.engine import (
    CLIENT_RANK,
    SERVER_RANK,
    CompiledModel,
    EngineConfig,
    make_io,
    runtime_config,
)

log = logging.getLogger(__name__)

# The link's receive timeout: the longest one protocol step may wait for the peer. SPU's
# default of 30 s is too short for the embedding product of a 30k-token vocabulary.
DEFAULT_LINK_TIMEOUT_S = 600.0


class SecureParty:
    """Holds the SPU link and runtime of one session, kept alive across queries.

    The constructor blocks until the peer has built its own runtime: SPU's runtime constructor
    talks to the peer, so both parties must create theirs at about the same time.
    """

    def __init__(self, rank: int, server_link: str, client_link: str, engine: EngineConfig,
                 model: CompiledModel, spu_log: Path,
                 link_timeout_s: float = DEFAULT_LINK_TIMEOUT_S):
        if rank not in (SERVER_RANK, CLIENT_RANK):
            raise ValueError(f"rank must be {SERVER_RANK} (server) or {CLIENT_RANK} (client)")
        self.rank = rank
        self.model = model
        self.engine = engine
        self.profile = ProfileReader(route_spu_log(spu_log))
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(link_timeout_s * 1000)
        desc.http_timeout_ms = int(link_timeout_s * 1000)
        desc.connect_retry_times = 60
        desc.connect_retry_interval_ms = 500
        desc.add_party("server", server_link)
        desc.add_party("client", client_link)
        self.link = libspu.link.create_brpc(desc, rank)
        self.runtime = spu.Runtime(self.link, runtime_config(engine, profile=True))
        self.io = make_io(engine)
        self.profile.read_new()  # skip the set-up lines

    def set_secret(self, name: str, value: np.ndarray, owner: int) -> None:
        """Infeed a secret owned by ``owner``; the non-owner passes zeros of the same shape."""
        if self.rank != owner and np.any(value):
            raise ValueError(f"the non-owner of {name!r} must pass zeros, not data")
        shares = self.io.make_shares(
            np.ascontiguousarray(value, np.float32), libspu.Visibility.VIS_SECRET,
            owner_rank=owner,
        )
        self.runtime.set_var(name, shares[self.rank])

    def run(self, on_stage: Callable[[int, int, str], None] | None = None) -> QueryCost:
        """Run every stage of the model; return this party's cost of the run."""
        cost = QueryCost()
        started = time.perf_counter()
        total = len(self.model.stages)
        for index, stage in enumerate(self.model.stages):
            if on_stage is not None:
                on_stage(index, total, stage.name)
            self.runtime.run(stage.executable)
            cost.stages.append(parse_run(self._wait_for_profile(stage.name), stage.name))
            if index > 0:
                # The previous stage's hidden state is consumed; free it.
                self.runtime.del_var(self.model.stages[index - 1].output_name)
        cost.wall_seconds = time.perf_counter() - started
        return cost

    def _wait_for_profile(self, stage: str, timeout_s: float = 10.0) -> str:
        # SPU's file logger may flush the profile shortly after Run returns.
        text, deadline = "", time.monotonic() + timeout_s
        while "Link details" not in text and time.monotonic() < deadline:
            text += self.profile.read_new()
            if "Link details" not in text:
                time.sleep(0.02)
        return text

    def output_share(self) -> libspu.Share:
        return self.runtime.get_var(self.model.output_name)

    def reconstruct(self, own: libspu.Share, peer: libspu.Share) -> np.ndarray:
        shares = [peer, own] if self.rank == CLIENT_RANK else [own, peer]
        return np.asarray(self.io.reconstruct(shares))

    def close(self) -> None:
        try:
            self.link.stop_link()
        except RuntimeError as error:  # the peer may already be gone
            log.debug("closing the SPU link failed: %s", error)


def share_to_blobs(share: libspu.Share) -> list[bytes]:
    return [bytes(share.meta), *[bytes(chunk) for chunk in share.share_chunks]]


def share_from_blobs(blobs: list[bytes]) -> libspu.Share:
    if len(blobs) < 2:
        raise ValueError(f"an output share needs a meta blob and at least one chunk, got {len(blobs)}")
    share = libspu.Share()
    share.meta = blobs[0]
    share.share_chunks = list(blobs[1:])
    return share
