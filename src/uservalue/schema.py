"""The canonical events table every source is turned into (DESIGN.md, "Canonical event table")."""

from __future__ import annotations

import pyarrow as pa

DEFAULT_BEHAVIORS: tuple[str, ...] = ("view", "fav", "cart", "buy")
PURCHASE = "buy"
# Goods given back (a transaction log's negative or cancelled lines), with the positive amount and
# quantity returned. Only logs that can hold returns name it in data.behaviors: the features of a
# log without it (CDNOW, Taobao, synthetic) have no return columns (features.sql).
RETURN = "return"
MONEY_BEHAVIORS: tuple[str, ...] = (PURCHASE, RETURN)  # the behaviours whose events carry an amount

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

# Optional columns (issue 23): a source that has item text (a title, an order line's Description) maps it
# to `item_text`; its events table is EVENTS_TEXT_SCHEMA then. Sources without text (CDNOW, Taobao, the
# default synthetic log) write EVENTS_SCHEMA exactly as before: no empty text column.
ITEM_TEXT = "item_text"
EVENTS_TEXT_SCHEMA = EVENTS_SCHEMA.append(pa.field(ITEM_TEXT, pa.string()))
OPTIONAL_COLUMNS: tuple[str, ...] = (ITEM_TEXT,)


def events_schema(columns: list[str] | tuple[str, ...] | pa.Schema) -> pa.Schema:
    """The canonical schema of a table with these columns: with item text when it has the column."""
    names = columns.names if isinstance(columns, pa.Schema) else columns
    return EVENTS_TEXT_SCHEMA if ITEM_TEXT in names else EVENTS_SCHEMA
