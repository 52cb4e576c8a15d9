//! Who may `LISTEN` to the extension's notification channels. PostgreSQL has no privileges on
//! channels, so any role that can connect could listen, and the payloads tell what the rest of
//! the product keeps from a role: `pg_secrets_changed` names every secret written, and
//! `pg_secrets_alarm` names roles, client addresses and secrets. A `ProcessUtility` hook
//! refuses `LISTEN` on them to roles outside the product: `pg_secrets_changed` is for members
//! of `secrets_user` (the roles given functions to call: the proxy's included), and
//! `pg_secrets_alarm` for those who keep the alarm rules, `secrets_auditor` and
//! `secrets_admin`.
//!
//! Sending cannot be refused the same way: `pg_notify()` is a function any role may call. A
//! notification is a hint to look, never evidence: the proxy only drops cached credentials on
//! one, and an alarm is confirmed with `access_anomalies()`.

use crate::access;
use crate::errors::{Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

static mut PREVIOUS_HOOK: pg_sys::ProcessUtility_hook_type = None;

/// Called from `_PG_init` in the postmaster; every server process inherits the hook.
pub fn register() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// A channel of ours, and who may listen to it.
struct Guarded {
    channel: &'static [u8],
    what: &'static str,
    groups: &'static [&'static str],
    who: &'static str,
}

const GUARDED: [Guarded; 2] = [
    Guarded {
        channel: b"pg_secrets_changed",
        what: "listening to pg_secrets_changed",
        groups: &["secrets_user"],
        who: "members of secrets_user",
    },
    Guarded {
        channel: b"pg_secrets_alarm",
        what: "listening to pg_secrets_alarm",
        groups: &["secrets_auditor", "secrets_admin"],
        who: "secrets_auditor and secrets_admin",
    },
];

/// The refusal of a `LISTEN` on `channel` by the current role, if it is one of ours.
fn check_listen(channel: &CStr) -> Result<()> {
    let Some(guarded) = GUARDED
        .iter()
        .find(|guarded| guarded.channel == channel.to_bytes())
    else {
        return Ok(());
    };
    // The roles come with the extension: without them it was never created in this cluster,
    // and nothing is sent on its channels. With them, the channels are guarded in every
    // database of the cluster (roles are cluster-wide), the extension's or not. Membership is
    // checked when LISTEN runs: a role that loses it later hears on until it disconnects.
    if !guarded
        .groups
        .iter()
        .any(|group| access::role_exists(group))
    {
        return Ok(());
    }
    let role = access::caller();
    for group in guarded.groups {
        if access::is_member(role, group)? {
            return Ok(());
        }
    }
    Err(Error::StoreWideDenied {
        what: guarded.what,
        who: guarded.who,
    })
}

#[allow(clippy::too_many_arguments)]
#[pg_guard]
unsafe extern "C-unwind" fn process_utility(
    statement: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    environment: *mut pg_sys::QueryEnvironment,
    destination: *mut pg_sys::DestReceiver,
    completion: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        let node = (*statement).utilityStmt;
        if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_ListenStmt {
            let listen = node.cast::<pg_sys::ListenStmt>();
            if let Err(refusal) = check_listen(CStr::from_ptr((*listen).conditionname)) {
                refusal.report();
            }
        }
        match PREVIOUS_HOOK {
            Some(previous) => previous(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                destination,
                completion,
            ),
            None => pg_sys::standard_ProcessUtility(
                statement,
                query,
                read_only_tree,
                context,
                params,
                environment,
                destination,
                completion,
            ),
        }
    }
}
