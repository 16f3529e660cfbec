//! The hot paths: Reserve, Commit, Release, and the expiry of holds. Each follows the ordering rule in lib.rs; an org
//! (a parent budget) is one more level that every step applies to in the same way, before the ticket when it takes
//! capacity and after it when it frees capacity.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;

use super::{
    validate_amount, validate_id, CommitArgs, CommitOutcome, ReleaseOutcome, ReserveArgs, ReserveOutcome, Shared,
};
use crate::alerts::{AlertKind, PendingAlert};
use crate::budget::{Budget, Refusal};
use crate::error::{EngineError, ErrorKind};
use crate::hold::{truncate_for_message, DenyReason, HoldExtras, HoldSlot, HoldState, Resolution};
use crate::records::{Dimensions, HoldRecord, HoldStatus};
use crate::store::idempotency_key;
use crate::usage::{validate_dimensions, validate_usage, MAX_MODEL_BYTES};
use crate::writer::{CommitOp, Op};

/// An estimate's fingerprint: the model and two token counts.
const MAX_FINGERPRINT_BYTES: usize = MAX_MODEL_BYTES + 48;

fn check_length(field: &str, value: &str, max_bytes: usize) -> Result<(), EngineError> {
    if value.len() > max_bytes {
        return Err(EngineError::invalid(format!(
            "{field} {:?} is {} bytes; give at most {max_bytes}",
            truncate_for_message(value),
            value.len()
        )));
    }
    Ok(())
}

impl Shared {
    pub(super) fn reserve(&self, args: &ReserveArgs<'_>) -> Result<ReserveOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", args.customer_id)?;
        validate_amount("amount", args.amount, 1)?;
        if !args.idempotency_key.is_empty() {
            validate_id("idempotency_key", args.idempotency_key)?;
        }
        validate_dimensions(&args.dimensions)?;
        check_length("model", args.model, MAX_MODEL_BYTES)?;
        check_length("fingerprint", args.fingerprint, MAX_FINGERPRINT_BYTES)?;
        let ttl_ms = self.resolve_ttl_ms(args.ttl_ms)?;
        let budget = self.budget(args.customer_id)?;
        if args.idempotency_key.is_empty() {
            return self.reserve_new(&budget, args, ttl_ms, None);
        }
        let composite = idempotency_key(args.customer_id, args.idempotency_key);
        match self.idempotency.entry(composite) {
            Entry::Occupied(entry) => {
                let hold_id = *entry.get();
                drop(entry);
                self.replay_reserve(hold_id, args)
            }
            Entry::Vacant(entry) => {
                // Under the shard lock, so no concurrent retry can slip a second hold in between.
                if let Some(hold_id) = self.with_store(|store| store.get_idempotency(entry.key()))? {
                    drop(entry);
                    return self.replay_reserve(hold_id, args);
                }
                let outcome = self.reserve_new(&budget, args, ttl_ms, Some(entry.key().as_str()))?;
                if outcome.granted {
                    entry.insert(self.identity.parse(&outcome.reservation_id)?);
                }
                Ok(outcome)
            }
        }
    }

    fn resolve_ttl_ms(&self, ttl_ms: u64) -> Result<u64, EngineError> {
        if ttl_ms == 0 {
            return Ok(self.config.default_ttl_ms);
        }
        if ttl_ms > self.config.max_ttl_ms {
            return Err(EngineError::invalid(format!(
                "ttl_ms is {ttl_ms}; the server allows at most {} (max_ttl_ms); pass 0 for the default of {}",
                self.config.max_ttl_ms, self.config.default_ttl_ms
            )));
        }
        Ok(ttl_ms)
    }

    fn check_room(&self) -> Result<(), EngineError> {
        self.check_map_room(crate::capacity::HOLD_WORST_CASE_BYTES)?;
        if self.outbox_depth.load(SeqCst) >= self.config.max_outbox_entries {
            return Err(EngineError::exhausted(format!(
                "{} committed usages are waiting for settlement to Stripe (max_outbox_entries): new reservations are \
                 refused until the settler catches up; check Stripe connectivity and the dead letters",
                self.config.max_outbox_entries
            )));
        }
        Ok(())
    }

