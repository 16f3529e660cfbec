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
    DENY_REASON_OVERAGE_BLOCKED: _ClassVar[DenyReason]
    DENY_REASON_UNKNOWN_MODEL: _ClassVar[DenyReason]
    DENY_REASON_HOLD_ENDED: _ClassVar[DenyReason]

class EnforcementMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENFORCEMENT_MODE_UNSPECIFIED: _ClassVar[EnforcementMode]
    ENFORCEMENT_MODE_HARD: _ClassVar[EnforcementMode]
    ENFORCEMENT_MODE_SOFT: _ClassVar[EnforcementMode]

class PeriodKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERIOD_KIND_UNSPECIFIED: _ClassVar[PeriodKind]
    PERIOD_KIND_MONTHLY: _ClassVar[PeriodKind]
    PERIOD_KIND_FIXED: _ClassVar[PeriodKind]
    PERIOD_KIND_LIFETIME: _ClassVar[PeriodKind]

class HoldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_STATE_UNSPECIFIED: _ClassVar[HoldState]
    HOLD_STATE_ACTIVE: _ClassVar[HoldState]
    HOLD_STATE_COMMITTED: _ClassVar[HoldState]
    HOLD_STATE_RELEASED: _ClassVar[HoldState]
    HOLD_STATE_EXPIRED: _ClassVar[HoldState]

class AlertKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALERT_KIND_UNSPECIFIED: _ClassVar[AlertKind]
    ALERT_KIND_SOFT_LIMIT_CROSSED: _ClassVar[AlertKind]
    ALERT_KIND_LIMIT_REACHED: _ClassVar[AlertKind]
    ALERT_KIND_BREAKER_TRIPPED: _ClassVar[AlertKind]
    ALERT_KIND_FROZEN: _ClassVar[AlertKind]
    ALERT_KIND_UNFROZEN: _ClassVar[AlertKind]
    ALERT_KIND_SETTLEMENT_DEAD_LETTER: _ClassVar[AlertKind]
    ALERT_KIND_INVOICE_SPIKE: _ClassVar[AlertKind]
    ALERT_KIND_RECONCILE_DIVERGENCE: _ClassVar[AlertKind]
    ALERT_KIND_CLOCK_STEP: _ClassVar[AlertKind]

class SettlementState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLEMENT_STATE_UNSPECIFIED: _ClassVar[SettlementState]
    SETTLEMENT_STATE_PENDING: _ClassVar[SettlementState]
    SETTLEMENT_STATE_SENT: _ClassVar[SettlementState]
    SETTLEMENT_STATE_DEAD_LETTER: _ClassVar[SettlementState]
    SETTLEMENT_STATE_CREDIT: _ClassVar[SettlementState]
DENY_REASON_UNSPECIFIED: DenyReason
DENY_REASON_INSUFFICIENT_BUDGET: DenyReason
DENY_REASON_TOO_MANY_HOLDS: DenyReason
DENY_REASON_FROZEN: DenyReason
DENY_REASON_OVERAGE_BLOCKED: DenyReason
DENY_REASON_UNKNOWN_MODEL: DenyReason
DENY_REASON_HOLD_ENDED: DenyReason
ENFORCEMENT_MODE_UNSPECIFIED: EnforcementMode
ENFORCEMENT_MODE_HARD: EnforcementMode
ENFORCEMENT_MODE_SOFT: EnforcementMode
PERIOD_KIND_UNSPECIFIED: PeriodKind
PERIOD_KIND_MONTHLY: PeriodKind
PERIOD_KIND_FIXED: PeriodKind
PERIOD_KIND_LIFETIME: PeriodKind
HOLD_STATE_UNSPECIFIED: HoldState
HOLD_STATE_ACTIVE: HoldState
HOLD_STATE_COMMITTED: HoldState
HOLD_STATE_RELEASED: HoldState
HOLD_STATE_EXPIRED: HoldState
ALERT_KIND_UNSPECIFIED: AlertKind
ALERT_KIND_SOFT_LIMIT_CROSSED: AlertKind
ALERT_KIND_LIMIT_REACHED: AlertKind
ALERT_KIND_BREAKER_TRIPPED: AlertKind
ALERT_KIND_FROZEN: AlertKind
ALERT_KIND_UNFROZEN: AlertKind
ALERT_KIND_SETTLEMENT_DEAD_LETTER: AlertKind
ALERT_KIND_INVOICE_SPIKE: AlertKind
ALERT_KIND_RECONCILE_DIVERGENCE: AlertKind
ALERT_KIND_CLOCK_STEP: AlertKind
SETTLEMENT_STATE_UNSPECIFIED: SettlementState
SETTLEMENT_STATE_PENDING: SettlementState
SETTLEMENT_STATE_SENT: SettlementState
SETTLEMENT_STATE_DEAD_LETTER: SettlementState
SETTLEMENT_STATE_CREDIT: SettlementState

