//! Logging in through a rotation. A refused login (28P01, 28000) before anything reached the
//! client is not the client's problem yet: the proxy drops the cached credential, tries
//! CURRENT, PENDING and PREVIOUS, and backs off within a budget before giving up. Once a
//! login found CURRENT refused and PENDING accepted, PENDING goes first for a while
//! (`stage_order`), so a rotation's window costs one refused login, not one per client.

use crate::backend::{self, BackendSession, ConnectSettings, Target};
use crate::config::{Route, Store};
use crate::credentials::{Credential, CredentialCache, STAGES};
use crate::error::{OneLine, ProxyError};
use crate::metrics::Metrics;
use crate::pool::Pool;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub struct LoginSettings<'a> {
    pub budget: Duration,
    pub connect: ConnectSettings<'a>,
    /// When `connect`'s TLS rules were read: a new session's birth. A reload after it clears
    /// the pool (`Pool::clear`), and a session born before the clear is not taken back, so
    /// a login that began under the old rules can never be pooled under the new ones.
    pub rules_read_at: Instant,
}

/// Route overrides first, then the credential; a credential without a host means the
/// cluster the secrets store runs in.
fn target(route: &Route, credential: &Credential, store: &Store, client_database: &str) -> Target {
    let (host, port) = match (&route.host, &credential.host) {
        (Some(host), _) => (host.clone(), route.port.or(credential.port).unwrap_or(5432)),
        (None, Some(host)) => (host.clone(), route.port.or(credential.port).unwrap_or(5432)),
        (None, None) => (store.host.clone(), route.port.unwrap_or(store.port)),
    };
    Target {
        host,
        port,
        dbname: route
            .dbname
            .clone()
            .or_else(|| credential.dbname.clone())
            .unwrap_or_else(|| client_database.to_string()),
        route: route.name(),
    }
}

/// Everything that shaped a server session, so a pooled one is only reused for an identical
/// request.
fn pool_key(
    route: &Route,
    target: &Target,
    credential: &Credential,
    client_parameters: &BTreeMap<String, String>,
) -> String {
    // Sessions of the two modes never mix: a session-mode client gets a reset session, and a
    // transaction-mode session is not reset between the transactions it serves.
    let mut key = format!(
        "{:?}\0{}\0{}\0{}\0{}",
        route.pool_mode, target.host, target.port, target.dbname, credential.username
    );
    // Each name and value with its length: a name may hold `=` and a value anything but NUL,
    // so joined they could read as another pair.
    for (name, value) in client_parameters {
        key.push_str(&format!("\0{}:{name}\0{}:{value}", name.len(), value.len()));
    }
    key
}

/// A server session for the route: an idle pooled one when there is one for the current
/// credential's target, otherwise a new login. Returns the session, its pool key and birth.
#[allow(clippy::too_many_arguments)]
pub async fn connect(
    route: &Route,
    store: &Store,
    credentials: &CredentialCache,
    pool: &Pool,
    client_parameters: &BTreeMap<String, String>,
    client_database: &str,
    settings: &LoginSettings<'_>,
    metrics: &Metrics,
) -> Result<(BackendSession, String, Instant), ProxyError> {
    if let Ok(Some(credential)) = credentials.get(&route.secret, STAGES[0]).await {
        let key = pool_key(
            route,
            &target(route, &credential, store, client_database),
            &credential,
            client_parameters,
        );
        if let Some((session, born)) = pool.checkout(&key) {
            metrics.pool_reuses.fetch_add(1, Ordering::Relaxed);
            return Ok((session, key, born));
        }
    }
    let (session, key) = login_with_retry(
        route,
        store,
        credentials,
        client_parameters,
        client_database,
        settings,
        metrics,
    )
    .await?;
    Ok((session, key, settings.rules_read_at))
}