    fn reserve_new(
        &self,
        budget: &Arc<Budget>,
        args: &ReserveArgs<'_>,
        ttl_ms: u64,
        composite_key: Option<&str>,
    ) -> Result<ReserveOutcome, EngineError> {
        self.check_room()?;
        let amount = args.amount;
        let parent = budget.parent.get().cloned();
        let remaining = || parent.as_ref().map_or(budget.remaining(), |p| p.remaining().min(budget.remaining()));
        if let Some(denial) = pre_admission(budget, parent.as_ref(), amount, remaining())? {
            return Ok(denial);
        }
        if !budget.try_open_hold(self.config.max_holds_per_budget as i64) {
            return Ok(denied(DenyReason::TooManyHolds, remaining(), amount, &budget.customer_id));
        }
        if !self.try_open_global_hold() {
            budget.close_hold();
            return Ok(denied(DenyReason::TooManyHolds, remaining(), amount, &budget.customer_id));
        }
        let own_over = match budget.admit(amount) {
            Ok(over) => over,
            Err(refusal) => {
                self.abandon_hold(budget, None, 0);
                return Ok(self.refused(budget, refusal, amount, remaining()));
            }
        };
        let parent_over = match parent.as_ref().map(|p| p.admit(amount)) {
            None => false,
            Some(Ok(over)) => over,
            Some(Err(refusal)) => {
                self.abandon_hold(budget, None, amount);
                let parent = parent.as_ref().expect("refused by the parent");
                return Ok(self.refused(parent, refusal, amount, remaining()));
            }
        };
        if let Err(err) = self.acquire_queue_slot() {
            self.abandon_hold(budget, parent.as_ref(), amount);
            return Err(err);
        }
        budget.add_hold(amount);
        if let Some(parent) = &parent {
            parent.open_hold();
            parent.add_hold(amount);
        }
        let hold_id = self.next_hold_id.fetch_add(1, SeqCst);
        // The hold ends on engine time (monotonic); expires_ms is the wall-clock estimate the caller is shown.
        let (mono_ms, now_ms) = self.clock.mono_and_now();
        let deadline_mono_ms = mono_ms + ttl_ms as i64;
        let expires_ms = now_ms + ttl_ms as i64;
        let record = HoldRecord {
            customer_id: budget.customer_id.to_string(),
            amount,
            status: HoldStatus::Active,
            created_ms: now_ms,
            expires_ms,
            deadline_mono_ms: Some(deadline_mono_ms),
            idempotency_key: composite_key.map(|_| args.idempotency_key.to_string()),
            committed_amount: None,
            excess: 0,
            late: false,
            resolved_ms: None,
            parent: parent.as_ref().map(|p| p.customer_id.to_string()),
            model: args.model.to_string(),
            dimensions: args.dimensions.clone(),
            fingerprint: args.fingerprint.to_string(),
        };
        // Took capacity: the ticket comes after the compare-and-swap. The slot goes in after the ticket, so any op
        // that finds this hold gets a later ticket than its Reserve.
        let ticket = self.take_ticket();
        let slot = HoldSlot {
            budget: budget.clone(),
            parent: parent.clone(),
            extras: HoldExtras::boxed(args.model, &args.dimensions, args.fingerprint),
            amount,
            expires_ms,
            deadline_mono_ms,
            idem_key: composite_key.map(Into::into),
            resolution: None,
            ticket,
        };
        let previous = self.holds.insert(hold_id, slot);
        assert!(previous.is_none(), "hold id {hold_id} was handed out twice");
        self.send(ticket, Op::Reserve { hold_id, record: Box::new(record) });
        let over_limit = own_over || parent_over;
        let decided_by = passed_by(budget, parent.as_ref(), own_over, parent_over);
        if own_over {
            self.raise_limit_reached(budget, amount, true);
        }
        if let (true, Some(parent)) = (parent_over, &parent) {
            self.raise_limit_reached(parent, amount, true);
        }
        Ok(ReserveOutcome {
            granted: true,
            reservation_id: self.identity.reservation_id(hold_id),
            remaining: remaining(),
            reason: DenyReason::None,
            expires_at_ms: expires_ms,
            replayed: false,
            amount,
            state: Some(HoldState::Active),
            over_limit,
            decided_by,
            ticket,
        })
    }

