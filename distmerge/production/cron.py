"""Five-field cron expressions (minute hour day-of-month month day-of-week), evaluated in UTC.

Enough of cron for merge schedules, without a dependency: each field is `*`, a number, a range `a-b`, a step
`*/n` or `a-b/n`, or a comma-separated list of those. Day of week is 0-6 with Sunday 0 (7 is Sunday too).
As in classic cron, when both day fields are restricted a time matches if either one does. No names
(`MON`, `JAN`) and no `@hourly` shorthands: they fail with a message that says what to write instead.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
_HORIZON_DAYS = 8 * 366  # Feb 29 on a given weekday can be years away; past this a schedule never fires


class CronError(ValueError):
    """A cron expression cannot be parsed; the message names the field and the fix."""


@dataclass(frozen=True)
class Cron:
    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    days_restricted: bool
    weekdays_restricted: bool

    def matches(self, when: dt.datetime) -> bool:
        return when.minute in self.minutes and when.hour in self.hours and self.day_matches(when)

    def day_matches(self, when: dt.datetime) -> bool:
        if when.month not in self.months:
            return False
        day_ok, weekday_ok = when.day in self.days, (when.weekday() + 1) % 7 in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def next_after(self, when: dt.datetime) -> dt.datetime:
        """The first matching minute strictly after `when` (an aware datetime; the result is UTC)."""
        candidate = when.astimezone(dt.UTC).replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
        horizon = candidate + dt.timedelta(days=_HORIZON_DAYS)
        while candidate < horizon:
            # Skip whole days and hours that cannot match instead of testing each of their minutes.
            if not self.day_matches(candidate):
                candidate = (candidate + dt.timedelta(days=1)).replace(hour=0, minute=0)
            elif candidate.hour not in self.hours:
                candidate = (candidate + dt.timedelta(hours=1)).replace(minute=0)
            elif candidate.minute not in self.minutes:
                candidate += dt.timedelta(minutes=1)
            else:
                return candidate
        raise CronError(f"cron {self.text!r} never fires (e.g. February 30). Fix: check the day and month fields")


def parse_cron(text: str) -> Cron:
    parts = text.split()
    if len(parts) != 5:
        raise CronError(f"cron {text!r} has {len(parts)} fields; write 5: minute hour day-of-month month "
                        "day-of-week, e.g. '*/15 * * * *' (every 15 minutes) or '0 3 * * 1' (Mondays 03:00 UTC)")
    values = [_parse_field(part, name, low, high, text) for part, (name, low, high) in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[4])
    return Cron(text, frozenset(values[0]), frozenset(values[1]), frozenset(values[2]), frozenset(values[3]),
                weekdays, days_restricted=parts[2] != "*", weekdays_restricted=parts[4] != "*")


def _parse_field(part: str, name: str, low: int, high: int, text: str) -> set[int]:
    out: set[int] = set()
    for item in part.split(","):
        span, _, step_text = item.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                start, end = low, high
            elif "-" in span:
                start, end = (int(v) for v in span.split("-", 1))
            else:
                start = end = int(span)
        except ValueError:
            raise CronError(f"cron {text!r}: {name} field {part!r} is not a number, range, list or step. "
                            f"Fix: use e.g. 5, 1-5, 1,15 or */10 (names and @shorthands are not supported)") from None
        if step < 1 or not low <= start <= end <= high:
            raise CronError(f"cron {text!r}: {name} field {part!r} is outside {low}-{high} or has a step below 1. "
                            f"Fix: keep {name} values within {low}-{high}")
        out.update(range(start, end + 1, step))
    return out
