"""Start the real `meshlens run` with only some of `default_sources()` (bench modes).

    python bench/agent_launch.py --sources tcp run --metrics-addr ... (same flags as meshlens)

The agent has no flag to choose its sources; for the "L4 only" mode the bench wraps
`agent.runner.default_sources` with a filter by Source.name and then calls the real CLI,
so everything else (flags, lock, exporter, shutdown) is the production path.
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--sources":
        print("usage: agent_launch.py --sources NAME[,NAME] <meshlens args>", file=sys.stderr)
        return 2
    wanted = set(args[1].split(","))
    from meshlens.agent import cli, runner

    original = runner.default_sources

    def only_wanted(config, features):  # type: ignore[no-untyped-def]
        return [s for s in original(config, features) if s.name in wanted]

    runner.default_sources = only_wanted
    return cli.main(args[2:])


if __name__ == "__main__":
    sys.exit(main())