    /// Undo the first steps of a Reserve that will not be granted: the open-hold counts, and `taken` units admitted
    /// on the budget (and on `parent`, when it admitted them too). Nothing was persisted.
    fn abandon_hold(&self, budget: &Budget, parent: Option<&Arc<Budget>>, taken: i64) {
        if taken > 0 {
            budget.untake(taken);
            if let Some(parent) = parent {
                parent.untake(taken);
            }
        }
        budget.close_hold();
        let before = self.active_holds.fetch_sub(1, SeqCst);
        assert!(before > 0, "closed more holds than were open");
    }

    /// A denial by `level`'s limit, raising its limit-reached alert the first time this period.
    fn refused(&self, level: &Budget, refusal: Refusal, amount: i64, remaining: i64) -> ReserveOutcome {
        self.raise_limit_reached(level, amount, false);
        denied(deny_reason(refusal), remaining, amount, &level.customer_id)
    }

    /// What a Reserve of `amount` for `customer_id` would answer now, holding nothing: the same checks in the same
    /// order as `reserve_new`, each asked without taking (no counter, hold, ticket, alert or idempotency record
    /// changes). Errors as Reserve would (a full outbox or map, an amount past MAX_BOOKED_UNITS). A granted quote
    /// has no reservation id, expiry or state; `remaining` is what is available before the call.
    pub(super) fn quote(&self, customer_id: &str, amount: i64) -> Result<ReserveOutcome, EngineError> {
        self.check_open()?;
        validate_id("customer_id", customer_id)?;
        validate_amount("amount", amount, 1)?;
        let budget = self.budget(customer_id)?;
        self.check_room()?;
        let parent = budget.parent.get().cloned();
        let remaining = parent.as_ref().map_or(budget.remaining(), |p| p.remaining().min(budget.remaining()));
        if let Some(denial) = pre_admission(&budget, parent.as_ref(), amount, remaining)? {
            return Ok(denial);
        }
        let max_holds = self.config.max_holds_per_budget as i64;
        if !budget.has_hold_room(max_holds) || self.active_holds.load(SeqCst) >= self.config.max_active_holds {
            return Ok(denied(DenyReason::TooManyHolds, remaining, amount, &budget.customer_id));
        }
        let own_over = match budget.would_admit(amount) {
            Ok(over) => over,
            Err(refusal) => return Ok(denied(deny_reason(refusal), remaining, amount, &budget.customer_id)),
        };
        let parent_over = match parent.as_ref().map(|p| (p, p.would_admit(amount))) {
            None => false,
            Some((_, Ok(over))) => over,
            Some((p, Err(refusal))) => return Ok(denied(deny_reason(refusal), remaining, amount, &p.customer_id)),
        };
        Ok(ReserveOutcome {
            granted: true,
            reservation_id: String::new(),
            remaining,
            reason: DenyReason::None,
            expires_at_ms: 0,
            replayed: false,
            amount,
            state: None,
            over_limit: own_over || parent_over,
            decided_by: passed_by(&budget, parent.as_ref(), own_over, parent_over),
            ticket: 0,
        })
    }

    fn raise_limit_reached(&self, level: &Budget, amount: i64, granted: bool) {
        if !level.limit_reached() {
            return;
        }
        let c = level.counters();
        let message = if granted {
            format!(
                "budget {:?} passed its limit of {} units in soft mode: a Reserve of {amount} was granted and flagged \
                 over_limit",
                level.customer_id, c.limit
            )
        } else {
            format!(
                "budget {:?} reached its limit of {} units: a Reserve of {amount} was denied ({} spent, {} held)",
                level.customer_id, c.limit, c.spent, c.held
            )
        };
        let values = [("limit", c.limit), ("spent", c.spent), ("reserved", c.held), ("amount", amount)];
        let alert =
            PendingAlert::new(AlertKind::LimitReached, &level.customer_id, self.clock.now_ms(), message, &values);
        if !self.raise(alert) {
            level.rearm_limit();
        }
    }

    fn try_open_global_hold(&self) -> bool {
        let max = self.config.max_active_holds;
        self.active_holds.fetch_update(SeqCst, SeqCst, |open| (open < max).then_some(open + 1)).is_ok()
    }

