from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenyReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENY_REASON_UNSPECIFIED: _ClassVar[DenyReason]
    DENY_REASON_INSUFFICIENT_BUDGET: _ClassVar[DenyReason]
    DENY_REASON_TOO_MANY_HOLDS: _ClassVar[DenyReason]
    DENY_REASON_FROZEN: _ClassVar[DenyReason]

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_ACTIVE: _ClassVar[HoldState]
    HOLD_STATE_COMMITTED: _ClassVar[HoldState]
    HOLD_STATE_RELEASED: _ClassVar[HoldState]
    HOLD_STATE_EXPIRED: _ClassVar[HoldState]
DENY_REASON_UNSPECIFIED: DenyReason
DENY_REASON_INSUFFICIENT_BUDGET: DenyReason
DENY_REASON_TOO_MANY_HOLDS: DenyReason
DENY_REASON_FROZEN: DenyReason
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_ACTIVE: HoldState
HOLD_STATE_COMMITTED: HoldState
HOLD_STATE_RELEASED: HoldState
HOLD_STATE_EXPIRED: HoldState

class ReserveRequest(_message.Message):
    __slots__ = ("customer_id", "amount", "idempotency_key", "ttl_ms")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: int
    idempotency_key: str
    ttl_ms: int
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("granted", "reservation_id", "remaining", "reason", "expires_at_ms", "replayed", "amount", "message", "state")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    reservation_id: str
    remaining: int
    reason: DenyReason
    expires_at_ms: int
    replayed: bool
    amount: int
    message: str
    state: HoldState
    def __init__(self, granted: _Optional[bool] = ..., reservation_id: _Optional[str] = ..., remaining: _Optional[int] = ..., reason: _Optional[_Union[DenyReason, str]] = ..., expires_at_ms: _Optional[int] = ..., replayed: _Optional[bool] = ..., amount: _Optional[int] = ..., message: _Optional[str] = ..., state: _Optional[_Union[HoldState, str]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "amount")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    amount: int
    def __init__(self, reservation_id: _Optional[str] = ..., amount: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("charged", "remaining", "over_reserved", "excess", "replayed", "hold_expired")
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVER_RESERVED_FIELD_NUMBER: _ClassVar[int]
    EXCESS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    HOLD_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    charged: int
    remaining: int
    over_reserved: bool
    excess: int
    replayed: bool
    hold_expired: bool
    def __init__(self, charged: _Optional[int] = ..., remaining: _Optional[int] = ..., over_reserved: _Optional[bool] = ..., excess: _Optional[int] = ..., replayed: _Optional[bool] = ..., hold_expired: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "remaining", "state", "replayed")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    remaining: int
    state: HoldState
    replayed: bool
    def __init__(self, released: _Optional[bool] = ..., remaining: _Optional[int] = ..., state: _Optional[_Union[HoldState, str]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class Balance(_message.Message):
    __slots__ = ("customer_id", "limit", "spent", "reserved", "remaining", "active_holds", "stripe_customer_id", "overdraft", "frozen")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_HOLDS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    OVERDRAFT_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    active_holds: int
    stripe_customer_id: str
    overdraft: int
    frozen: bool
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., spent: _Optional[int] = ..., reserved: _Optional[int] = ..., remaining: _Optional[int] = ..., active_holds: _Optional[int] = ..., stripe_customer_id: _Optional[str] = ..., overdraft: _Optional[int] = ..., frozen: _Optional[bool] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "stripe_customer_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    stripe_customer_id: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., stripe_customer_id: _Optional[str] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("balance", "created")
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    balance: Balance
    created: bool
    def __init__(self, balance: _Optional[_Union[Balance, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class FreezeBudgetRequest(_message.Message):
    __slots__ = ("customer_id", "frozen")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    frozen: bool
    def __init__(self, customer_id: _Optional[str] = ..., frozen: _Optional[bool] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("prefix", "limit")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    limit: int
    def __init__(self, prefix: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Balance]
    def __init__(self, budgets: _Optional[_Iterable[_Union[Balance, _Mapping]]] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("seq", "identifier", "sent_as", "customer_id", "stripe_customer_id", "amount", "ts_ms", "first_attempt_ms", "attempts", "reason", "dead_ms", "requeues")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    SENT_AS_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_ATTEMPT_MS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEAD_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEUES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    identifier: str
    sent_as: str
    customer_id: str
    stripe_customer_id: str
    amount: int
    ts_ms: int
    first_attempt_ms: int
    attempts: int
    reason: str
    dead_ms: int
    requeues: int
    def __init__(self, seq: _Optional[int] = ..., identifier: _Optional[str] = ..., sent_as: _Optional[str] = ..., customer_id: _Optional[str] = ..., stripe_customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., ts_ms: _Optional[int] = ..., first_attempt_ms: _Optional[int] = ..., attempts: _Optional[int] = ..., reason: _Optional[str] = ..., dead_ms: _Optional[int] = ..., requeues: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters",)
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ...) -> None: ...

class RequeueDeadLetterRequest(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class RequeueDeadLetterResponse(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class GetSettlementStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SettlementStatus(_message.Message):
    __slots__ = ("enabled", "transport", "event_name", "aggregate_window_ms", "outbox_depth", "max_outbox_entries", "oldest_age_ms", "dead_letters", "last_success_ms", "last_error", "last_error_ms", "delivered_events", "delivered_entries", "dead_lettered_entries", "failing_since_ms")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    OUTBOX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTBOX_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_MS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_MS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FAILING_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    transport: str
    event_name: str
    aggregate_window_ms: int
    outbox_depth: int
    max_outbox_entries: int
    oldest_age_ms: int
    dead_letters: int
    last_success_ms: int
    last_error: str
    last_error_ms: int
    delivered_events: int
    delivered_entries: int
    dead_lettered_entries: int
    failing_since_ms: int
    def __init__(self, enabled: _Optional[bool] = ..., transport: _Optional[str] = ..., event_name: _Optional[str] = ..., aggregate_window_ms: _Optional[int] = ..., outbox_depth: _Optional[int] = ..., max_outbox_entries: _Optional[int] = ..., oldest_age_ms: _Optional[int] = ..., dead_letters: _Optional[int] = ..., last_success_ms: _Optional[int] = ..., last_error: _Optional[str] = ..., last_error_ms: _Optional[int] = ..., delivered_events: _Optional[int] = ..., delivered_entries: _Optional[int] = ..., dead_lettered_entries: _Optional[int] = ..., failing_since_ms: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("dest_dir",)
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    dest_dir: str
    def __init__(self, dest_dir: _Optional[str] = ...) -> None: ...

class BackupResponse(_message.Message):
    __slots__ = ("dest_dir", "size_bytes", "durable_ticket", "started_ms", "duration_ms")
    DEST_DIR_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURABLE_TICKET_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    dest_dir: str
    size_bytes: int
    durable_ticket: int
    started_ms: int
    duration_ms: int
    def __init__(self, dest_dir: _Optional[str] = ..., size_bytes: _Optional[int] = ..., durable_ticket: _Optional[int] = ..., started_ms: _Optional[int] = ..., duration_ms: _Optional[int] = ...) -> None: ...
