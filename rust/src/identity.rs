//! Who issued an id: every data dir has a random 64-bit instance id, made with it and renewed by every restore, and
//! every id that leaves the sidecar carries it (reservation ids, and through them Stripe identifiers and alert ids).
//!
//! Why: hold ids come from a per-data-dir counter. Without the instance id two sidecars, a recreated data dir or a
//! restored backup issue the same ids again, Stripe drops the second event as a duplicate, and a reservation id held
//! from before a restore would commit onto someone else's new hold.

use std::io::Read;

use crate::error::{EngineError, ErrorKind};
use crate::hold::truncate_for_message;
use crate::limits::{LEGACY_RESERVATION_ID_LEN, RESERVATION_ID_LEN, RESERVATION_ID_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Random, never 0, in every reservation id this data dir issues.
    pub instance_id: u64,
    /// Holds below this id were issued before the data dir had an instance id (an upgraded data dir): their old,
    /// shorter reservation ids are still accepted. 0 on a new or restored data dir.
    pub legacy_holds_below: u64,
}

impl Identity {
    pub fn reservation_id(&self, hold_id: u64) -> String {
        format!("{RESERVATION_ID_PREFIX}{:016x}{hold_id:016x}", self.instance_id)
    }

    /// The reservation id of a ledger entry or hold record, as it was issued (old holds keep their legacy id).
    pub fn issued_reservation_id(&self, hold_id: u64) -> String {
        if hold_id < self.legacy_holds_below {
            format!("{RESERVATION_ID_PREFIX}{hold_id:016x}")
        } else {
            self.reservation_id(hold_id)
        }
    }

    /// The hold id of a reservation id this data dir issued. A well-formed id from another instance (another sidecar,
    /// or this data dir before a restore) is NOT_FOUND, never someone else's hold.
    pub fn parse(&self, reservation_id: &str) -> Result<u64, EngineError> {
        let digits = reservation_id.strip_prefix(RESERVATION_ID_PREFIX).filter(|d| is_lower_hex(d));
        match (digits, reservation_id.len()) {
            (Some(digits), RESERVATION_ID_LEN) => {
                let instance_id = hex_u64(&digits[..16]);
                let hold_id = hex_u64(&digits[16..]);
                if instance_id != self.instance_id {
                    return Err(self.foreign(reservation_id, instance_id));
                }
                Ok(hold_id)
            }
            (Some(digits), LEGACY_RESERVATION_ID_LEN) => {
                let hold_id = hex_u64(digits);
                if hold_id >= self.legacy_holds_below {
                    return Err(EngineError::new(
                        ErrorKind::NotFound,
                        format!(
                            "reservation_id {reservation_id:?} has the old form without an instance id and was not \
                             issued by this data dir (instance {:016x}; a restored data dir refuses every id from \
                             before the restore): reserve again",
                            self.instance_id
                        ),
                    ));
                }
                Ok(hold_id)
            }
            _ => Err(EngineError::invalid(format!(
                "reservation_id {:?} is malformed: pass the reservation_id that Reserve returned (rsv_ and 32 hex \
                 digits)",
                truncate_for_message(reservation_id)
            ))),
        }
    }

    fn foreign(&self, reservation_id: &str, instance_id: u64) -> EngineError {
        EngineError::new(
            ErrorKind::NotFound,
            format!(
                "reservation_id {reservation_id:?} was issued by spendgate instance {instance_id:016x}, not by this one \
                 ({:016x}): commit or release a hold on the sidecar that granted it; after a restore (which gives \
                 the data dir a new instance id) holds from before it are gone, so reserve again",
                self.instance_id
            ),
        )
    }
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn hex_u64(digits: &str) -> u64 {
    debug_assert!(digits.len() == 16 && is_lower_hex(digits));
    u64::from_str_radix(digits, 16).expect("16 lowercase hex digits")
}

/// A fresh instance id from the kernel's random source (never 0, so 0 can mean "none yet").
pub fn random_instance_id() -> Result<u64, EngineError> {
    let mut bytes = [0u8; 8];
    loop {
        std::fs::File::open("/dev/urandom")
            .and_then(|mut source| source.read_exact(&mut bytes))
            .map_err(|err| EngineError::internal(format!("cannot read /dev/urandom for an instance id: {err}")))?;
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Identity = Identity { instance_id: 0x0123_4567_89ab_cdef, legacy_holds_below: 10 };

    #[test]
    fn reservation_ids_round_trip() {
        for hold_id in [0u64, 1, 0xdead_beef, u64::MAX] {
            let id = ME.reservation_id(hold_id);
            assert_eq!(id.len(), RESERVATION_ID_LEN);
            assert_eq!(ME.parse(&id).unwrap(), hold_id);
        }
    }

    #[test]
    fn another_instances_id_is_not_found_and_says_why() {
        let other = Identity { instance_id: 42, legacy_holds_below: 0 };
        let err = ME.parse(&other.reservation_id(1)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.message.contains("000000000000002a"), "{}", err.message);
    }

    #[test]
    fn legacy_ids_are_accepted_only_below_the_upgrade_mark() {
        assert_eq!(ME.parse("rsv_0000000000000009").unwrap(), 9);
        assert_eq!(ME.issued_reservation_id(9), "rsv_0000000000000009");
        assert_eq!(ME.parse("rsv_000000000000000a").unwrap_err().kind, ErrorKind::NotFound);
        let restored = Identity { legacy_holds_below: 0, ..ME };
        assert_eq!(restored.parse("rsv_0000000000000001").unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn malformed_ids_are_invalid_argument() {
        for bad in [
            "",
            "rsv_",
            "rsv_123",
            "rsv_00000000000000zz",
            "xyz_0000000000000001",
            "rsv_0000000000000001x",
            "rsv_0123456789ABCDEF0000000000000001",
        ] {
            assert_eq!(ME.parse(bad).unwrap_err().kind, ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn random_ids_differ() {
        assert_ne!(random_instance_id().unwrap(), random_instance_id().unwrap());
    }
}
