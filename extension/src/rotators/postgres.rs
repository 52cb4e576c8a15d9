//! The PostgreSQL rotators, on the credential JSON.
//!
//! - `postgres-single-user` changes the user's own password. For a role of this cluster the
//!   change runs through SPI inside the rotation's one transaction; for another server it logs
//!   in with CURRENT and changes its own password.
//! - `postgres-alternating-users` logs in with the admin credential of `master_secret` and
//!   alternates between `<user>` and `<user>_clone`; the login not being rotated keeps working.
//!
//! Passwords travel only as SCRAM-SHA-256 verifiers computed here, so no SQL text, log line
//! or statistics view ever holds the plaintext.

use super::connection::{describe, off_thread, Login, StillWanted};
use super::{Credential, Rotator, Step, StepContext};
use crate::errors::{Error, Result};
use crate::password::{self, PasswordRules};
use pgrx::prelude::*;
use zeroize::Zeroizing;

/// 32 letters and digits: about 190 bits, and safe in any connection string.
fn new_password() -> Result<Zeroizing<String>> {
    password::random_password(&PasswordRules {
        length: 32,
        exclude_characters: "",
        exclude_numbers: false,
        exclude_punctuation: true,
        exclude_uppercase: false,
        exclude_lowercase: false,
        include_space: false,
        require_each_included_type: true,
    })
    .map(Zeroizing::new)
}

fn scram_verifier(password: &str) -> String {
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

const CLONE_SUFFIX: &str = "_clone";

const NEEDS_MASTER_SECRET: &str = "postgres-alternating-users needs \"master_secret\" in the \
     credential: the name of a secret with admin credentials for the server";

/// The role objects belong to: `app` for both `app` and `app_clone`.
fn main_user(login: &str) -> &str {
    login.strip_suffix(CLONE_SUFFIX).unwrap_or(login)
}

fn other_login(login: &str) -> String {
    match login.strip_suffix(CLONE_SUFFIX) {
        Some(main) => main.to_string(),
        None => format!("{login}{CLONE_SUFFIX}"),
    }
}

/// What a database rotation acts on: the server, the role (for alternating users, the main
/// role of the pair), and the admin secret it logs in with. The password is not part of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    host: Option<String>,
    port: u16,
    dbname: String,
    role: String,
    master_secret: Option<String>,
}

impl Target {
    pub fn of(rotator: &Rotator, credential: &Credential) -> Target {
        let username = credential.username();
        Target {
            host: credential.host().map(str::to_string),
            port: credential.port().expect("checked by parse"),
            dbname: credential.dbname().to_string(),
            role: match rotator {
                Rotator::PostgresAlternatingUsers => main_user(username),
                _ => username,
            }
            .to_string(),
            master_secret: credential.master_secret().map(str::to_string),
        }
    }

    /// The credential field of the first difference, by name: the values may be private.
    pub fn first_difference(&self, other: &Target) -> Option<&'static str> {
        [
            ("host", self.host != other.host),
            ("port", self.port != other.port),
            ("dbname", self.dbname != other.dbname),
            ("username", self.role != other.role),
            ("master_secret", self.master_secret != other.master_secret),
        ]
        .into_iter()
        .find_map(|(field, differs)| differs.then_some(field))
    }
}

pub fn create_single_user(context: &StepContext) -> Result<Zeroizing<Vec<u8>>> {
    let current = context.current_credential(Step::Create)?;
    Ok(current.with_login(current.username(), &new_password()?))
}

pub fn create_alternating(context: &StepContext) -> Result<Zeroizing<Vec<u8>>> {
    let current = context.current_credential(Step::Create)?;
    if current.master_secret().is_none() {
        return Err(context.failed(Step::Create, NEEDS_MASTER_SECRET));
    }
    Ok(current.with_login(&other_login(current.username()), &new_password()?))
}

pub fn set_single_user(context: &StepContext) -> Result<()> {
    let current = context.current_credential(Step::Set)?;
    let pending = context.pending_credential(Step::Set)?;
    let verifier = scram_verifier(pending.password());
    if current.is_local() {
        return alter_local_password(context, pending.username(), &verifier);
    }
    let statement = format!(
        "ALTER ROLE CURRENT_USER PASSWORD {}",
        quote_literal(&verifier)
    );
    let (as_current, as_pending) = (
        Login::new(&current, &current).map_err(|why| context.failed(Step::Set, why))?,
        Login::new(&pending, &pending).map_err(|why| context.failed(Step::Set, why))?,
    );
    off_thread(move |wanted| match as_current.connect() {
        Ok(mut client) => commit_if_wanted(&mut client, &[statement.as_str()], wanted),
        // A run that crashed after changing the password but before recording it: CURRENT no
        // longer logs in, PENDING does, and the step is already done.
        Err(error) if error.is_login_refused() && as_pending.connect().is_ok() => Ok(()),
        Err(error) => Err(error.to_string()),
    })
    .map_err(|why| context.failed(Step::Set, why))
}

