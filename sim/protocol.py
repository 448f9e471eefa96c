"""TWS API socket protocol, server side: framing, request decoding, message encoding.

Pure functions and small value types only (no sockets, no state) so every message
can be unit-tested against the real client decoders (ib_async, ib_insync).

Wire format (API v100+): after the handshake every message is a 4-byte big-endian
length followed by NUL-terminated text fields. The client opens with the bytes
``API\\0`` and one length-prefixed message ``v<min>..<max>[ <options>]``; the server
answers one message with two fields, its version and the connection time.

Field order follows the client's decoder for SERVER_VERSION (176): that is the
version both ib_async (client versions 157..178) and ib_insync 0.9.86 (157..176)
accept, and at 176 their decoders read identical layouts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

SERVER_VERSION = 176
MIN_CLIENT_VERSION = SERVER_VERSION  # only the v176 layouts are encoded (see negotiate)
MAX_FRAME_BYTES = 16 * 1024 * 1024  # bigger than any sane request; guards memory

UNSET_DOUBLE = 1.7976931348623157e308
UNSET_INTEGER = 2**31 - 1

_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """The byte stream is broken (bad handshake, absurd frame): drop that client."""


class MalformedRequest(Exception):
    """One request could not be decoded; the connection itself is fine."""

    def __init__(self, msg_id: int | None, req_id: int, text: str) -> None:
        super().__init__(text)
        self.msg_id = msg_id
        self.req_id = req_id
        self.text = text


# --------------------------------------------------------------------------- framing


def encode(fields: Iterable[Any]) -> bytes:
    """One message: every field rendered as text, NUL-terminated, length-prefixed."""
    payload = "".join(f"{fmt(value)}\0" for value in fields).encode()
    return _LEN.pack(len(payload)) + payload


def encode_text(text: str) -> bytes:
    """Fast path for pre-joined fields (market data): ``text`` already ends with NUL."""
    payload = text.encode()
    return _LEN.pack(len(payload)) + payload


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if value is True:
        return "1"
    if value is False:
        return "0"
    if isinstance(value, float):
        if value == UNSET_DOUBLE:
            return ""
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(round(value, 8))
    return str(value)


def price_text(cents: int) -> str:
    """Prices travel as cents internally; on the wire as plain decimals ("24.85")."""
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}{cents // 100}.{cents % 100:02d}"


@dataclass(frozen=True)
class Handshake:
    min_version: int
    max_version: int
    options: str


def parse_handshake(buffer: bytes) -> tuple[Handshake, int] | None:
    """Decode ``API\\0`` + prefixed ``v<min>..<max>``; None until enough bytes arrived."""
    if len(buffer) < 4:
        if not b"API\0".startswith(buffer):
            raise ProtocolError("not a TWS API client (missing API\\0 prefix)")
        return None
    if buffer[:4] != b"API\0":
        raise ProtocolError("not a TWS API client (missing API\\0 prefix)")
    if len(buffer) < 8:
        return None
    (size,) = _LEN.unpack_from(buffer, 4)
    if size > 1024:
        raise ProtocolError(f"handshake too long ({size} bytes)")
    if len(buffer) < 8 + size:
        return None
    text = buffer[8 : 8 + size].decode("ascii", errors="replace").rstrip("\0")
    versions, _, options = text.partition(" ")
    if not versions.startswith("v"):
        raise ProtocolError(f"bad version string {text!r}")
    low, sep, high = versions[1:].partition("..")
    try:
        min_version = int(low)
        max_version = int(high) if sep else min_version
    except ValueError as exc:
        raise ProtocolError(f"bad version string {text!r}") from exc
    return Handshake(min_version, max_version, options.strip()), 8 + size


def negotiate(handshake: Handshake) -> tuple[int | None, str]:
    """The version to speak with this client, or (None, why) to refuse it.

    This server encodes only the v176 layouts, so a client must accept 176: one whose
    minimum is above 176 is told 176 (its own check then gives up) and dropped; one whose
    maximum is below 176 is dropped before any reply (no layout it did not agree to)."""
    if handshake.min_version > SERVER_VERSION:
        return None, f"client needs v{handshake.min_version}+, this server speaks v{SERVER_VERSION}"
    if handshake.max_version < SERVER_VERSION:
        return None, f"client speaks at most v{handshake.max_version}; only the v{SERVER_VERSION} layouts are simulated"
    return SERVER_VERSION, ""


def handshake_reply(version: int, connection_time: str) -> bytes:
    return encode([version, connection_time])


def split_frames(buffer: bytearray) -> list[list[str]]:
    """Remove every complete message from ``buffer``; return each as its text fields."""
    messages: list[list[str]] = []
    offset = 0
    end = len(buffer)
    while end - offset >= 4:
        (size,) = _LEN.unpack_from(buffer, offset)
        if size > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
        if end - offset - 4 < size:
            break
        raw = bytes(buffer[offset + 4 : offset + 4 + size])
        offset += 4 + size
        text = raw.decode("utf-8", errors="replace")
        fields = text.split("\0")
        if fields and fields[-1] == "":
            fields.pop()
        messages.append(fields)
    del buffer[:offset]
    return messages


# ------------------------------------------------------------------ request decoding


class FieldReader:
    """Sequential typed access to a request's fields; errors name the field."""

    def __init__(self, fields: Sequence[str], msg_id: int) -> None:
        self.fields = fields
        self.pos = 1  # fields[0] is the message id
        self.msg_id = msg_id
        self.req_id = -1

    def _next(self, name: str) -> str:
        if self.pos >= len(self.fields):
            raise MalformedRequest(self.msg_id, self.req_id, f"missing field '{name}'")
        value = self.fields[self.pos]
        self.pos += 1
        return value

    def str(self, name: str) -> str:
        return self._next(name)

    def int(self, name: str, default: int = 0) -> int:
        text = self._next(name)
        if text == "":
            return default
        try:
            return int(text)
        except ValueError:
            try:
                as_float = float(text)
            except ValueError:
                raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is not an integer: {text!r}") from None
            if not as_float.is_integer():
                raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is not an integer: {text!r}") from None
            return int(as_float)

    def float(self, name: str, default: float = UNSET_DOUBLE) -> float:
        text = self._next(name)
        if text == "":
            return default
        if text == "Infinite":
            return float("inf")
        try:
            value = float(text)
        except ValueError:
            raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is not a number: {text!r}") from None
        if value != value:  # NaN
            raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is NaN")
        return value

    def bool(self, name: str) -> bool:
        text = self._next(name)
        if text in ("", "0", "false", "False"):
            return False
        if text in ("1", "true", "True"):
            return True
        raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is not a boolean: {text!r}")

    def req(self, name: str = "reqId") -> int:
        self.req_id = self.int(name, default=-1)
        return self.req_id

    def count(self, name: str, limit: int = 10_000) -> int:
        """A repeat count: 0 <= n <= limit (a negative or absurd count is malformed)."""
        n = self.int(name)
        if n < 0 or n > limit:
            raise MalformedRequest(self.msg_id, self.req_id, f"field '{name}' is out of range: {n}")
        return n

    def skip(self, count: int = 1) -> None:
        if count < 0:
            raise MalformedRequest(self.msg_id, self.req_id, f"negative field count {count}")
        self.pos += count

    def remaining(self) -> int:
        return max(0, len(self.fields) - self.pos)