class Period(_message.Message):
    __slots__ = ("kind", "anchor_ms", "start_ms", "end_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_MS_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    kind: PeriodKind
    anchor_ms: int
    start_ms: int
    end_ms: int
    def __init__(self, kind: _Optional[_Union[PeriodKind, str]] = ..., anchor_ms: _Optional[int] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ...) -> None: ...

class TokenEstimate(_message.Message):
    __slots__ = ("model", "input_tokens", "max_output_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_tokens: int
    max_output_tokens: int
    def __init__(self, model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class TokenUsage(_message.Message):
    __slots__ = ("model", "input_tokens", "cached_input_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens", "cache_hit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cache_hit: bool
    def __init__(self, model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., cache_hit: _Optional[bool] = ...) -> None: ...

class UsagePart(_message.Message):
    __slots__ = ("token_type", "tokens", "units")
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    token_type: str
    tokens: int
    units: int
    def __init__(self, token_type: _Optional[str] = ..., tokens: _Optional[int] = ..., units: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("customer_id", "amount", "idempotency_key", "ttl_ms", "estimate", "dimensions")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: int
    idempotency_key: str
    ttl_ms: int
    estimate: TokenEstimate
    dimensions: _containers.ScalarMap[str, str]
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., estimate: _Optional[_Union[TokenEstimate, _Mapping]] = ..., dimensions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("granted", "reservation_id", "remaining", "reason", "expires_at_ms", "replayed", "amount", "message", "state", "over_limit", "decided_by", "priced_model", "fallback_price", "parts")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    PRICED_MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PRICE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    reservation_id: str
    remaining: int
    reason: DenyReason
    expires_at_ms: int
    replayed: bool
    amount: int
    message: str
    state: HoldState
    over_limit: bool
    decided_by: str
    priced_model: str
    fallback_price: bool
    parts: _containers.RepeatedCompositeFieldContainer[UsagePart]
    def __init__(self, granted: _Optional[bool] = ..., reservation_id: _Optional[str] = ..., remaining: _Optional[int] = ..., reason: _Optional[_Union[DenyReason, str]] = ..., expires_at_ms: _Optional[int] = ..., replayed: _Optional[bool] = ..., amount: _Optional[int] = ..., message: _Optional[str] = ..., state: _Optional[_Union[HoldState, str]] = ..., over_limit: _Optional[bool] = ..., decided_by: _Optional[str] = ..., priced_model: _Optional[str] = ..., fallback_price: _Optional[bool] = ..., parts: _Optional[_Iterable[_Union[UsagePart, _Mapping]]] = ...) -> None: ...

class QuoteRequest(_message.Message):
    __slots__ = ("customer_id", "amount", "estimate")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: int
    estimate: TokenEstimate
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., estimate: _Optional[_Union[TokenEstimate, _Mapping]] = ...) -> None: ...

class QuoteResponse(_message.Message):
    __slots__ = ("granted", "reason", "message", "amount", "parts", "priced_model", "fallback_price", "remaining", "over_limit", "decided_by")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    PRICED_MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PRICE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    reason: DenyReason
    message: str
    amount: int
    parts: _containers.RepeatedCompositeFieldContainer[UsagePart]
    priced_model: str
    fallback_price: bool
    remaining: int
    over_limit: bool
    decided_by: str
    def __init__(self, granted: _Optional[bool] = ..., reason: _Optional[_Union[DenyReason, str]] = ..., message: _Optional[str] = ..., amount: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[UsagePart, _Mapping]]] = ..., priced_model: _Optional[str] = ..., fallback_price: _Optional[bool] = ..., remaining: _Optional[int] = ..., over_limit: _Optional[bool] = ..., decided_by: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "amount", "usage", "dimensions")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    amount: int
    usage: TokenUsage
    dimensions: _containers.ScalarMap[str, str]
    def __init__(self, reservation_id: _Optional[str] = ..., amount: _Optional[int] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., dimensions: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("charged", "remaining", "over_reserved", "excess", "replayed", "hold_expired", "over_limit", "breaker_tripped", "parts", "priced_model", "fallback_price")
    CHARGED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    OVER_RESERVED_FIELD_NUMBER: _ClassVar[int]
    EXCESS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    HOLD_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    BREAKER_TRIPPED_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    PRICED_MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PRICE_FIELD_NUMBER: _ClassVar[int]
    charged: int
    remaining: int
    over_reserved: bool
    excess: int
    replayed: bool
    hold_expired: bool
    over_limit: bool
    breaker_tripped: bool
    parts: _containers.RepeatedCompositeFieldContainer[UsagePart]
    priced_model: str
    fallback_price: bool
    def __init__(self, charged: _Optional[int] = ..., remaining: _Optional[int] = ..., over_reserved: _Optional[bool] = ..., excess: _Optional[int] = ..., replayed: _Optional[bool] = ..., hold_expired: _Optional[bool] = ..., over_limit: _Optional[bool] = ..., breaker_tripped: _Optional[bool] = ..., parts: _Optional[_Iterable[_Union[UsagePart, _Mapping]]] = ..., priced_model: _Optional[str] = ..., fallback_price: _Optional[bool] = ...) -> None: ...

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
    __slots__ = ("customer_id", "limit", "spent", "reserved", "remaining", "active_holds", "stripe_customer_id", "overdraft", "frozen", "frozen_reason", "included", "soft_limit", "mode", "block_overage", "parent_id", "members", "period", "period_start_ms", "period_end_ms", "breaker_multiplier", "credits", "stop_at")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_HOLDS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    OVERDRAFT_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    FROZEN_REASON_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_OVERAGE_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    BREAKER_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    active_holds: int
    stripe_customer_id: str
    overdraft: int
    frozen: bool
    frozen_reason: str
    included: int
    soft_limit: int
    mode: EnforcementMode
    block_overage: bool
    parent_id: str
    members: int
    period: Period
    period_start_ms: int
    period_end_ms: int
    breaker_multiplier: int
    credits: int
    stop_at: int
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., spent: _Optional[int] = ..., reserved: _Optional[int] = ..., remaining: _Optional[int] = ..., active_holds: _Optional[int] = ..., stripe_customer_id: _Optional[str] = ..., overdraft: _Optional[int] = ..., frozen: _Optional[bool] = ..., frozen_reason: _Optional[str] = ..., included: _Optional[int] = ..., soft_limit: _Optional[int] = ..., mode: _Optional[_Union[EnforcementMode, str]] = ..., block_overage: _Optional[bool] = ..., parent_id: _Optional[str] = ..., members: _Optional[int] = ..., period: _Optional[_Union[Period, _Mapping]] = ..., period_start_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., breaker_multiplier: _Optional[int] = ..., credits: _Optional[int] = ..., stop_at: _Optional[int] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "stripe_customer_id", "included", "soft_limit", "mode", "block_overage", "parent_id", "period", "breaker_multiplier", "stop_at")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_OVERAGE_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    BREAKER_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    stripe_customer_id: str
    included: int
    soft_limit: int
    mode: EnforcementMode
    block_overage: bool
    parent_id: str
    period: Period
    breaker_multiplier: int
    stop_at: int
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., stripe_customer_id: _Optional[str] = ..., included: _Optional[int] = ..., soft_limit: _Optional[int] = ..., mode: _Optional[_Union[EnforcementMode, str]] = ..., block_overage: _Optional[bool] = ..., parent_id: _Optional[str] = ..., period: _Optional[_Union[Period, _Mapping]] = ..., breaker_multiplier: _Optional[int] = ..., stop_at: _Optional[int] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("balance", "created", "rolled")
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_FIELD_NUMBER: _ClassVar[int]
    balance: Balance
    created: bool
    rolled: bool
    def __init__(self, balance: _Optional[_Union[Balance, _Mapping]] = ..., created: _Optional[bool] = ..., rolled: _Optional[bool] = ...) -> None: ...

class FreezeBudgetRequest(_message.Message):
    __slots__ = ("customer_id", "frozen", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    frozen: bool
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., frozen: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

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

class GetUsageRequest(_message.Message):
    __slots__ = ("customer_id", "period", "top")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period: str
    top: int
    def __init__(self, customer_id: _Optional[str] = ..., period: _Optional[str] = ..., top: _Optional[int] = ...) -> None: ...

class DayUsage(_message.Message):
    __slots__ = ("date", "units")
    DATE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    date: str
    units: int
    def __init__(self, date: _Optional[str] = ..., units: _Optional[int] = ...) -> None: ...

class ModelUsage(_message.Message):
    __slots__ = ("model", "token_type", "tokens", "units")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_type: str
    tokens: int
    units: int
    def __init__(self, model: _Optional[str] = ..., token_type: _Optional[str] = ..., tokens: _Optional[int] = ..., units: _Optional[int] = ...) -> None: ...

class DimensionUsage(_message.Message):
    __slots__ = ("key", "value", "units")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    units: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ..., units: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("customer_id", "period_start_ms", "period_end_ms", "current", "total", "commits", "included", "limit", "overage", "included_remaining", "projected_total", "projected_overage", "daily", "by_model", "by_dimension", "reserved", "spent", "credits_granted", "grants", "credits", "folded_dimension_keys")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_REMAINING_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_OVERAGE_FIELD_NUMBER: _ClassVar[int]
    DAILY_FIELD_NUMBER: _ClassVar[int]
    BY_MODEL_FIELD_NUMBER: _ClassVar[int]
    BY_DIMENSION_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    CREDITS_GRANTED_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    FOLDED_DIMENSION_KEYS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period_start_ms: int
    period_end_ms: int
    current: bool
    total: int
    commits: int
    included: int
    limit: int
    overage: int
    included_remaining: int
    projected_total: int
    projected_overage: int
    daily: _containers.RepeatedCompositeFieldContainer[DayUsage]
    by_model: _containers.RepeatedCompositeFieldContainer[ModelUsage]
    by_dimension: _containers.RepeatedCompositeFieldContainer[DimensionUsage]
    reserved: int
    spent: int
    credits_granted: int
    grants: int
    credits: int
    folded_dimension_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, customer_id: _Optional[str] = ..., period_start_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., current: _Optional[bool] = ..., total: _Optional[int] = ..., commits: _Optional[int] = ..., included: _Optional[int] = ..., limit: _Optional[int] = ..., overage: _Optional[int] = ..., included_remaining: _Optional[int] = ..., projected_total: _Optional[int] = ..., projected_overage: _Optional[int] = ..., daily: _Optional[_Iterable[_Union[DayUsage, _Mapping]]] = ..., by_model: _Optional[_Iterable[_Union[ModelUsage, _Mapping]]] = ..., by_dimension: _Optional[_Iterable[_Union[DimensionUsage, _Mapping]]] = ..., reserved: _Optional[int] = ..., spent: _Optional[int] = ..., credits_granted: _Optional[int] = ..., grants: _Optional[int] = ..., credits: _Optional[int] = ..., folded_dimension_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchAlertsRequest(_message.Message):
    __slots__ = ("after_seq", "from_start", "customer_ids")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    FROM_START_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_IDS_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    from_start: bool
    customer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, after_seq: _Optional[int] = ..., from_start: _Optional[bool] = ..., customer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class Alert(_message.Message):
    __slots__ = ("seq", "kind", "customer_id", "ts_ms", "message", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: AlertKind
    customer_id: str
    ts_ms: int
    message: str
    values: _containers.ScalarMap[str, int]
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[AlertKind, str]] = ..., customer_id: _Optional[str] = ..., ts_ms: _Optional[int] = ..., message: _Optional[str] = ..., values: _Optional[_Mapping[str, int]] = ...) -> None: ...

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
    __slots__ = ("seq", "identifier", "sent_as", "customer_id", "stripe_customer_id", "amount", "ts_ms", "first_attempt_ms", "attempts", "reason", "dead_ms", "requeues", "fate_unknown")
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
    FATE_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
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
    fate_unknown: bool
    def __init__(self, seq: _Optional[int] = ..., identifier: _Optional[str] = ..., sent_as: _Optional[str] = ..., customer_id: _Optional[str] = ..., stripe_customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., ts_ms: _Optional[int] = ..., first_attempt_ms: _Optional[int] = ..., attempts: _Optional[int] = ..., reason: _Optional[str] = ..., dead_ms: _Optional[int] = ..., requeues: _Optional[int] = ..., fate_unknown: _Optional[bool] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters",)
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ...) -> None: ...

class RequeueDeadLetterRequest(_message.Message):
    __slots__ = ("seq", "confirmed_missing")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_MISSING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    confirmed_missing: bool
    def __init__(self, seq: _Optional[int] = ..., confirmed_missing: _Optional[bool] = ...) -> None: ...

class RequeueDeadLetterResponse(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class GetSettlementStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SettlementStatus(_message.Message):
    __slots__ = ("enabled", "transport", "event_name", "aggregate_window_ms", "outbox_depth", "max_outbox_entries", "oldest_age_ms", "dead_letters", "last_success_ms", "last_error", "last_error_ms", "delivered_events", "delivered_entries", "dead_lettered_entries", "failing_since_ms", "auto_aggregate", "auto_aggregating")
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
    AUTO_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    AUTO_AGGREGATING_FIELD_NUMBER: _ClassVar[int]
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
    auto_aggregate: bool
    auto_aggregating: bool
    def __init__(self, enabled: _Optional[bool] = ..., transport: _Optional[str] = ..., event_name: _Optional[str] = ..., aggregate_window_ms: _Optional[int] = ..., outbox_depth: _Optional[int] = ..., max_outbox_entries: _Optional[int] = ..., oldest_age_ms: _Optional[int] = ..., dead_letters: _Optional[int] = ..., last_success_ms: _Optional[int] = ..., last_error: _Optional[str] = ..., last_error_ms: _Optional[int] = ..., delivered_events: _Optional[int] = ..., delivered_entries: _Optional[int] = ..., dead_lettered_entries: _Optional[int] = ..., failing_since_ms: _Optional[int] = ..., auto_aggregate: _Optional[bool] = ..., auto_aggregating: _Optional[bool] = ...) -> None: ...

class ListLedgerRequest(_message.Message):
    __slots__ = ("customer_id", "period", "after", "limit")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period: str
    after: int
    limit: int
    def __init__(self, customer_id: _Optional[str] = ..., period: _Optional[str] = ..., after: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class LedgerEntry(_message.Message):
    __slots__ = ("seq", "ts_ms", "reservation_id", "customer_id", "parent", "amount", "reserved", "excess", "model", "parts", "cache_hit", "dimensions", "stripe_customer_id", "identifier", "meter_event_identifiers", "state", "settled_ms", "dead_letter_reason", "archived", "period_start_ms", "claim", "kind", "reason")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    EXCESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    METER_EVENT_IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SETTLED_MS_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_REASON_FIELD_NUMBER: _ClassVar[int]
    ARCHIVED_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    CLAIM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    ts_ms: int
    reservation_id: str
    customer_id: str
    parent: str
    amount: int
    reserved: int
    excess: int
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[UsagePart]
    cache_hit: bool
    dimensions: _containers.ScalarMap[str, str]
    stripe_customer_id: str
    identifier: str
    meter_event_identifiers: _containers.RepeatedScalarFieldContainer[str]
    state: SettlementState
    settled_ms: int
    dead_letter_reason: str
    archived: bool
    period_start_ms: int
    claim: str
    kind: str
    reason: str
    def __init__(self, seq: _Optional[int] = ..., ts_ms: _Optional[int] = ..., reservation_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., parent: _Optional[str] = ..., amount: _Optional[int] = ..., reserved: _Optional[int] = ..., excess: _Optional[int] = ..., model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[UsagePart, _Mapping]]] = ..., cache_hit: _Optional[bool] = ..., dimensions: _Optional[_Mapping[str, str]] = ..., stripe_customer_id: _Optional[str] = ..., identifier: _Optional[str] = ..., meter_event_identifiers: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[SettlementState, str]] = ..., settled_ms: _Optional[int] = ..., dead_letter_reason: _Optional[str] = ..., archived: _Optional[bool] = ..., period_start_ms: _Optional[int] = ..., claim: _Optional[str] = ..., kind: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListLedgerResponse(_message.Message):
    __slots__ = ("entries", "next_after", "more", "period_start_ms", "period_end_ms", "scanned")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    SCANNED_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LedgerEntry]
    next_after: int
    more: bool
    period_start_ms: int
    period_end_ms: int
    scanned: int
    def __init__(self, entries: _Optional[_Iterable[_Union[LedgerEntry, _Mapping]]] = ..., next_after: _Optional[int] = ..., more: _Optional[bool] = ..., period_start_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., scanned: _Optional[int] = ...) -> None: ...

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

class CreateUsageLinkRequest(_message.Message):
    __slots__ = ("customer_id", "ttl_ms", "allow_limit", "ceiling")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    ttl_ms: int
    allow_limit: bool
    ceiling: int
    def __init__(self, customer_id: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., allow_limit: _Optional[bool] = ..., ceiling: _Optional[int] = ...) -> None: ...

class CreateUsageLinkResponse(_message.Message):
    __slots__ = ("url", "path", "expires_at_ms", "scope", "ceiling")
    URL_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CEILING_FIELD_NUMBER: _ClassVar[int]
    url: str
    path: str
    expires_at_ms: int
    scope: str
    ceiling: int
    def __init__(self, url: _Optional[str] = ..., path: _Optional[str] = ..., expires_at_ms: _Optional[int] = ..., scope: _Optional[str] = ..., ceiling: _Optional[int] = ...) -> None: ...

class VirtualKey(_message.Message):
    __slots__ = ("key_id", "customer_id", "created_ms")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    customer_id: str
    created_ms: int
    def __init__(self, key_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., created_ms: _Optional[int] = ...) -> None: ...

class CreateVirtualKeyRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class CreateVirtualKeyResponse(_message.Message):
    __slots__ = ("key", "virtual_key")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    virtual_key: VirtualKey
    def __init__(self, key: _Optional[str] = ..., virtual_key: _Optional[_Union[VirtualKey, _Mapping]] = ...) -> None: ...

class ListVirtualKeysRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class ListVirtualKeysResponse(_message.Message):
    __slots__ = ("virtual_keys",)
    VIRTUAL_KEYS_FIELD_NUMBER: _ClassVar[int]
    virtual_keys: _containers.RepeatedCompositeFieldContainer[VirtualKey]
    def __init__(self, virtual_keys: _Optional[_Iterable[_Union[VirtualKey, _Mapping]]] = ...) -> None: ...

class RevokeVirtualKeyRequest(_message.Message):
    __slots__ = ("key_id_or_customer_id",)
    KEY_ID_OR_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    key_id_or_customer_id: str
    def __init__(self, key_id_or_customer_id: _Optional[str] = ...) -> None: ...

class RevokeVirtualKeyResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedCompositeFieldContainer[VirtualKey]
    def __init__(self, revoked: _Optional[_Iterable[_Union[VirtualKey, _Mapping]]] = ...) -> None: ...

class GrantCreditsRequest(_message.Message):
    __slots__ = ("customer_id", "amount", "idempotency_key", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: int
    idempotency_key: str
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GrantCreditsResponse(_message.Message):
    __slots__ = ("customer_id", "amount", "reason", "granted_ms", "limit_after", "credits_after", "replayed", "balance")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    GRANTED_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREDITS_AFTER_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: int
    reason: str
    granted_ms: int
    limit_after: int
    credits_after: int
    replayed: bool
    balance: Balance
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[int] = ..., reason: _Optional[str] = ..., granted_ms: _Optional[int] = ..., limit_after: _Optional[int] = ..., credits_after: _Optional[int] = ..., replayed: _Optional[bool] = ..., balance: _Optional[_Union[Balance, _Mapping]] = ...) -> None: ...

class ReleaseInvoiceRequest(_message.Message):
    __slots__ = ("invoice_id",)
    INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    invoice_id: str
    def __init__(self, invoice_id: _Optional[str] = ...) -> None: ...

class ReleaseInvoiceResponse(_message.Message):
    __slots__ = ("invoice_id", "stripe_customer_id", "status", "auto_advance", "was_held", "total", "currency")
    INVOICE_ID_FIELD_NUMBER: _ClassVar[int]
    STRIPE_CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUTO_ADVANCE_FIELD_NUMBER: _ClassVar[int]
    WAS_HELD_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    invoice_id: str
    stripe_customer_id: str
    status: str
    auto_advance: bool
    was_held: bool
    total: int
    currency: str
    def __init__(self, invoice_id: _Optional[str] = ..., stripe_customer_id: _Optional[str] = ..., status: _Optional[str] = ..., auto_advance: _Optional[bool] = ..., was_held: _Optional[bool] = ..., total: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...
