//! Who may do what with which secret: the one predicate every SQL function and the row-level
//! security policies use.
//!
//! In order, the first that applies decides:
//! 1. superusers pass;
//! 2. a `deny` statement of the secret's resource policy that covers the role, the action and
//!    the session (conditions) refuses, whatever else would allow;
//! 3. members of the secret's owner role (its creator) have every action;
//! 4. an unexpired grant whose pattern matches the name, to the role or a role it is a member
//!    of, allows its actions;
//! 5. an `allow` statement of the resource policy allows;
//! 6. members of `secrets_admin` may do everything, members of `secrets_reader` get and
//!    describe;
//! 7. nothing else does.
//!
//! Grants, policies and role memberships are cached per backend and invalidated through
//! PostgreSQL's own cache invalidation, so a read costs a few hash lookups (`cache.rs`).

mod cache;
pub mod pattern;
pub mod policy;

pub use cache::{
    application_name, invalidate_grants, invalidate_policies, now_micros,
    register_invalidation_callbacks, session, SessionInfo, POSTGRES_EPOCH_OFFSET_MICROS,
};

use crate::errors::{Error, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::Uuid;
use std::rc::Rc;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Creating a secret of a name: `manage` on that name.
    Create,
    Get,
    Describe,
    Put,
    Rotate,
    Delete,
    Manage,
}

pub const ALL_ACTIONS: [Action; 6] = [
    Action::Get,
    Action::Describe,
    Action::Put,
    Action::Rotate,
    Action::Delete,
    Action::Manage,
];

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Get => "get",
            Action::Describe => "describe",
            Action::Put => "put",
            Action::Rotate => "rotate",
            Action::Delete => "delete",
            Action::Manage => "manage",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        ALL_ACTIONS
            .into_iter()
            .find(|action| action.as_str() == text)
    }

    fn bit(self) -> u8 {
        match self {
            Action::Get => 1,
            Action::Describe => 2,
            Action::Put => 4,
            Action::Rotate => 8,
            Action::Delete => 16,
            Action::Manage | Action::Create => 32,
        }
    }
}

/// A set of actions, as grants and policy statements hold them.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Actions(u8);

impl Actions {
    pub fn parse<S: AsRef<str>>(names: &[S]) -> std::result::Result<Actions, String> {
        names.iter().try_fold(Actions(0), |set, name| {
            let name = name.as_ref();
            Action::parse(name)
                .map(|action| Actions(set.0 | action.bit()))
                .ok_or_else(|| {
                    format!(
                        "unknown action \"{name}\"; actions are get, describe, put, rotate, \
                         delete and manage"
                    )
                })
        })
    }

    pub fn contains(self, action: Action) -> bool {
        self.0 & action.bit() != 0
    }

    pub fn names(self) -> Vec<&'static str> {
        ALL_ACTIONS
            .into_iter()
            .filter(|action| self.contains(*action))
            .map(Action::as_str)
            .collect()
    }
}

thread_local! {
    /// The callers of the SQL functions running now, innermost last (see `as_owner`).
    static CALLERS: std::cell::RefCell<Vec<Oid>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The role on whose behalf a function runs: the current user PostgreSQL had when the SQL
/// function was called (see `as_owner`); outside one (the workers), the current user.
pub fn caller() -> Oid {
    CALLERS
        .with(|callers| callers.borrow().last().copied())
        .unwrap_or_else(|| unsafe { pg_sys::GetUserId() })
}

/// Runs the body of a SQL function as the owner of the extension's tables, on behalf of the
/// caller. The SQL functions are SECURITY INVOKER so that the caller is the current user
/// PostgreSQL itself had at the call: inside another role's SECURITY DEFINER function that is
/// the definer, and in maintenance that runs a table owner's code (ANALYZE evaluating an
/// index expression, by autovacuum or a superuser) it is that owner. A SECURITY DEFINER
/// function could only see the outer user, which is neither. A call from within the
/// extension's own queries (a row-level security predicate) keeps the caller of the call
/// that made them.
pub fn as_owner<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    /// Puts back the user and security context when the body returns or unwinds.
    struct Restore {
        user: Oid,
        context: i32,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: only sets two backend globals back to what they were.
            unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
            CALLERS.with(|callers| callers.borrow_mut().pop());
        }
    }
    let owner = crate::index_read::tables_owner()?;
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads two backend globals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut context) };
    let nested = user == owner && CALLERS.with(|callers| !callers.borrow().is_empty());
    let on_behalf_of = if nested { caller() } else { user };
    CALLERS.with(|callers| callers.borrow_mut().push(on_behalf_of));
    let _restore = Restore { user, context };
    // SAFETY: what fmgr does for a SECURITY DEFINER function; the flag forbids SET ROLE
    // until it is undone.
    unsafe {
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32)
    };
    body()
}