@dataclass(frozen=True)
class ContractRef:
    """The contract as a client sends it in a request (12 fields)."""

    con_id: int = 0
    symbol: str = ""
    sec_type: str = ""
    last_trade_date: str = ""
    strike: float = 0.0
    right: str = ""
    multiplier: str = ""
    exchange: str = ""
    primary_exchange: str = ""
    currency: str = ""
    local_symbol: str = ""
    trading_class: str = ""


def read_contract(r: FieldReader) -> ContractRef:
    return ContractRef(
        con_id=r.int("conId"),
        symbol=r.str("symbol"),
        sec_type=r.str("secType"),
        last_trade_date=r.str("lastTradeDateOrContractMonth"),
        strike=r.float("strike", 0.0),
        right=r.str("right"),
        multiplier=r.str("multiplier"),
        exchange=r.str("exchange"),
        primary_exchange=r.str("primaryExchange"),
        currency=r.str("currency"),
        local_symbol=r.str("localSymbol"),
        trading_class=r.str("tradingClass"),
    )


# Requests the simulator handles. Each is a small frozen dataclass.


@dataclass(frozen=True)
class StartApi:
    client_id: int
    optional_capabilities: str


@dataclass(frozen=True)
class ReqMktData:
    req_id: int
    contract: ContractRef
    generic_ticks: str
    snapshot: bool
    regulatory_snapshot: bool


@dataclass(frozen=True)
class CancelMktData:
    req_id: int


@dataclass(frozen=True)
class PlaceOrder:
    order_id: int
    contract: ContractRef
    action: str
    total_quantity: float
    order_type: str
    lmt_price: float
    aux_price: float
    tif: str
    oca_group: str
    account: str
    open_close: str
    origin: int
    order_ref: str
    transmit: bool
    parent_id: int
    block_order: bool
    sweep_to_fill: bool
    display_size: int
    trigger_method: int
    outside_rth: bool
    hidden: bool
    what_if: bool = False


@dataclass(frozen=True)
class CancelOrder:
    order_id: int


@dataclass(frozen=True)
class ReqOpenOrders:
    pass


@dataclass(frozen=True)
class ReqAllOpenOrders:
    pass


@dataclass(frozen=True)
class ReqAutoOpenOrders:
    auto_bind: bool


@dataclass(frozen=True)
class ReqAccountUpdates:
    subscribe: bool
    account: str


@dataclass(frozen=True)
class ExecFilter:
    client_id: int = 0
    account: str = ""
    time: str = ""
    symbol: str = ""
    sec_type: str = ""
    exchange: str = ""
    side: str = ""


@dataclass(frozen=True)
class ReqExecutions:
    req_id: int
    filter: ExecFilter


@dataclass(frozen=True)
class ReqIds:
    num_ids: int


@dataclass(frozen=True)
class ReqContractDetails:
    req_id: int
    contract: ContractRef


@dataclass(frozen=True)
class ReqManagedAccts:
    pass


@dataclass(frozen=True)
class ReqCurrentTime:
    pass


@dataclass(frozen=True)
class ReqGlobalCancel:
    pass


@dataclass(frozen=True)
class ReqMarketDataType:
    market_data_type: int


@dataclass(frozen=True)
class ReqPositions:
    pass


@dataclass(frozen=True)
class CancelPositions:
    pass


@dataclass(frozen=True)
class ReqAccountSummary:
    req_id: int
    group: str
    tags: str


@dataclass(frozen=True)
class CancelAccountSummary:
    req_id: int


@dataclass(frozen=True)
class ReqPositionsMulti:
    req_id: int
    account: str
    model_code: str


@dataclass(frozen=True)
class CancelPositionsMulti:
    req_id: int


@dataclass(frozen=True)
class ReqAccountUpdatesMulti:
    req_id: int
    account: str
    model_code: str
    ledger_and_nlv: bool


@dataclass(frozen=True)
class CancelAccountUpdatesMulti:
    req_id: int


@dataclass(frozen=True)
class ReqTickByTick:
    req_id: int
    contract: ContractRef
    tick_type: str
    number_of_ticks: int
    ignore_size: bool


@dataclass(frozen=True)
class CancelTickByTick:
    req_id: int


@dataclass(frozen=True)
class ReqCompletedOrders:
    api_only: bool


# Reference data, news, scanners, research and other requests answered from static or
# universe data (sim/handlers_reference.py).


@dataclass(frozen=True)
class ReqSecDefOptParams:
    req_id: int
    underlying_symbol: str
    fut_fop_exchange: str
    underlying_sec_type: str
    underlying_con_id: int


@dataclass(frozen=True)
class ReqSmartComponents:
    req_id: int
    bbo_exchange: str


@dataclass(frozen=True)
class ReqMktDepthExchanges:
    pass


@dataclass(frozen=True)
class ReqNewsProviders:
    pass


@dataclass(frozen=True)
class ReqNewsArticle:
    req_id: int
    provider_code: str
    article_id: str


@dataclass(frozen=True)
class ReqHistoricalNews:
    req_id: int
    con_id: int
    provider_codes: str


@dataclass(frozen=True)
class ReqUserInfo:
    req_id: int


@dataclass(frozen=True)
class ReqFundamentalData:
    req_id: int
    contract: ContractRef
    report_type: str


@dataclass(frozen=True)
class ReqScannerParameters:
    pass


@dataclass(frozen=True)
class ReqScannerSubscription:
    req_id: int
    number_of_rows: int
    instrument: str
    location_code: str
    scan_code: str
    above_price: float
    below_price: float
    above_volume: int


@dataclass(frozen=True)
class CancelRequest:
    """A cancel for a request family that needs no answer (scanner, fundamentals, depth, ...)."""

    msg_id: int
    name: str
    req_id: int


@dataclass(frozen=True)
class ReqWshMetaData:
    req_id: int


@dataclass(frozen=True)
class ReqWshEventData:
    req_id: int
    con_id: int


@dataclass(frozen=True)
class ReqMatchingSymbols:
    req_id: int
    pattern: str


@dataclass(frozen=True)
class ReqMarketRule:
    market_rule_id: int


@dataclass(frozen=True)
class ReqSoftDollarTiers:
    req_id: int


@dataclass(frozen=True)
class ReqFamilyCodes:
    pass


@dataclass(frozen=True)
class QueryDisplayGroups:
    req_id: int


@dataclass(frozen=True)
class OptionComputation:
    """calculateImpliedVolatility (54) / calculateOptionPrice (55): needs an option contract."""

    msg_id: int
    req_id: int
    contract: ContractRef


@dataclass(frozen=True)
class ExerciseOptions:
    req_id: int
    contract: ContractRef


@dataclass(frozen=True)
class RequestFA:
    fa_data_type: int


@dataclass(frozen=True)
class ReplaceFA:
    req_id: int


@dataclass(frozen=True)
class ReqNewsBulletins:
    all_messages: bool


