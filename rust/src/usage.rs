//! Usage views: what each period's spend was made of, kept by the writer beside the ledger (see UsageRecord), and the
//! bounds on what a call may label itself with.

use crate::error::EngineError;
use crate::hold::truncate_for_message;
use std::collections::BTreeMap;

use crate::records::{Dimensions, UsageDetail, UsageRecord};

/// Labels one call may carry, and their sizes in UTF-8 bytes.
pub const MAX_DIMENSIONS: usize = 16;
pub const MAX_DIMENSION_KEY_BYTES: usize = 64;
pub const MAX_DIMENSION_VALUE_BYTES: usize = 128;
/// What one period's usage record tracks by name; the rest is summed under OTHER_VALUE, so that labels fed with
/// request ids cannot grow a record that every batch rewrites whole. Values of one dimension key, distinct
/// (key, value) pairs of all keys, dimension keys (keys past it count as (OTHER_VALUE, OTHER_VALUE)), models, and
/// token types of one model. With the label sizes below these keep a record under MAX_USAGE_RECORD_BYTES.
pub const MAX_TRACKED_VALUES: usize = 64;
pub const MAX_TRACKED_DIMENSION_PAIRS: usize = 256;
pub const MAX_TRACKED_DIMENSION_KEYS: usize = 32;
pub const MAX_TRACKED_MODELS: usize = 32;
pub const MAX_TRACKED_TOKEN_TYPES: usize = 8;
pub const OTHER_VALUE: &str = "(other)";
/// The most a usage record takes as stored (JSON), whatever clients send; a test builds the worst case.
pub const MAX_USAGE_RECORD_BYTES: usize = 128 * 1024;
pub const MAX_MODEL_BYTES: usize = 128;
pub const MAX_TOKEN_TYPE_BYTES: usize = 32;
/// Priced parts of one call (input, cached input, cache write, output, reasoning, and room for more).
pub const MAX_USAGE_PARTS: usize = 8;
/// The dimension under which an org's usage names the member that spent it.
pub const MEMBER_DIMENSION: &str = "member";

pub fn validate_dimensions(dimensions: &Dimensions) -> Result<(), EngineError> {
    if dimensions.len() > MAX_DIMENSIONS {
        return Err(EngineError::invalid(format!(
            "{} dimensions given; a call may carry at most {MAX_DIMENSIONS} (MAX_DIMENSIONS)",
            dimensions.len()
        )));
    }
    for (key, value) in dimensions {
        check_label("dimension key", key, MAX_DIMENSION_KEY_BYTES)?;
        if value.len() > MAX_DIMENSION_VALUE_BYTES || value.chars().any(char::is_control) {
            return Err(EngineError::invalid(format!(
                "dimension {key:?} has a value of {} bytes; give at most {MAX_DIMENSION_VALUE_BYTES} bytes without \
                 control characters",
                value.len()
            )));
        }
    }
    Ok(())
}

fn check_label(what: &str, text: &str, max_bytes: usize) -> Result<(), EngineError> {
    if text.is_empty() || text.len() > max_bytes || text.chars().any(char::is_control) {
        return Err(EngineError::invalid(format!(
            "{what} {:?} must be 1..={max_bytes} bytes without control characters",
            truncate_for_message(text)
        )));
    }
    Ok(())
}

/// A usage detail must add up: its parts' units sum to the committed amount, and every count is in range.
pub fn validate_usage(detail: &UsageDetail, amount: i64) -> Result<(), EngineError> {
    check_label("model", &detail.model, MAX_MODEL_BYTES)?;
    if detail.parts.len() > MAX_USAGE_PARTS {
        return Err(EngineError::invalid(format!(
            "{} usage parts given; at most {MAX_USAGE_PARTS}",
            detail.parts.len()
        )));
    }
    let mut units_sum: i64 = 0;
    for part in &detail.parts {
        check_label("token type", &part.token_type, MAX_TOKEN_TYPE_BYTES)?;
        if part.tokens < 0 || part.units < 0 || part.units > crate::limits::MAX_AMOUNT_UNITS {
            return Err(EngineError::invalid(format!(
                "usage part {:?} has tokens {} and units {}; both must be >= 0 and units <= 2^53",
                part.token_type, part.tokens, part.units
            )));
        }
        units_sum = units_sum.saturating_add(part.units);
    }
    if units_sum != amount {
        return Err(EngineError::invalid(format!(
            "the usage parts cost {units_sum} units but the commit is for {amount}; they must add up"
        )));
    }
    Ok(())
}

