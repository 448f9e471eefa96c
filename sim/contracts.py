"""The simulator's security master: IB contract details for every universe symbol.

conIds are derived from the symbol (CRC32), so they are stable across runs and do
not depend on the order of the universe file.
"""

from __future__ import annotations

import re
import zlib
from typing import Iterable

from qe.universe import Instrument

from .protocol import ContractInfo, ContractRef

_PREFERRED = re.compile(r"^([A-Z.]+) PR([A-Z])$")


def con_id_for(symbol: str) -> int:
    # 9 digits like real conIds, never 0.
    return 100_000_000 + zlib.crc32(symbol.encode()) % 800_000_000


def contract_for(instrument: Instrument) -> ContractInfo:
    symbol = instrument.symbol
    match = _PREFERRED.match(symbol)
    if instrument.group.upper() == "ETF":
        stock_type, primary, long_name = "ETF", "NASDAQ", f"{symbol} EXCHANGE TRADED FUND"
        category = "Exchange Traded Fund"
    elif match:
        stock_type, primary = "PREFERRED", "NYSE"
        long_name = f"{instrument.group or match.group(1)} SERIES {match.group(2)} PREFERRED"
        category = "Preferred Stock"
    else:
        # Plain-ticker preferreds (AGNCN, ...) are Nasdaq listings in the universe.
        stock_type, primary = "PREFERRED", "NASDAQ"
        long_name = f"{instrument.group or symbol} PREFERRED {symbol}"
        category = "Preferred Stock"
    return ContractInfo(
        con_id=con_id_for(symbol),
        symbol=symbol,
        primary_exchange=primary,
        local_symbol=symbol,
        trading_class=symbol,
        long_name=long_name,
        stock_type=stock_type,
        industry="Financial",
        category=category,
    )


class Catalogue:
    """Lookup of ContractInfo by symbol or conId, matching IB's rules loosely."""

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.by_symbol: dict[str, ContractInfo] = {}
        self.by_con_id: dict[int, ContractInfo] = {}
        for instrument in instruments:
            info = contract_for(instrument)
            if info.con_id in self.by_con_id:  # pragma: no cover - CRC collision
                raise ValueError(f"conId collision for {instrument.symbol}")
            self.by_symbol[info.symbol] = info
            self.by_con_id[info.con_id] = info

    def __contains__(self, symbol: str) -> bool:
        return symbol in self.by_symbol

    def get(self, symbol: str) -> ContractInfo | None:
        return self.by_symbol.get(symbol)

    def resolve(self, ref: ContractRef) -> ContractInfo | None:
        """The instrument a request means, or None (IB error 200)."""
        if ref.con_id:
            info = self.by_con_id.get(ref.con_id)
            if info is None:
                return None
            if ref.symbol and ref.symbol.upper() != info.symbol:
                return None
            return info
        symbol = (ref.symbol or ref.local_symbol).strip().upper()
        info = self.by_symbol.get(symbol)
        if info is None and ref.local_symbol:
            info = self.by_symbol.get(ref.local_symbol.strip().upper())
        if info is None:
            return None
        if ref.sec_type and ref.sec_type.upper() not in ("STK", info.sec_type):
            return None
        if ref.currency and ref.currency.upper() != info.currency:
            return None
        return info
