"""The canonical events table every source is turned into (DESIGN.md, "Canonical event table")."""

from __future__ import annotations

import pyarrow as pa

DEFAULT_BEHAVIORS: tuple[str, ...] = ("view", "fav", "cart", "buy")
PURCHASE = "buy"

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("behavior", pa.string(), nullable=False),
        pa.field("item_id", pa.string()),
        pa.field("category_id", pa.string()),
        pa.field("quantity", pa.float64(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
    ]
)
EVENT_COLUMNS: tuple[str, ...] = tuple(EVENTS_SCHEMA.names)
REQUIRED_COLUMNS: tuple[str, ...] = ("user_id", "ts", "behavior", "quantity", "amount")
