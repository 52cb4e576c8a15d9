//! The rotation engine: rotation settings (`rotate_secret`, `cancel_rotate_secret`), the record
//! of each rotation in `secrets.rotation`, and running its steps.
//!
//! A rotation runs create -> set -> test -> finish. Each step commits its own progress, so a
//! crash resumes at the recorded step; steps are idempotent. The exception is a role of this
//! very cluster (`postgres-single-user` with no host): there all four steps run in one
//! transaction, so the password and CURRENT can never disagree.
//!
//! Locks: a step holds its rotation row; create and finish, which move labels, also take the
//! secret row, and give way (SKIP LOCKED) when a writer holds it, so a worker never deadlocks
//! with `put_secret_value`, which takes the secret row first.

use crate::access::{self, Action, HandedOn};
use crate::db::required;
use crate::errors::{Error, Result};
use crate::labels::{self, CURRENT};
use crate::rotators::{self, Rotator, Step, StepContext};
use crate::schedule::{self, Schedule};
use crate::settings;
use crate::store::{self, OnDeleted, SecretRow};
use crate::validate::Value;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, Uuid};
use zeroize::Zeroizing;

pub const PENDING: &str = "PENDING";
/// Failures after which each further failure also raises `pg_secrets_alarm`.
const ALARM_AFTER_FAILURES: i32 = 3;
/// Failures after which a rotation is given up; the schedule tries again next time.
const MAX_FAILURES: i32 = 8;
/// The retry delay doubles with each failure up to this.
const MAX_RETRY_DELAY_SECONDS: i64 = 3600;

fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() as i64)
        .unwrap_or(0)
}

/// What `rotate_secret` was asked to change and do.
pub struct Request<'a> {
    pub rotator: Option<&'a str>,
    pub schedule: Option<&'a str>,
    pub window_seconds: Option<i64>,
    pub immediately: bool,
    /// Pin a target other than the one pinned before.
    pub new_target: bool,
}

/// A secret's rotation settings as stored.
struct Settings {
    rotator: Option<String>,
    schedule: Option<String>,
    window_seconds: Option<i64>,
    last_rotated: Option<i64>,
}

fn load_settings(client: &SpiClient<'_>, secret_id: Uuid) -> Result<Settings> {
    let row = crate::db::first_row(client.select(
        "SELECT rotator, rotation_schedule, \
                pg_catalog.date_part('epoch', rotation_window)::bigint, \
                pg_catalog.date_part('epoch', last_rotated_at)::bigint \
         FROM secrets.secret WHERE id = $1",
        Some(1),
        &[secret_id.into()],
    )?)
    .ok_or(Error::GoneById(secret_id))?;
    Ok(Settings {
        rotator: row.get(1)?,
        schedule: row.get(2)?,
        window_seconds: row.get(3)?,
        last_rotated: row.get(4)?,
    })
}

/// When a schedule next rotates a secret, window offset included.
fn next_rotation(
    secret: &SecretRow,
    schedule: &Schedule,
    window_seconds: Option<i64>,
    last_rotated: Option<i64>,
) -> Result<i64> {
    let now = now_seconds();
    let window = window_seconds
        .unwrap_or_else(|| schedule::default_window(schedule.shortest_interval(now).unwrap_or(0)));
    let offset = schedule::window_offset(secret.id.as_bytes(), window);
    schedule.next_after(now, last_rotated, offset)
}

/// `window_stored`: the window is the one the secret has, not one given with this call,
/// which the error then says.
fn check_schedule(
    text: &str,
    window_seconds: Option<i64>,
    window_stored: bool,
) -> Result<Schedule> {
    let schedule = Schedule::parse(text)?;
    let shortest = schedule.shortest_interval(now_seconds())?;
    let minimum = settings::min_rotation_interval();
    if shortest < minimum {
        return Err(Error::InvalidParameter(format!(
            "schedule \"{text}\" rotates every {shortest} s, more often than \
             pg_secrets.min_rotation_interval ({minimum} s) allows"
        )));
    }
    if let Some(window) = window_seconds {
        if !(0..=schedule::MAX_WINDOW_SECONDS).contains(&window) || window >= shortest {
            let stored = if window_stored {
                format!(
                    " (the secret's rotation_window of {window} s, set before: pass a shorter \
                     one with the schedule)"
                )
            } else {
                String::new()
            };
            return Err(Error::InvalidParameter(format!(
                "rotation_window must be between 0 and 24 hours and shorter than the \
                 schedule's interval ({shortest} s){stored}"
            )));
        }
    }
    Ok(schedule)
}