@dataclass(frozen=True)
class ReqPnL:
    req_id: int
    account: str
    model_code: str


@dataclass(frozen=True)
class CancelPnL:
    req_id: int


@dataclass(frozen=True)
class ReqPnLSingle:
    req_id: int
    account: str
    model_code: str
    con_id: int


@dataclass(frozen=True)
class CancelPnLSingle:
    req_id: int


@dataclass(frozen=True)
class ReqHistoricalData:
    req_id: int
    contract: ContractRef
    end: str
    bar_size: str
    duration: str
    use_rth: bool
    what_to_show: str
    format_date: int
    keep_up_to_date: bool


@dataclass(frozen=True)
class ReqHeadTimeStamp:
    req_id: int
    contract: ContractRef
    use_rth: bool
    what_to_show: str
    format_date: int


@dataclass(frozen=True)
class ReqHistoricalTicks:
    req_id: int
    contract: ContractRef
    start: str
    end: str
    number_of_ticks: int
    what_to_show: str
    use_rth: bool
    ignore_size: bool


@dataclass(frozen=True)
class Unsupported:
    """A request we recognise but do not simulate; req_id is -1 when it has none."""

    msg_id: int
    name: str
    req_id: int


def _start_api(r: FieldReader) -> StartApi:
    r.skip()  # version
    client_id = r.int("clientId")
    caps = r.str("optionalCapabilities") if r.remaining() else ""
    return StartApi(client_id, caps)


def _req_mkt_data(r: FieldReader) -> ReqMktData:
    r.skip()  # version
    req_id = r.req("tickerId")
    contract = read_contract(r)
    if contract.sec_type == "BAG":
        legs = r.count("comboLegsCount")
        r.skip(4 * legs)
    if r.bool("deltaNeutralContractPresent"):
        r.skip(3)
    generic = r.str("genericTickList")
    snapshot = r.bool("snapshot")
    regulatory = r.bool("regulatorySnapshot") if r.remaining() else False
    return ReqMktData(req_id, contract, generic, snapshot, regulatory)


def _place_order_head(r: FieldReader) -> PlaceOrder:
    order_id = r.req("orderId")
    contract = read_contract(r)
    r.str("secIdType")
    r.str("secId")
    return PlaceOrder(
        order_id=order_id,
        contract=contract,
        action=r.str("action"),
        total_quantity=r.float("totalQuantity", 0.0),
        order_type=r.str("orderType"),
        lmt_price=r.float("lmtPrice"),
        aux_price=r.float("auxPrice"),
        tif=r.str("tif"),
        oca_group=r.str("ocaGroup"),
        account=r.str("account"),
        open_close=r.str("openClose"),
        origin=r.int("origin"),
        order_ref=r.str("orderRef"),
        transmit=r.bool("transmit"),
        parent_id=r.int("parentId"),
        block_order=r.bool("blockOrder"),
        sweep_to_fill=r.bool("sweepToFill"),
        display_size=r.int("displaySize"),
        trigger_method=r.int("triggerMethod"),
        outside_rth=r.bool("outsideRth"),
        hidden=r.bool("hidden"),
        what_if=False,
    )


def _place_order(r: FieldReader) -> PlaceOrder:
    order = _place_order_head(r)
    try:
        what_if = _read_what_if(r, order.contract.sec_type == "BAG")
    except MalformedRequest:
        what_if = False  # the tail is only read to spot what-if previews
    if what_if:
        return replace(order, what_if=True)
    return order


def _read_what_if(r: FieldReader, is_bag: bool) -> bool:
    """Walk the variable-length tail of placeOrder (client layout at server 176) to whatIf."""
    if is_bag:
        legs = r.count("comboLegsCount")
        r.skip(8 * legs)
        r.skip(r.count("orderComboLegsCount"))
        r.skip(2 * r.count("smartComboRoutingParamsCount"))
    r.skip(8)  # "", discretionaryAmt, goodAfterTime, goodTillDate, faGroup, faMethod, faPercentage, faProfile
    r.skip(22)  # modelCode .. volatilityType
    if r.str("deltaNeutralOrderType"):
        r.skip(1 + 8)
    else:
        r.skip(1)
    r.skip(6)  # continuousUpdate .. scaleSubsLevelSize
    increment = r.float("scalePriceIncrement")
    if 0 < increment < UNSET_DOUBLE:
        r.skip(7)
    r.skip(3)  # scaleTable, activeStartTime, activeStopTime
    if r.str("hedgeType"):
        r.skip(1)
    r.skip(4)  # optOutSmartRouting, clearingAccount, clearingIntent, notHeld
    if r.bool("deltaNeutralContractPresent"):
        r.skip(3)
    if r.str("algoStrategy"):
        r.skip(2 * r.count("algoParamsCount"))
    r.skip(1)  # algoId
    return r.bool("whatIf")


def _cancel_order(r: FieldReader) -> CancelOrder:
    r.skip()  # version
    return CancelOrder(r.req("orderId"))


def _req_executions(r: FieldReader) -> ReqExecutions:
    r.skip()  # version
    req_id = r.req()
    flt = ExecFilter(
        client_id=r.int("clientId") if r.remaining() else 0,
        account=r.str("acctCode") if r.remaining() else "",
        time=r.str("time") if r.remaining() else "",
        symbol=r.str("symbol") if r.remaining() else "",
        sec_type=r.str("secType") if r.remaining() else "",
        exchange=r.str("exchange") if r.remaining() else "",
        side=r.str("side") if r.remaining() else "",
    )
    return ReqExecutions(req_id, flt)


def _req_contract_details(r: FieldReader) -> ReqContractDetails:
    r.skip()  # version
    req_id = r.req()
    return ReqContractDetails(req_id, read_contract(r))


def _req_tick_by_tick(r: FieldReader) -> ReqTickByTick:
    req_id = r.req()
    contract = read_contract(r)
    tick_type = r.str("tickType")
    number = r.int("numberOfTicks") if r.remaining() else 0
    ignore = r.bool("ignoreSize") if r.remaining() else False
    return ReqTickByTick(req_id, contract, tick_type, number, ignore)


def _req_fundamental_data(r: FieldReader) -> ReqFundamentalData:
    r.skip()  # version
    req_id = r.req()
    contract = ContractRef(
        con_id=r.int("conId"),
        symbol=r.str("symbol"),
        sec_type=r.str("secType"),
        exchange=r.str("exchange"),
        primary_exchange=r.str("primaryExchange"),
        currency=r.str("currency"),
        local_symbol=r.str("localSymbol"),
    )
    return ReqFundamentalData(req_id, contract, r.str("reportType"))


def _req_scanner_subscription(r: FieldReader) -> ReqScannerSubscription:
    req_id = r.req("tickerId")
    return ReqScannerSubscription(
        req_id=req_id,
        number_of_rows=r.int("numberOfRows", -1),
        instrument=r.str("instrument"),
        location_code=r.str("locationCode"),
        scan_code=r.str("scanCode"),
        above_price=r.float("abovePrice"),
        below_price=r.float("belowPrice"),
        above_volume=r.int("aboveVolume", UNSET_INTEGER),
    )


