"""Symbols and the tradable universe (`etc/universe.csv`).

Three spellings of one preferred:
  display / IB   "CIM PRB"   (IB contract: symbol as shown, STK, SMART, USD)
  Hammer Pro     "CIM-B"     (" PR" + letter  <->  "-" + letter)
  plain tickers  "AGNCN", "PFF" are the same everywhere.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

_DISPLAY_PREFERRED = re.compile(r"^([A-Z.]+) PR([A-Z])$")
_HAMMER_PREFERRED = re.compile(r"^([A-Z.]+)-([A-Z])$")
BUCKETS = ("LT", "MM_PURE")
MAX_ADV = 10**12
MAX_REF_PRICE = 1_000_000.0


class UniverseError(ValueError):
    pass


def to_hammer(display: str) -> str:
    match = _DISPLAY_PREFERRED.match(display)
    return f"{match.group(1)}-{match.group(2)}" if match else display


def from_hammer(hammer: str) -> str:
    match = _HAMMER_PREFERRED.match(hammer)
    return f"{match.group(1)} PR{match.group(2)}" if match else hammer


@dataclass(frozen=True)
class Instrument:
    symbol: str
    bucket_hint: str
    adv: int
    group: str
    ref_price: float



def liquidity_cap(adv: int, adv_divisor: int, min_shares: int) -> int:
    """Most shares one order may carry: max(ADV/1000, 200) by default (SPEC, Execution).
    Execution refuses larger orders; the Brain sizes its orders within it."""
    return max(adv // adv_divisor, min_shares)


def load_universe(path: str | Path) -> dict[str, Instrument]:
    """Read the universe file; a bad row names its line and field."""
    from .config import read_text_file  # (config does not import this module)

    path = Path(path)
    try:
        text = read_text_file(path)  # bounded; unreadable, binary or not UTF-8: refused
    except ValueError as exc:
        raise UniverseError(f"{path}: {exc}") from None
    rows = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    try:
        reader = csv.DictReader(rows)
        fieldnames = reader.fieldnames
        records = list(reader)
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise UniverseError(f"{path}: not valid CSV: {exc}") from None
    required = {"symbol", "bucket_hint", "adv", "group", "ref_price"}
    missing = required - set(fieldnames or ())
    if missing:
        raise UniverseError(f"{path}: header lacks {sorted(missing)}")
    universe: dict[str, Instrument] = {}
    for index, row in enumerate(records, start=2):
        where = f"{path}: data row {index - 1}"
        symbol = (row["symbol"] or "").strip()
        if not symbol or symbol != symbol.upper():
            raise UniverseError(f"{where}: symbol {symbol!r} must be non-empty upper case")
        bucket = (row["bucket_hint"] or "").strip()
        if bucket not in BUCKETS:
            raise UniverseError(f"{where}: bucket_hint {bucket!r} must be one of {BUCKETS}")
        try:
            adv = int(row["adv"])
            ref_price = float(row["ref_price"])
        except (TypeError, ValueError) as exc:
            raise UniverseError(f"{where}: adv/ref_price: {exc}") from exc
        # ref_price is execution's mark of last resort: nan/inf or absurd values are refused.
        if not (0 <= adv <= MAX_ADV and math.isfinite(ref_price) and 0 < ref_price <= MAX_REF_PRICE):
            raise UniverseError(f"{where}: adv must be 0..{MAX_ADV} and ref_price a number in (0, {MAX_REF_PRICE}]")
        if symbol in universe:
            raise UniverseError(f"{where}: duplicate symbol {symbol!r}")
        universe[symbol] = Instrument(symbol, bucket, adv, (row["group"] or "").strip(), ref_price)
    if not universe:
        raise UniverseError(f"{path}: no symbols")
    return universe