/// `rotate_secret`: stores what changed, re-enables a configured schedule, and with
/// `immediately` starts a rotation, returning its pending version. A concurrent call that
/// finds a rotation already started returns that rotation's version instead of a second one.
pub fn rotate_secret(name: &str, request: Request) -> Result<Option<Uuid>> {
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Rotate, OnDeleted::Refuse)?;
        let configures = request.rotator.is_some()
            || request.schedule.is_some()
            || request.window_seconds.is_some();
        let may_manage = || {
            access::decide(
                access::caller(),
                Action::Manage,
                name,
                Some(secret.subject()),
                access::Context::Session,
            )
        };
        if configures && !may_manage()?.allows() {
            return Err(Error::AccessDenied {
                name: name.to_string(),
                action: Action::Manage.as_str(),
            });
        }
        if configures {
            access::within_own_manage(name, Some(secret.subject()), HandedOn::Rotation)?;
        }
        let stored = load_settings(client, secret.id)?;
        let rotator = match request.rotator.or(stored.rotator.as_deref()) {
            Some(text) => Rotator::parse(text)?,
            None => {
                return Err(Error::InvalidParameter(format!(
                    "secret \"{name}\" has no rotator; pass rotator => 'postgres-single-user', \
                     'postgres-alternating-users' or 'command:<program>'"
                )))
            }
        };
        let schedule_text = request.schedule.or(stored.schedule.as_deref());
        if schedule_text.is_none() && request.window_seconds.is_some() {
            return Err(Error::InvalidParameter(
                "rotation_window spreads a schedule's start times; give a schedule with it".into(),
            ));
        }
        if request.new_target && request.rotator.is_none() {
            return Err(Error::InvalidParameter(
                "new_target moves the pin that naming the rotator sets; pass rotator with it"
                    .into(),
            ));
        }
        // Naming the rotator (re)pins the target: the caller vouches for what CURRENT names.
        let pin = match request.rotator {
            Some(_) => Some(pin_target(client, &secret, &rotator, request.new_target)?),
            None => None,
        };
        let window_seconds = request.window_seconds.or(stored.window_seconds);
        let schedule = schedule_text
            .map(|text| check_schedule(text, window_seconds, request.window_seconds.is_none()))
            .transpose()?;
        let last_rotated = if request.immediately {
            Some(now_seconds())
        } else {
            stored.last_rotated
        };
        let next_rotation_at = schedule
            .as_ref()
            .map(|schedule| next_rotation(&secret, schedule, window_seconds, last_rotated))
            .transpose()?;
        client.update(
            "UPDATE secrets.secret SET rotator = $2, rotation_schedule = $3, \
                    rotation_window = pg_catalog.make_interval(secs => $4), \
                    rotation_enabled = $3 IS NOT NULL, \
                    next_rotation_at = pg_catalog.to_timestamp($5), \
                    rotation_target_version_id = CASE WHEN $6 THEN $7 \
                                                      ELSE rotation_target_version_id END \
             WHERE id = $1",
            None,
            &[
                secret.id.into(),
                rotator.name().into(),
                schedule_text.into(),
                window_seconds.map(|seconds| seconds as f64).into(),
                next_rotation_at.map(|seconds| seconds as f64).into(),
                pin.is_some().into(),
                pin.flatten().into(),
            ],
        )?;
        if !request.immediately {
            return Ok(None);
        }
        if let Some(version) = concurrent_rotation(client, secret.id)? {
            return Ok(Some(version));
        }
        let mut run = start(client, &secret, &rotator.name())?;
        crate::audit::touched(secret.id, Some(run.pending_version), Some(PENDING));
        run_steps(client, &mut run)?;
        Ok(Some(run.pending_version))
    })
}

/// The version a database rotator's target is pinned to: CURRENT, once the caller has been
/// checked for the right to point a rotation at what it names. `None` for a command rotator,
/// which is checked too.
/// Moving the pin to another target takes `new_target`, so that re-configuring (by habit, or
/// on the advice of a failing step's message) never adopts what a writer put without meaning
/// to.
fn pin_target(
    client: &SpiClient<'_>,
    secret: &SecretRow,
    rotator: &Rotator,
    new_target: bool,
) -> Result<Option<Uuid>> {
    let current = match rotator.acts_on_named_target() {
        true => labels::holder(client, secret.id, CURRENT)?,
        false => None,
    };
    let value = current
        .map(|version| store::version_value(client, secret, version))
        .transpose()?;
    let pinned = match new_target {
        true => None,
        false => pinned_target(client, secret, rotator)?,
    };
    rotators::check_configuration(
        rotator,
        &secret.name,
        value.as_ref().map(|value| value.as_slice()),
        pinned
            .as_ref()
            .map(|(version, value)| (*version, value.as_slice())),
        access::caller(),
    )?;
    Ok(current)
}

