"""The limits on events and requests, named once: the service's request models (uservalue.serving.requests)
and the pipeline's validation gate (uservalue.data.validation) read them from here, so the service never
accepts what the gate would reject. README "Limits" lists them in one table.

Standard library only: the data layer, the serving layer and the CLI all import it.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

# Identifiers (user_id, item_id, category_id, event_id): 1..ID_MAX_LENGTH characters, none of them a
# control character (C0 or DEL). This keeps out NUL (truncates in C libraries, Parquet readers) and
# "\x1f", the separator of the service's batch keys (serving.requests.KEY_SEPARATOR).
ID_MIN_LENGTH: Final = 1
ID_MAX_LENGTH: Final = 256
ID_FORBIDDEN_CHARACTERS: Final = r"\x00-\x1f\x7f"  # as regex escapes, readable in the JSON Schema
ID_PATTERN: Final = rf"^[^{ID_FORBIDDEN_CHARACTERS}]+$"  # JSON Schema `pattern`, Python `re` and Rust regex
ID_REGEX: Final = re.compile(ID_PATTERN)

# Numbers: finite, >= 0 and at most these. A larger amount is a unit mistake or an attack, and it would
# overflow the float32 features (1.7e308 became inf and broke the monitor); sums over
# MAX_EVENTS_PER_USER events of AMOUNT_MAX stay far below float32's 3.4e38.
AMOUNT_MAX: Final = 1e8  # money of one event (a purchase or a return); other behaviours have amount 0
QUANTITY_MAX: Final = 1e6  # units of one event

# Times (UTC). An event is not older than TS_MIN and not in the future (CLOCK_SKEW tolerated for a
# client clock slightly ahead); `as_of` lies in [TS_MIN, AS_OF_MAX]. Both bounds are well inside
# pandas' nanosecond range (1677-09-21 .. 2262-04-11), which the feature code and the logs use.
TS_MIN: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
AS_OF_MAX: Final = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)

# Requests. MAX_USERS_PER_REQUEST and MAX_EVENTS_PER_REQUEST are the defaults of params serve.max_users
# and serve.max_events (a deployment may lower or raise them: more is a 413); a body over
# MAX_BODY_BYTES is a 413 before it is read.
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
MAX_USERS_PER_REQUEST: Final = 1000
MAX_EVENTS_PER_REQUEST: Final = 100_000
MAX_EVENTS_PER_USER: Final = 10_000  # events of one user in one request


def latest_event_time(now: dt.datetime | None = None) -> dt.datetime:
    """The latest acceptable event time: now (UTC) plus the tolerated clock skew."""
    return (now or dt.datetime.now(dt.UTC)) + CLOCK_SKEW


def id_problem(value: str) -> str | None:
    """Why `value` is not an acceptable identifier, or None."""
    if not ID_MIN_LENGTH <= len(value) <= ID_MAX_LENGTH:
        return f"{len(value)} characters; expected {ID_MIN_LENGTH} to {ID_MAX_LENGTH}"
    if not ID_REGEX.fullmatch(value):
        bad = next(c for c in value if not ID_REGEX.fullmatch(c))
        return f"contains the control character {bad!r}; expected no control characters (U+0000-U+001F, U+007F)"
    return None


# Item text (issue 23; the optional item_text column: a title or description): 1..ITEM_TEXT_MAX_LENGTH
# characters once trimmed, valid UTF-8, no control character other than tab, newline and carriage return.
# Longer text is a wrong column mapping (a whole HTML page), and the text model reads 256 tokens at most.
ITEM_TEXT_MIN_LENGTH: Final = 1
ITEM_TEXT_MAX_LENGTH: Final = 2000
ITEM_TEXT_PATTERN: Final = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]+$"  # GE `regex` and Python `re`
ITEM_TEXT_REGEX: Final = re.compile(ITEM_TEXT_PATTERN)


def item_text_problem(value: str) -> str | None:
    """Why `value` is not an acceptable item text, or None."""
    if not ITEM_TEXT_MIN_LENGTH <= len(value) <= ITEM_TEXT_MAX_LENGTH:
        return f"{len(value)} characters; expected {ITEM_TEXT_MIN_LENGTH} to {ITEM_TEXT_MAX_LENGTH}"
    if not ITEM_TEXT_REGEX.fullmatch(value):
        bad = next(c for c in value if not ITEM_TEXT_REGEX.fullmatch(c))
        return f"contains the control character {bad!r}; expected none but tab, newline, carriage return"
    return None


LIMITS_TABLE: Final = (
    # (name, value, what it bounds) - README "Limits" shows this table.
    ("ID_MAX_LENGTH", ID_MAX_LENGTH, "characters of user_id, item_id, category_id, event_id (at least 1)"),
    ("ID_PATTERN", ID_PATTERN, "identifiers hold no control character (NUL, \\x1f, ...)"),
    ("AMOUNT_MAX", AMOUNT_MAX, "amount of one event; >= 0, finite, and 0 unless behavior is buy or return"),
    ("QUANTITY_MAX", QUANTITY_MAX, "quantity of one event; >= 0, finite"),
    ("TS_MIN", TS_MIN.isoformat(), "earliest event ts and as_of"),
    ("CLOCK_SKEW", str(CLOCK_SKEW), "an event ts may be at most this far in the future"),
    ("AS_OF_MAX", AS_OF_MAX.isoformat(), "latest as_of"),
    ("MAX_BODY_BYTES", MAX_BODY_BYTES, "request body (413 beyond)"),
    ("MAX_USERS_PER_REQUEST", MAX_USERS_PER_REQUEST, "default of serve.max_users (413 beyond)"),
    ("MAX_EVENTS_PER_REQUEST", MAX_EVENTS_PER_REQUEST, "default of serve.max_events (413 beyond)"),
    ("MAX_EVENTS_PER_USER", MAX_EVENTS_PER_USER, "events of one user in one request (413 beyond)"),
)