/// How policy conditions are judged.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Against this session: its client address, application_name and the time.
    Session,
    /// "Could the role do it from somewhere?": conditional allows count as met and
    /// conditional denies as not applying. Offboarding uses this.
    Anywhere,
}

/// A secret as the predicate needs it: `None` for a name no secret has.
#[derive(Clone, Copy)]
pub struct Secret {
    pub id: Uuid,
    pub owner: Oid,
}

/// What decided.
pub enum Basis {
    Superuser,
    PolicyDeny(usize),
    Owner(Oid),
    Grant(Rc<cache::Grant>),
    PolicyAllow(usize),
    Role(&'static str),
    Nothing,
}

impl Basis {
    pub fn allows(&self) -> bool {
        !matches!(self, Basis::PolicyDeny(_) | Basis::Nothing)
    }

    /// For `check_access`: which grant, statement or ownership decided.
    pub fn describe(&self) -> String {
        match self {
            Basis::Superuser => "superuser".into(),
            Basis::PolicyDeny(n) => format!("denied by statement {n} of the resource policy"),
            Basis::Owner(owner) => format!("member of the owner role {}", role_name(*owner)),
            Basis::Grant(grant) => grant.describe(),
            Basis::PolicyAllow(n) => format!("allowed by statement {n} of the resource policy"),
            Basis::Role(role) => format!("member of {role}"),
            Basis::Nothing => "no grant, resource policy statement or ownership allows it".into(),
        }
    }
}

pub fn role_name(role: Oid) -> String {
    cache::role_name(role, || {
        // SAFETY: a syscache lookup; NULL (noerr) for a dropped role.
        let name = unsafe { pg_sys::GetUserNameFromId(role, true) };
        if name.is_null() {
            format!("role {}", role.to_u32())
        } else {
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
    })
}

/// The predicate.
pub fn decide(
    role: Oid,
    action: Action,
    name: &str,
    secret: Option<Secret>,
    context: Context,
) -> Result<Basis> {
    if unsafe { pg_sys::superuser_arg(role) } {
        return Ok(Basis::Superuser);
    }
    let policy = match secret.map(|secret| cache::policy_of(secret.id)).transpose() {
        Ok(policy) => policy.flatten(),
        // What the policy denies cannot be told, so it allows nothing. Only a role the rest
        // would allow learns why (and that the secret exists); to any other it is the
        // refusal a missing secret gets too.
        Err(unreadable @ Error::UnreadablePolicy { .. }) => {
            let allowed_but_for_it =
                decide_under(None, role, action, name, secret, context)?.allows();
            return if allowed_but_for_it {
                Err(unreadable)
            } else {
                Ok(Basis::Nothing)
            };
        }
        Err(other) => return Err(other),
    };
    decide_under(policy, role, action, name, secret, context)
}

/// `decide` for a role that is not a superuser, under the secret's resource policy, if any.
fn decide_under(
    policy: Option<Rc<policy::Policy<Oid>>>,
    role: Oid,
    action: Action,
    name: &str,
    secret: Option<Secret>,
    context: Context,
) -> Result<Basis> {
    let deny_reach = DenyReach::of(role, context)?;
    let membership = &deny_reach.membership;
    let mut session = None;
    let mut applies =
        |statement: &policy::Statement<Oid>, effect: policy::Effect| -> Result<bool> {
            let covers_role = match effect {
                policy::Effect::Deny => deny_reach.covers(&statement.principals),
                policy::Effect::Allow => statement
                    .principals
                    .include(|r| membership.roles.contains(r)),
            };
            if statement.effect != effect || !statement.actions.contains(action) || !covers_role {
                return Ok(false);
            }
            if statement.conditions.is_empty() {
                return Ok(true);
            }
            Ok(match context {
                Context::Anywhere => effect == policy::Effect::Allow,
                Context::Session => {
                    if session.is_none() {
                        session = Some(cache::session()?);
                    }
                    let session = session.as_ref().expect("just set");
                    statement.conditions.met_by(&policy::Session {
                        source: session.source,
                        application_name: &cache::application_name(),
                        now_micros: cache::now_micros(),
                    })
                }
            })
        };
    if let Some(policy) = &policy {
        for (index, statement) in policy.statements.iter().enumerate() {
            if applies(statement, policy::Effect::Deny)? {
                return Ok(Basis::PolicyDeny(index + 1));
            }
        }
    }
    if let Some(secret) = secret {
        if membership.roles.contains(&secret.owner) {
            return Ok(Basis::Owner(secret.owner));
        }
    }
    let (grants, now) = (cache::grants()?, cache::now_micros());
    if let Some(grant) = grants_reaching(&grants, membership, action, name)
        .find(|grant| grant.valid_until.is_none_or(|until| now < until))
    {
        return Ok(Basis::Grant(grant.clone()));
    }
    if let Some(policy) = &policy {
        for (index, statement) in policy.statements.iter().enumerate() {
            if applies(statement, policy::Effect::Allow)? {
                return Ok(Basis::PolicyAllow(index + 1));
            }
        }
    }
    if membership.admin {
        return Ok(Basis::Role("secrets_admin"));
    }
    if membership.reader && matches!(action, Action::Get | Action::Describe) {
        return Ok(Basis::Role("secrets_reader"));
    }
    Ok(Basis::Nothing)
}

/// `decide` for a listing (of secrets, grants, requests, audit records): whether `role` may do
/// `action` on `secret`. A secret whose stored policy cannot be read is left out rather than
/// failing the whole listing; acting on it still fails with the reason.
pub fn shown(
    role: Oid,
    action: Action,
    name: &str,
    secret: Secret,
    context: Context,
) -> Result<bool> {
    match decide(role, action, name, Some(secret), context) {
        Ok(basis) => Ok(basis.allows()),
        Err(Error::UnreadablePolicy { .. }) => Ok(false),
        Err(other) => Err(other),
    }
}

/// Whom a deny statement binds when deciding for a role: every role it belongs to, and for
/// the caller in its own session the session user's too. A deny that names the person follows
/// it into the roles it acts as (SET ROLE to a group, a SECURITY DEFINER function). Not when
/// deciding for another role (a simulation, a rotation on the owner's behalf), and superusers
/// are bound by no policy.
struct DenyReach {
    membership: Rc<cache::Membership>,
    session_membership: Option<Rc<cache::Membership>>,
}

impl DenyReach {
    fn of(role: Oid, context: Context) -> Result<DenyReach> {
        let session_user = unsafe { pg_sys::GetSessionUserId() };
        let session_membership = match context {
            Context::Session
                if role == caller()
                    && session_user != role
                    && !unsafe { pg_sys::superuser_arg(session_user) } =>
            {
                Some(cache::membership(session_user)?)
            }
            _ => None,
        };
        Ok(DenyReach {
            membership: cache::membership(role)?,
            session_membership,
        })
    }

    fn covers(&self, principals: &policy::Principals<Oid>) -> bool {
        principals.include(|r| {
            self.membership.member_of.contains(r)
                || self
                    .session_membership
                    .as_ref()
                    .is_some_and(|session| session.member_of.contains(r))
        })
    }
}

/// The deny statements of the secret's resource policy that bind the caller (under any
/// condition), as indexes into its statements: a policy's denials bind the owner and managers
/// too, so these must survive any change the caller makes to the policy. None for a role that
/// may manage every secret (superusers, `secrets_admin`), whose changes are not bounded.
pub fn denials_binding_caller(secret: Secret) -> Result<Vec<usize>> {
    let role = caller();
    if may_on_any(role, Action::Manage)? {
        return Ok(Vec::new());
    }
    let Some(policy) = cache::policy_of(secret.id)? else {
        return Ok(Vec::new());
    };
    let reach = DenyReach::of(role, Context::Session)?;
    Ok(policy
        .statements
        .iter()
        .enumerate()
        .filter(|(_, statement)| {
            statement.effect == policy::Effect::Deny && reach.covers(&statement.principals)
        })
        .map(|(index, _)| index)
        .collect())
}

/// The refusal of a policy change that would lift statement `index` (0-based), which denies
/// the caller.
pub fn lifts_own_denial(name: &str, index: usize) -> crate::errors::Error {
    crate::errors::Error::BeyondOwnAccess {
        name: name.to_string(),
        reason: format!(
            "statement {} of its resource policy denies you, and the change would lift it; \
             keep that statement as it is, or ask a role it does not bind, or secrets_admin",
            index + 1
        ),
    }
}

/// How far a role may hand on its `manage` right on a secret, by a grant, by approving a
/// request, by a resource policy, by a rotation that runs on with the owner's rights, or by
/// creating a secret it then owns: no further than the right itself reaches. Otherwise a role
/// given `manage` for an hour could grant itself, or anyone, access for good.
#[derive(Debug, PartialEq)]
pub enum Delegation {
    /// Without limit: superusers, `secrets_admin`, the owner, a grant without an end, a policy
    /// statement without conditions.
    Unlimited,
    /// Until this time (Unix microseconds), the latest end of the time-bound grants giving it.
    Until(i64),
    /// Not at all: only policy statements with conditions give it, and what is handed on would
    /// not carry them.
    Nothing,
}

/// `role`'s `Delegation` on the secret named `name` (`None` for a name no secret has yet).
/// The caller has checked that the role may manage it (so no deny applies).
pub fn delegation(role: Oid, name: &str, secret: Option<Secret>) -> Result<Delegation> {
    if may_on_any(role, Action::Manage)? {
        return Ok(Delegation::Unlimited);
    }
    let membership = cache::membership(role)?;
    if let Some(secret) = secret {
        if membership.roles.contains(&secret.owner) {
            return Ok(Delegation::Unlimited);
        }
        let by_unconditional_statement = cache::policy_of(secret.id)?.is_some_and(|policy| {
            policy.statements.iter().any(|statement| {
                statement.effect == policy::Effect::Allow
                    && statement.actions.contains(Action::Manage)
                    && statement.conditions.is_empty()
                    && statement
                        .principals
                        .include(|r| membership.roles.contains(r))
            })
        });
        if by_unconditional_statement {
            return Ok(Delegation::Unlimited);
        }
    }
    let (grants, now) = (cache::grants()?, cache::now_micros());
    let mut latest_end = None;
    for grant in grants_reaching(&grants, &membership, Action::Manage, name) {
        match grant.valid_until {
            None => return Ok(Delegation::Unlimited),
            Some(until) if now < until => latest_end = latest_end.max(Some(until)),
            Some(_) => {}
        }
    }
    Ok(latest_end.map_or(Delegation::Nothing, Delegation::Until))
}

/// The grants to a role (through its memberships) that name `action` on a pattern matching
/// `name`, whether they have expired or not.
fn grants_reaching<'a>(
    grants: &'a cache::GrantIndex,
    membership: &'a cache::Membership,
    action: Action,
    name: &'a str,
) -> impl Iterator<Item = &'a Rc<cache::Grant>> {
    membership
        .roles
        .iter()
        .flat_map(|role| grants.for_grantee(*role))
        .filter(move |grant| {
            grant.actions.contains(action) && pattern::matches(&grant.pattern, name)
        })
}