/// The pinned version of a database rotation and its value, read at each step.
fn pinned_target(
    client: &SpiClient<'_>,
    secret: &SecretRow,
    rotator: &Rotator,
) -> Result<Option<(Uuid, Zeroizing<Vec<u8>>)>> {
    if !rotator.acts_on_named_target() {
        return Ok(None);
    }
    let pinned: Option<Uuid> = crate::db::first_value(client.select(
        "SELECT rotation_target_version_id FROM secrets.secret WHERE id = $1",
        Some(1),
        &[secret.id.into()],
    )?)?;
    pinned
        .map(|version| Ok((version, store::version_value(client, secret, version)?)))
        .transpose()
}

/// A rotation of this secret that is running, or that finished while this statement waited
/// for the secret's lock: two concurrent requests make one rotation.
fn concurrent_rotation(client: &SpiClient<'_>, secret_id: Uuid) -> Result<Option<Uuid>> {
    crate::db::first_value(client.select(
        "SELECT pending_version_id FROM secrets.rotation \
         WHERE secret_id = $1 \
           AND (state = 'running' \
                OR (state = 'succeeded' AND finished_at >= pg_catalog.statement_timestamp())) \
         ORDER BY started_at DESC LIMIT 1",
        None,
        &[secret_id.into()],
    )?)
}

/// `cancel_rotate_secret`: turns the schedule off (settings are kept, so `rotate_secret` turns
/// it back on) and cancels a rotation still creating its value. One at `set` or later may have
/// changed the target, even with no attempt recorded (a crash during `set` rolls the record
/// back, not the target), so it is left to finish: stopping it would leave CURRENT with a
/// password the target no longer accepts.
pub fn cancel_rotate_secret(name: &str) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Manage, OnDeleted::Allow)?;
        client.update(
            "UPDATE secrets.secret SET rotation_enabled = false, next_rotation_at = NULL \
             WHERE id = $1",
            None,
            &[secret.id.into()],
        )?;
        client.update(
            "UPDATE secrets.rotation SET state = 'cancelled', \
                    finished_at = pg_catalog.clock_timestamp(), \
                    note = 'cancelled by ' || $2 \
             WHERE secret_id = $1 AND state = 'running' AND step = 'create'",
            None,
            // The caller, not current_user: inside the extension's functions that is the
            // extension's owner.
            &[secret.id.into(), caller_name().into()],
        )?;
        let still_running = !client
            .select(
                "SELECT FROM secrets.rotation WHERE secret_id = $1 AND state = 'running'",
                Some(1),
                &[secret.id.into()],
            )?
            .is_empty();
        if still_running {
            pgrx::notice!(
                "the rotation of secret \"{name}\" in progress may already have changed its \
                 target and will finish; the schedule is off. To stop it anyway, put the value \
                 the target accepts with put_secret_value"
            );
        }
        Ok(())
    })
}

/// Labels moved while a rotation runs (`put_secret_value`, `update_secret_version_stage`;
/// `did` says what, for the rotation's record). Moving `CURRENT` takes over: the rotation stops,
/// recorded as `abandoned`, and its version loses `PENDING`. Moving `PENDING` alone is refused:
/// it is the rotation's, whose steps go on by version id, so the label would name a value no
/// rotation sets. Other labels leave the rotation alone.
pub fn labels_moved_during_rotation(
    client: &mut SpiClient<'_>,
    secret_id: Uuid,
    secret_name: &str,
    labels: &[&str],
    did: &str,
) -> Result<()> {
    let Some((step, pending)) = client
        .select(
            "SELECT step, pending_version_id FROM secrets.rotation \
             WHERE secret_id = $1 AND state = 'running'",
            Some(1),
            &[secret_id.into()],
        )?
        .next()
        .map(|row| -> Result<_> { Ok((required::<String>(&row, 1)?, row.get::<Uuid>(2)?)) })
        .transpose()?
    else {
        return Ok(());
    };
    if labels.contains(&CURRENT) {
        client.update(
            "UPDATE secrets.rotation SET state = 'abandoned', \
                    finished_at = pg_catalog.clock_timestamp(), note = $2 \
             WHERE secret_id = $1 AND state = 'running'",
            None,
            &[
                secret_id.into(),
                format!("abandoned: {did} (by {})", caller_name()).into(),
            ],
        )?;
        if let Some(pending) = pending {
            take_pending_label(client, secret_id, pending)?;
        }
        return Ok(());
    }
    if labels.contains(&PENDING) {
        return Err(Error::PendingOfRotation {
            name: secret_name.to_string(),
            step,
        });
    }
    Ok(())
}