def _req_historical_data(r: FieldReader) -> ReqHistoricalData:
    req_id = r.req()
    contract = read_contract(r)
    r.bool("includeExpired")
    end, bar_size, duration = r.str("endDateTime"), r.str("barSizeSetting"), r.str("durationStr")
    use_rth = r.bool("useRTH")
    what, format_date = r.str("whatToShow"), r.int("formatDate", 1)
    if contract.sec_type == "BAG":
        r.skip(4 * r.count("comboLegsCount"))
    keep = r.bool("keepUpToDate") if r.remaining() else False
    return ReqHistoricalData(req_id, contract, end, bar_size, duration, use_rth, what, format_date, keep)


def _req_head_time_stamp(r: FieldReader) -> ReqHeadTimeStamp:
    req_id = r.req()
    contract = read_contract(r)
    r.bool("includeExpired")
    use_rth = r.bool("useRTH")
    return ReqHeadTimeStamp(req_id, contract, use_rth, r.str("whatToShow"), r.int("formatDate", 1))


def _req_historical_ticks(r: FieldReader) -> ReqHistoricalTicks:
    req_id = r.req()
    contract = read_contract(r)
    r.bool("includeExpired")
    start, end = r.str("startDateTime"), r.str("endDateTime")
    number = r.int("numberOfTicks")
    what = r.str("whatToShow")
    use_rth = r.bool("useRth")
    ignore = r.bool("ignoreSize") if r.remaining() else False
    return ReqHistoricalTicks(req_id, contract, start, end, number, what, use_rth, ignore)


def _option_computation(r: FieldReader):
    msg_id = r.msg_id
    r.skip()  # version
    req_id = r.req()
    return OptionComputation(msg_id, req_id, read_contract(r))


def _exercise_options(r: FieldReader) -> ExerciseOptions:
    r.skip()  # version
    req_id = r.req()
    con_id = r.int("conId")
    symbol, sec_type = r.str("symbol"), r.str("secType")
    return ExerciseOptions(req_id, ContractRef(con_id=con_id, symbol=symbol, sec_type=sec_type))


def _cancel(msg_id: int, name: str, versioned: bool):
    def parse(r: FieldReader) -> CancelRequest:
        if versioned:
            r.skip()
        return CancelRequest(msg_id, name, r.req())

    return parse


def _versioned(builder):
    def parse(r: FieldReader):
        r.skip()  # version
        return builder(r)

    return parse


_PARSERS = {
    1: _req_mkt_data,
    2: _versioned(lambda r: CancelMktData(r.req("tickerId"))),
    3: _place_order,
    4: _cancel_order,
    5: _versioned(lambda r: ReqOpenOrders()),
    6: _versioned(lambda r: ReqAccountUpdates(r.bool("subscribe"), r.str("acctCode") if r.remaining() else "")),
    7: _req_executions,
    8: _versioned(lambda r: ReqIds(r.int("numIds", 1))),
    9: _req_contract_details,
    15: _versioned(lambda r: ReqAutoOpenOrders(r.bool("bAutoBind"))),
    16: _versioned(lambda r: ReqAllOpenOrders()),
    17: _versioned(lambda r: ReqManagedAccts()),
    49: _versioned(lambda r: ReqCurrentTime()),
    58: _versioned(lambda r: ReqGlobalCancel()),
    59: _versioned(lambda r: ReqMarketDataType(r.int("marketDataType", 1))),
    61: _versioned(lambda r: ReqPositions()),
    62: _versioned(lambda r: ReqAccountSummary(r.req(), r.str("groupName"), r.str("tags"))),
    63: _versioned(lambda r: CancelAccountSummary(r.req())),
    64: _versioned(lambda r: CancelPositions()),
    71: _start_api,
    74: _versioned(lambda r: ReqPositionsMulti(r.req(), r.str("account"), r.str("modelCode"))),
    75: _versioned(lambda r: CancelPositionsMulti(r.req())),
    76: _versioned(
        lambda r: ReqAccountUpdatesMulti(
            r.req(), r.str("account"), r.str("modelCode"), r.bool("ledgerAndNLV") if r.remaining() else False
        )
    ),
    77: _versioned(lambda r: CancelAccountUpdatesMulti(r.req())),
    97: _req_tick_by_tick,
    98: lambda r: CancelTickByTick(r.req()),
    99: lambda r: ReqCompletedOrders(r.bool("apiOnly") if r.remaining() else False),
    12: _versioned(lambda r: ReqNewsBulletins(r.bool("allMsgs") if r.remaining() else False)),
    18: _versioned(lambda r: RequestFA(r.int("faDataType"))),
    19: _versioned(lambda r: (r.skip(2), ReplaceFA(r.req() if r.remaining() else -1))[1]),
    21: _exercise_options,
    22: _req_scanner_subscription,
    23: _cancel(23, "cancelScannerSubscription", versioned=True),
    24: _versioned(lambda r: ReqScannerParameters()),
    52: _req_fundamental_data,
    53: _cancel(53, "cancelFundamentalData", versioned=True),
    54: _option_computation,
    55: _option_computation,
    56: _cancel(56, "cancelCalculateImpliedVolatility", versioned=True),
    57: _cancel(57, "cancelCalculateOptionPrice", versioned=True),
    67: _versioned(lambda r: QueryDisplayGroups(r.req())),
    78: lambda r: ReqSecDefOptParams(r.req(), r.str("underlyingSymbol"), r.str("futFopExchange"), r.str("underlyingSecType"), r.int("underlyingConId")),
    79: lambda r: ReqSoftDollarTiers(r.req()),
    80: lambda r: ReqFamilyCodes(),
    81: lambda r: ReqMatchingSymbols(r.req(), r.str("pattern")),
    82: lambda r: ReqMktDepthExchanges(),
    83: lambda r: ReqSmartComponents(r.req(), r.str("bboExchange")),
    84: lambda r: ReqNewsArticle(r.req(), r.str("providerCode"), r.str("articleId")),
    85: lambda r: ReqNewsProviders(),
    86: lambda r: ReqHistoricalNews(r.req(), r.int("conId"), r.str("providerCodes")),
    91: lambda r: ReqMarketRule(r.int("marketRuleId")),
    100: lambda r: ReqWshMetaData(r.req()),
    101: _cancel(101, "cancelWshMetaData", versioned=False),
    102: lambda r: ReqWshEventData(r.req(), r.int("conId") if r.remaining() else 0),
    103: _cancel(103, "cancelWshEventData", versioned=False),
    104: lambda r: ReqUserInfo(r.req()),
    92: lambda r: ReqPnL(r.req(), r.str("account"), r.str("modelCode")),
    93: lambda r: CancelPnL(r.req()),
    94: lambda r: ReqPnLSingle(r.req(), r.str("account"), r.str("modelCode"), r.int("conId")),
    95: lambda r: CancelPnLSingle(r.req()),
    20: _req_historical_data,
    87: _req_head_time_stamp,
    96: _req_historical_ticks,
    # Cancels that IB does not answer.
    11: _cancel(11, "cancelMktDepth", versioned=True),
    13: _versioned(lambda r: CancelRequest(13, "cancelNewsBulletins", -1)),
    14: _versioned(lambda r: CancelRequest(14, "setServerLogLevel", -1)),
    25: _cancel(25, "cancelHistoricalData", versioned=True),
    51: _cancel(51, "cancelRealTimeBars", versioned=True),
    89: _cancel(89, "cancelHistogramData", versioned=False),
    90: _cancel(90, "cancelHeadTimeStamp", versioned=False),
}