/// A role of this cluster: the secret's owner must be allowed to change that role's password
/// (superuser, CREATEROLE, or member of the role), and superusers are never rotated from a
/// secret, so holding `rotate` on a secret is never a way to take over a more powerful role.
fn alter_local_password(context: &StepContext, username: &str, verifier: &str) -> Result<()> {
    may_change_local_password(username, context.owner, "the secret's owner", |why| {
        context.failed(Step::Set, why)
    })?;
    Spi::connect_mut(|client| {
        client.update(
            &format!(
                "ALTER ROLE {} PASSWORD {}",
                quote_ident(username),
                quote_literal(verifier)
            ),
            None,
            &[],
        )?;
        Ok(())
    })
}

/// Whether `actor` (named `who` in the refusal) may change the password of role `username` of
/// this cluster: the role exists and is no superuser, and `actor` is a superuser, has
/// CREATEROLE or is a member of the role. `refused` makes the error for a refusal.
fn may_change_local_password(
    username: &str,
    actor: pg_sys::Oid,
    who: &str,
    refused: impl Fn(String) -> Error,
) -> Result<()> {
    let verdict = Spi::connect(|client| -> Result<Option<(bool, bool)>> {
        let rows = client.select(
            "SELECT r.rolsuper, \
                    o.rolsuper OR o.rolcreaterole OR pg_catalog.pg_has_role(o.oid, r.oid, 'USAGE') \
             FROM pg_catalog.pg_roles r, pg_catalog.pg_roles o \
             WHERE r.rolname = $1 AND o.oid = $2",
            Some(1),
            &[username.into(), actor.into()],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some((
            row.get::<bool>(1)? == Some(true),
            row.get::<bool>(2)? == Some(true),
        )))
    })?;
    match verdict {
        None => Err(refused(format!(
            "role \"{username}\" does not exist in this cluster"
        ))),
        Some((true, _)) => Err(refused(format!(
            "role \"{username}\" is a superuser; its password is not rotated from a secret"
        ))),
        Some((false, false)) => Err(refused(format!(
            "{who} may not change the password of role \"{username}\": it needs CREATEROLE or \
             membership in that role"
        ))),
        Some((false, true)) => Ok(()),
    }
}

/// The configuring caller's side of a database rotation's target, checked when rotation is
/// configured and the target pinned: the caller must itself be allowed to change the role's
/// password here, or to read the admin secret that changes it, so configuring rotation never
/// lends the owner's rights to anyone. `refused` makes the error for a target that cannot be.
pub fn check_caller_may_target(
    rotator: &Rotator,
    credential: &Credential,
    caller: pg_sys::Oid,
    refused: impl Fn(String) -> Error,
) -> Result<()> {
    match rotator {
        Rotator::PostgresSingleUser if credential.is_local() => {
            let who = format!("role \"{}\"", crate::access::role_name(caller));
            may_change_local_password(credential.username(), caller, &who, refused)
        }
        Rotator::PostgresAlternatingUsers => {
            let master_name = credential
                .master_secret()
                .ok_or_else(|| refused(NEEDS_MASTER_SECRET.to_string()))?;
            // The caller's own right to read the admin credential, not the owner's.
            let admin = crate::store::read_current_as(caller, master_name)?;
            Credential::parse(&admin)
                .map(drop)
                .map_err(|why| refused(format!("master_secret: {why}")))
        }
        Rotator::PostgresSingleUser | Rotator::Command(_) => Ok(()),
    }
}

pub fn set_alternating(context: &StepContext) -> Result<()> {
    let pending = context.pending_credential(Step::Set)?;
    let master_name = pending.master_secret().unwrap_or_default().to_string();
    let admin_value = crate::store::read_current_as(context.owner, &master_name)
        .map_err(|error| context.failed(Step::Set, format!("master_secret: {error}")))?;
    let admin = Credential::parse(&admin_value)
        .map_err(|why| context.failed(Step::Set, format!("master_secret: {why}")))?;
    let as_admin = Login::new(&admin, &pending).map_err(|why| context.failed(Step::Set, why))?;
    let login = pending.username().to_string();
    let main = main_user(&login).to_string();
    // A member of the main role that becomes it at login: whatever either login creates
    // belongs to the main role, so alternating never splits ownership.
    let create_clone = [
        format!(
            "CREATE ROLE {} LOGIN IN ROLE {}",
            quote_ident(&login),
            quote_ident(&main)
        ),
        format!(
            "ALTER ROLE {} SET role = {}",
            quote_ident(&login),
            quote_literal(&main)
        ),
    ];
    let set_password = format!(
        "ALTER ROLE {} PASSWORD {}",
        quote_ident(&login),
        quote_literal(&scram_verifier(pending.password()))
    );
    off_thread(move |wanted| {
        let mut client = as_admin.connect().map_err(|e| e.to_string())?;
        let mut statements = Vec::new();
        if login != main {
            let exists = client
                .query_opt(
                    "SELECT FROM pg_catalog.pg_roles WHERE rolname = $1",
                    &[&login],
                )
                .map_err(|e| describe(&e))?
                .is_some();
            if !exists {
                statements.extend(create_clone.iter().map(String::as_str));
            }
        }
        statements.push(&set_password);
        commit_if_wanted(&mut client, &statements, wanted)
    })
    .map_err(|why| context.failed(Step::Set, why))
}