/// Takes `PENDING` off a rotation's version, if that version still holds it: once the
/// rotation has finished or been taken over, nothing is being rotated in, and whoever falls
/// back to `PENDING` at login (secrets-proxy) must not try a value no rotation will set.
fn take_pending_label(client: &mut SpiClient<'_>, secret_id: Uuid, pending: Uuid) -> Result<()> {
    if labels::holder(client, secret_id, PENDING)? == Some(pending) {
        labels::remove_label(client, secret_id, PENDING)?;
    }
    Ok(())
}

/// Who called the SQL function, for a rotation's notes.
fn caller_name() -> String {
    access::role_name(access::caller())
}

struct Run {
    id: Uuid,
    secret_id: Uuid,
    /// As stored; parsed at each step, so a rotator that became unusable (its program was
    /// removed) fails in the run, recorded and alarmed, instead of silently not rotating.
    rotator: String,
    step: Step,
    pending_version: Uuid,
}

fn start(client: &mut SpiClient<'_>, secret: &SecretRow, rotator: &str) -> Result<Run> {
    let run = Run {
        id: store::new_uuid(),
        secret_id: secret.id,
        rotator: rotator.to_string(),
        step: Step::Create,
        pending_version: store::new_uuid(),
    };
    client.update(
        "INSERT INTO secrets.rotation (id, secret_id, rotator, pending_version_id, step, state) \
         VALUES ($1, $2, $3, $4, 'create', 'running')",
        None,
        &[
            run.id.into(),
            run.secret_id.into(),
            rotator.into(),
            run.pending_version.into(),
        ],
    )?;
    Ok(run)
}

enum Progress {
    Advanced,
    Finished,
    /// A writer holds the secret; try again next round.
    Busy,
}

/// Runs steps: one, or all of them when the rotation is transactional.
fn run_steps(client: &mut SpiClient<'_>, run: &mut Run) -> Result<Progress> {
    loop {
        let secret = store::secret_by_id(client, run.secret_id)?;
        let current = store::labelled_value(client, &secret, CURRENT)?;
        let rotator = Rotator::parse(&run.rotator)?;
        let transactional =
            rotators::is_transactional(&rotator, current.as_ref().map(|v| v.as_slice()));
        match perform_step(client, run, &rotator, &secret, current)? {
            Progress::Advanced if transactional => continue,
            progress => return Ok(progress),
        }
    }
}

fn lock_secret(client: &mut SpiClient<'_>, secret_id: Uuid) -> Result<bool> {
    Ok(!client
        .update(
            "SELECT FROM secrets.secret WHERE id = $1 FOR UPDATE SKIP LOCKED",
            Some(1),
            &[secret_id.into()],
        )?
        .is_empty())
}