    fn close_hold(&self, budget: &Budget, parent: Option<&Arc<Budget>>) {
        budget.close_hold();
        if let Some(parent) = parent {
            parent.close_hold();
        }
        let before = self.active_holds.fetch_sub(1, SeqCst);
        assert!(before > 0, "closed more holds than were open");
    }

    fn replay_reserve(&self, hold_id: u64, args: &ReserveArgs<'_>) -> Result<ReserveOutcome, EngineError> {
        let (original, fingerprint, expires_ms, remaining, state, ticket) = match self.holds.get(&hold_id) {
            Some(slot) => {
                let state = slot.resolution.map_or(HoldState::Active, Resolution::state);
                let fingerprint = slot.extras.as_ref().map(|extras| extras.fingerprint.clone()).unwrap_or_default();
                (slot.amount, fingerprint, slot.expires_ms, slot.budget.remaining(), state, slot.ticket)
            }
            None => {
                let record = self.with_store(|store| store.get_hold(hold_id))?.ok_or_else(|| {
                    EngineError::internal(format!(
                        "idempotency key {:?} points at hold {hold_id}, which is gone",
                        args.idempotency_key
                    ))
                })?;
                let remaining = self.budget(&record.customer_id)?.remaining();
                let state = stored_resolution(&record)?.state();
                (record.amount, record.fingerprint, record.expires_ms, remaining, state, 0)
            }
        };
        // A derived amount (a priced estimate) is compared by what it was derived from: prices may have changed.
        let same = if fingerprint.is_empty() && args.fingerprint.is_empty() {
            original == args.amount
        } else {
            fingerprint == args.fingerprint
        };
        if !same {
            return Err(EngineError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "idempotency_key {:?} was already used for a reservation of {original} units{}; a retry must send \
                     the same request, a new reservation needs a new key",
                    truncate_for_message(args.idempotency_key),
                    if fingerprint.is_empty() { String::new() } else { format!(" ({fingerprint})") }
                ),
            ));
        }
        // A replay of a hold that ended holds nothing: granting it would let the caller spend unreserved units (after
        // an expiry) or make a call whose commit is refused (after a release). It is a denial that says why.
        let ended = state != HoldState::Active;
        Ok(ReserveOutcome {
            granted: !ended,
            reservation_id: self.identity.reservation_id(hold_id),
            remaining,
            reason: if ended { DenyReason::HoldEnded } else { DenyReason::None },
            expires_at_ms: expires_ms,
            replayed: true,
            amount: original,
            state: Some(state),
            over_limit: false,
            decided_by: String::new(),
            ticket,
        })
    }

    pub(super) fn commit(&self, args: CommitArgs<'_>) -> Result<CommitOutcome, EngineError> {
        self.check_open()?;
        let reservation_id = args.reservation_id;
        let hold_id = self.identity.parse(reservation_id)?;
        validate_amount("amount", args.amount, 0)?;
        if let Some(usage) = &args.usage {
            validate_usage(usage, args.amount)?;
        }
        validate_dimensions(&args.dimensions)?;
        match self.holds.entry(hold_id) {
            Entry::Occupied(mut entry) => {
                let slot = entry.get_mut();
                match slot.resolution {
                    None => self.commit_hold(slot, hold_id, args, false),
                    Some(Resolution::Expired) => self.commit_hold(slot, hold_id, args, true),
                    Some(resolution) => replay_commit(
                        reservation_id,
                        resolution,
                        slot.amount,
                        args.amount,
                        slot.budget.remaining(),
                        slot.ticket,
                    ),
                }
            }
            Entry::Vacant(entry) => {
                let record = self.stored_hold(reservation_id, hold_id)?;
                let budget = self.budget(&record.customer_id)?;
                match record.status {
                    HoldStatus::Expired => {
                        let parent = match &record.parent {
                            Some(parent_id) => Some(self.budget(parent_id)?),
                            None => None,
                        };
                        let mut slot = HoldSlot {
                            budget,
                            parent,
                            extras: HoldExtras::boxed(&record.model, &record.dimensions, &record.fingerprint),
                            amount: record.amount,
                            expires_ms: record.expires_ms,
                            deadline_mono_ms: record.deadline_mono_ms.unwrap_or(i64::MIN), // ended already
                            idem_key: None,
                            resolution: Some(Resolution::Expired),
                            ticket: 0,
                        };
                        let outcome = self.commit_hold(&mut slot, hold_id, args, true)?;
                        entry.insert(slot);
                        Ok(outcome)
                    }
                    _ => replay_commit(
                        reservation_id,
                        stored_resolution(&record)?,
                        record.amount,
                        args.amount,
                        budget.remaining(),
                        0,
                    ),
                }
            }
        }
    }

    pub(super) fn stored_hold(&self, reservation_id: &str, hold_id: u64) -> Result<HoldRecord, EngineError> {
        self.with_store(|store| store.get_hold(hold_id))?.ok_or_else(|| {
            EngineError::not_found(format!(
                "no reservation {reservation_id}: it never existed here, or it was resolved more than \
                 resolved_retention_ms ago"
            ))
        })
    }

    /// Post a commit of `held` (0 for an expired hold) on the budget and its org, in the period each is in now.
    /// Returns the op's ticket and the excess on each level.
    fn post_commit(
        &self,
        slot: &HoldSlot,
        hold_id: u64,
        held: i64,
        late: bool,
        args: CommitArgs<'_>,
    ) -> (u64, i64, i64) {
        let budget = &slot.budget;
        let parent = slot.parent.as_ref();
        // Shared: a roll-over (exclusive) cannot move either period while this commit is counted and ticketed.
        let _gate = budget.period_gate.read().expect("period gate");
        let _parent_gate = parent.map(|p| p.period_gate.read().expect("period gate"));
        let mut op = CommitOp {
            hold_id,
            amount: args.amount,
            excess: 0,
            parent_excess: 0,
            late,
            now_ms: self.clock.now_ms(),
            period_start_ms: budget.period().0,
            parent_period_start_ms: parent.map_or(0, |p| p.period().0),
            usage: args.usage,
            dimensions: merged_dimensions(slot.extras.as_deref(), args.dimensions),
        };
        let amount = args.amount;
        if amount <= held {
            // Frees capacity: ticket first, then publish.
            let ticket = self.take_ticket();
            self.send(ticket, Op::Commit(Box::new(op)));
            assert_eq!(budget.post(held, amount), 0);
            if let Some(parent) = parent {
                assert_eq!(parent.post(held, amount), 0);
            }
            return (ticket, 0, 0);
        }
        // Takes capacity: publish first, then the ticket.
        op.excess = budget.post(held, amount);
        op.parent_excess = parent.map_or(0, |p| p.post(held, amount));
        let (excess, parent_excess) = (op.excess, op.parent_excess);
        let ticket = self.take_ticket();
        self.send(ticket, Op::Commit(Box::new(op)));
        (ticket, excess, parent_excess)
    }

    /// Post a Commit of an active hold, or, `late`, of one that expired before it (the LLM call happened anyway, so
    /// the usage is recorded in full, against nothing held).
    fn commit_hold(
        &self,
        slot: &mut HoldSlot,
        hold_id: u64,
        args: CommitArgs<'_>,
        late: bool,
    ) -> Result<CommitOutcome, EngineError> {
        for level in std::iter::once(&slot.budget).chain(slot.parent.as_ref()) {
            if let Some(why) = level.booking_refused(args.amount, false) {
                return Err(EngineError::invalid(why));
            }
        }
        self.acquire_queue_slot()?;
        let (held, amount) = (if late { 0 } else { slot.amount }, args.amount);
        let (ticket, excess, _) = self.post_commit(slot, hold_id, held, late, args);
        if !late {
            self.close_hold(&slot.budget, slot.parent.as_ref()); // an expired hold was closed when it expired
        }
        slot.resolution = Some(Resolution::Committed { amount, excess, late });
        slot.ticket = ticket;
        let (over_limit, breaker_tripped) = self.after_commit(slot, amount);
        Ok(CommitOutcome {
            charged: amount,
            remaining: slot_remaining(slot),
            over_reserved: amount > slot.amount,
            excess,
            replayed: false,
            hold_expired: late,
            over_limit,
            breaker_tripped,
            ticket,
        })
    }

    /// What a commit sets off on each level: the soft-limit alert, the breaker. Returns (over the limit, tripped).
    fn after_commit(&self, slot: &HoldSlot, amount: i64) -> (bool, bool) {
        let (mut over_limit, mut tripped) = (false, false);
        let now_ms = self.clock.now_ms();
        for level in std::iter::once(&slot.budget).chain(slot.parent.as_ref()) {
            if level.soft_limit_crossed() {
                self.raise_soft_limit(level);
            }
            let c = level.counters();
            over_limit |= c.spent > c.limit;
            tripped |= self.check_breaker(level, amount, now_ms);
        }
        (over_limit, tripped)
    }

    fn raise_soft_limit(&self, level: &Budget) {
        let c = level.counters();
        let soft_limit = level.soft_limit();
        let message = format!(
            "budget {:?} has spent {} units, past its soft limit of {soft_limit} (limit {})",
            level.customer_id, c.spent, c.limit
        );
        let values = [("soft_limit", soft_limit), ("spent", c.spent), ("limit", c.limit)];
        let alert =
            PendingAlert::new(AlertKind::SoftLimitCrossed, &level.customer_id, self.clock.now_ms(), message, &values);
        if !self.raise(alert) {
            level.rearm_soft_limit();
        }
    }

    pub(super) fn release(&self, reservation_id: &str) -> Result<ReleaseOutcome, EngineError> {
        self.check_open()?;
        let hold_id = self.identity.parse(reservation_id)?;
        match self.holds.entry(hold_id) {
            Entry::Occupied(mut entry) => {
                let slot = entry.get_mut();
                match slot.resolution {
                    None => self.release_active(slot, hold_id),
                    Some(resolution) => replay_release(reservation_id, resolution, slot_remaining(slot), slot.ticket),
                }
            }
            Entry::Vacant(_) => {
                let record = self.stored_hold(reservation_id, hold_id)?;
                let remaining = self.budget(&record.customer_id)?.remaining();
                replay_release(reservation_id, stored_resolution(&record)?, remaining, 0)
            }
        }
    }

    fn release_active(&self, slot: &mut HoldSlot, hold_id: u64) -> Result<ReleaseOutcome, EngineError> {
        self.acquire_queue_slot()?;
        let ticket = self.take_ticket();
        self.send(ticket, Op::Release { hold_id, now_ms: self.clock.now_ms() });
        self.void(slot, Resolution::Released, ticket);
        Ok(ReleaseOutcome {
            released: true,
            remaining: slot_remaining(slot),
            state: HoldState::Released,
            replayed: false,
            ticket,
        })
    }

    /// End an active hold without a commit (after its op has a ticket: this frees capacity).
    fn void(&self, slot: &mut HoldSlot, resolution: Resolution, ticket: u64) {
        slot.budget.free_hold(slot.amount);
        if let Some(parent) = &slot.parent {
            parent.free_hold(slot.amount);
        }
        self.close_hold(&slot.budget, slot.parent.as_ref());
        slot.resolution = Some(resolution);
        slot.ticket = ticket;
    }

    pub(super) fn reap_expired(&self) -> u64 {
        if self.check_open().is_err() {
            return 0;
        }
        // Due by engine time alone: a step of the wall clock neither ends a hold early nor keeps it alive.
        let (mono_ms, now_ms) = self.clock.mono_and_now();
        // Collect first: mutating while a DashMap iterator holds a shard lock would deadlock.
        let due: Vec<u64> = self
            .holds
            .iter()
            .filter(|entry| entry.resolution.is_none() && entry.deadline_mono_ms <= mono_ms)
            .map(|entry| *entry.key())
            .collect();
        let mut expired = 0;
        for hold_id in due {
            let Some(mut slot) = self.holds.get_mut(&hold_id) else { continue };
            if slot.resolution.is_some() {
                continue;
            }
            if self.acquire_queue_slot().is_err() {
                break; // The disk is behind; the next round retries.
            }
            let ticket = self.take_ticket();
            self.send(ticket, Op::Expire { hold_id, now_ms });
            self.void(&mut slot, Resolution::Expired, ticket);
            expired += 1;
        }
        self.expired_total.fetch_add(expired, SeqCst);
        expired
    }
}

