"""What a request may be billed in units other than tokens, for budget reservations."""

from __future__ import annotations

from typing import Any

from ..providers._base import Operation

#: Documents per rerank search unit (Cohere) or query (Bedrock).
DOCUMENTS_PER_SEARCH_UNIT = 100


def requested_units(operation: Operation, body: dict[str, Any]) -> tuple[int, int]:
    """(images, search units) a request asks for at most: ``n`` images, one search unit per query
    of up to 100 documents."""
    if operation in (Operation.IMAGE, Operation.IMAGE_EDIT):
        n = body.get("n")
        return (n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1), 0
    if operation is Operation.RERANK:
        documents = body.get("documents")
        count = len(documents) if isinstance(documents, list) else 0
        return 0, max(1, -(-count // DOCUMENTS_PER_SEARCH_UNIT))
    return 0, 0
