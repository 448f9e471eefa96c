"""Simulator settings and the account file (`etc/sim_account.yaml`).

Account file (YAML)::

    account: DU1234567          # "DU..." = paper; anything else is treated as live
    currency: USD
    equity: 1000000             # NetLiquidation at start; cash is derived from it
    # cash: 250000              # ...or give starting cash instead of equity
    positions:
      - {symbol: "CIM PRB", qty: 3000, avg_cost: 24.60, bucket: LT}
      - {symbol: "AGNCO", qty: -1500, avg_cost: 24.10, bucket: MM_PURE, prev_close: 24.20}
    checks:                     # IB's pre-trade checks (optional; these are the defaults)
      price_cap_pct: 3          # precautionary Percentage constraint (163); null = off
      max_order_size: null      # Size Limit in shares (383)
      max_order_value: null     # Total Value Limit in USD (451)
      margin: true              # Reg-T initial margin vs equity with loan (201)

qty is signed (negative = short); prev_close (optional) is the previous close daily P&L
and the close tick start from (default: the universe's ref_price); bucket is informational for the simulator but
must equal the universe's bucket_hint for that symbol (a mismatch is a config error).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qe.universe import BUCKETS, Instrument

_ACCOUNT_ID = re.compile(r"^(DU|DF|U|F)\d{4,10}$")


class SimConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SeedPosition:
    symbol: str
    qty: int
    avg_cost: float
    bucket: str
    prev_close: float | None = None  # the previous close for daily P&L (default: the universe's ref_price)


@dataclass(frozen=True)
class AccountSpec:
    account_id: str
    currency: str
    equity: float | None
    cash: float | None
    positions: tuple[SeedPosition, ...]
    checks: dict[str, Any] = field(default_factory=dict)  # Precautions overrides (validated)
    sessions: bool | None = None  # the account file's ``sessions:`` (None: the CLI / config decides)

    @property
    def is_paper(self) -> bool:
        return self.account_id.startswith("DU")

    def starting_cash(self, marks: dict[str, float]) -> float:
        """Cash such that NetLiquidation at the starting marks equals ``equity``."""
        if self.cash is not None:
            return self.cash
        assert self.equity is not None
        return self.equity - sum(p.qty * marks.get(p.symbol, p.avg_cost) for p in self.positions)


def load_account(path: str | Path, universe: dict[str, Instrument]) -> AccountSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SimConfigError(f"{path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SimConfigError(f"{path}: invalid YAML: {exc}") from exc
    return parse_account(raw, universe, where=str(path))


def parse_account(raw: Any, universe: dict[str, Instrument], where: str = "account") -> AccountSpec:
    if not isinstance(raw, dict):
        raise SimConfigError(f"{where}: expected a mapping at the top level")
    unknown = set(raw) - {"account", "currency", "equity", "cash", "positions", "checks", "sessions"}
    if unknown:
        raise SimConfigError(f"{where}: unknown keys {sorted(unknown)}")
    account_id = str(raw.get("account", "")).strip()
    if not _ACCOUNT_ID.match(account_id):
        raise SimConfigError(f"{where}: account {account_id!r} must look like DU1234567 (paper) or U1234567")
    currency = str(raw.get("currency", "USD"))
    if currency != "USD":
        raise SimConfigError(f"{where}: only USD accounts are simulated, got {currency!r}")
    equity, cash = raw.get("equity"), raw.get("cash")
    if (equity is None) == (cash is None):
        raise SimConfigError(f"{where}: give exactly one of 'equity' or 'cash'")
    try:
        equity = None if equity is None else float(equity)
        cash = None if cash is None else float(cash)
    except (TypeError, ValueError) as exc:
        raise SimConfigError(f"{where}: equity/cash must be numbers: {exc}") from exc
    if equity is not None and equity <= 0:
        raise SimConfigError(f"{where}: equity must be > 0")
    positions: list[SeedPosition] = []
    seen: set[str] = set()
    for index, item in enumerate(raw.get("positions") or [], start=1):
        at = f"{where}: positions[{index}]"
        if not isinstance(item, dict):
            raise SimConfigError(f"{at}: expected a mapping")
        missing = {"symbol", "qty", "avg_cost", "bucket"} - set(item)
        if missing:
            raise SimConfigError(f"{at}: missing {sorted(missing)}")
        symbol = str(item["symbol"]).strip()
        if symbol not in universe:
            raise SimConfigError(f"{at}: symbol {symbol!r} is not in the universe")
        if symbol in seen:
            raise SimConfigError(f"{at}: duplicate symbol {symbol!r}")
        seen.add(symbol)
        try:
            qty = int(item["qty"])
            avg_cost = float(item["avg_cost"])
        except (TypeError, ValueError) as exc:
            raise SimConfigError(f"{at}: qty/avg_cost: {exc}") from exc
        if qty == 0 or float(item["qty"]) != qty:
            raise SimConfigError(f"{at}: qty must be a non-zero whole number of shares")
        if avg_cost <= 0:
            raise SimConfigError(f"{at}: avg_cost must be > 0")
        bucket = str(item["bucket"]).strip()
        if bucket not in BUCKETS:
            raise SimConfigError(f"{at}: bucket {bucket!r} must be one of {BUCKETS}")
        if bucket != universe[symbol].bucket_hint:
            raise SimConfigError(
                f"{at}: bucket {bucket!r} does not match the universe's bucket_hint "
                f"{universe[symbol].bucket_hint!r} for {symbol!r}"
            )
        prev_close = item.get("prev_close")
        if prev_close is not None:
            if isinstance(prev_close, bool) or not isinstance(prev_close, (int, float)) or not 0 < prev_close < 1e6:
                raise SimConfigError(f"{at}: prev_close must be a positive price, got {prev_close!r}")
            prev_close = float(prev_close)
        positions.append(SeedPosition(symbol, qty, avg_cost, bucket, prev_close))
    sessions = raw.get("sessions")
    if sessions is not None and not isinstance(sessions, bool):
        raise SimConfigError(f"{where}: sessions must be true or false")
    return AccountSpec(account_id, currency, equity, cash, tuple(positions), parse_checks(raw.get("checks"), where), sessions)


def parse_checks(raw: Any, where: str) -> dict[str, Any]:
    """The account file's ``checks:`` (IB's pre-trade checks); absent keys keep the defaults."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SimConfigError(f"{where}: checks: expected a mapping")
    unknown = set(raw) - {"price_cap_pct", "max_order_size", "max_order_value", "margin"}
    if unknown:
        raise SimConfigError(f"{where}: checks: unknown keys {sorted(unknown)}")
    checks: dict[str, Any] = {}
    for key, kind in (("price_cap_pct", float), ("max_order_size", int), ("max_order_value", float)):
        if key not in raw:
            continue
        value = raw[key]
        if value is None:
            checks[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise SimConfigError(f"{where}: checks: {key} must be a positive number or null, got {value!r}")
        checks[key] = kind(value)
    if "margin" in raw:
        if not isinstance(raw["margin"], bool):
            raise SimConfigError(f"{where}: checks: margin must be true or false")
        checks["margin"] = raw["margin"]
    return checks


def _env(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


def _optional_port(text: str) -> int | None:
    """A port setting where empty or negative means "not served"."""
    return None if text in ("", "none") or int(text) < 0 else int(text)


@dataclass
class SimConfig:
    """Everything the simulator needs; CLI flags and QE_SIM_* variables fill it."""

    universe_path: str = "etc/universe.csv"
    account_path: str | None = "etc/sim_account.yaml"
    host: str = "127.0.0.1"
    port: int = 4002  # IB Gateway paper default
    control_host: str = "127.0.0.1"
    control_port: int = 4012
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None  # Prometheus endpoint (sim/metrics.py); None: not served
    seed: int = 42
    quote_rate: float = 1.0  # quote updates per symbol per wall second
    print_rate: float = 0.3  # prints per symbol per wall second
    tick_interval_s: float = 0.05  # market timer period (wall)
    max_tick_by_tick: int = 50  # simultaneous tick-by-tick subscriptions (IB: 10190 beyond)
    max_market_data_lines: int = 1000  # simultaneous reqMktData lines (IB: 101 beyond)
    account_update_s: float = 10.0  # push account values/portfolio to subscribers (IB: ~180 s)
    master_client_id: int | None = None  # receives every client's order updates (IB: none unless configured)
    order_id_file: str | None = None  # keeps the account's highest order id across simulator processes
    fill_on_prints: bool = True  # resting limits also fill when the tape trades through them
    farm_codes_on_connect: bool = True  # send 2104/2106/2158 after connect, like the gateway
    max_write_buffer: int = 8 * 1024 * 1024  # above this, market data to that client is dropped
    referee_log_cap: int = 100_000  # entries kept in the referee log (oldest evicted, still counted)
    sessions: bool = False  # trading sessions on the XNYS calendar (sim/sessions.py); off = always open
    pnl_update_s: float = 1.0  # reqPnL / reqPnLSingle: push changed figures this often (IB: ~1 s)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "SimConfig":
        master = _env("QE_SIM_MASTER_CLIENT_ID", "none")
        return cls(
            universe_path=_env("QE_SIM_UNIVERSE", _env("QE_UNIVERSE", "etc/universe.csv")),
            account_path=_env("QE_SIM_ACCOUNT", "etc/sim_account.yaml"),
            host=_env("QE_SIM_HOST", "127.0.0.1"),
            port=int(_env("QE_SIM_PORT", "4002")),
            control_port=int(_env("QE_SIM_CONTROL_PORT", "4012")),
            metrics_port=_optional_port(_env("QE_SIM_METRICS_PORT", "")),
            seed=int(_env("QE_SIM_SEED", "42")),
            quote_rate=float(_env("QE_SIM_QUOTE_RATE", "1.0")),
            print_rate=float(_env("QE_SIM_PRINT_RATE", "0.3")),
            max_tick_by_tick=int(_env("QE_SIM_MAX_TBT", "50")),
            account_update_s=float(_env("QE_SIM_ACCOUNT_UPDATE_S", "10")),
            referee_log_cap=int(_env("QE_SIM_REFEREE_LOG_CAP", "100000")),
            master_client_id=None if master.lower() in ("", "none", "-1") else int(master),
            order_id_file=_env("QE_SIM_ORDER_ID_FILE", "") or None,
            sessions=_env("QE_SIM_SESSIONS", "0").lower() in ("1", "true", "yes", "on"),
        )