/// The checks before admission, shared by Reserve and Quote: a frozen budget or org denies; an amount that would
/// take either past MAX_BOOKED_UNITS is an error.
fn pre_admission(
    budget: &Arc<Budget>,
    parent: Option<&Arc<Budget>>,
    amount: i64,
    remaining: i64,
) -> Result<Option<ReserveOutcome>, EngineError> {
    for level in std::iter::once(budget).chain(parent) {
        if level.frozen() {
            return Ok(Some(denied(DenyReason::Frozen, remaining, amount, &level.customer_id)));
        }
    }
    for level in std::iter::once(budget).chain(parent) {
        if let Some(why) = level.booking_refused(amount, true) {
            return Err(EngineError::invalid(why));
        }
    }
    Ok(None)
}

fn deny_reason(refusal: Refusal) -> DenyReason {
    match refusal {
        Refusal::Insufficient => DenyReason::InsufficientBudget,
        Refusal::OverageBlocked => DenyReason::OverageBlocked,
    }
}

/// The budget a soft grant went past: the customer's own first, else its org's ("" when within both limits).
fn passed_by(budget: &Budget, parent: Option<&Arc<Budget>>, own_over: bool, parent_over: bool) -> String {
    match (own_over, parent_over, parent) {
        (true, _, _) => budget.customer_id.to_string(),
        (false, true, Some(parent)) => parent.customer_id.to_string(),
        _ => String::new(),
    }
}