impl UsageRecord {
    /// Count one committed call.
    pub fn add(&mut self, ts_ms: i64, amount: i64, usage: Option<&UsageDetail>, dimensions: &Dimensions) {
        self.units = self.units.saturating_add(amount);
        self.commits += 1;
        let day = ts_ms.div_euclid(crate::period::DAY_MS);
        *self.days.entry(day).or_default() += amount;
        if let Some(detail) = usage {
            self.add_model(detail);
        }
        for (key, value) in dimensions {
            self.add_dimension(key, value, amount);
        }
        debug_assert_eq!(self.days.values().sum::<i64>(), self.units);
    }

    fn add_model(&mut self, detail: &UsageDetail) {
        let tracked = self.models.len() < MAX_TRACKED_MODELS || self.models.contains_key(&detail.model);
        let model = if tracked { detail.model.as_str() } else { OTHER_VALUE };
        let types = self.models.entry(model.to_string()).or_default();
        for part in &detail.parts {
            let tracked = types.len() < MAX_TRACKED_TOKEN_TYPES || types.contains_key(&part.token_type);
            let token_type = if tracked { part.token_type.as_str() } else { OTHER_VALUE };
            let totals = types.entry(token_type.to_string()).or_default();
            totals.tokens = totals.tokens.saturating_add(part.tokens);
            totals.units = totals.units.saturating_add(part.units);
        }
    }

    /// Count `amount` under (key, value), or under OTHER_VALUE once the key, the record or the key count is full.
    fn add_dimension(&mut self, key: &str, value: &str, amount: i64) {
        let key_tracked = self.dimensions.len() < MAX_TRACKED_DIMENSION_KEYS || self.dimensions.contains_key(key);
        let key = if key_tracked { key } else { OTHER_VALUE };
        let pairs: usize = self.dimensions.values().map(BTreeMap::len).sum();
        let values = self.dimensions.entry(key.to_string()).or_default();
        let room = values.len() < MAX_TRACKED_VALUES && pairs < MAX_TRACKED_DIMENSION_PAIRS;
        let value = if key_tracked && (room || values.contains_key(value)) { value } else { OTHER_VALUE };
        *values.entry(value.to_string()).or_default() += amount;
    }