/// What a manager hands on, for `within_own_manage`.
pub enum HandedOn {
    /// A grant or an approval, ending at this time (Unix microseconds) or never.
    Access {
        ends: Option<i64>,
    },
    Policy,
    Rotation,
    Ownership,
}

/// Refuses, for the caller, what `handed` would reach beyond its own `manage` right on the
/// secret named `name` (see `Delegation`).
pub fn within_own_manage(name: &str, secret: Option<Secret>, handed: HandedOn) -> Result<()> {
    let basis = match delegation(caller(), name, secret)? {
        Delegation::Unlimited => return Ok(()),
        Delegation::Until(limit) => {
            if let HandedOn::Access { ends: Some(ends) } = handed {
                if ends <= limit {
                    return Ok(());
                }
            }
            format!(
                "your manage access to it ends at {}",
                chrono::DateTime::from_timestamp_micros(limit)
                    .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default()
            )
        }
        Delegation::Nothing => {
            "your manage access to it holds only under the conditions of resource policy \
             statements"
                .to_string()
        }
    };
    let why = match handed {
        HandedOn::Access { .. } => {
            "what you grant must end by then (a grant's valid_until, an approval's duration) \
             and carries no conditions"
        }
        HandedOn::Policy => "a resource policy has no end and outlives them",
        HandedOn::Rotation => "a rotation schedule runs on with the owner's rights, without end",
        HandedOn::Ownership => "creating it would make you its owner for good",
    };
    Err(crate::errors::Error::BeyondOwnAccess {
        name: name.to_string(),
        reason: format!("{basis}; {why}"),
    })
}

