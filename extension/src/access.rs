//! Who may do what. Until per-secret grants exist, the model is: superusers and members of
//! `secrets_admin` may do everything, members of `secrets_reader` may get and describe every
//! secret, and members of a secret's owner role (the role that created it) have every right on
//! that secret.

use pgrx::pg_sys::{self, Oid};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    Create,
    Get,
    Describe,
    Put,
    Rotate,
    Delete,
    Manage,
}

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
}

/// The role on whose behalf a function runs. The functions are SECURITY DEFINER, so
/// `GetUserId()` is the extension owner; the outer user id is the caller's current_user
/// (including `SET ROLE`), which a SECURITY DEFINER call does not change.
pub fn caller() -> Oid {
    unsafe { pg_sys::GetOuterUserId() }
}

fn member_of(role: Oid, group: &std::ffi::CStr) -> bool {
    let group = unsafe { pg_sys::get_role_oid(group.as_ptr(), true) };
    group != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(role, group) }
}

/// Rights on every secret, whoever owns it. Used also to decide whether a missing secret may
/// be reported as missing; for anyone else it is "permission denied", so names cannot be probed.
pub fn may_on_any(role: Oid, action: Action) -> bool {
    let superuser = unsafe { pg_sys::superuser_arg(role) };
    superuser
        || member_of(role, c"secrets_admin")
        || (matches!(action, Action::Get | Action::Describe) && member_of(role, c"secrets_reader"))
}

pub fn may(role: Oid, action: Action, owner: Oid) -> bool {
    let owns = unsafe { pg_sys::has_privs_of_role(role, owner) };
    (action != Action::Create && owns) || may_on_any(role, action)
}