    /// The dimension keys whose values are no longer all tracked by name in this period.
    pub fn folded_dimension_keys(&self) -> impl Iterator<Item = &str> {
        self.dimensions.iter().filter(|(_, values)| values.contains_key(OTHER_VALUE)).map(|(key, _)| key.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::UsagePart;

    fn detail(model: &str, parts: &[(&str, i64, i64)]) -> UsageDetail {
        UsageDetail {
            model: model.into(),
            parts: parts
                .iter()
                .map(|(token_type, tokens, units)| UsagePart {
                    token_type: (*token_type).into(),
                    tokens: *tokens,
                    units: *units,
                })
                .collect(),
            cache_hit: false,
            fallback: false,
        }
    }

    #[test]
    fn a_record_sums_days_models_and_dimensions() {
        let mut record = UsageRecord::default();
        let dims: Dimensions = [("feature".to_string(), "chat".to_string())].into();
        record.add(5, 30, Some(&detail("gpt", &[("input", 100, 10), ("output", 50, 20)])), &dims);
        record.add(crate::period::DAY_MS + 1, 7, None, &Dimensions::new());
        assert_eq!((record.units, record.commits), (37, 2));
        assert_eq!(record.days, [(0, 30), (1, 7)].into());
        assert_eq!(record.models["gpt"]["output"].tokens, 50);
        assert_eq!(record.dimensions["feature"]["chat"], 30);
    }

    #[test]
    fn values_past_the_tracking_bound_fold_into_other() {
        let mut record = UsageRecord::default();
        for n in 0..MAX_TRACKED_VALUES + 5 {
            let dims: Dimensions = [("request".to_string(), format!("r{n}"))].into();
            record.add(0, 1, None, &dims);
        }
        assert_eq!(record.dimensions["request"].len(), MAX_TRACKED_VALUES + 1);
        assert_eq!(record.dimensions["request"][OTHER_VALUE], 5);
        assert_eq!(record.folded_dimension_keys().collect::<Vec<_>>(), ["request"]);
        assert_eq!(record.dimensions["request"].values().sum::<i64>(), (MAX_TRACKED_VALUES + 5) as i64);
    }

    #[test]
    fn keys_and_pairs_past_their_bounds_fold_into_other() {
        let mut record = UsageRecord::default();
        for n in 0..MAX_TRACKED_DIMENSION_KEYS + 3 {
            for v in 0..MAX_TRACKED_VALUES {
                record.add(0, 1, None, &[(format!("k{n}"), format!("v{v}"))].into());
            }
        }
        let pairs: usize = record.dimensions.values().map(BTreeMap::len).sum();
        assert!(pairs <= MAX_TRACKED_DIMENSION_PAIRS + MAX_TRACKED_DIMENSION_KEYS + 1, "{pairs} pairs");
        assert_eq!(record.dimensions.len(), MAX_TRACKED_DIMENSION_KEYS + 1);
        assert_eq!(record.dimensions[OTHER_VALUE].len(), 1);
        let total: i64 = record.dimensions.values().flat_map(BTreeMap::values).sum();
        assert_eq!(total, record.units);
    }

    #[test]
    fn the_worst_record_a_client_can_cause_fits_its_stated_bound() {
        // The widest labels, made of the character JSON escapes, fresh on every call, over the longest period.
        let mut record = UsageRecord { customer_id: "c".repeat(crate::limits::MAX_ID_BYTES), ..Default::default() };
        let label = |n: usize, bytes: usize| format!("{n}{}", "\"".repeat(bytes - n.to_string().len()));
        let days = crate::period::MAX_PERIOD_MS / crate::period::DAY_MS + 1;
        for n in 0..4_000_usize {
            let dims: Dimensions = (0..MAX_DIMENSIONS)
                .map(|k| (label(n * MAX_DIMENSIONS + k, MAX_DIMENSION_KEY_BYTES), label(n, MAX_DIMENSION_VALUE_BYTES)))
                .collect();
            let parts = (0..MAX_USAGE_PARTS)
                .map(|p| crate::records::UsagePart {
                    token_type: label(n * MAX_USAGE_PARTS + p, MAX_TOKEN_TYPE_BYTES),
                    tokens: i64::MAX,
                    units: -1,
                })
                .collect();
            let usage = UsageDetail { model: label(n, MAX_MODEL_BYTES), parts, cache_hit: false, fallback: false };
            let day = (n as i64 % days) * crate::period::DAY_MS;
            record.add(day, -1, Some(&usage), &dims);
        }
        // The longest numbers JSON can hold.
        record.units = i64::MIN;
        record.commits = u64::MAX;
        record.days.values_mut().for_each(|units| *units = i64::MIN);
        for totals in record.models.values_mut().flat_map(BTreeMap::values_mut) {
            (totals.tokens, totals.units) = (i64::MIN, i64::MIN);
        }
        record.dimensions.values_mut().flat_map(BTreeMap::values_mut).for_each(|units| *units = i64::MIN);
        let bytes = serde_json::to_vec(&record).unwrap().len();
        assert!(bytes <= MAX_USAGE_RECORD_BYTES, "a usage record took {bytes} bytes");
    }

    #[test]
    fn usage_that_does_not_add_up_is_invalid() {
        let good = detail("gpt", &[("input", 1, 2), ("output", 1, 3)]);
        assert!(validate_usage(&good, 5).is_ok());
        assert!(validate_usage(&good, 6).is_err());
        assert!(validate_usage(&detail("", &[]), 0).is_err());
        assert!(validate_usage(&detail("gpt", &[("input", -1, 0)]), 0).is_err());
    }

    #[test]
    fn dimensions_are_bounded() {
        let too_many: Dimensions = (0..=MAX_DIMENSIONS).map(|n| (format!("k{n}"), "v".to_string())).collect();
        assert!(validate_dimensions(&too_many).is_err());
        let long_value: Dimensions = [("k".to_string(), "v".repeat(MAX_DIMENSION_VALUE_BYTES + 1))].into();
        assert!(validate_dimensions(&long_value).is_err());
        let empty_key: Dimensions = [(String::new(), "v".to_string())].into();
        assert!(validate_dimensions(&empty_key).is_err());
    }
}
