// SPDX-License-Identifier: Apache-2.0 OR MIT
//! Civil calendar arithmetic (proleptic Gregorian, UTC) for the RTC, without dependencies.
//!
//! The day-count conversions are Howard Hinnant's public-domain `days_from_civil` /
//! `civil_from_days` algorithms.

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DateTime {
    pub(crate) year: i64,
    pub(crate) month: u8,
    pub(crate) day: u8,
    pub(crate) hour: u8,
    pub(crate) minute: u8,
    pub(crate) second: u8,
    /// 1 = Sunday .. 7 = Saturday (the RTC's convention).
    pub(crate) weekday: u8,
}

/// Days since 1970-01-01 of year/month/day (month 1..=12, day 1..=31).
pub(crate) fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Year, month, day of a day count since 1970-01-01.
pub(crate) fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both are small by construction (1..=31 and 1..=12).
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days in `month` of `year`.
pub(crate) fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl DateTime {
    /// The time `secs` seconds after the Unix epoch.
    pub(crate) fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        // 1970-01-01 was a Thursday (weekday 5 with Sunday = 1).
        let weekday = ((days + 4).rem_euclid(7) + 1) as u8;
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday,
        }
    }

    /// Seconds since the Unix epoch, or `None` when a field is out of range.
    pub(crate) fn to_unix(self) -> Option<i64> {
        if !(1..=12).contains(&self.month)
            || self.day == 0
            || self.day > days_in_month(self.year, self.month)
            || self.hour > 23
            || self.minute > 59
            || self.second > 59
        {
            return None;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        Some(
            days * 86_400
                + i64::from(self.hour) * 3600
                + i64::from(self.minute) * 60
                + i64::from(self.second),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        let t = DateTime::from_unix(0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (1970, 1, 1, 5));
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        let t = DateTime::from_unix(951_827_696);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2000, 2, 29, 12, 34, 56, 3)
        );
        // 2038-01-19 03:14:08 UTC, a Tuesday.
        let t = DateTime::from_unix(1 << 31);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (2038, 1, 19, 3, 3)
        );
    }

    #[test]
    fn round_trips_over_four_centuries() {
        let mut secs = -2_208_988_800i64; // 1900-01-01
        while secs < 10_413_792_000 {
            // 2300-01-01
            let t = DateTime::from_unix(secs);
            assert_eq!(t.to_unix(), Some(secs), "{t:?}");
            secs += 86_400 * 7 + 3_601;
        }
    }

    #[test]
    fn invalid_fields_are_rejected() {
        let ok = DateTime::from_unix(0);
        for bad in [
            DateTime { month: 13, ..ok },
            DateTime { month: 0, ..ok },
            DateTime { day: 0, ..ok },
            DateTime {
                month: 2,
                day: 29,
                year: 2023,
                ..ok
            },
            DateTime { hour: 24, ..ok },
            DateTime { minute: 60, ..ok },
            DateTime { second: 60, ..ok },
        ] {
            assert_eq!(bad.to_unix(), None, "{bad:?}");
        }
        assert!(DateTime {
            month: 2,
            day: 29,
            year: 2024,
            ..ok
        }
        .to_unix()
        .is_some());
    }
}