# Known requests we do not simulate: name, and where the request id sits
# (index into the fields, or None when the request has none).
UNSUPPORTED: dict[int, tuple[str, int | None]] = {
    10: ("reqMktDepth", 2),
    50: ("reqRealTimeBars", 2),
    65: ("verifyRequest", None),
    66: ("verifyMessage", None),
    68: ("subscribeToGroupEvents", 2),
    69: ("updateDisplayGroup", 2),
    70: ("unsubscribeFromGroupEvents", 2),
    72: ("verifyAndAuthRequest", None),
    73: ("verifyAndAuthMessage", None),
    88: ("reqHistogramData", 1),
}


def decode_request(fields: Sequence[str]) -> Any:
    """Turn one incoming message into a request object.

    Raises MalformedRequest (with the request id when it could be read) for a
    message that does not decode; unknown message ids decode to Unsupported.
    """
    if not fields:
        raise MalformedRequest(None, -1, "empty message")
    try:
        msg_id = int(fields[0])
    except ValueError:
        raise MalformedRequest(None, -1, f"message id is not an integer: {fields[0][:20]!r}") from None
    parser = _PARSERS.get(msg_id)
    if parser is None:
        name, req_index = UNSUPPORTED.get(msg_id, (f"message {msg_id}", None))
        req_id = -1
        if req_index is not None and req_index < len(fields):
            try:
                req_id = int(fields[req_index])
            except ValueError:
                req_id = -1
        return Unsupported(msg_id, name, req_id)
    reader = FieldReader(fields, msg_id)
    return parser(reader)


# ------------------------------------------------------------------ message encoding
# Incoming message ids (server -> client).
TICK_PRICE = 1
TICK_SIZE = 2
ORDER_STATUS = 3
ERR_MSG = 4
OPEN_ORDER = 5
ACCT_VALUE = 6
PORTFOLIO_VALUE = 7
ACCT_UPDATE_TIME = 8
NEXT_VALID_ID = 9
CONTRACT_DATA = 10
EXECUTION_DATA = 11
MANAGED_ACCTS = 15
TICK_GENERIC = 45
TICK_STRING = 46
CURRENT_TIME = 49
CONTRACT_DATA_END = 52
OPEN_ORDER_END = 53
ACCT_DOWNLOAD_END = 54
EXECUTION_DATA_END = 55
TICK_SNAPSHOT_END = 57
MARKET_DATA_TYPE = 58
COMMISSION_REPORT = 59
POSITION_DATA = 61
POSITION_END = 62
ACCOUNT_SUMMARY = 63
ACCOUNT_SUMMARY_END = 64
POSITION_MULTI = 71
POSITION_MULTI_END = 72
ACCOUNT_UPDATE_MULTI = 73
ACCOUNT_UPDATE_MULTI_END = 74
TICK_REQ_PARAMS = 81
TICK_BY_TICK = 99
COMPLETED_ORDER = 101
COMPLETED_ORDERS_END = 102

# Tick types (reqMktData).
BID_SIZE, BID, ASK, ASK_SIZE, LAST, LAST_SIZE, HIGH, LOW, VOLUME, CLOSE = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
OPEN = 14
LAST_TIMESTAMP = 45
HALTED = 49
LAST_EXCHANGE = 84

# Tick-by-tick types.
TBT_LAST, TBT_ALL_LAST, TBT_BID_ASK, TBT_MID_POINT = 1, 2, 3, 4
TBT_TYPES = {"Last": TBT_LAST, "AllLast": TBT_ALL_LAST, "BidAsk": TBT_BID_ASK, "MidPoint": TBT_MID_POINT}


@dataclass(frozen=True)
class ContractInfo:
    """What the server knows about an instrument (see sim.contracts)."""

    con_id: int
    symbol: str
    sec_type: str = "STK"
    exchange: str = "SMART"
    primary_exchange: str = "NYSE"
    currency: str = "USD"
    local_symbol: str = ""
    trading_class: str = ""
    long_name: str = ""
    stock_type: str = "COMMON"
    min_tick: float = 0.01
    industry: str = ""
    category: str = ""
    valid_exchanges: str = "SMART,NYSE,ARCA,NASDAQ,BATS,DRCTEDGE,IEX"
    order_types: str = "ACTIVETIM,AD,ADJUST,ALERT,ALLOC,AVGCOST,BASKET,DAY,GTC,HID,IOC,LIT,LMT,MIT,MKT,MOC,MTL,REL,RTH,STP,STPLMT,TRAIL,WHATIF"

    def fields(self, exchange: str | None = None) -> list[Any]:
        """The 11 contract fields most messages carry (no primaryExchange)."""
        return [
            self.con_id,
            self.symbol,
            self.sec_type,
            "",
            0,
            "",
            "",
            self.exchange if exchange is None else exchange,
            self.currency,
            self.local_symbol or self.symbol,
            self.trading_class or self.symbol,
        ]


def error(req_id: int, code: int, text: str, advanced_reject_json: str = "") -> bytes:
    return encode([ERR_MSG, 2, req_id, code, text, advanced_reject_json])


def next_valid_id(order_id: int) -> bytes:
    return encode([NEXT_VALID_ID, 1, order_id])


def managed_accounts(accounts: Sequence[str]) -> bytes:
    return encode([MANAGED_ACCTS, 1, ",".join(accounts)])


def current_time(epoch_s: int) -> bytes:
    return encode([CURRENT_TIME, 1, epoch_s])


def market_data_type(req_id: int, data_type: int) -> bytes:
    return encode([MARKET_DATA_TYPE, 1, req_id, data_type])


def tick_req_params(req_id: int, min_tick: float, bbo_exchange: str, snapshot_permissions: int) -> bytes:
    return encode([TICK_REQ_PARAMS, req_id, min_tick, bbo_exchange, snapshot_permissions])


def tick_price(req_id: int, tick_type: int, price: str, size: int | str, attrib_mask: int = 0) -> bytes:
    return encode_text(f"1\x006\x00{req_id}\x00{tick_type}\x00{price}\x00{size}\x00{attrib_mask}\x00")


def tick_size(req_id: int, tick_type: int, size: int | str) -> bytes:
    return encode_text(f"2\x006\x00{req_id}\x00{tick_type}\x00{size}\x00")


def tick_string(req_id: int, tick_type: int, value: str) -> bytes:
    return encode_text(f"46\x006\x00{req_id}\x00{tick_type}\x00{value}\x00")


def tick_generic(req_id: int, tick_type: int, value: float | int) -> bytes:
    return encode([TICK_GENERIC, 6, req_id, tick_type, value])


def tick_snapshot_end(req_id: int) -> bytes:
    return encode([TICK_SNAPSHOT_END, 1, req_id])


