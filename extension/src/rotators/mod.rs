//! Rotators: what each of the four rotation steps does for one kind of secret. The engine in
//! `rotation.rs` decides when steps run and records them; a rotator only acts.
//!
//! Every step must be idempotent: after a crash the engine runs the recorded step again.

mod command;
mod connection;
mod credential;
mod postgres;

pub use credential::Credential;

use crate::errors::{Error, Result};
use pgrx::Uuid;
use zeroize::Zeroizing;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Create,
    Set,
    Test,
    Finish,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Set => "set",
            Step::Test => "test",
            Step::Finish => "finish",
        }
    }

    pub fn parse(text: &str) -> Option<Step> {
        [Step::Create, Step::Set, Step::Test, Step::Finish]
            .into_iter()
            .find(|step| step.as_str() == text)
    }

    /// The step after this one, `None` after finish.
    pub fn next(self) -> Option<Step> {
        match self {
            Step::Create => Some(Step::Set),
            Step::Set => Some(Step::Test),
            Step::Test => Some(Step::Finish),
            Step::Finish => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rotator {
    PostgresSingleUser,
    PostgresAlternatingUsers,
    /// A program in `pg_secrets.rotator_dir`.
    Command(String),
}

impl Rotator {
    /// Parses and checks a rotator name; a command's program must exist now.
    pub fn parse(text: &str) -> Result<Rotator> {
        match text {
            "postgres-single-user" => Ok(Rotator::PostgresSingleUser),
            "postgres-alternating-users" => Ok(Rotator::PostgresAlternatingUsers),
            _ => match text.strip_prefix("command:") {
                Some(program) => {
                    command::resolve(program)?;
                    Ok(Rotator::Command(program.to_string()))
                }
                None => Err(Error::InvalidParameter(format!(
                    "unknown rotator \"{text}\"; use postgres-single-user, \
                     postgres-alternating-users or command:<program>"
                ))),
            },
        }
    }

    /// Whether the rotator acts where the secret's value says (a database credential names
    /// its server, role and admin secret), so that target is pinned when rotation is
    /// configured. A command's program is chosen by the superuser and acts on its own.
    pub fn acts_on_named_target(&self) -> bool {
        !matches!(self, Rotator::Command(_))
    }

    pub fn name(&self) -> String {
        match self {
            Rotator::PostgresSingleUser => "postgres-single-user".into(),
            Rotator::PostgresAlternatingUsers => "postgres-alternating-users".into(),
            Rotator::Command(program) => format!("command:{program}"),
        }
    }
}

/// What a step sees of the secret being rotated.
pub struct StepContext<'a> {
    pub secret_name: &'a str,
    pub owner: pgrx::pg_sys::Oid,
    pub pending_version: Option<Uuid>,
    /// The CURRENT value, if the secret has one.
    pub current: Option<&'a [u8]>,
    /// The PENDING value, from the set step on.
    pub pending: Option<&'a [u8]>,
    /// For a database rotator, the version whose target the rotation may act on, and its
    /// value: the CURRENT version when rotation was configured, then each rotation's result.
    pub pinned: Option<(Uuid, &'a [u8])>,
}

impl StepContext<'_> {
    pub fn failed(&self, step: Step, reason: impl std::fmt::Display) -> Error {
        Error::RotationFailed {
            name: self.secret_name.to_string(),
            step: step.as_str(),
            reason: reason.to_string(),
        }
    }

    fn current_credential(&self, step: Step) -> Result<Credential> {
        let current = self
            .current
            .ok_or_else(|| self.failed(step, "the secret has no CURRENT version to rotate"))?;
        Credential::parse(current).map_err(|why| self.failed(step, why))
    }

    fn pending_credential(&self, step: Step) -> Result<Credential> {
        let pending = self
            .pending
            .ok_or_else(|| self.failed(step, "the rotation has no PENDING version"))?;
        Credential::parse(pending).map_err(|why| self.failed(step, why))
    }
}

/// Configuring rotation pins its target, the server, role and admin secret that the CURRENT
/// value names, on the caller's own rights: a role that may `put` can later write another
/// target into the value, and rotations act with the owner's rights, so without the pin a
/// `put` would steer them. With `pinned` (the version pinned before, unless the caller asked
/// for a new target), CURRENT must name the same target. Refusals are 55000, like a failing
/// step's.
pub fn check_configuration(
    rotator: &Rotator,
    secret_name: &str,
    current: Option<&[u8]>,
    pinned: Option<(Uuid, &[u8])>,
    caller: pgrx::pg_sys::Oid,
) -> Result<()> {
    let refused = |reason: String| Error::RotationFailed {
        name: secret_name.to_string(),
        step: "configure",
        reason,
    };
    if let Rotator::Command(_) = rotator {
        return command::check_name(secret_name).map_err(refused);
    }
    let current =
        current.ok_or_else(|| refused("the secret has no CURRENT version to rotate".into()))?;
    let credential = Credential::parse(current).map_err(&refused)?;
    if let Some((pinned_version, pinned)) = pinned {
        if let Some(field) = target_difference(rotator, pinned, current).map_err(&refused)? {
            return Err(refused(format!(
                "the CURRENT value names another \"{field}\" than version {pinned_version}, \
                 the target pinned before; to rotate the new target, pass new_target => true"
            )));
        }
    }
    postgres::check_caller_may_target(rotator, &credential, caller, refused)
}

/// A database rotation acts only on its pinned target: the CURRENT and PENDING values a step
/// works from must name the same server, role and admin secret as the pinned version.
pub fn check_target(rotator: &Rotator, step: Step, context: &StepContext) -> Result<()> {
    if !rotator.acts_on_named_target() {
        return Ok(());
    }
    let (pinned_version, pinned) = context.pinned.ok_or_else(|| {
        context.failed(
            step,
            "no target is pinned for it; a role with manage on the secret must configure \
             rotation with rotate_secret(name, rotator => ...)",
        )
    })?;
    for (label, value) in [("CURRENT", context.current), ("PENDING", context.pending)] {
        let Some(value) = value else { continue };
        let difference =
            target_difference(rotator, pinned, value).map_err(|why| context.failed(step, why))?;
        if let Some(field) = difference {
            return Err(context.failed(
                step,
                format!(
                    "the {label} value names another \"{field}\" than version {pinned_version}, \
                     the target pinned when rotation was configured; if the change is meant, a \
                     role with manage on the secret who may act on the new target pins it with \
                     rotate_secret(name, rotator => ..., new_target => true)"
                ),
            ));
        }
    }
    Ok(())
}

/// The first credential field in which `value` names another target than `pinned`, by name.
fn target_difference(
    rotator: &Rotator,
    pinned: &[u8],
    value: &[u8],
) -> std::result::Result<Option<&'static str>, String> {
    let pinned = postgres::Target::of(rotator, &Credential::parse(pinned)?);
    Ok(postgres::Target::of(rotator, &Credential::parse(value)?).first_difference(&pinned))
}

