//! Per-backend caches of what the access predicate reads: grants (by grantee), resource
//! policies (by secret), and each role's memberships. They are dropped through PostgreSQL's
//! invalidation machinery, the way its own catalog caches are:
//!
//! - writers of grants and policies call `CacheInvalidateRelcacheByRelid` on the table, which
//!   PostgreSQL delivers to every backend when (and only if) the transaction commits, and to
//!   this backend at the end of the command;
//! - changes to roles and role memberships arrive as syscache invalidations of `pg_authid`
//!   and `pg_auth_members`; they also drop the cache of role names.

use super::policy::{self, Policy, Source};
use super::Actions;
use crate::db::required;
use crate::errors::{Error, Result};
use crate::index_read::relation_oid;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::Uuid;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// One row of `secrets.access_grant`.
pub struct Grant {
    pub id: Uuid,
    pub pattern: String,
    pub grantee: Oid,
    pub actions: Actions,
    /// Unix microseconds.
    pub valid_until: Option<i64>,
}

impl Grant {
    pub fn describe(&self) -> String {
        let until = match self.valid_until {
            Some(until) => chrono::DateTime::from_timestamp_micros(until)
                .map(|t| format!(" until {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_default(),
            None => String::new(),
        };
        format!(
            "grant {} of {} on \"{}\" to {}{until}",
            self.id,
            self.actions.names().join(", "),
            self.pattern,
            super::role_name(self.grantee)
        )
    }
}

#[derive(Default)]
pub struct GrantIndex {
    by_grantee: HashMap<Oid, Vec<Rc<Grant>>>,
}

impl GrantIndex {
    pub fn for_grantee(&self, grantee: Oid) -> &[Rc<Grant>] {
        self.by_grantee.get(&grantee).map_or(&[], Vec::as_slice)
    }
}

/// The roles a role belongs to, with and without their privileges, and whether it has the
/// privileges of `secrets_admin` or `secrets_reader`.
pub struct Membership {
    /// The roles whose privileges the role has: itself, and every role it belongs to through
    /// INHERIT memberships. Grants, allows and ownership follow these.
    pub roles: Vec<Oid>,
    /// Every role it belongs to, NOINHERIT memberships included (it can SET ROLE to them):
    /// deny statements follow these, so a member cannot step out of its group's deny by
    /// holding the membership without inheriting it.
    pub member_of: Vec<Oid>,
    pub admin: bool,
    pub reader: bool,
}

pub struct SessionInfo {
    pub source: Option<Source>,
    /// As the audit trail records them: NULL for Unix sockets and background workers.
    pub address: Option<String>,
    pub port: Option<i32>,
}

/// Each secret's resource policy, or why the stored document does not parse.
type Policies = HashMap<Uuid, std::result::Result<Rc<Policy<Oid>>, String>>;

/// A cache entry and how long it may be used. It is loaded under a snapshot taken at the load
/// (`with_latest_snapshot`), so it saw every commit whose invalidation this backend has
/// received, and stays until the next invalidation. Under REPEATABLE READ or SERIALIZABLE, a
/// transaction that has written uses its own snapshot for every query whatever is pushed,
/// which can be older than an invalidation already received (a grant revoked since the
/// transaction began), so what it loads serves only the rest of that transaction.
struct Loaded<T> {
    value: Rc<T>,
    /// The local transaction id it is limited to.
    only_in: Option<pg_sys::LocalTransactionId>,
}

impl<T> Loaded<T> {
    fn new(value: Rc<T>) -> Loaded<T> {
        // SAFETY: backend globals, set while a transaction runs.
        let only_in = unsafe {
            (pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32)
                .then(|| (*pg_sys::MyProc).lxid)
        };
        Loaded { value, only_in }
    }

    fn usable(&self) -> Option<Rc<T>> {
        // SAFETY: as above.
        let current = unsafe { (*pg_sys::MyProc).lxid };
        self.only_in
            .is_none_or(|lxid| lxid == current)
            .then(|| self.value.clone())
    }
}

thread_local! {
    static GRANTS: RefCell<Option<Loaded<GrantIndex>>> = const { RefCell::new(None) };
    static POLICIES: RefCell<Option<Loaded<Policies>>> = const { RefCell::new(None) };
    static MEMBERSHIP: RefCell<HashMap<Oid, Loaded<Membership>>> = RefCell::new(HashMap::new());
    static SESSION: RefCell<Option<Rc<SessionInfo>>> = const { RefCell::new(None) };
    /// Role names by OID: every audit record names two roles.
    static ROLE_NAMES: RefCell<HashMap<Oid, String>> = RefCell::new(HashMap::new());
    /// The tables the caches were loaded from, so invalidation callbacks need no catalog access.
    static GRANT_TABLE: Cell<Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static POLICY_TABLE: Cell<Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Counts the invalidations that emptied a cache (`keepable`).
    static INVALIDATIONS: Cell<u64> = const { Cell::new(0) };
}

/// Whether what was loaded since `INVALIDATIONS` read `before` may be kept for later calls. Not
/// when an invalidation arrived during the load: its query took the table's lock, which is
/// when invalidations are accepted, after its snapshot was taken, so it may predate the change
/// (a revoke). Nor when loaded in parallel mode, where the statement's own, older snapshot
/// served. Either way it serves the call that loaded it, as the statement's snapshot would.
fn keepable(before: u64) -> bool {
    INVALIDATIONS.with(Cell::get) == before && !unsafe { pg_sys::IsInParallelMode() }
}

fn count_invalidation() {
    INVALIDATIONS.with(|count| count.set(count.get() + 1));
}

/// Runs a cache load under a snapshot taken now. A statement's own snapshot can be older than
/// an invalidation the backend accepts during the statement (a revoke committed while it ran):
/// loaded under it, a revoked grant would be cached until the next change.
fn with_latest_snapshot<T>(load: impl FnOnce() -> T) -> T {
    /// Pops the snapshot when the load returns; when an error unwinds through it, the
    /// (sub)transaction's abort pops it instead.
    struct Pushed;
    impl Drop for Pushed {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                // SAFETY: pushed by `with_latest_snapshot`; SPI pops what it pushes.
                unsafe { pg_sys::PopActiveSnapshot() };
            }
        }
    }
    // A row-level security predicate can run in the leader of a parallel query, where
    // PostgreSQL takes no new snapshot; the statement's then serves.
    if unsafe { pg_sys::IsInParallelMode() } {
        return load();
    }
    // SAFETY: inside a transaction, as every access decision is.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let _pushed = Pushed;
    load()
}

