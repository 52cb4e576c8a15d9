//! Rotation schedules: `rate(N minutes|hours|days)` and `cron(<five or six fields>)`, both in
//! UTC, and the window that spreads start times. Pure computation on Unix seconds, so it is
//! tested without a server.

use crate::errors::{Error, Result};
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

/// A parsed schedule.
#[derive(Debug)]
pub enum Schedule {
    /// Every this many seconds after the last rotation.
    Rate(i64),
    Cron(Box<Cron>),
}

/// Cron occurrences examined to find a schedule's shortest gap.
const CRON_GAPS_CHECKED: usize = 50;
/// Longest rotation window accepted.
pub const MAX_WINDOW_SECONDS: i64 = 24 * 3600;

fn invalid(schedule: &str, why: &str) -> Error {
    Error::InvalidParameter(format!(
        "schedule \"{schedule}\" is not valid: {why}; use rate(N minutes|hours|days) or cron(...)"
    ))
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule> {
        let trimmed = text.trim();
        let inner = |prefix: &str| {
            trimmed
                .strip_prefix(prefix)
                .and_then(|rest| rest.strip_suffix(')'))
                .map(str::trim)
        };
        if let Some(rate) = inner("rate(") {
            let (count, unit) = rate
                .split_once(char::is_whitespace)
                .ok_or_else(|| invalid(text, "a rate needs a number and a unit"))?;
            let count: i64 = count
                .parse()
                .ok()
                .filter(|count| (1..=100_000).contains(count))
                .ok_or_else(|| invalid(text, "the number must be between 1 and 100000"))?;
            let unit_seconds = match unit.trim() {
                "minute" | "minutes" => 60,
                "hour" | "hours" => 3600,
                "day" | "days" => 86_400,
                _ => return Err(invalid(text, "the unit must be minutes, hours or days")),
            };
            return Ok(Schedule::Rate(count * unit_seconds));
        }
        if let Some(expression) = inner("cron(") {
            // Five fields, as the README says: croner's default also takes seconds and a year,
            // and with a year a schedule fires a few times and then never again.
            let cron = CronParser::builder()
                .seconds(Seconds::Disallowed)
                .year(Year::Disallowed)
                .build()
                .parse(expression)
                .map_err(|error| invalid(text, &format!("{error}")))?;
            return Ok(Schedule::Cron(Box::new(cron)));
        }
        Err(invalid(text, "unknown form"))
    }

    /// The shortest time between two rotations this schedule asks for.
    pub fn shortest_interval(&self, now: i64) -> Result<i64> {
        match self {
            Schedule::Rate(seconds) => Ok(*seconds),
            Schedule::Cron(cron) => {
                let mut times = cron.iter_after(utc(now)?).take(CRON_GAPS_CHECKED);
                let mut previous = times
                    .next()
                    .ok_or_else(|| Error::InvalidParameter("cron schedule never fires".into()))?;
                let mut shortest = i64::MAX;
                for time in times {
                    shortest = shortest.min((time - previous).num_seconds());
                    previous = time;
                }
                Ok(shortest)
            }
        }
    }

    /// When the next rotation is due: `rate` counts from the last rotation (or from now),
    /// `cron` is the next occurrence after now. `offset` (from the window) is added.
    pub fn next_after(&self, now: i64, last_rotated: Option<i64>, offset: i64) -> Result<i64> {
        let due = match self {
            Schedule::Rate(seconds) => last_rotated.unwrap_or(now).max(now - seconds) + seconds,
            Schedule::Cron(cron) => cron
                .find_next_occurrence(&utc(now)?, false)
                .map_err(|error| Error::InvalidParameter(format!("cron schedule: {error}")))?
                .timestamp(),
        };
        Ok(due + offset)
    }
}

fn utc(seconds: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp(seconds, 0)
        .ok_or_else(|| Error::InvalidParameter("time out of range".into()))
}

/// The default window: a quarter of the schedule's interval, at most an hour.
pub fn default_window(shortest_interval: i64) -> i64 {
    (shortest_interval / 4).min(3600)
}

/// Where in the window this secret starts: fixed per secret (derived from its id), so a
/// thousand secrets on one schedule start spread over the window instead of in one second.
pub fn window_offset(secret_id: &[u8; 16], window_seconds: i64) -> i64 {
    if window_seconds <= 0 {
        return 0;
    }
    let spread = u64::from_le_bytes(secret_id[..8].try_into().expect("16 bytes"));
    (spread % window_seconds as u64) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: i64 = 1_700_000_000 - 1_700_000_000 % 86_400 + 12 * 3600;

    #[test]
    fn rates() {
        let schedule = Schedule::parse("rate(30 days)").unwrap();
        assert_eq!(schedule.shortest_interval(NOON).unwrap(), 30 * 86_400);
        assert_eq!(
            schedule.next_after(NOON, Some(NOON - 86_400), 0).unwrap(),
            NOON + 29 * 86_400
        );
        // Never rotated: one interval from now. Long overdue: now plus one interval at most.
        assert_eq!(
            schedule.next_after(NOON, None, 5).unwrap(),
            NOON + 30 * 86_400 + 5
        );
        assert_eq!(
            Schedule::parse(" rate(1 minute) ")
                .unwrap()
                .next_after(NOON, Some(0), 0)
                .unwrap(),
            NOON
        );
        assert_eq!(
            Schedule::parse("rate(2 hours)")
                .unwrap()
                .shortest_interval(0)
                .unwrap(),
            7200
        );
    }

    #[test]
    fn crons() {
        let schedule = Schedule::parse("cron(0 3 * * *)").unwrap();
        assert_eq!(schedule.shortest_interval(NOON).unwrap(), 86_400);
        assert_eq!(
            schedule.next_after(NOON, None, 0).unwrap(),
            NOON + 15 * 3600
        );
        let every_five = Schedule::parse("cron(*/5 * * * *)").unwrap();
        assert_eq!(every_five.shortest_interval(NOON).unwrap(), 300);
    }

    #[test]
    fn refused_schedules_say_why() {
        for text in [
            "",
            "rate(0 days)",
            "rate(5 weeks)",
            "rate(days)",
            "rate(-1 days)",
            "rate(1000000 days)",
            "cron(not a cron)",
            "cron(61 * * * *)",
            "every day",
            "rate(1 day",
        ] {
            let error = Schedule::parse(text).expect_err(text);
            assert!(error.to_string().contains("is not valid"), "{error}");
        }
    }

    #[test]
    fn windows_spread_and_stay_inside() {
        let offsets: std::collections::HashSet<i64> = (0..1000u32)
            .map(|i| {
                let mut id = [0u8; 16];
                id[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_le_bytes());
                window_offset(&id, 3600)
            })
            .collect();
        assert!(offsets.iter().all(|offset| (0..3600).contains(offset)));
        assert!(
            offsets.len() > 500,
            "only {} distinct starts",
            offsets.len()
        );
        assert_eq!(window_offset(&[7; 16], 0), 0);
        assert_eq!(default_window(86_400 * 30), 3600);
        assert_eq!(default_window(60), 15);
    }
}
