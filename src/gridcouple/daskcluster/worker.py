"""The job side of :class:`gridcouple.dask.BatchCluster`: one dask worker.

``python -m gridcouple.daskcluster.worker SCHEDULER --name NAME --nthreads N
[--memory-limit BYTES] [--host HOST] [--death-timeout SECONDS]``

The worker speaks mutual TLS with the cluster's certificate, given as distributed ``Security``
keyword arguments (JSON) in ``$GRIDCOUPLE_DASK_TLS``; it joins under NAME, the cluster's name
for its job, and ends (exit 0) when the cluster retires it or the scheduler goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

TLS_ENV = "GRIDCOUPLE_DASK_TLS"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m gridcouple.daskcluster.worker")
    parser.add_argument("scheduler")
    parser.add_argument("--name", required=True)
    parser.add_argument("--nthreads", type=int, default=1)
    parser.add_argument("--memory-limit", default="0")
    parser.add_argument("--host", default=None)
    parser.add_argument("--death-timeout", type=float, default=60.0)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace, tls: dict[str, object]) -> None:
    """Run the worker until it is closed."""
    from distributed import Worker
    from distributed.security import Security

    async with Worker(args.scheduler, name=args.name, nthreads=args.nthreads,
                      memory_limit=args.memory_limit, host=args.host,
                      death_timeout=args.death_timeout, security=Security(**tls)) as worker:
        await worker.finished()


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        tls = json.loads(os.environ.pop(TLS_ENV))
    except (KeyError, ValueError) as exc:
        print(f"gridcouple dask worker: no TLS settings in ${TLS_ENV} ({exc}); the cluster "
              "sets them", file=sys.stderr)
        return 2
    asyncio.run(run(args, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
