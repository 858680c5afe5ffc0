"""Capability-probing sets D^P (paper section 5.1.1, Figure 5, step 5): each source's representative set
D^R_i feeds the probing sets of the capabilities it is assigned to (Code C, Math M, Knowledge K; a source
may feed several). The assignment defaults to each recipe source's ``capabilities`` and can be overridden
in ``[curation] assignment``."""

from __future__ import annotations

from typing import Iterable

CAPABILITIES = ("code", "math", "knowledge")


def assignment(source_caps: dict[str, list[str]], override: dict[str, list[str]], present: Iterable[str]
               ) -> dict[str, list[str]]:
    """capability -> sources feeding it, in the order sources are given. ``override`` (capability ->
    sources) replaces the recipe's assignment for the capabilities it names."""
    present = list(present)
    bad = sorted(set(override) - set(CAPABILITIES))
    if bad:
        raise ValueError(f"[curation] assignment: unknown capability {bad[0]!r} (known: {', '.join(CAPABILITIES)})")
    for cap, names in override.items():
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(f"[curation] assignment.{cap}: source {missing[0]!r} is not among the inputs "
                             f"({', '.join(present) or 'none'})")
    for name, caps in source_caps.items():
        bad = [c for c in caps if c not in CAPABILITIES]
        if bad:
            raise ValueError(f"source {name!r}: unknown capability {bad[0]!r} (known: {', '.join(CAPABILITIES)})")
    out = {}
    for cap in CAPABILITIES:
        if cap in override:
            out[cap] = list(override[cap])
        else:
            out[cap] = [s for s in present if cap in source_caps.get(s, [])]
    return out


def capabilities_of(source: str, assign: dict[str, list[str]]) -> list[str]:
    return [c for c in CAPABILITIES if source in assign.get(c, [])]


def build_probing_sets(representative: dict[str, list[dict]], assign: dict[str, list[str]]
                       ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """D^P per capability: the union of its sources' D^R_i, exact-text duplicates across sources dropped
    (first source in assignment order keeps it). Returns (sets, counts per capability and source)."""
    sets, counts = {}, {}
    for cap in CAPABILITIES:
        seen, rows, per = set(), [], {}
        for src in assign.get(cap, []):
            n = 0
            for r in representative.get(src, []):
                if r["text"] in seen:
                    continue
                seen.add(r["text"])
                rows.append({"text": r["text"], "source": src, "id": r["id"],
                             "score": r.get("domain", {}).get(cap, r.get("askllm"))})
                n += 1
            per[src] = n
        sets[cap] = rows
        counts[cap] = {"total": len(rows), "by_source": per}
    return sets, counts
