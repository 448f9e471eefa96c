"""Request handlers: reference data, news, scanners, research, FA and other requests that
do not touch orders or the account. Each answers with IB's message or IB's specific
error for that request (with its reqId), so no client waits forever.

A mixin of ``SimServer`` (sim/server.py): ``self`` is the server, ``s`` the client session.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from . import protocol as P

if TYPE_CHECKING:  # pragma: no cover
    from .contracts import Catalogue
    from .market import Market
    from .server import Session

log = logging.getLogger("sim.server")

NO_SECURITY = "No security definition has been found for the request"
# SMART's components behind the bboExchange id sent in tickReqParams ("9c0001").
BBO_EXCHANGE = "9c0001"
SMART_COMPONENTS = ((0, "NYSE", "N"), (1, "ARCA", "P"), (2, "NASDAQ", "Q"), (3, "BATS", "Z"), (4, "DRCTEDGE", "J"), (5, "IEX", "V"))
MARKET_RULES = {26: ((0.0, 0.01),)}  # the marketRuleIds contract details name
SCAN_CODES = {
    "MOST_ACTIVE": "Most Active",
    "HOT_BY_VOLUME": "Hot Contracts by Volume",
    "TOP_PERC_GAIN": "Top % Gainers",
    "TOP_PERC_LOSE": "Top % Losers",
}
SCANNER_XML = (
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ScanParameterResponse>"
    "<InstrumentList><Instrument><name>US Stocks</name><type>STK</type><filters>PRICE,VOLUME</filters></Instrument></InstrumentList>"
    "<LocationTree><Location><displayName>US Stocks</displayName><locationCode>STK.US</locationCode><instruments>STK</instruments>"
    "<LocationTree><Location><displayName>Listed/NASDAQ</displayName><locationCode>STK.US.MAJOR</locationCode>"
    "<instruments>STK</instruments></Location></LocationTree></Location></LocationTree><ScanTypeList>"
    + "".join(
        f"<ScanType><displayName>{name}</displayName><scanCode>{code}</scanCode><instruments>STK</instruments></ScanType>"
        for code, name in SCAN_CODES.items()
    )
    + "</ScanTypeList></ScanParameterResponse>"
)
WSH_META = json.dumps({"meta_data": {"event_types": [], "filters": []}, "source": "IB gateway simulator: no calendar events"})


def rank_scan(market: "Market", catalogue: "Catalogue", scan: P.ReqScannerSubscription) -> list[P.ContractInfo] | None:
    """The universe ranked for a scan code (None: code not offered). Pure."""
    if scan.scan_code not in SCAN_CODES:
        return None
    rows = []
    for symbol, book in market.books.items():
        info = catalogue.get(symbol)
        if info is None:
            continue
        price = (book.last or book.mid) / 100
        if scan.above_price < P.UNSET_DOUBLE and price <= scan.above_price:
            continue
        if scan.below_price < P.UNSET_DOUBLE and price >= scan.below_price:
            continue
        if scan.above_volume != P.UNSET_INTEGER and book.volume <= scan.above_volume:
            continue
        change = (price * 100 - book.ref) / book.ref if book.ref else 0.0
        key = {"TOP_PERC_GAIN": -change, "TOP_PERC_LOSE": change}.get(scan.scan_code, -book.volume)
        if scan.scan_code == "TOP_PERC_GAIN" and change <= 0 or scan.scan_code == "TOP_PERC_LOSE" and change >= 0:
            continue
        rows.append((key, symbol, info))
    rows.sort(key=lambda row: (row[0], row[1]))
    limit = scan.number_of_rows if 0 < scan.number_of_rows <= 50 else 50
    return [info for _, _, info in rows[:limit]]


class ReferenceHandlers:
    catalogue: "Catalogue"
    market: "Market"

    def on_ReqSecDefOptParams(self, s: "Session", r: P.ReqSecDefOptParams) -> None:
        info = self.catalogue.resolve(P.ContractRef(con_id=r.underlying_con_id, symbol=r.underlying_symbol))
        if info is None:
            s.error(r.req_id, 200, NO_SECURITY)
            return
        s.send(P.sec_def_opt_params_end(r.req_id))  # preferreds and these ETFs list no options here

    def on_ReqSmartComponents(self, s: "Session", r: P.ReqSmartComponents) -> None:
        s.send(P.smart_components(r.req_id, SMART_COMPONENTS if r.bbo_exchange == BBO_EXCHANGE else ()))

    def on_ReqMktDepthExchanges(self, s: "Session", r: P.ReqMktDepthExchanges) -> None:
        s.send(P.mkt_depth_exchanges(()))  # no depth is offered (reqMktDepth answers 10092)

    def on_ReqNewsProviders(self, s: "Session", r: P.ReqNewsProviders) -> None:
        s.send(P.news_providers(()))  # no news subscriptions

    def on_ReqNewsArticle(self, s: "Session", r: P.ReqNewsArticle) -> None:
        s.error(r.req_id, 10172, "Failed to request news article: No data available")

    def on_ReqHistoricalNews(self, s: "Session", r: P.ReqHistoricalNews) -> None:
        s.send(P.historical_news_end(r.req_id, False))

    def on_ReqNewsBulletins(self, s: "Session", r: P.ReqNewsBulletins) -> None:
        log.info("news bulletins subscribed (none are simulated)", extra={"client_id": s.client_id})

    def on_ReqUserInfo(self, s: "Session", r: P.ReqUserInfo) -> None:
        s.send(P.user_info(r.req_id, ""))

    def on_ReqFundamentalData(self, s: "Session", r: P.ReqFundamentalData) -> None:
        s.error(r.req_id, 430, "We are sorry, but fundamentals data for the security specified is not available.")

    def on_ReqScannerParameters(self, s: "Session", r: P.ReqScannerParameters) -> None:
        s.send(P.scanner_parameters(SCANNER_XML))

    def on_ReqScannerSubscription(self, s: "Session", r: P.ReqScannerSubscription) -> None:
        if r.instrument not in ("STK", ""):
            s.error(r.req_id, 162, f"Historical Market Data Service error message:Scanner instrument '{r.instrument}' is not offered")
            return
        ranked = rank_scan(self.market, self.catalogue, r)
        if ranked is None:
            s.error(r.req_id, 162, f"Historical Market Data Service error message:Invalid scan code '{r.scan_code}'")
            return
        s.send(P.scanner_data(r.req_id, list(enumerate(ranked))))

    def on_ReqWshMetaData(self, s: "Session", r: P.ReqWshMetaData) -> None:
        s.send(P.wsh_meta_data(r.req_id, WSH_META))

    def on_ReqWshEventData(self, s: "Session", r: P.ReqWshEventData) -> None:
        s.send(P.wsh_event_data(r.req_id, "[]"))

    def on_ReqMatchingSymbols(self, s: "Session", r: P.ReqMatchingSymbols) -> None:
        pattern = r.pattern.strip().upper()
        found = [info for symbol, info in sorted(self.catalogue.by_symbol.items())
                 if pattern and (symbol.upper().startswith(pattern) or pattern in info.long_name.upper())]
        s.send(P.symbol_samples(r.req_id, found[:16], s.version))

    def on_ReqMarketRule(self, s: "Session", r: P.ReqMarketRule) -> None:
        s.send(P.market_rule(r.market_rule_id, MARKET_RULES.get(r.market_rule_id, ())))

    def on_ReqSoftDollarTiers(self, s: "Session", r: P.ReqSoftDollarTiers) -> None:
        s.send(P.soft_dollar_tiers(r.req_id))

    def on_ReqFamilyCodes(self, s: "Session", r: P.ReqFamilyCodes) -> None:
        s.send(P.family_codes([(self.broker.account.account_id, "")]))  # type: ignore[attr-defined]

    def on_QueryDisplayGroups(self, s: "Session", r: P.QueryDisplayGroups) -> None:
        s.send(P.display_group_list(r.req_id, ""))

    def on_OptionComputation(self, s: "Session", r: P.OptionComputation) -> None:
        s.error(r.req_id, 200, NO_SECURITY)  # only stocks are simulated: no option contract exists

    def on_ExerciseOptions(self, s: "Session", r: P.ExerciseOptions) -> None:
        s.error(r.req_id, 200, NO_SECURITY)

    def on_RequestFA(self, s: "Session", r: P.RequestFA) -> None:
        # IB's answer for a non-FA account; ib_async's requestFA cannot end on an error (it
        # waits for receiveFA by name), exactly as against a real non-FA account.
        s.error(-1, 321, "Error validating request.-'b9' : cause - FA data operations ignored for non FA customers.")

    def on_ReplaceFA(self, s: "Session", r: P.ReplaceFA) -> None:
        s.error(r.req_id, 321, "Error validating request.-'b9' : cause - FA data operations ignored for non FA customers.")

    def on_CancelRequest(self, s: "Session", r: P.CancelRequest) -> None:
        if r.msg_id == 25:  # cancelHistoricalData: a keepUpToDate subscription ends
            self.cancel_historical_data(s, r.req_id)  # type: ignore[attr-defined]
        log.debug("cancel request", extra={"request": r.name, "req_id": r.req_id, "client_id": s.client_id})