/// A role given as `regrole`, which takes any number as it is: a number no role has is refused
/// (22023), not judged as a role without memberships (one that a policy allowing everyone
/// would let read everything).
pub fn existing_role(role: Oid) -> Result<Oid> {
    // SAFETY: a syscache lookup; NULL (noerr) when no role has this OID.
    if unsafe { pg_sys::GetUserNameFromId(role, true) }.is_null() {
        return Err(crate::errors::Error::InvalidParameter(format!(
            "role with OID {} does not exist",
            role.to_u32()
        )));
    }
    Ok(role)
}

/// Whether a role of this name exists.
pub fn role_exists(name: &str) -> bool {
    cache::resolve_role(name).is_some()
}

/// Whether `role` has the privileges of the role named `group`.
pub fn is_member(role: Oid, group: &str) -> Result<bool> {
    if unsafe { pg_sys::superuser_arg(role) } {
        return Ok(true);
    }
    let Some(group) = cache::resolve_role(group) else {
        return Ok(false);
    };
    Ok(cache::membership(role)?.roles.contains(&group))
}

/// `may_on_any` for the caller, or the permission error naming `what` was refused and who
/// may do it.
pub fn require_on_every_secret(action: Action, what: &'static str) -> Result<()> {
    if may_on_any(caller(), action)? {
        return Ok(());
    }
    Err(crate::errors::Error::StoreWideDenied {
        what,
        who: match action {
            Action::Get | Action::Describe => "superusers, secrets_admin and secrets_reader",
            _ => "superusers and secrets_admin",
        },
    })
}

/// Rights on every secret, whoever owns it: superusers, `secrets_admin`, and `secrets_reader`
/// for get and describe. Work that spans all secrets (purging, master-key rotation) needs it.
pub fn may_on_any(role: Oid, action: Action) -> Result<bool> {
    if unsafe { pg_sys::superuser_arg(role) } {
        return Ok(true);
    }
    let membership = cache::membership(role)?;
    Ok(membership.admin || (membership.reader && matches!(action, Action::Get | Action::Describe)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_sets() {
        let set = Actions::parse(&["get", "manage"]).unwrap();
        assert!(set.contains(Action::Get));
        assert!(set.contains(Action::Manage));
        assert!(set.contains(Action::Create), "create is manage on the name");
        assert!(!set.contains(Action::Put));
        assert_eq!(set.names(), ["get", "manage"]);
        assert!(Actions::parse(&["get", "write"])
            .unwrap_err()
            .contains("unknown action \"write\""));
    }
}