fn perform_step(
    client: &mut SpiClient<'_>,
    run: &mut Run,
    rotator: &Rotator,
    secret: &SecretRow,
    current: Option<Zeroizing<Vec<u8>>>,
) -> Result<Progress> {
    let pending = match run.step {
        Step::Create => None,
        _ => Some(store::version_value(client, secret, run.pending_version)?),
    };
    let pinned = pinned_target(client, secret, rotator)?;
    let context = StepContext {
        secret_name: &secret.name,
        owner: secret.owner,
        pending_version: Some(run.pending_version),
        current: current.as_ref().map(|value| value.as_slice()),
        pending: pending.as_ref().map(|value| value.as_slice()),
        pinned: pinned
            .as_ref()
            .map(|(version, value)| (*version, value.as_slice())),
    };
    rotators::check_target(rotator, run.step, &context)?;
    match run.step {
        Step::Create => {
            if !lock_secret(client, secret.id)? {
                return Ok(Progress::Busy);
            }
            let value = rotators::create(rotator, &context)?;
            let text = std::str::from_utf8(&value)
                .map_err(|_| context.failed(Step::Create, "the new value is not UTF-8 text"))?;
            store::insert_version(
                client,
                secret,
                &Value::String(text),
                None,
                run.pending_version,
            )?;
            labels::move_label(
                client,
                &secret.name,
                secret.id,
                PENDING,
                run.pending_version,
            )?;
        }
        Step::Set | Step::Test => rotators::act(rotator, run.step, &context)?,
        Step::Finish => {
            if !lock_secret(client, secret.id)? {
                return Ok(Progress::Busy);
            }
            labels::move_label(
                client,
                &secret.name,
                secret.id,
                CURRENT,
                run.pending_version,
            )?;
            take_pending_label(client, secret.id, run.pending_version)?;
            rotators::act(rotator, Step::Finish, &context)?;
            // The new version names the pinned target (checked above): the pin moves to it,
            // so older versions may be pruned.
            client.update(
                "UPDATE secrets.secret SET last_rotated_at = pg_catalog.now(), \
                        changed_at = pg_catalog.now(), \
                        rotation_target_version_id = CASE \
                            WHEN rotation_target_version_id IS NOT NULL THEN $2 END \
                 WHERE id = $1",
                None,
                &[secret.id.into(), run.pending_version.into()],
            )?;
            labels::prune_deprecated(client, Some(secret.id), "rotation")?;
            labels::notify_changed(client, "rotate", &secret.name, Some(run.pending_version))?;
        }
    }
    let next = run.step.next();
    client.update(
        "UPDATE secrets.rotation SET step = $2, \
                state = CASE WHEN $2 = 'done' THEN 'succeeded' ELSE state END, \
                finished_at = CASE WHEN $2 = 'done' THEN pg_catalog.clock_timestamp() END \
         WHERE id = $1",
        None,
        &[run.id.into(), next.map_or("done", Step::as_str).into()],
    )?;
    match next {
        Some(step) => {
            run.step = step;
            Ok(Progress::Advanced)
        }
        None => Ok(Progress::Finished),
    }
}

/// What the worker does with one rotation in one transaction.
pub enum Outcome {
    /// A step committed; run the next one.
    Progressed,
    /// Finished, failed, busy or claimed elsewhere: nothing more this round.
    Stopped,
}

/// The worker: starts rotations whose schedule is due. Returns how many started.
pub fn start_due_rotations() -> Result<usize> {
    Spi::connect_mut(|client| {
        let due: Vec<(Uuid, String)> = client
            .update(
                "SELECT s.id, s.rotator FROM secrets.secret s \
                 WHERE s.rotation_enabled AND s.next_rotation_at <= pg_catalog.now() \
                   AND s.purge_at IS NULL \
                   AND NOT EXISTS (SELECT FROM secrets.rotation r \
                                   WHERE r.secret_id = s.id AND r.state = 'running') \
                 ORDER BY s.next_rotation_at LIMIT 100 \
                 FOR UPDATE OF s SKIP LOCKED",
                None,
                &[],
            )?
            .map(|row| Ok((required(&row, 1)?, required(&row, 2)?)))
            .collect::<Result<_>>()?;
        // One secret's trouble must not hold up the others: its next time is moved on (or
        // cleared) before its rotation starts, and the start runs in a subtransaction.
        for (secret_id, rotator) in &due {
            let secret = store::secret_by_id(client, *secret_id)?;
            let stored = load_settings(client, *secret_id)?;
            let next = stored
                .schedule
                .as_deref()
                .map(|text| {
                    next_rotation(
                        &secret,
                        &Schedule::parse(text)?,
                        stored.window_seconds,
                        Some(now_seconds()),
                    )
                })
                .transpose()
                .unwrap_or_else(|error| {
                    crate::worker::warn(
                        &format!(
                            "secret \"{}\" has no next scheduled rotation; its schedule stops \
                             until rotate_secret sets it again",
                            secret.name
                        ),
                        error,
                    );
                    None
                });
            client.update(
                "UPDATE secrets.secret SET next_rotation_at = pg_catalog.to_timestamp($2) \
                 WHERE id = $1",
                None,
                &[
                    (*secret_id).into(),
                    next.map(|seconds| seconds as f64).into(),
                ],
            )?;
            if let Err(error) = crate::db::in_subtransaction(|| start(client, &secret, rotator)) {
                crate::worker::warn(
                    &format!(
                        "scheduled rotation of secret \"{}\" did not start",
                        secret.name
                    ),
                    error,
                );
            }
        }
        Ok(due.len())
    })
}

