"""Evaluation: exact match scoring and reference sets.

``em`` holds the pure scoring functions (extractors, normalisers,
``exact_match``); ``references`` loads and validates JSONL reference sets.
"""

from gateway.evaluation.em import (
    Extractor,
    Normalizer,
    RegexExtractor,
    exact_match,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    get_extractor,
    get_normalizer,
    normalize_exact,
    normalize_number,
    normalize_text,
)
from gateway.evaluation.references import (
    Message,
    ReferenceIssue,
    ReferenceItem,
    ReferenceSet,
    ReferenceSetError,
    load_reference_file,
    parse_reference_lines,
)

__all__ = [
    "Extractor",
    "Message",
    "Normalizer",
    "ReferenceIssue",
    "ReferenceItem",
    "ReferenceSet",
    "ReferenceSetError",
    "RegexExtractor",
    "exact_match",
    "extract_boxed",
    "extract_gsm8k",
    "extract_last_number",
    "get_extractor",
    "get_normalizer",
    "load_reference_file",
    "normalize_exact",
    "normalize_number",
    "normalize_text",
    "parse_reference_lines",
]