def tick_by_tick_last(
    req_id: int, tick_type: int, epoch_s: int, price: str, size: int, mask: int, exchange: str, conditions: str
) -> bytes:
    return encode_text(
        f"99\x00{req_id}\x00{tick_type}\x00{epoch_s}\x00{price}\x00{size}\x00{mask}\x00{exchange}\x00{conditions}\x00"
    )


def tick_by_tick_bid_ask(
    req_id: int, epoch_s: int, bid: str, ask: str, bid_size: int, ask_size: int, mask: int = 0
) -> bytes:
    return encode_text(f"99\x00{req_id}\x003\x00{epoch_s}\x00{bid}\x00{ask}\x00{bid_size}\x00{ask_size}\x00{mask}\x00")


def tick_by_tick_mid_point(req_id: int, epoch_s: int, mid: float) -> bytes:
    return encode([TICK_BY_TICK, req_id, TBT_MID_POINT, epoch_s, mid])


def contract_details(req_id: int, c: ContractInfo, exchange: str, trading_hours: str = "", liquid_hours: str = "") -> bytes:
    return encode(
        [
            CONTRACT_DATA,
            req_id,
            c.symbol,
            c.sec_type,
            "",  # lastTradeDateOrContractMonth (+ time + zone)
            0,  # strike
            "",  # right
            exchange,
            c.currency,
            c.local_symbol or c.symbol,
            c.trading_class or c.symbol,  # marketName
            c.trading_class or c.symbol,
            c.con_id,
            c.min_tick,
            "",  # multiplier
            c.order_types,
            c.valid_exchanges,
            1,  # priceMagnifier
            0,  # underConId
            c.long_name,
            c.primary_exchange,
            "",  # contractMonth
            c.industry,
            c.category,
            "",  # subcategory
            "US/Eastern",
            trading_hours,
            liquid_hours,
            "",  # evRule
            "",  # evMultiplier
            0,  # secIdList count
            1,  # aggGroup
            "",  # underSymbol
            "",  # underSecType
            "26,26,26,26,26,26,26",  # marketRuleIds
            "",  # realExpirationDate
            c.stock_type,
            1,  # minSize
            1,  # sizeIncrement
            100,  # suggestedSizeIncrement
        ]
    )


def contract_details_end(req_id: int) -> bytes:
    return encode([CONTRACT_DATA_END, 1, req_id])


@dataclass
class OrderFields:
    """What openOrder / completedOrder / orderStatus need to know about an order."""

    order_id: int
    client_id: int
    perm_id: int
    contract: ContractInfo
    action: str
    total_quantity: float
    order_type: str
    lmt_price: float | None
    aux_price: float | None
    tif: str
    account: str
    order_ref: str
    outside_rth: bool
    hidden: bool
    display_size: int
    parent_id: int
    status: str
    filled: float = 0.0
    remaining: float = 0.0
    avg_fill_price: float = 0.0
    last_fill_price: float = 0.0
    why_held: str = ""
    completed_time: str = ""
    completed_status: str = ""
    extra: dict = field(default_factory=dict)


_ORDER_STATE_TEXT = ("initMarginBefore", "maintMarginBefore", "equityWithLoanBefore", "initMarginChange",
                     "maintMarginChange", "equityWithLoanChange", "initMarginAfter", "maintMarginAfter",
                     "equityWithLoanAfter")


def _order_state_fields(state: dict) -> list[Any]:
    """The OrderState part of openOrder (what-if figures; empty for a normal order)."""
    fields: list[Any] = [state.get(key, "") for key in _ORDER_STATE_TEXT]
    for key in ("commission", "minCommission", "maxCommission"):
        value = state.get(key)
        fields.append("" if value is None else value)
    fields += [state.get("commissionCurrency", ""), state.get("warningText", "")]
    return fields


def _opt_price(value: float | None) -> Any:
    return "" if value is None else value


def open_order(o: OrderFields) -> bytes:
    c = o.contract
    fields: list[Any] = [OPEN_ORDER, o.order_id]
    fields += c.fields()
    fields += [
        o.action,
        o.total_quantity,
        o.order_type,
        _opt_price(o.lmt_price),
        _opt_price(o.aux_price),
        o.tif,
        "",  # ocaGroup
        o.account,
        "",  # openClose
        0,  # origin
        o.order_ref,
        o.client_id,
        o.perm_id,
        o.outside_rth,
        o.hidden,
        0,  # discretionaryAmt
        "",  # goodAfterTime
        "",  # sharesAllocation (deprecated)
        "",  # faGroup
        "",  # faMethod
        "",  # faPercentage
        "",  # faProfile (server < 177)
        "",  # modelCode
        "",  # goodTillDate
        "",  # rule80A
        "",  # percentOffset
        "",  # settlingFirm
        0,  # shortSaleSlot
        "",  # designatedLocation
        -1,  # exemptCode
        0,  # auctionStrategy
        "",  # startingPrice
        "",  # stockRefPrice
        "",  # delta
        "",  # stockRangeLower
        "",  # stockRangeUpper
        o.display_size,
        False,  # blockOrder
        False,  # sweepToFill
        False,  # allOrNone
        "",  # minQty
        3,  # ocaType
        False,  # eTradeOnly
        False,  # firmQuoteOnly
        "",  # nbboPriceCap
        o.parent_id,
        0,  # triggerMethod
        "",  # volatility
        0,  # volatilityType
        "",  # deltaNeutralOrderType
        "",  # deltaNeutralAuxPrice
        False,  # continuousUpdate
        0,  # referencePriceType
        "",  # trailStopPrice
        "",  # trailingPercent
        "",  # basisPoints
        "",  # basisPointsType
        "",  # comboLegsDescrip
        0,  # comboLegs count
        0,  # orderComboLegs count
        0,  # smartComboRoutingParams count
        "",  # scaleInitLevelSize
        "",  # scaleSubsLevelSize
        "",  # scalePriceIncrement
        "",  # hedgeType
        False,  # optOutSmartRouting
        "",  # clearingAccount
        "",  # clearingIntent
        False,  # notHeld
        False,  # deltaNeutralContract present
        "",  # algoStrategy
        False,  # solicited
        bool(o.extra.get("what_if")),  # whatIf
        o.status,
        *_order_state_fields(o.extra.get("order_state") or {}),
        False,  # randomizeSize
        False,  # randomizePrice
        0,  # conditions count
        "",  # adjustedOrderType
        "",  # triggerPrice
        "",  # trailStopPrice
        "",  # lmtPriceOffset
        "",  # adjustedStopPrice
        "",  # adjustedStopLimitPrice
        "",  # adjustedTrailingAmount
        0,  # adjustableTrailingUnit
        "",  # softDollarTier name
        "",  # softDollarTier value
        "",  # softDollarTier displayName
        "",  # cashQty
        False,  # dontUseAutoPriceForHedge
        False,  # isOmsContainer
        False,  # discretionaryUpToLimitPrice
        False,  # usePriceMgmtAlgo
        "",  # duration (>= 159)
        "",  # postToAts (>= 160)
        False,  # autoCancelParent (>= 162)
        "",  # minTradeQty (>= 170)
        "",  # minCompeteSize
        "",  # competeAgainstBestOffset
        "",  # midOffsetAtWhole
        "",  # midOffsetAtHalf
    ]
    return encode(fields)