/// What `slot` holds while it may be used, or what `load` loads (under a fresh snapshot), kept
/// there from then on.
fn cached<T>(
    slot: &'static std::thread::LocalKey<RefCell<Option<Loaded<T>>>>,
    load: impl FnOnce() -> Result<T>,
) -> Result<Rc<T>> {
    if let Some(cached) = slot.with(|slot| slot.borrow().as_ref().and_then(Loaded::usable)) {
        return Ok(cached);
    }
    let before = INVALIDATIONS.with(Cell::get);
    let value = Rc::new(with_latest_snapshot(load)?);
    if keepable(before) {
        slot.with(|slot| *slot.borrow_mut() = Some(Loaded::new(value.clone())));
    }
    Ok(value)
}

pub fn grants() -> Result<Rc<GrantIndex>> {
    cached(&GRANTS, load_grants)
}

fn load_grants() -> Result<GrantIndex> {
    let table_oid = relation_oid(c"access_grant")?;
    GRANT_TABLE.with(|table| table.set(table_oid));
    let mut index = GrantIndex::default();
    Spi::connect(|client| -> Result<()> {
        let rows = client.select(
            "SELECT id, name_pattern, grantee::oid, actions, \
                    (pg_catalog.date_part('epoch', valid_until) * 1000000)::int8 \
             FROM secrets.access_grant",
            None,
            &[],
        )?;
        for row in rows {
            let actions: Vec<String> = row.get(4)?.unwrap_or_default();
            let grant = Grant {
                id: required(&row, 1)?,
                pattern: required(&row, 2)?,
                grantee: required(&row, 3)?,
                actions: Actions::parse(&actions).unwrap_or_default(),
                valid_until: row.get(5)?,
            };
            index
                .by_grantee
                .entry(grant.grantee)
                .or_default()
                .push(Rc::new(grant));
        }
        Ok(())
    })?;
    Ok(index)
}

