"""Referee / introspection: the ``state()`` summary the control API serves.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` a client session.
"""

from __future__ import annotations

import logging
from typing import Any


log = logging.getLogger("sim.server")


class Introspection:
    """The state() summary."""

    def state(self) -> dict[str, Any]:
        values = self.broker.account_values()
        account = self.broker.account
        return {
            "port": self.port,
            "control_port": self.control_port,
            "accepting": self.listener is not None,
            "ib_connected": self.ib_connected,
            "data_farm_ok": self.data_farm_ok,
            "clock": self.clock.describe(),
            "now_ns": self.clock.now_ns(),
            "clients": [
                {
                    "client_id": s.client_id,
                    "peer": s.peer,
                    "mkt_subscriptions": len(s.mkt_subs),
                    "tbt_subscriptions": len(s.tbt_subs),
                    "dropped_market_msgs": s.dropped_market_msgs,
                }
                for s in sorted(self.api_sessions(), key=lambda s: s.client_id or 0)
            ],
            "account": {
                "account_id": account.account_id,
                "paper": account.account_id.startswith("DU"),
                "cash": round(account.cash, 2),
                "net_liquidation": round(values["NetLiquidation"], 2),
                "gross_position_value": round(values["GrossPositionValue"], 2),
                "long_value": round(values["LongMarketValue"], 2),
                "short_value": round(-values["ShortMarketValue"], 2),
                "gross_pct": round(100 * values["GrossPositionValue"] / values["NetLiquidation"], 3)
                if values["NetLiquidation"]
                else None,
                "realized_pnl": round(account.realized_pnl, 2),
                "commissions": round(account.commissions, 2),
                "values": {k: round(v, 4) for k, v in values.items()},
            },
            "positions": [
                {
                    "symbol": pos.symbol,
                    "qty": pos.qty,
                    "avg_cost": round(pos.avg_cost, 6),
                    "mark": round(mark, 4),
                    "market_value": round(pos.qty * mark, 2),
                    "bucket": pos.bucket,
                    "realized_pnl": round(pos.realized_pnl, 2),
                }
                for info, pos, mark in self.broker.portfolio()
            ],
            "pnl": self.broker.pnl().describe(),
            "session": {"enabled": self.broker.trading_sessions, "phase": self.broker.phase,
                        "halted": sorted(self.broker.halted)},
            "open_orders": len(self.broker.open_orders()),
            "orders": len(self.broker.all_orders()),
            "executions": len(self.broker.executions),
            "faults": self.broker.faults.describe(),
            "checks": self.broker.precautions.describe(),
            "referee": self.broker.referee(),
            "market": {
                "quote_rate": self.market.config.quote_rate,
                "print_rate": self.market.config.print_rate,
                "events": self.market_events,
                "ticks_sent": self.ticks_sent,
                "frozen": [s for s, b in self.market.books.items() if b.frozen],
            },
            "limits": {
                "max_tick_by_tick": self.config.max_tick_by_tick,
                "max_market_data_lines": self.config.max_market_data_lines,
            },
        }

    def pnl_report(self) -> dict[str, Any]:
        """Today's P&L as reqPnL / reqPnLSingle report it: the account and every symbol held
        now, at the start of the day, or traded today; with the previous closes used."""
        broker = self.broker
        broker.roll_day()
        account = broker.account
        symbols = sorted(set(account.day_start_qty) | set(account.day_cash_flow)
                         | {s for s, p in account.positions.items() if p.qty})
        return {
            "trading_day": broker.trading_day,
            "account": broker.pnl().describe(),
            "commissions": round(account.day_commissions, 4),
            "symbols": {
                s: dict(broker.pnl_single(s).describe(), prev_close=account.prev_close.get(s), mark=round(broker.mark(s), 4))
                for s in symbols if s in broker.market.books
            },
        }
