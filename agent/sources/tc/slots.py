"""Counter slots of the tc programs: which interface counts in which entry of bpf/tc.bpf.c's
per-CPU array `if_slots`.

agent/sources/tc/source.py takes a slot here when it attaches to an interface and attaches
both filters with the slot as their classid (the programs read it back as skb->tc_classid,
so finding an interface's counters costs no map lookup); the slot returns here when the
interface goes away. Slot 0 means none (the table is full): that interface is counted in
the `ifstats` hash instead. The lowest free slot is always taken, so the slots in use stay
dense. Pure bookkeeping, no kernel access (unit-tested); the source zeroes a slot's entries
before it hands the slot to a new interface.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, Optional

MAX_SLOTS = 0xFFFF  # cls_bpf stores the classid in the skb's 16-bit tc_classid


class SlotTable:
    """Slots 1..size for interfaces by ifindex. Not thread-safe: the caller holds its lock."""

    def __init__(self, size: int) -> None:
        if not 1 <= size <= MAX_SLOTS:
            raise ValueError(f"interface slots: {size} is not in 1..{MAX_SLOTS}")
        self.size = size
        self._free: List[int] = list(range(1, size + 1))  # a heap (sorted is a valid heap)
        self._by_ifindex: Dict[int, int] = {}
        self.refused = 0  # interfaces that found the table full

    def assign(self, ifindex: int) -> Optional[int]:
        """The interface's slot (its existing one if it has one); None when the table is full."""
        if ifindex in self._by_ifindex:
            return self._by_ifindex[ifindex]
        if not self._free:
            self.refused += 1
            return None
        slot = heapq.heappop(self._free)
        self._by_ifindex[ifindex] = slot
        return slot

    def release(self, ifindex: int) -> Optional[int]:
        """Give the interface's slot back; returns it (None if it had none)."""
        slot = self._by_ifindex.pop(ifindex, None)
        if slot is not None:
            heapq.heappush(self._free, slot)
        return slot

    def slot_of(self, ifindex: int) -> Optional[int]:
        return self._by_ifindex.get(ifindex)

    def in_use(self) -> Dict[int, int]:
        """ifindex -> slot of every interface holding one."""
        return dict(self._by_ifindex)


def entry_index(slot: int, direction: int) -> int:
    """The `if_slots` entry of (slot, direction), as the programs compute it."""
    return (slot - 1) * 2 + direction