/// What is left for the hold's customer: the lesser of its own and its org's remaining.
fn slot_remaining(slot: &HoldSlot) -> i64 {
    let own = slot.budget.remaining();
    slot.parent.as_ref().map_or(own, |parent| own.min(parent.remaining()))
}

/// The Reserve's dimensions, overridden key by key by the Commit's.
fn merged_dimensions(extras: Option<&HoldExtras>, commit: Dimensions) -> Dimensions {
    match extras {
        Some(extras) if !extras.dimensions.is_empty() => {
            let mut merged = extras.dimensions.clone();
            merged.extend(commit);
            merged
        }
        _ => commit,
    }
}

pub(super) fn denied(reason: DenyReason, remaining: i64, amount: i64, decided_by: &str) -> ReserveOutcome {
    ReserveOutcome {
        granted: false,
        reservation_id: String::new(),
        remaining,
        reason,
        expires_at_ms: 0,
        replayed: false,
        amount,
        state: None,
        over_limit: false,
        decided_by: decided_by.to_string(),
        ticket: 0,
    }
}

fn stored_resolution(record: &HoldRecord) -> Result<Resolution, EngineError> {
    match record.status {
        HoldStatus::Committed => Ok(Resolution::Committed {
            amount: record.committed_amount.unwrap_or_default(),
            excess: record.excess,
            late: record.late,
        }),
        HoldStatus::Released => Ok(Resolution::Released),
        HoldStatus::Expired => Ok(Resolution::Expired),
        HoldStatus::Active => Err(EngineError::internal("invariant: an active hold is missing from memory")),
    }
}

