"""Round scheduling and per-mode summaries.

Rounds alternate between modes in blocks (base, agent, base, agent, ...); with more than
two modes every other block is reversed (A B C, C B A, ...) so a slow drift of the
machine does not favour the mode that always runs last. Each agent round is also paired
with the baseline round of its own block, which gives a per-block ratio and its spread.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from .stats import Summary, median, paired_ratios, pct_delta, ratio, summarize


def schedule(modes: Sequence[str], blocks: int) -> List[Tuple[int, str]]:
    """[(block, mode), ...]: every mode once per block, odd blocks in reverse order."""
    if not modes or blocks < 1:
        raise ValueError("need at least one mode and one block")
    out: List[Tuple[int, str]] = []
    for b in range(blocks):
        order = list(modes) if b % 2 == 0 else list(reversed(modes))
        out += [(b, m) for m in order]
    return out


def by_mode(values: Sequence[Tuple[int, str, float]]) -> Dict[str, Dict[int, float]]:
    """{mode: {block: value}} from (block, mode, value) triples."""
    out: Dict[str, Dict[int, float]] = {}
    for block, mode, v in values:
        out.setdefault(mode, {})[block] = v
    return out


def compare(values: Sequence[Tuple[int, str, float]], base: str = "base") -> Dict[str, Dict[str, object]]:
    """Per mode: summary of values, ratio of medians to the baseline, paired per-block ratios.

    `ratio_pct` is 100 * median(mode) / median(base); `paired` summarizes the block-wise
    ratios (in %) against the baseline run in the same block: its min–max is the spread.
    """
    table = by_mode(values)
    if base not in table:
        raise ValueError(f"no baseline rounds ({base!r})")
    base_med = median(list(table[base].values()))
    out: Dict[str, Dict[str, object]] = {}
    for mode, rounds in table.items():
        s: Summary = summarize(list(rounds.values()))
        blocks = sorted(b for b in rounds if b in table[base])
        pairs = [100.0 * r for r in paired_ratios([rounds[b] for b in blocks], [table[base][b] for b in blocks])]
        out[mode] = {
            "summary": s,
            "ratio_pct": 100.0 * ratio(s.median, base_med),
            "delta_pct": pct_delta(s.median, base_med),
            "paired_pct": summarize(pairs) if pairs else None,
        }
    return out