/// Whether all four steps run in one transaction: a role of this very cluster, where the
/// password change and the label move can commit together.
pub fn is_transactional(rotator: &Rotator, current: Option<&[u8]>) -> bool {
    *rotator == Rotator::PostgresSingleUser
        && current
            .and_then(|value| Credential::parse(value).ok())
            .is_some_and(|credential| credential.is_local())
}

/// The create step: the value of the new version.
pub fn create(rotator: &Rotator, context: &StepContext) -> Result<Zeroizing<Vec<u8>>> {
    match rotator {
        Rotator::PostgresSingleUser => postgres::create_single_user(context),
        Rotator::PostgresAlternatingUsers => postgres::create_alternating(context),
        Rotator::Command(program) => command::run(program, Step::Create, context),
    }
}

/// The set, test and finish steps. Finish runs after CURRENT has moved, in the same
/// transaction, so a failing finish leaves CURRENT where it was.
pub fn act(rotator: &Rotator, step: Step, context: &StepContext) -> Result<()> {
    match (rotator, step) {
        (_, Step::Create) => unreachable!("create makes a value; see create()"),
        (Rotator::Command(program), step) => command::run(program, step, context).map(drop),
        (Rotator::PostgresSingleUser, Step::Set) => postgres::set_single_user(context),
        (Rotator::PostgresAlternatingUsers, Step::Set) => postgres::set_alternating(context),
        (Rotator::PostgresSingleUser, Step::Test) => postgres::test_single_user(context),
        (Rotator::PostgresAlternatingUsers, Step::Test) => postgres::test_login(context),
        (_, Step::Finish) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_run_in_order() {
        let mut step = Some(Step::Create);
        let mut seen = Vec::new();
        while let Some(current) = step {
            seen.push(current.as_str());
            assert_eq!(Step::parse(current.as_str()), Some(current));
            step = current.next();
        }
        assert_eq!(seen, ["create", "set", "test", "finish"]);
        assert_eq!(Step::parse("done"), None);
    }

    #[test]
    fn rotator_names() {
        for name in ["postgres-single-user", "postgres-alternating-users"] {
            assert_eq!(Rotator::parse(name).unwrap().name(), name);
        }
        let error = Rotator::parse("lambda:arn").unwrap_err();
        assert!(error.to_string().contains("unknown rotator"));
    }
}
