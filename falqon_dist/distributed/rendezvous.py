"""A rendezvous that names the ranks it waits for, and gives up in bounded time.

torch's ``env://`` rendezvous waits silently (gloo's default: 30 minutes) and, when it times out,
says only how many clients joined. This one builds the same TCPStore (rank 0 hosts it, or torchrun's
agent does) without waiting for workers, then every rank adds a join key; while ranks are missing,
every rank says which, and after the timeout the error names them. The store is then handed to
``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time

import torch.distributed as tdist

from falqon_dist.distributed.waits import NOTICE_EVERY_S, announced


class RendezvousError(RuntimeError):
    """Ranks that did not join (or a rendezvous host that did not answer) within the timeout."""


def rendezvous(rank: int, world: int, timeout_s: float, poll_s: float = 0.2) -> tdist.Store:
    """The TCPStore at ``MASTER_ADDR:MASTER_PORT`` once all ``world`` ranks have joined it.

    Rank 0 hosts it (or torchrun's agent does, ``TORCHELASTIC_USE_AGENT_STORE``), as torch's
    ``env://`` does. Each rank then adds its join key; while ranks are missing every rank says which
    (after a few seconds, then every interval), and after ``timeout_s`` raises
    :class:`RendezvousError` naming them.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    where = f"{addr}:{port}"
    try:
        with announced(
            f"the rendezvous host {where} (rank 0{' / the torchrun agent' if agent else ''}) to answer"
        ):
            store = tdist.TCPStore(
                addr,
                port,
                world,
                is_master=rank == 0 and not agent,
                timeout=dt.timedelta(seconds=timeout_s),
                wait_for_workers=False,
                multi_tenant=True,
            )
    except (
        RuntimeError,
        OSError,
    ) as exc:  # DistNetworkError / DistStoreError derive from RuntimeError
        raise RendezvousError(
            f"rank {rank}: the rendezvous host {where} did not answer within {timeout_s:.0f}s (dist.timeout_s): "
            f"is rank 0 running, and are MASTER_ADDR/MASTER_PORT right? ({exc})"
        ) from None
    prefix = "falqon_dist/join/{}/{}/".format(
        os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    )
    store.set(f"{prefix}{rank}", socket.gethostname())
    joined = store.add(f"{prefix}count", 1)
    deadline = time.monotonic() + timeout_s

    def missing() -> list[int]:
        return [r for r in range(world) if not store.check([f"{prefix}{r}"])]

    def waiting_for() -> str:
        absent = missing()
        shown = ", ".join(map(str, absent[:16])) + (
            f" and {len(absent) - 16} more" if len(absent) > 16 else ""
        )
        return f"rank(s) {shown} of {world} to join the rendezvous at {where}"

    with announced(waiting_for, every_s=NOTICE_EVERY_S):
        while joined < world:
            if time.monotonic() > deadline:
                absent = missing()
                raise RendezvousError(
                    f"rank {rank}: rank(s) {', '.join(map(str, absent))} of {world} did not join the rendezvous "
                    f"at {where} within {timeout_s:.0f}s (dist.timeout_s); check that they were started and "
                    f"can reach {where}"
                )
            time.sleep(poll_s)
            try:
                joined = store.add(f"{prefix}count", 0)
            # DistNetworkError: the host's store closed (rank 0 gave up or died)
            except RuntimeError as exc:
                raise RendezvousError(
                    f"rank {rank}: the rendezvous host {where} went away while {joined} of {world} ranks had "
                    f"joined (rank 0 gave up or exited; see its output) ({type(exc).__name__})"
                ) from None
    return store
