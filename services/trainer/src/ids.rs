//! Run and checkpoint ids. Every id that arrives in a request becomes part of a path under
//! `--root`, so each is checked against a strict charset before it touches the file system.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use synopsis_common::quote;

use crate::error::{Result, TrainerError};

/// Longest id component accepted (run ids are 24 characters; names are short too).
const MAX_COMPONENT_LEN: usize = 128;

/// A new run id, `run-YYYYMMDD-HHMMSS-<4 hex>` in UTC: sortable by creation time, and the
/// random suffix keeps two runs started in the same second apart.
pub fn new_run_id() -> String {
    let now = unix_seconds();
    let (y, mo, d, h, mi, s) = civil_from_unix(now);
    let suffix: u16 = rand::rng().random();
    format!("run-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}-{suffix:04x}")
}

/// Checks one path component: `[A-Za-z0-9._-]`, not starting with `.` (so never `..`, nor a
/// hidden temp directory), non-empty and short. Anything else could escape `--root`.
pub fn validate_component(field: &'static str, value: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= MAX_COMPONENT_LEN
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(TrainerError::invalid(
            field,
            format!(
                "{} is not a valid id (letters, digits, '.', '_', '-'; not starting with '.')",
                quote(value)
            ),
        ))
    }
}

/// A run id from a request.
pub fn validate_run_id(field: &'static str, value: &str) -> Result<()> {
    validate_component(field, value)
}

/// A checkpoint id `<run_id>/<name>` from a request, split into its two checked parts.
pub fn split_checkpoint_id<'a>(field: &'static str, value: &'a str) -> Result<(&'a str, &'a str)> {
    let Some((run, name)) = value.split_once('/') else {
        return Err(TrainerError::invalid(
            field,
            format!(
                "{} is not a checkpoint id (expected <run_id>/<name>)",
                quote(value)
            ),
        ));
    };
    validate_component(field, run)?;
    validate_component(field, name)?;
    Ok((run, name))
}

/// Name of a checkpoint directory: sorts by epoch then step.
pub fn checkpoint_name(epoch: u32, step: u64) -> String {
    format!("epoch-{epoch:04}-step-{step:06}")
}

pub fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn unix_seconds_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// (year, month, day, hour, minute, second) in UTC of a Unix time, by Howard Hinnant's
/// days-to-civil algorithm (no date crate needed for one format string).
fn civil_from_unix(t: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (secs / 3_600) as u32,
        (secs % 3_600 / 60) as u32,
        (secs % 60) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_match_known_instants() {
        assert_eq!(civil_from_unix(0), (1970, 1, 1, 0, 0, 0));
        // 2026-11-29T09:14:07Z
        assert_eq!(civil_from_unix(1_795_943_647), (2026, 11, 29, 9, 14, 7));
        // 2000-02-29T23:59:59Z (leap day of a century leap year)
        assert_eq!(civil_from_unix(951_868_799), (2000, 2, 29, 23, 59, 59));
    }

    #[test]
    fn run_ids_have_the_documented_shape_and_validate() {
        let id = new_run_id();
        let re = regex::Regex::new(r"^run-\d{8}-\d{6}-[0-9a-f]{4}$").unwrap();
        assert!(re.is_match(&id), "{id}");
        validate_run_id("run_id", &id).unwrap();
    }

    #[test]
    fn ids_that_could_escape_the_root_are_refused() {
        for bad in ["", "..", ".", "a/b", "../x", "x\0y", ".tmp-1", "a b", "ä"] {
            assert!(validate_run_id("run_id", bad).is_err(), "{bad:?}");
        }
        assert!(split_checkpoint_id("id", "run-1/../../etc").is_err());
        assert!(split_checkpoint_id("id", "run-1").is_err());
        assert!(split_checkpoint_id("id", "/etc/passwd").is_err());
        assert_eq!(
            split_checkpoint_id("id", "run-1/epoch-0001-step-000010").unwrap(),
            ("run-1", "epoch-0001-step-000010")
        );
    }
}
