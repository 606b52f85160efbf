"""One party's side of a two-party SPU session: link, runtime, infeed, staged runs, outfeed."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    check_two_party_protocol,
    make_io,
    runtime_config,
)
from cipherprompt.secure.tls import TLSFiles, configure_link

log = logging.getLogger(__name__)

# The link's receive timeout: the longest one protocol step may wait for the peer. SPU's
# default of 30 s is too short for the embedding product of a 30k-token vocabulary.
DEFAULT_LINK_TIMEOUT_S = 600.0
# How long the link keeps trying to reach the peer when the session starts.
DEFAULT_CONNECT_TIMEOUT_S = 30.0
_CONNECT_RETRY_INTERVAL_S = 0.5
# Seconds one send on the link (at most 1 MB, SPU's chunk size) may take; longer means the peer
# is stalled. A failed send is tried once more, so a stalled peer blocks a send for at most
# twice this plus 1 s, where spu 0.9.5's default of three retries would allow four times.
_MAX_SEND_TIMEOUT_S = 60.0
_SEND_RETRIES = 1


@dataclass(frozen=True)
class LinkOptions:
    """Settings of one party's SPU link."""

    # Seconds one protocol step may wait for the peer's message before the run fails.
    timeout_s: float = DEFAULT_LINK_TIMEOUT_S
    # Seconds the link keeps retrying to reach the peer at set-up.
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    # Certificates for TLS on the link; None sends the link's bytes in the clear.
    tls: TLSFiles | None = None

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"the link timeout must be positive, got {self.timeout_s} s")
        if self.connect_timeout_s <= 0:
            raise ValueError(
                f"the link connect timeout must be positive, got {self.connect_timeout_s} s"
            )


class SecureParty:
    """Holds the SPU link and runtime of one session, kept alive across queries.

    The constructor blocks until the peer has built its own runtime: SPU's runtime constructor
    talks to the peer, so both parties must create theirs at about the same time. It calls
    ``on_linked`` once the link reached the peer, before the runtime set-up. One runtime
    runs the programs of every length bucket, because the weights do not depend on the length.

    ``server_link`` and ``client_link`` are the link's party list as this party sees it: the
    link listens on the entry of its own rank and connects to the entry of the peer's rank. So
    the peer's entry may be a relay's address, and the two parties may pass different lists.
    """

    def __init__(self, rank: int, server_link: str, client_link: str, engine: EngineConfig,
                 spu_log: Path, link: LinkOptions = LinkOptions(),
                 on_linked: Callable[[], None] | None = None):
        if rank not in (SERVER_RANK, CLIENT_RANK):
            raise ValueError(f"rank must be {SERVER_RANK} (server) or {CLIENT_RANK} (client)")
        check_two_party_protocol(engine.protocol)
        self.rank = rank
        self.engine = engine
        self.profile = ProfileReader(route_spu_log(spu_log))
        desc = libspu.link.Desc()
        desc.recv_timeout_ms = int(link.timeout_s * 1000)
        desc.http_timeout_ms = int(min(link.timeout_s, _MAX_SEND_TIMEOUT_S) * 1000)
        desc.retry_opts.max_retry = _SEND_RETRIES
        desc.connect_retry_times = max(1, round(link.connect_timeout_s / _CONNECT_RETRY_INTERVAL_S))
        desc.connect_retry_interval_ms = int(_CONNECT_RETRY_INTERVAL_S * 1000)
        if link.tls is not None:
            configure_link(desc, link.tls)
        desc.add_party("server", server_link)
        desc.add_party("client", client_link)
        self.link = libspu.link.create_brpc(desc, rank)
        if on_linked is not None:
            on_linked()
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

    def set_public(self, name: str, value: np.ndarray) -> None:
        """Infeed a public value; the peer must infeed the same value under the same name."""
        shares = self.io.make_shares(np.array(value, order="C"), libspu.Visibility.VIS_PUBLIC)
        self.runtime.set_var(name, shares[self.rank])

    def run(self, model: CompiledModel,
            on_stage: Callable[[int, int, str], None] | None = None) -> QueryCost:
        """Run every stage of ``model``; return this party's cost of the run."""
        cost = QueryCost()
        started = time.perf_counter()
        total = len(model.stages)
        for index, stage in enumerate(model.stages):
            if on_stage is not None:
                on_stage(index, total, stage.name)
            self.runtime.run(stage.executable)
            cost.stages.append(parse_run(self._wait_for_profile(stage.name), stage.name))
            for name in stage.frees:
                self.runtime.del_var(name)
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

    def output_share(self, model: CompiledModel) -> libspu.Share:
        return self.runtime.get_var(model.output_name)

    def reconstruct(self, own: libspu.Share, peer: libspu.Share) -> np.ndarray:
        shares = [peer, own] if self.rank == CLIENT_RANK else [own, peer]
        return np.asarray(self.io.reconstruct(shares))

    def close(self) -> None:
        """Stop the link after the peer's FIN message; call only while the peer also closes.

        NOTE: in spu 0.9.5 this waits for the peer without a time limit, and the process exits
        with status 255 when the peer is gone, because the link's failed asynchronous sends
        end the process. Skip it when the session ended in an error.
        """
        try:
            self.link.stop_link()
        except RuntimeError as error:
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


_SPU_MESSAGE = re.compile(r"\[[^\]]*\.cc:\d+\]\s*(.+)")


def describe_spu_error(error: BaseException) -> str:
    """Return the first line of SPU's message without its stack trace, e.g. ``Get data timeout``."""
    text = str(error)
    match = _SPU_MESSAGE.search(text)
    line = match.group(1) if match else text.strip()
    return line.splitlines()[0].strip() if line else type(error).__name__
