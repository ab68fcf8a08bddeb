//! Calendar dates from Unix days, shared by both programs (the agent's drift report times,
//! the collector's file-sink day names and its page's UTC times), so there is one copy.

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar, counting
/// in 400-year eras that start on 1 March (so the leap day ends a year). Saturating: a
/// hostile timestamp gives a nonsense date, never an overflow.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe.saturating_add(era.saturating_mul(400)) + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn known_days_and_extremes() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(20_512), (2026, 2, 28));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        civil_from_days(i64::MAX);
        civil_from_days(i64::MIN);
    }
}
