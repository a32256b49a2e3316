"""What a reason code means for a file: the status rule of curation, shared by the stage and its report.

A file is `quarantined` when any reason is a quarantine reason (or a quality rule that is not
only a flag), `flagged` when any reason is a flag, else `kept`.
"""

from __future__ import annotations

from simone.data.records import RECORD_REASONS

QUARANTINE = {
    "empty",
    "binary",
    "not_utf8",
    "unreadable",
    "orphan_sidecar",
    "stub",
    "too_short",
    "exact_duplicate",
    "near_duplicate",
    "outside_corpus",
    "not_regular_file",
    "too_large",
    "timed_out",
    "hidden",
    "symlinked_dir",
} | RECORD_REASONS  # a record of a record file that is no document
NOT_DOCUMENTS = {"hidden", "symlinked_dir"}  # folder-level skips: not counted in any domain
FLAG = {
    "title_mismatch",
    "bad_sidecar",
    "contamination",
    "low_quality:repeated_passage",
    "low_quality:whitespace_share",
}


def quarantines(reason: str) -> bool:
    """Whether this reason alone keeps a file out of training."""
    return reason in QUARANTINE or (reason.startswith("low_quality:") and reason not in FLAG)


def file_status(reasons: list[str]) -> str:
    """ "quarantined", "flagged" or "kept" for a file with these reason codes."""
    if any(quarantines(r) for r in reasons):
        return "quarantined"
    if any(r in FLAG for r in reasons):
        return "flagged"
    return "kept"