/// The worker: running rotations whose next attempt is due.
pub fn runnable() -> Result<Vec<Uuid>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT id FROM secrets.rotation \
                 WHERE state = 'running' AND next_attempt_at <= pg_catalog.now() \
                 ORDER BY next_attempt_at LIMIT 100",
                None,
                &[],
            )?
            .map(|row| required(&row, 1))
            .collect()
    })
}

/// The worker: one step (or all, if transactional) of rotation `id`, with failures recorded.
pub fn work_on(id: Uuid) -> Result<Outcome> {
    Spi::connect_mut(|client| {
        let claimed = client
            .update(
                "SELECT secret_id, rotator, step, pending_version_id FROM secrets.rotation \
                 WHERE id = $1 AND state = 'running' FOR UPDATE SKIP LOCKED",
                Some(1),
                &[id.into()],
            )?
            .next()
            .map(|row| -> Result<_> {
                Ok((
                    required::<Uuid>(&row, 1)?,
                    required::<String>(&row, 2)?,
                    required::<String>(&row, 3)?,
                    row.get::<Uuid>(4)?,
                ))
            })
            .transpose()?;
        let Some((secret_id, rotator, step, pending_version)) = claimed else {
            return Ok(Outcome::Stopped);
        };
        let attempt = crate::db::in_subtransaction(|| {
            let mut run = Run {
                id,
                secret_id,
                rotator,
                step: Step::parse(&step).expect("CHECK constraint"),
                pending_version: pending_version.expect("set at start"),
            };
            Spi::connect_mut(|client| run_steps(client, &mut run))
        });
        // The worker's own changes are audited like anyone's: a finished rotation (CURRENT
        // moved) and every failed step.
        let name = store::secret_by_id(client, secret_id)?.name;
        let audit = |outcome: &str, error: Option<&Error>| -> Result<()> {
            let mut details =
                serde_json::json!({"function": "worker", "rotation_id": id.to_string()});
            if let Some(error) = error {
                details["error"] = error.to_string().into();
            }
            crate::audit::record(
                "rotate",
                Some(&name),
                crate::audit::Touched {
                    secret_id: Some(secret_id),
                    version_id: pending_version,
                    version_stage: Some(CURRENT.to_string()).filter(|_| error.is_none()),
                    ..Default::default()
                },
                outcome,
                error.map(|error| error.sqlstate().1),
                details.to_string(),
            )
        };
        match attempt {
            Ok(Progress::Advanced) => Ok(Outcome::Progressed),
            Ok(Progress::Finished) => {
                audit("allowed", None)?;
                Ok(Outcome::Stopped)
            }
            Ok(Progress::Busy) => Ok(Outcome::Stopped),
            Err(error) => {
                record_failure(client, id, &error)?;
                audit("error", Some(&error))?;
                Ok(Outcome::Stopped)
            }
        }
    })
}

/// Counts a failure, schedules the retry with a doubling delay, and from
/// `ALARM_AFTER_FAILURES` on raises `pg_secrets_alarm`. It gives up after `MAX_FAILURES` only
/// while creating the new value: from `set` on the target may already accept only the new
/// password (an attempt whose answer was lost), and a rotation given up there would leave
/// CURRENT with one the target refuses. It goes on at the longest delay, alarming, until the
/// target answers or a `put_secret_value` settles it.
fn record_failure(client: &mut SpiClient<'_>, id: Uuid, error: &Error) -> Result<()> {
    let message = error.to_string();
    // The doubling stops at 2^30 (past any longest delay): a target down for weeks counts
    // over a thousand failures, and 2^1024 overflows float8, which would fail this update
    // and leave the rotation retried every round without a word.
    let row = client
        .update(
            "UPDATE secrets.rotation r SET attempts = r.attempts + 1, last_error = $2, \
                    next_attempt_at = pg_catalog.now() + pg_catalog.make_interval(secs => \
                        LEAST($3 * 2 ^ LEAST(r.attempts, 30), $4)), \
                    state = CASE WHEN r.attempts + 1 >= $5 AND r.step = 'create' \
                                 THEN 'failed' ELSE 'running' END, \
                    finished_at = CASE WHEN r.attempts + 1 >= $5 AND r.step = 'create' \
                                       THEN pg_catalog.clock_timestamp() END \
             FROM secrets.secret s WHERE r.id = $1 AND s.id = r.secret_id \
             RETURNING r.attempts, r.state, r.step, s.name",
            Some(1),
            &[
                id.into(),
                message.clone().into(),
                (settings::rotation_retry_delay() as f64).into(),
                (MAX_RETRY_DELAY_SECONDS as f64).into(),
                MAX_FAILURES.into(),
            ],
        )?
        .first();
    let attempts: i32 = row.get(1)?.unwrap_or(0);
    let state: String = row.get(2)?.unwrap_or_default();
    let name: String = row.get(4)?.unwrap_or_default();
    pgrx::warning!("pg_secrets: {message}");
    if attempts >= ALARM_AFTER_FAILURES {
        let details = serde_json::json!({
            "rotation_id": id.to_string(),
            "step": row.get::<String>(3)?,
            "failures": attempts,
            "gave_up": state == "failed",
            "error": message,
        });
        let event_id = crate::db::first_value::<i64>(client.update(
            "INSERT INTO secrets.alarm_event (rule_name, kind, secret_name, details) \
             VALUES ('rotation_failing', 'rotation', $1, $2) RETURNING id",
            None,
            &[name.into(), JsonB(details).into()],
        )?)?;
        crate::audit::alarms::notify_alarm(
            client,
            event_id,
            "rotation_failing",
            "rotation_failing",
        )?;
    }
    Ok(())
}