fn replay_commit(
    reservation_id: &str,
    resolution: Resolution,
    held: i64,
    amount: i64,
    remaining: i64,
    ticket: u64,
) -> Result<CommitOutcome, EngineError> {
    match resolution {
        Resolution::Committed { amount: committed, excess, late } if committed == amount => Ok(CommitOutcome {
            charged: committed,
            remaining,
            over_reserved: committed > held,
            excess,
            replayed: true,
            hold_expired: late,
            over_limit: false,
            breaker_tripped: false,
            ticket,
        }),
        Resolution::Committed { amount: committed, .. } => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was already committed with {committed} units; a commit is final (a retry \
             must send the same amount)"
        ))),
        Resolution::Released => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was released, so it cannot be committed; reserve again before the call"
        ))),
        Resolution::Expired => unreachable!("an expired hold commits late instead of replaying"),
    }
}

fn replay_release(
    reservation_id: &str,
    resolution: Resolution,
    remaining: i64,
    ticket: u64,
) -> Result<ReleaseOutcome, EngineError> {
    match resolution {
        Resolution::Released => {
            Ok(ReleaseOutcome { released: true, remaining, state: HoldState::Released, replayed: true, ticket })
        }
        Resolution::Expired => {
            Ok(ReleaseOutcome { released: false, remaining, state: HoldState::Expired, replayed: false, ticket })
        }
        Resolution::Committed { amount, .. } => Err(EngineError::precondition(format!(
            "reservation {reservation_id} was already committed with {amount} units; a committed reservation cannot \
             be released"
        ))),
    }
}