async fn login_with_retry(
    route: &Route,
    store: &Store,
    credentials: &CredentialCache,
    client_parameters: &BTreeMap<String, String>,
    client_database: &str,
    settings: &LoginSettings<'_>,
    metrics: &Metrics,
) -> Result<(BackendSession, String), ProxyError> {
    let deadline = Instant::now() + settings.budget;
    let mut delay = Duration::from_millis(25);
    let mut last_error: Option<ProxyError> = None;
    let mut attempted = false;
    let mut current_refused = false;
    loop {
        // Whether anything in this round could turn out otherwise if asked again: a round in
        // which the store only refused (no such secret, no `get` on it, not credential JSON)
        // ends the login at once rather than keep the client for the whole budget.
        let mut worth_retrying = false;
        for stage in credentials.stage_order(route) {
            let generation = credentials.generation();
            let credential = match credentials.get(&route.secret, stage).await {
                Ok(Some(credential)) => credential,
                Ok(None) => continue,
                Err(error @ ProxyError::StoreRefused { .. }) => {
                    // The reason names a field, never a value.
                    tracing::warn!(route = %route.name(), stage, error = %OneLine(&error), "a stage of the route's secret is not a usable credential");
                    last_error.get_or_insert(error);
                    continue;
                }
                Err(error) => {
                    metrics.retry("store");
                    last_error = Some(error);
                    worth_retrying = true;
                    break;
                }
            };
            worth_retrying = true;
            // The first attempt has the server's connect timeout whatever the budget (a budget
            // of 0 means no retries); a later one only what is left of the budget.
            let budget_left = if attempted {
                deadline.saturating_duration_since(Instant::now())
            } else {
                settings.connect.timeout
            };
            if budget_left.is_zero() {
                break;
            }
            let cut_short = attempted && budget_left < settings.connect.timeout;
            attempted = true;
            let target = target(route, &credential, store, client_database);
            let login = backend::login(
                &target,
                &credential,
                client_parameters,
                &settings.connect,
                budget_left,
            );
            match login.await {
                Ok(session) => {
                    if current_refused && stage == "PENDING" {
                        credentials.pending_accepted(route, generation);
                    }
                    metrics.server_login(stage);
                    match stage {
                        "CURRENT" => {}
                        // The server still has the old password: a rotation that moved the
                        // labels without reaching the server, or a password set back by hand.
                        // Logins keep working, but only until PREVIOUS moves on. (A CURRENT
                        // that is no credential is logged above.)
                        "PREVIOUS" if current_refused => {
                            if let Some(unwarned) = credentials.previous_accepted(route) {
                                tracing::warn!(
                                    route = %route.name(),
                                    secret = %route.secret,
                                    logins_since_last_warning = unwarned,
                                    "the server refused CURRENT and accepted PREVIOUS: the \
                                     secret's CURRENT value is not the server's password"
                                )
                            }
                        }
                        _ => {
                            tracing::info!(route = %route.name(), stage, "logged in with a non-CURRENT credential")
                        }
                    }
                    return Ok((
                        session,
                        pool_key(route, &target, &credential, client_parameters),
                    ));
                }
                Err(error) if error.retryable() => {
                    // Only a refused login says the credential may have changed; a server
                    // that is down says nothing about it.
                    if let ProxyError::LoginRefused { .. } = error {
                        metrics.retry("refused");
                        credentials.invalidate_if_used(&route.secret, &credential);
                        current_refused |= stage == STAGES[0];
                    } else {
                        metrics.retry("unreachable");
                    }
                    // An attempt cut short by the budget says less than what came before it
                    // (a refusal's own SQLSTATE, say).
                    if !(cut_short && last_error.is_some()) {
                        last_error = Some(error);
                    }
                }
                Err(error) => return Err(error),
            }
        }
        if (!worth_retrying && last_error.is_some()) || Instant::now() + delay > deadline {
            return Err(last_error.unwrap_or_else(|| ProxyError::Store {
                secret: route.secret.clone(),
                reason: "the secret has no CURRENT, PENDING or PREVIOUS version".into(),
            }));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}