def open_order_end() -> bytes:
    return encode([OPEN_ORDER_END, 1])


def order_status(o: OrderFields, mkt_cap_price: float = 0.0) -> bytes:
    return encode(
        [
            ORDER_STATUS,
            o.order_id,
            o.status,
            o.filled,
            o.remaining,
            o.avg_fill_price,
            o.perm_id,
            o.parent_id,
            o.last_fill_price,
            o.client_id,
            o.why_held,
            mkt_cap_price,
        ]
    )


def completed_order(o: OrderFields) -> bytes:
    c = o.contract
    fields: list[Any] = [COMPLETED_ORDER]
    fields += c.fields()
    fields += [
        o.action,
        o.total_quantity,
        o.order_type,
        _opt_price(o.lmt_price),
        _opt_price(o.aux_price),
        o.tif,
        "",  # ocaGroup
        o.account,
        "",  # openClose
        0,  # origin
        o.order_ref,
        o.perm_id,
        o.outside_rth,
        o.hidden,
        0,  # discretionaryAmt
        "",  # goodAfterTime
        "",  # faGroup
        "",  # faMethod
        "",  # faPercentage
        "",  # faProfile (server < 177)
        "",  # modelCode
        "",  # goodTillDate
        "",  # rule80A
        "",  # percentOffset
        "",  # settlingFirm
        0,  # shortSaleSlot
        "",  # designatedLocation
        -1,  # exemptCode
        "",  # startingPrice
        "",  # stockRefPrice
        "",  # delta
        "",  # stockRangeLower
        "",  # stockRangeUpper
        o.display_size,
        False,  # sweepToFill
        False,  # allOrNone
        "",  # minQty
        3,  # ocaType
        0,  # triggerMethod
        "",  # volatility
        0,  # volatilityType
        "",  # deltaNeutralOrderType
        "",  # deltaNeutralAuxPrice
        False,  # continuousUpdate
        0,  # referencePriceType
        "",  # trailStopPrice
        "",  # trailingPercent
        "",  # comboLegsDescrip
        0,  # comboLegs count
        0,  # orderComboLegs count
        0,  # smartComboRoutingParams count
        "",  # scaleInitLevelSize
        "",  # scaleSubsLevelSize
        "",  # scalePriceIncrement
        "",  # hedgeType
        "",  # clearingAccount
        "",  # clearingIntent
        False,  # notHeld
        False,  # deltaNeutralContract present
        "",  # algoStrategy
        False,  # solicited
        o.status,
        False,  # randomizeSize
        False,  # randomizePrice
        0,  # conditions count
        "",  # trailStopPrice
        "",  # lmtPriceOffset
        "",  # cashQty
        False,  # dontUseAutoPriceForHedge
        False,  # isOmsContainer
        "",  # autoCancelDate
        o.filled,  # filledQuantity
        0,  # refFuturesConId
        False,  # autoCancelParent
        "",  # shareholder
        False,  # imbalanceOnly
        False,  # routeMarketableToBbo
        o.perm_id if o.parent_id else 0,  # parentPermId
        o.completed_time,
        o.completed_status,
        "",  # minTradeQty (>= 170)
        "",  # minCompeteSize
        "",  # competeAgainstBestOffset
        "",  # midOffsetAtWhole
        "",  # midOffsetAtHalf
    ]
    return encode(fields)


def completed_orders_end() -> bytes:
    return encode([COMPLETED_ORDERS_END])


@dataclass(frozen=True)
class ExecFields:
    exec_id: str
    time_text: str  # "yyyymmdd hh:mm:ss <zone>"
    account: str
    exchange: str
    side: str  # BOT / SLD
    shares: float
    price: float
    perm_id: int
    client_id: int
    order_id: int
    cum_qty: float
    avg_price: float
    order_ref: str
    last_liquidity: int  # 1 added, 2 removed


def exec_details(req_id: int, c: ContractInfo, e: ExecFields) -> bytes:
    fields: list[Any] = [EXECUTION_DATA, req_id, e.order_id]
    fields += c.fields(exchange=e.exchange)
    fields += [
        e.exec_id,
        e.time_text,
        e.account,
        e.exchange,
        e.side,
        e.shares,
        e.price,
        e.perm_id,
        e.client_id,
        0,  # liquidation
        e.cum_qty,
        e.avg_price,
        e.order_ref,
        "",  # evRule
        "",  # evMultiplier
        "",  # modelCode
        e.last_liquidity,
    ]
    return encode(fields)


def exec_details_end(req_id: int) -> bytes:
    return encode([EXECUTION_DATA_END, 1, req_id])


def commission_report(exec_id: str, commission: float, currency: str, realized_pnl: float | None) -> bytes:
    realized = UNSET_DOUBLE if realized_pnl is None else realized_pnl
    realized_text = "1.7976931348623157E308" if realized == UNSET_DOUBLE else fmt(float(realized))
    return encode([COMMISSION_REPORT, 1, exec_id, commission, currency, realized_text, "1.7976931348623157E308", 0])


def position(account: str, c: ContractInfo, qty: float, avg_cost: float) -> bytes:
    fields: list[Any] = [POSITION_DATA, 3, account]
    fields += c.fields(exchange=c.primary_exchange)
    fields += [qty, avg_cost]
    return encode(fields)


def position_end() -> bytes:
    return encode([POSITION_END, 1])


def position_multi(req_id: int, account: str, c: ContractInfo, qty: float, avg_cost: float, model_code: str = "") -> bytes:
    fields: list[Any] = [POSITION_MULTI, 1, req_id, account]
    fields += c.fields(exchange=c.primary_exchange)
    fields += [qty, avg_cost, model_code]
    return encode(fields)


def position_multi_end(req_id: int) -> bytes:
    return encode([POSITION_MULTI_END, 1, req_id])


def account_value(key: str, value: str, currency: str, account: str) -> bytes:
    return encode([ACCT_VALUE, 2, key, value, currency, account])


def portfolio_value(
    c: ContractInfo,
    qty: float,
    market_price: float,
    market_value: float,
    avg_cost: float,
    unrealized: float,
    realized: float,
    account: str,
) -> bytes:
    fields: list[Any] = [PORTFOLIO_VALUE, 8, c.con_id, c.symbol, c.sec_type, "", 0, "", "", c.primary_exchange]
    fields += [c.currency, c.local_symbol or c.symbol, c.trading_class or c.symbol]
    fields += [qty, market_price, market_value, avg_cost, unrealized, realized, account]
    return encode(fields)


def account_update_time(hh_mm: str) -> bytes:
    return encode([ACCT_UPDATE_TIME, 1, hh_mm])


def account_download_end(account: str) -> bytes:
    return encode([ACCT_DOWNLOAD_END, 1, account])


def account_summary(req_id: int, account: str, tag: str, value: str, currency: str) -> bytes:
    return encode([ACCOUNT_SUMMARY, 1, req_id, account, tag, value, currency])


def account_summary_end(req_id: int) -> bytes:
    return encode([ACCOUNT_SUMMARY_END, 1, req_id])


