//! Usage views: what each period's spend was made of, kept by the writer beside the ledger (see UsageRecord), and the
//! bounds on what a call may label itself with.

use crate::error::EngineError;
use crate::hold::truncate_for_message;
use crate::records::{Dimensions, UsageDetail, UsageRecord};

/// Labels one call may carry, and their sizes in UTF-8 bytes.
pub const MAX_DIMENSIONS: usize = 16;
pub const MAX_DIMENSION_KEY_BYTES: usize = 64;
pub const MAX_DIMENSION_VALUE_BYTES: usize = 128;
/// Distinct values of one dimension, and distinct models, tracked per period; the rest are summed under OTHER_VALUE,
/// so that a dimension fed with request ids cannot grow a usage record without bound.
pub const MAX_TRACKED_VALUES: usize = 1_000;
pub const MAX_TRACKED_MODELS: usize = 256;
pub const OTHER_VALUE: &str = "(other)";
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
        if value.len() > MAX_DIMENSION_VALUE_BYTES || value.contains('\0') {
            return Err(EngineError::invalid(format!(
                "dimension {key:?} has a value of {} bytes; give at most {MAX_DIMENSION_VALUE_BYTES} bytes without NUL",
                value.len()
            )));
        }
    }
    Ok(())
}

fn check_label(what: &str, text: &str, max_bytes: usize) -> Result<(), EngineError> {
    if text.is_empty() || text.len() > max_bytes || text.contains('\0') {
        return Err(EngineError::invalid(format!(
            "{what} {:?} must be 1..={max_bytes} bytes without NUL",
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
            let tracked = self.models.len() < MAX_TRACKED_MODELS || self.models.contains_key(&detail.model);
            let model = if tracked { detail.model.as_str() } else { OTHER_VALUE };
            let types = self.models.entry(model.to_string()).or_default();
            for part in &detail.parts {
                let totals = types.entry(part.token_type.clone()).or_default();
                totals.tokens = totals.tokens.saturating_add(part.tokens);
                totals.units = totals.units.saturating_add(part.units);
            }
        }
        for (key, value) in dimensions {
            let values = self.dimensions.entry(key.clone()).or_default();
            let tracked = values.len() < MAX_TRACKED_VALUES || values.contains_key(value);
            let value = if tracked { value.as_str() } else { OTHER_VALUE };
            *values.entry(value.to_string()).or_default() += amount;
        }
        debug_assert_eq!(self.days.values().sum::<i64>(), self.units);
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