fn all_policies() -> Result<Rc<Policies>> {
    cached(&POLICIES, load_policies)
}

fn load_policies() -> Result<Policies> {
    let table_oid = relation_oid(c"resource_policy")?;
    POLICY_TABLE.with(|table| table.set(table_oid));
    let mut policies = Policies::new();
    Spi::connect(|client| -> Result<()> {
        for row in client.select(
            "SELECT secret_id, policy FROM secrets.resource_policy",
            None,
            &[],
        )? {
            let id: Uuid = required(&row, 1)?;
            let document: pgrx::JsonB = required(&row, 2)?;
            // Stored policies were validated; a role dropped since then simply matches no one.
            // One that does not parse (edited in the table, or stored by another version) is
            // kept as its problem: its denials cannot be told, so access fails closed.
            let parsed = policy::parse(&document.0, &mut resolve_role, &mut Vec::new())
                .map(Rc::new)
                .map_err(|finding| match finding.statement {
                    0 => finding.problem,
                    n => format!("statement {n}: {}", finding.problem),
                });
            policies.insert(id, parsed);
        }
        Ok(())
    })?;
    Ok(policies)
}

/// The secret's resource policy; an error if its stored document does not parse.
pub fn policy_of(secret_id: Uuid) -> Result<Option<Rc<Policy<Oid>>>> {
    match all_policies()?.get(&secret_id) {
        None => Ok(None),
        Some(Ok(policy)) => Ok(Some(Rc::clone(policy))),
        Some(Err(problem)) => Err(Error::UnreadablePolicy {
            secret_id,
            problem: problem.clone(),
        }),
    }
}

pub fn resolve_role(name: &str) -> Option<Oid> {
    let name = std::ffi::CString::new(name).ok()?;
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

pub fn membership(role: Oid) -> Result<Rc<Membership>> {
    if let Some(cached) =
        MEMBERSHIP.with(|cache| cache.borrow().get(&role).and_then(Loaded::usable))
    {
        return Ok(cached);
    }
    let before = INVALIDATIONS.with(Cell::get);
    let member_of: Vec<(Oid, bool)> = with_latest_snapshot(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT oid, pg_catalog.pg_has_role($1, oid, 'USAGE') FROM pg_catalog.pg_roles \
                     WHERE pg_catalog.pg_has_role($1, oid, 'MEMBER')",
                    None,
                    &[role.into()],
                )?
                .map(|row| Ok((required(&row, 1)?, required(&row, 2)?)))
                .collect::<Result<_>>()
        })
    })?;
    let roles: Vec<Oid> = member_of
        .iter()
        .filter(|(_, inherited)| *inherited)
        .map(|(oid, _)| *oid)
        .collect();
    let has_privileges_of = |name: &str| resolve_role(name).is_some_and(|oid| roles.contains(&oid));
    let membership = Rc::new(Membership {
        admin: has_privileges_of("secrets_admin"),
        reader: has_privileges_of("secrets_reader"),
        member_of: member_of.into_iter().map(|(oid, _)| oid).collect(),
        roles,
    });
    if keepable(before) {
        MEMBERSHIP.with(|cache| {
            cache
                .borrow_mut()
                .insert(role, Loaded::new(membership.clone()))
        });
    }
    Ok(membership)
}