/// Runs `statements` on the target in one transaction, committed only if the step still
/// waits for it: a target that answers after the step was given up is left as it was.
fn commit_if_wanted(
    client: &mut postgres::Client,
    statements: &[&str],
    wanted: &StillWanted,
) -> std::result::Result<(), String> {
    wanted.check()?;
    let mut transaction = client.transaction().map_err(|e| describe(&e))?;
    for statement in statements {
        transaction
            .batch_execute(statement)
            .map_err(|e| describe(&e))?;
    }
    wanted.check()?;
    transaction.commit().map_err(|e| describe(&e))
}

/// For a role of this cluster the new password commits together with the label move, so
/// there is nothing to log in with before that; elsewhere, PENDING must log in.
pub fn test_single_user(context: &StepContext) -> Result<()> {
    if context.pending_credential(Step::Test)?.is_local() {
        return Ok(());
    }
    test_login(context)
}

/// Logs in with PENDING and runs a query.
pub fn test_login(context: &StepContext) -> Result<()> {
    let pending = context.pending_credential(Step::Test)?;
    let as_pending =
        Login::new(&pending, &pending).map_err(|why| context.failed(Step::Test, why))?;
    off_thread(move |_| {
        let mut client = as_pending.connect().map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .map(drop)
            .map_err(|e| describe(&e))
    })
    .map_err(|why| context.failed(Step::Test, why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_alternate() {
        assert_eq!(other_login("app"), "app_clone");
        assert_eq!(other_login("app_clone"), "app");
        assert_eq!(main_user("app_clone"), "app");
        assert_eq!(main_user("app"), "app");
    }

    #[test]
    fn targets_compare_where_the_rotation_acts_not_the_password() {
        let target = |rotator: &Rotator, json: &str| {
            Target::of(rotator, &Credential::parse(json.as_bytes()).unwrap())
        };
        let single = Rotator::PostgresSingleUser;
        let pinned = target(&single, r#"{"host":"db1","username":"app","password":"a"}"#);
        for (json, difference) in [
            (
                r#"{"host":"db1","port":"5432","username":"app","password":"b"}"#,
                None,
            ),
            (
                r#"{"host":"db1","dbname":"postgres","username":"app","password":"b"}"#,
                None,
            ),
            (
                r#"{"host":"db2","username":"app","password":"a"}"#,
                Some("host"),
            ),
            (
                r#"{"host":"db1","port":6432,"username":"app","password":"a"}"#,
                Some("port"),
            ),
            (
                r#"{"host":"db1","dbname":"x","username":"app","password":"a"}"#,
                Some("dbname"),
            ),
            (
                r#"{"host":"db1","username":"app_clone","password":"a"}"#,
                Some("username"),
            ),
            (
                r#"{"host":"db1","username":"app","password":"a","master_secret":"m"}"#,
                Some("master_secret"),
            ),
        ] {
            assert_eq!(
                target(&single, json).first_difference(&pinned),
                difference,
                "{json}"
            );
        }
        // Alternating users: either login of the pair is the same target.
        let alternating = Rotator::PostgresAlternatingUsers;
        let pinned = target(
            &alternating,
            r#"{"username":"app","password":"a","master_secret":"m"}"#,
        );
        let clone = target(
            &alternating,
            r#"{"username":"app_clone","password":"b","master_secret":"m"}"#,
        );
        assert_eq!(clone.first_difference(&pinned), None);
        let other = target(
            &alternating,
            r#"{"username":"boss","password":"b","master_secret":"m"}"#,
        );
        assert_eq!(other.first_difference(&pinned), Some("username"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn verifiers_never_hold_the_password() {
        let verifier = scram_verifier("correct horse");
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:"));
        assert!(!verifier.contains("correct horse"));
        assert_eq!(quote_literal(&verifier), format!("'{verifier}'"));
    }
}
