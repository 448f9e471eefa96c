"""Request handlers: positions, account updates, account summary, and the periodic
account push.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from . import protocol as P
from .broker import NEW_YORK
from .session import PnLSub

if TYPE_CHECKING:  # pragma: no cover
    from .session import Session

log = logging.getLogger("sim.server")

ACCOUNT_VALUE_KEYS_USD = (
    "NetLiquidation",
    "EquityWithLoanValue",
    "TotalCashValue",
    "CashBalance",
    "GrossPositionValue",
    "StockMarketValue",
    "InitMarginReq",
    "MaintMarginReq",
    "FullInitMarginReq",
    "FullMaintMarginReq",
    "AvailableFunds",
    "FullAvailableFunds",
    "ExcessLiquidity",
    "FullExcessLiquidity",
    "BuyingPower",
    "UnrealizedPnL",
    "RealizedPnL",
)
ACCOUNT_VALUE_KEYS_BASE = ("NetLiquidationByCurrency", "CashBalance", "TotalCashBalance", "UnrealizedPnL", "RealizedPnL")


def _money(value: float) -> str:
    return f"{value:.2f}"


class AccountHandlers:
    """Positions and account requests."""

    def on_ReqPositions(self, s: Session, r: P.ReqPositions) -> None:
        account = self.broker.account
        for info, pos, _mark in self.broker.portfolio():
            if pos.qty:
                s.send(P.position(account.account_id, info, float(pos.qty), round(pos.avg_cost, 8)))
        s.send(P.position_end())
        s.positions_sub = True

    def on_CancelPositions(self, s: Session, r: P.CancelPositions) -> None:
        s.positions_sub = False

    def on_ReqPositionsMulti(self, s: Session, r: P.ReqPositionsMulti) -> None:
        account = self.broker.account
        if not r.account or r.account == account.account_id:
            for info, pos, _mark in self.broker.portfolio():
                if pos.qty:
                    s.send(P.position_multi(r.req_id, account.account_id, info, float(pos.qty), round(pos.avg_cost, 8), r.model_code))
        s.send(P.position_multi_end(r.req_id))

    def on_CancelPositionsMulti(self, s: Session, r: P.CancelPositionsMulti) -> None:
        pass

    def account_value_rows(self) -> list[tuple[str, str, str]]:
        values = self.broker.account_values()
        account = self.broker.account
        rows = [
            ("AccountCode", account.account_id, ""),
            ("AccountType", "INDIVIDUAL", ""),
            ("AccountReady", "true", ""),
            ("Currency", "USD", "USD"),
            ("Cushion", f"{values['Cushion']:.6f}", ""),
            ("Leverage-S", f"{values['Leverage']:.4f}", ""),
            ("DayTradesRemaining", "-1", ""),
        ]
        rows += [(key, _money(values[key]), "USD") for key in ACCOUNT_VALUE_KEYS_USD]
        base = {
            "NetLiquidationByCurrency": values["NetLiquidation"],
            "CashBalance": values["CashBalance"],
            "TotalCashBalance": values["CashBalance"],
            "UnrealizedPnL": values["UnrealizedPnL"],
            "RealizedPnL": values["RealizedPnL"],
        }
        rows += [(key, _money(base[key]), "BASE") for key in ACCOUNT_VALUE_KEYS_BASE]
        rows.append(("NetLiquidationByCurrency", _money(values["NetLiquidation"]), "USD"))
        return rows

    def _send_account_values(self, s: Session) -> None:
        account_id = self.broker.account.account_id
        for key, value, currency in self.account_value_rows():
            s.send(P.account_value(key, value, currency, account_id))

    def _send_portfolio(self, s: Session, symbols: set[str] | None = None) -> None:
        account_id = self.broker.account.account_id
        for info, pos, mark in self.broker.portfolio():
            if symbols is not None and info.symbol not in symbols:
                continue
            if not pos.qty and symbols is None:
                continue
            s.send(
                P.portfolio_value(
                    info,
                    float(pos.qty),
                    round(mark, 4),
                    round(pos.qty * mark, 2),
                    round(pos.avg_cost, 8),
                    round(pos.qty * (mark - pos.avg_cost), 2) if pos.qty else 0.0,
                    round(pos.realized_pnl, 2),
                    account_id,
                )
            )

    def _account_time_text(self) -> str:
        now = datetime.fromtimestamp(self.clock.now_ns() / 1e9, tz=timezone.utc).astimezone(NEW_YORK)
        return now.strftime("%H:%M")

    def on_ReqAccountUpdates(self, s: Session, r: P.ReqAccountUpdates) -> None:
        account_id = self.broker.account.account_id
        if not r.subscribe:
            s.account_updates = False
            return
        if r.account and r.account != account_id:
            s.error(-1, 321, f"Error validating request.-'acctCode' : cause - unknown account {r.account!r}")
            s.send(P.account_download_end(r.account))
            return
        s.account_updates = True
        self._send_account_values(s)
        self._send_portfolio(s)
        s.send(P.account_update_time(self._account_time_text()))
        s.send(P.account_download_end(account_id))

    def on_ReqAccountUpdatesMulti(self, s: Session, r: P.ReqAccountUpdatesMulti) -> None:
        account_id = self.broker.account.account_id
        if not r.account or r.account in (account_id, "All"):
            for key, value, currency in self.account_value_rows():
                s.send(P.account_update_multi(r.req_id, account_id, r.model_code, key, value, currency))
            s.account_multi.add(r.req_id)
        s.send(P.account_update_multi_end(r.req_id))

    def on_CancelAccountUpdatesMulti(self, s: Session, r: P.CancelAccountUpdatesMulti) -> None:
        s.account_multi.discard(r.req_id)

    def _summary_rows(self) -> dict[str, tuple[str, str]]:
        values = self.broker.account_values()
        rows = {key: (_money(values[key]), "USD") for key in ACCOUNT_VALUE_KEYS_USD if key in values}
        rows["TotalCashValue"] = (_money(values["TotalCashValue"]), "USD")
        rows["SettledCash"] = (_money(values["TotalCashValue"]), "USD")
        rows["AccruedCash"] = ("0.00", "USD")
        rows["AccountType"] = ("INDIVIDUAL", "")
        rows["Cushion"] = (f"{values['Cushion']:.6f}", "")
        rows["Leverage"] = (f"{values['Leverage']:.4f}", "")
        rows["DayTradesRemaining"] = ("-1", "")
        rows["RegTEquity"] = (_money(values["NetLiquidation"]), "USD")
        rows["RegTMargin"] = (_money(values["InitMarginReq"]), "USD")
        rows["SMA"] = (_money(max(0.0, values["AvailableFunds"])), "USD")
        rows["PreviousDayEquityWithLoanValue"] = (_money(self.broker.previous_day_equity), "USD")
        rows["LookAheadNextChange"] = ("0", "")
        for key in ("InitMarginReq", "MaintMarginReq", "AvailableFunds", "ExcessLiquidity"):
            rows["LookAhead" + key] = (_money(values[key]), "USD")
        rows["HighestSeverity"] = ("0", "")
        return rows

    def _ledger_rows(self, currency: str) -> list[tuple[str, str]]:
        """The $LEDGER rows (one currency: USD, or BASE for the account's base currency)."""
        values = self.broker.account_values()
        zero = "0.00"
        rows = [
            ("CashBalance", _money(values["CashBalance"])),
            ("TotalCashBalance", _money(values["CashBalance"])),
            ("AccruedCash", zero),
            ("StockMarketValue", _money(values["StockMarketValue"])),
            ("OptionMarketValue", zero),
            ("FutureOptionValue", zero),
            ("FuturesPNL", zero),
            ("NetLiquidationByCurrency", _money(values["NetLiquidation"])),
            ("UnrealizedPnL", _money(values["UnrealizedPnL"])),
            ("RealizedPnL", _money(values["RealizedPnL"])),
            ("ExchangeRate", "1.00"),
            ("FundValue", zero),
            ("NetDividend", zero),
            ("MutualFundValue", zero),
            ("MoneyMarketFundValue", zero),
            ("CorporateBondValue", zero),
            ("TBondValue", zero),
            ("TBillValue", zero),
            ("WarrantValue", zero),
            ("FxCashBalance", zero),
            ("AccountOrGroup", self.broker.account.account_id),
            ("RealCurrency", "USD"),
            ("IssuerOptionValue", zero),
        ]
        return rows

    def _send_summary(self, s: Session, req_id: int, tags: set[str] | None) -> None:
        account_id = self.broker.account.account_id
        for tag, (value, currency) in self._summary_rows().items():
            if tags is None or tag in tags:
                s.send(P.account_summary(req_id, account_id, tag, value, currency))
        for ledger in sorted(t for t in (tags or ()) if t.upper().startswith("$LEDGER")):
            which = ledger.partition(":")[2].upper()
            currencies = ["BASE"] if not which else ["BASE", "USD"] if which == "ALL" else [which] if which == "USD" else []
            for currency in currencies:
                for tag, value in self._ledger_rows(currency):
                    s.send(P.account_summary(req_id, account_id, tag, value, currency))
        s.send(P.account_summary_end(req_id))

    def on_ReqAccountSummary(self, s: Session, r: P.ReqAccountSummary) -> None:
        tags = {t.strip() for t in r.tags.split(",") if t.strip()}
        wanted = None if not tags or "All" in tags else tags
        s.summary_subs[r.req_id] = wanted
        self._send_summary(s, r.req_id, wanted)

    def on_CancelAccountSummary(self, s: Session, r: P.CancelAccountSummary) -> None:
        s.summary_subs.pop(r.req_id, None)

    # ------------------------------------------------------------------ P&L

    def on_ReqPnL(self, s: Session, r: P.ReqPnL) -> None:
        if not self._pnl_request_ok(s, r.req_id, r.account):
            return
        self._start_pnl(s, PnLSub(r.req_id, None))

    def on_ReqPnLSingle(self, s: Session, r: P.ReqPnLSingle) -> None:
        if not self._pnl_request_ok(s, r.req_id, r.account):
            return
        info = self.catalogue.resolve(P.ContractRef(con_id=r.con_id)) if r.con_id > 0 else None
        if info is None:
            s.error(r.req_id, 200, "No security definition has been found for the request")
            return
        self._start_pnl(s, PnLSub(r.req_id, info.symbol))

    def _pnl_request_ok(self, s: Session, req_id: int, account: str) -> bool:
        if account != self.broker.account.account_id:
            s.error(req_id, 321, f"Error validating request.-'PnL' : cause - Invalid account code {account!r}")
            return False
        if req_id in s.pnl_subs:
            s.error(req_id, 322, f"Error processing request.-'{req_id}' : cause - Duplicate ticker id")
            return False
        return True

    def _start_pnl(self, s: Session, sub: PnLSub) -> None:
        self.broker.roll_day()
        s.pnl_subs[sub.req_id] = sub
        self._send_pnl(s, sub)

    def on_CancelPnL(self, s: Session, r: P.CancelPnL) -> None:
        s.pnl_subs.pop(r.req_id, None)  # IB does not answer a cancel

    def on_CancelPnLSingle(self, s: Session, r: P.CancelPnLSingle) -> None:
        s.pnl_subs.pop(r.req_id, None)

    def _send_pnl(self, s: Session, sub: PnLSub) -> None:
        """The subscription's figures, if they changed since last sent (to the cent)."""
        if sub.symbol is None:
            f = self.broker.pnl()
            figures: tuple = (round(f.daily, 2), round(f.unrealized, 2), round(f.realized, 2))
            if figures != sub.last:
                s.send(P.pnl(sub.req_id, *figures))
        else:
            f = self.broker.pnl_single(sub.symbol)
            figures = (f.position, round(f.daily, 2), round(f.unrealized, 2), round(f.realized, 2), round(f.value, 2))
            if figures != sub.last:
                s.send(P.pnl_single(sub.req_id, *figures))
        sub.last = figures

    async def _pnl_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.config.pnl_update_s))
            try:
                self.broker.roll_day()
                for session in self.api_sessions():
                    for sub in list(session.pnl_subs.values()):
                        self._send_pnl(session, sub)
            except Exception:
                log.exception("P&L update failed")

    async def _account_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.5, self.config.account_update_s))
            try:
                for session in self.api_sessions():
                    if session.account_updates:
                        self._send_account_values(session)
                        self._send_portfolio(session)
                        session.send(P.account_update_time(self._account_time_text()))
                    for req_id in session.account_multi:
                        for key, value, currency in self.account_value_rows():
                            session.send(P.account_update_multi(req_id, self.broker.account.account_id, "", key, value, currency))
                    for req_id, tags in session.summary_subs.items():
                        self._send_summary(session, req_id, tags)
            except Exception:
                log.exception("account update failed")