/// The `rotation` part of `describe_secret`; `None` if the secret is gone.
pub fn describe(client: &SpiClient<'_>, secret_id: Uuid) -> Result<Option<JsonB>> {
    crate::db::first_value::<JsonB>(client.select(
        "SELECT pg_catalog.jsonb_build_object( \
           'enabled', s.rotation_enabled, 'rotator', s.rotator, \
           'schedule', s.rotation_schedule, 'window', s.rotation_window, \
           'target_version_id', s.rotation_target_version_id, \
           'next_rotation_at', s.next_rotation_at, 'last_rotated_at', s.last_rotated_at, \
           'in_progress', (SELECT pg_catalog.jsonb_build_object('id', r.id, 'step', r.step, \
                               'pending_version_id', r.pending_version_id, \
                               'started_at', r.started_at, 'failures', r.attempts, \
                               'last_error', r.last_error, 'next_attempt_at', r.next_attempt_at) \
                           FROM secrets.rotation r \
                           WHERE r.secret_id = s.id AND r.state = 'running'), \
           'last', (SELECT pg_catalog.jsonb_build_object('id', r.id, 'state', r.state, \
                               'step', r.step, 'pending_version_id', r.pending_version_id, \
                               'started_at', r.started_at, 'finished_at', r.finished_at, \
                               'failures', r.attempts, 'last_error', r.last_error, 'note', r.note) \
                    FROM secrets.rotation r WHERE r.secret_id = s.id AND r.state <> 'running' \
                    ORDER BY r.started_at DESC LIMIT 1)) \
         FROM secrets.secret s WHERE s.id = $1",
        Some(1),
        &[secret_id.into()],
    )?)
}

/// One rotation of a secret, as `rotation_history` shows it.
pub struct HistoryEntry {
    pub id: Uuid,
    pub rotator: String,
    pub state: String,
    pub step: String,
    pub pending_version_id: Option<Uuid>,
    pub failures: i32,
    pub last_error: Option<String>,
    pub note: Option<String>,
    pub started_at: TimestampWithTimeZone,
    pub finished_at: Option<TimestampWithTimeZone>,
}

/// `rotation_history`: the secret's rotations, newest first, for those who may describe it.
pub fn history(name: &str, max_results: i32) -> Result<Vec<HistoryEntry>> {
    if !(1..=1000).contains(&max_results) {
        return Err(Error::InvalidParameter(format!(
            "max_results must be between 1 and 1000, not {max_results}"
        )));
    }
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Describe, OnDeleted::Allow)?;
        client
            .select(
                "SELECT id, rotator, state, step, pending_version_id, attempts, last_error, note, \
                        started_at, finished_at \
                 FROM secrets.rotation WHERE secret_id = $1 \
                 ORDER BY started_at DESC LIMIT $2",
                None,
                &[secret.id.into(), i64::from(max_results).into()],
            )?
            .map(|row| {
                Ok(HistoryEntry {
                    id: required(&row, 1)?,
                    rotator: required(&row, 2)?,
                    state: required(&row, 3)?,
                    step: required(&row, 4)?,
                    pending_version_id: row.get(5)?,
                    failures: required(&row, 6)?,
                    last_error: row.get(7)?,
                    note: row.get(8)?,
                    started_at: required(&row, 9)?,
                    finished_at: row.get(10)?,
                })
            })
            .collect()
    })
}