/// The client's address: `None` in a background worker, `Local` on a Unix socket.
pub fn session() -> Result<Rc<SessionInfo>> {
    if let Some(cached) = SESSION.with(|session| session.borrow().clone()) {
        return Ok(cached);
    }
    let info = if unsafe { pg_sys::MyProcPort.is_null() } {
        SessionInfo {
            source: None,
            address: None,
            port: None,
        }
    } else {
        let (address, port) = Spi::connect(|client| -> Result<_> {
            let row = client
                .select(
                    "SELECT pg_catalog.host(pg_catalog.inet_client_addr()), \
                            pg_catalog.inet_client_port()",
                    Some(1),
                    &[],
                )?
                .first();
            Ok((row.get::<String>(1)?, row.get::<i32>(2)?))
        })?;
        SessionInfo {
            source: match &address {
                None => Some(Source::Local),
                Some(text) => text.parse().ok().map(Source::Ip),
            },
            address,
            port,
        }
    };
    let info = Rc::new(info);
    SESSION.with(|session| *session.borrow_mut() = Some(info.clone()));
    Ok(info)
}

pub fn application_name() -> String {
    // SAFETY: the GUC's storage, always a valid string once the backend is up.
    let name = unsafe { pg_sys::application_name };
    if name.is_null() {
        String::new()
    } else {
        unsafe { std::ffi::CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
pub const POSTGRES_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    now + POSTGRES_EPOCH_OFFSET_MICROS
}

/// After writing `secrets.access_grant`: every backend drops its grant cache at commit.
pub fn invalidate_grants() {
    invalidate(c"access_grant");
}

/// After writing `secrets.resource_policy`.
pub fn invalidate_policies() {
    invalidate(c"resource_policy");
}

fn invalidate(table: &'static std::ffi::CStr) {
    if let Ok(oid) = relation_oid(table) {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(oid) };
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_argument: pg_sys::Datum, relation: Oid) {
    let all = relation == pg_sys::InvalidOid;
    let (grant_table, policy_table) = (GRANT_TABLE.with(Cell::get), POLICY_TABLE.with(Cell::get));
    // Before the first load the tables are not known yet: any relation may be one of them.
    let unknown = grant_table == pg_sys::InvalidOid || policy_table == pg_sys::InvalidOid;
    let grants = all || unknown || grant_table == relation;
    let policies = all || unknown || policy_table == relation;
    if grants {
        GRANTS.with(|grants| grants.borrow_mut().take());
    }
    if policies {
        POLICIES.with(|policies| policies.borrow_mut().take());
    }
    if grants || policies {
        count_invalidation();
    }
}

/// Policies name roles, resolved when they are loaded: a role created, renamed or dropped
/// since must be looked up again, or a `deny` naming a role created later would miss it.
#[pg_guard]
unsafe extern "C-unwind" fn roles_changed(_argument: pg_sys::Datum, _cache: i32, _hash: u32) {
    MEMBERSHIP.with(|cache| cache.borrow_mut().clear());
    ROLE_NAMES.with(|names| names.borrow_mut().clear());
    POLICIES.with(|policies| policies.borrow_mut().take());
    count_invalidation();
}

/// `role`'s name, found by `look_up` unless known since roles last changed (a rename
/// included).
pub fn role_name(role: Oid, look_up: impl FnOnce() -> String) -> String {
    if let Some(name) = ROLE_NAMES.with(|names| names.borrow().get(&role).cloned()) {
        return name;
    }
    let name = look_up();
    ROLE_NAMES.with(|names| names.borrow_mut().insert(role, name.clone()));
    name
}

/// Called from `_PG_init`, so every backend inherits the callbacks.
pub fn register_invalidation_callbacks() {
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0));
        for cache in [
            pg_sys::SysCacheIdentifier::AUTHMEMMEMROLE,
            pg_sys::SysCacheIdentifier::AUTHOID,
        ] {
            pg_sys::CacheRegisterSyscacheCallback(
                cache as i32,
                Some(roles_changed),
                pg_sys::Datum::from(0),
            );
        }
    }
}