def account_update_multi(req_id: int, account: str, model_code: str, key: str, value: str, currency: str) -> bytes:
    return encode([ACCOUNT_UPDATE_MULTI, 1, req_id, account, model_code, key, value, currency])


def account_update_multi_end(req_id: int) -> bytes:
    return encode([ACCOUNT_UPDATE_MULTI_END, 1, req_id])


PNL = 94
PNL_SINGLE = 95


def pnl(req_id: int, daily: float, unrealized: float, realized: float) -> bytes:
    return encode([PNL, req_id, float(daily), float(unrealized), float(realized)])


def pnl_single(req_id: int, position: int, daily: float, unrealized: float, realized: float, value: float) -> bytes:
    return encode([PNL_SINGLE, req_id, int(position), float(daily), float(unrealized), float(realized), float(value)])


HISTORICAL_DATA = 17
HEAD_TIMESTAMP = 88
HISTORICAL_DATA_UPDATE = 90
HISTORICAL_TICKS = 96
HISTORICAL_TICKS_BID_ASK = 97
HISTORICAL_TICKS_LAST = 98


def historical_data(req_id: int, start: str, end: str, bars: Sequence[Any]) -> bytes:
    fields: list[Any] = [HISTORICAL_DATA, req_id, start, end, len(bars)]
    for b in bars:
        fields += [b.label, b.open, b.high, b.low, b.close, b.volume, b.wap, b.count]
    return encode(fields)


def historical_data_update(req_id: int, b: Any) -> bytes:
    return encode([HISTORICAL_DATA_UPDATE, req_id, b.count, b.label, b.open, b.close, b.high, b.low, b.wap, b.volume])


def head_timestamp(req_id: int, text: str) -> bytes:
    return encode([HEAD_TIMESTAMP, req_id, text])


def historical_ticks_last(req_id: int, ticks: Sequence[tuple[int, str, int, str, str]], done: bool = True) -> bytes:
    """ticks: (epoch s, price text, size, exchange, conditions)."""
    fields: list[Any] = [HISTORICAL_TICKS_LAST, req_id, len(ticks)]
    for epoch_s, price, size, exchange, conditions in ticks:
        fields += [epoch_s, 0, price, size, exchange, conditions]
    return encode(fields + [done])


def historical_ticks_bid_ask(req_id: int, ticks: Sequence[tuple[int, str, str, int, int]], done: bool = True) -> bytes:
    """ticks: (epoch s, bid text, ask text, bid size, ask size)."""
    fields: list[Any] = [HISTORICAL_TICKS_BID_ASK, req_id, len(ticks)]
    for epoch_s, bid, ask, bid_size, ask_size in ticks:
        fields += [epoch_s, 0, bid, ask, bid_size, ask_size]
    return encode(fields + [done])


def historical_ticks_mid(req_id: int, ticks: Sequence[tuple[int, float]], done: bool = True) -> bytes:
    """ticks: (epoch s, midpoint)."""
    fields: list[Any] = [HISTORICAL_TICKS, req_id, len(ticks)]
    for epoch_s, mid in ticks:
        fields += [epoch_s, "", mid, 0]
    return encode(fields + [done])


# Reference data and other answers (server -> client).
RECEIVE_FA = 16
SCANNER_PARAMETERS = 19
SCANNER_DATA = 20
DISPLAY_GROUP_LIST = 67
SECURITY_DEFINITION_OPTION_PARAMETER_END = 76
SOFT_DOLLAR_TIERS = 77
FAMILY_CODES = 78
SYMBOL_SAMPLES = 79
MKT_DEPTH_EXCHANGES = 80
SMART_COMPONENTS = 82
NEWS_PROVIDERS = 85
HISTORICAL_NEWS_END = 87
MARKET_RULE = 93
WSH_META_DATA = 104
WSH_EVENT_DATA = 105
USER_INFO = 107


def sec_def_opt_params_end(req_id: int) -> bytes:
    return encode([SECURITY_DEFINITION_OPTION_PARAMETER_END, req_id])


def smart_components(req_id: int, components: Sequence[tuple[int, str, str]]) -> bytes:
    fields: list[Any] = [SMART_COMPONENTS, req_id, len(components)]
    for bit, exchange, letter in components:
        fields += [bit, exchange, letter]
    return encode(fields)


def mkt_depth_exchanges(rows: Sequence[tuple[str, str, str, str, int]]) -> bytes:
    fields: list[Any] = [MKT_DEPTH_EXCHANGES, len(rows)]
    for row in rows:
        fields += list(row)
    return encode(fields)


def news_providers(providers: Sequence[tuple[str, str]]) -> bytes:
    fields: list[Any] = [NEWS_PROVIDERS, len(providers)]
    for code, name in providers:
        fields += [code, name]
    return encode(fields)


def historical_news_end(req_id: int, has_more: bool) -> bytes:
    return encode([HISTORICAL_NEWS_END, req_id, has_more])


def user_info(req_id: int, white_branding_id: str) -> bytes:
    return encode([USER_INFO, req_id, white_branding_id])


def scanner_parameters(xml: str) -> bytes:
    return encode([SCANNER_PARAMETERS, 1, xml])


def scanner_data(req_id: int, rows: Sequence[tuple[int, "ContractInfo"]]) -> bytes:
    fields: list[Any] = [SCANNER_DATA, 3, req_id, len(rows)]
    for rank, c in rows:
        fields += [rank, c.con_id, c.symbol, c.sec_type, "", 0, "", c.primary_exchange, c.currency,
                   c.local_symbol or c.symbol, c.trading_class or c.symbol, c.trading_class or c.symbol,
                   "", "", "", ""]  # distance, benchmark, projection, legsStr
    return encode(fields)


def wsh_meta_data(req_id: int, data_json: str) -> bytes:
    return encode([WSH_META_DATA, req_id, data_json])


def wsh_event_data(req_id: int, data_json: str) -> bytes:
    return encode([WSH_EVENT_DATA, req_id, data_json])


def symbol_samples(req_id: int, contracts: Sequence["ContractInfo"], version: int = SERVER_VERSION) -> bytes:
    fields: list[Any] = [SYMBOL_SAMPLES, req_id, len(contracts)]
    for c in contracts:
        fields += [c.con_id, c.symbol, c.sec_type, c.primary_exchange, c.currency, 0]  # no derivatives
        if version >= 176:
            fields += [c.long_name, ""]  # description, issuerId
    return encode(fields)


def market_rule(rule_id: int, increments: Sequence[tuple[float, float]]) -> bytes:
    fields: list[Any] = [MARKET_RULE, rule_id, len(increments)]
    for low_edge, increment in increments:
        fields += [low_edge, increment]
    return encode(fields)


def soft_dollar_tiers(req_id: int) -> bytes:
    return encode([SOFT_DOLLAR_TIERS, req_id, 0])


def family_codes(codes: Sequence[tuple[str, str]]) -> bytes:
    fields: list[Any] = [FAMILY_CODES, len(codes)]
    for account, code in codes:
        fields += [account, code]
    return encode(fields)


def display_group_list(req_id: int, groups: str) -> bytes:
    return encode([DISPLAY_GROUP_LIST, 1, req_id, groups])