/// `rotate_secrets_accessible_by`: every secret `role` can read (with `only_accessed`, only
/// those it did read according to the audit trail), with what happened to it.
/// Each one is rotated in its own subtransaction, so one failure does not stop the others.
pub fn rotate_accessible_by(
    role: pg_sys::Oid,
    only_accessed: bool,
) -> Result<Vec<(String, String)>> {
    // Read according to the audit trail; records still queued are drained first by the
    // worker, so a read a moment ago may not be there yet: offboarding after the fact is
    // the intended use.
    let read_by_role = if only_accessed {
        Some(crate::audit::trail::secrets_read_by(role)?)
    } else {
        None
    };
    let readable: Vec<(String, Uuid, pg_sys::Oid, bool)> = Spi::connect(|client| {
        client
            .select(
                "SELECT name, id, owner_role::oid, rotator IS NOT NULL FROM secrets.secret \
                 WHERE purge_at IS NULL ORDER BY name",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    required(&row, 1)?,
                    required(&row, 2)?,
                    required(&row, 3)?,
                    required(&row, 4)?,
                ))
            })
            .collect::<Result<_>>()
    })?;
    let caller = access::caller();
    let mut statuses = Vec::new();
    for (name, id, owner, has_rotator) in readable {
        if read_by_role
            .as_ref()
            .is_some_and(|read| !read.contains(&id))
        {
            continue;
        }
        // Could the role read it from anywhere: conditions of the policy count as met, and so
        // does a policy that cannot be read: offboarding errs on the side of rotating.
        let secret = access::Secret { id, owner };
        let could_read = match access::decide(
            role,
            Action::Get,
            &name,
            Some(secret),
            access::Context::Anywhere,
        ) {
            Ok(basis) => basis.allows(),
            Err(Error::UnreadablePolicy { .. }) => true,
            Err(other) => return Err(other),
        };
        if !could_read {
            continue;
        }
        // Only the secrets the caller may manage are listed: which roles can read what is for
        // those who decide it (as `check_access` about another role is), and a list of names it
        // may not see would be a probe. `only_accessed` (who read what, an audit fact) needs
        // the same: the caller may read those secrets' audit records. A manager is told of a
        // secret whose policy stops its rotation.
        let unreadable_policy = match access::decide(
            caller,
            Action::Manage,
            &name,
            Some(secret),
            access::Context::Session,
        ) {
            Ok(basis) if basis.allows() => None,
            Ok(_) => continue,
            Err(unreadable @ Error::UnreadablePolicy { .. }) => Some(unreadable),
            Err(other) => return Err(other),
        };
        let status = if let Some(unreadable) = unreadable_policy {
            format!("needs a superuser: {unreadable}")
        } else if !has_rotator {
            "needs manual rotation: no rotator is configured".to_string()
        } else {
            let request = Request {
                rotator: None,
                schedule: None,
                window_seconds: None,
                immediately: true,
                new_target: false,
            };
            // Each rotation is a record of its own, naming the secret (its managers see it
            // among its records) and the role offboarded; the call's own record names none.
            let started = crate::db::in_subtransaction(|| {
                crate::audit::audited(
                    "rotate",
                    "rotate_secrets_accessible_by",
                    Some(&name),
                    || {
                        crate::audit::note("offboarded_role", access::role_name(role).into());
                        rotate_secret(&name, request)
                    },
                )
            });
            match started {
                Ok(_) => rotation_status(&name)?,
                Err(error) => format!("failed: {error}"),
            }
        };
        statuses.push((name, status));
    }
    Ok(statuses)
}

fn rotation_status(name: &str) -> Result<String> {
    let state = crate::db::select_value::<String>(
        "SELECT r.state FROM secrets.rotation r JOIN secrets.secret s ON s.id = r.secret_id \
         WHERE s.name = $1 ORDER BY r.started_at DESC LIMIT 1",
        &[name.into()],
    )?;
    Ok(match state.as_deref() {
        Some("succeeded") => "rotated".into(),
        Some("running") => "rotation started".into(),
        other => format!("rotation {}", other.unwrap_or("unknown")),
    })
}
