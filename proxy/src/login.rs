//! Logging in through a rotation. A refused login (28P01, 28000) before anything reached the
//! client is not the client's problem yet: the proxy drops the cached credential, tries
//! CURRENT, PENDING and PREVIOUS, and backs off within a budget before giving up.

use crate::backend::{self, BackendSession, Target};
use crate::config::{Route, Store};
use crate::credentials::{Credential, CredentialCache, STAGES};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub struct LoginSettings {
    pub budget: Duration,
    pub connect_timeout: Duration,
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
        route: route.database.clone(),
    }
}

pub async fn login_with_retry(
    route: &Route,
    store: &Store,
    credentials: &CredentialCache,
    client_parameters: &BTreeMap<String, String>,
    client_database: &str,
    settings: &LoginSettings,
    metrics: &Metrics,
) -> Result<BackendSession, ProxyError> {
    let deadline = Instant::now() + settings.budget;
    let mut delay = Duration::from_millis(25);
    let mut last_error: Option<ProxyError> = None;
    loop {
        for stage in STAGES {
            let credential = match credentials.get(&route.secret, stage).await {
                Ok(Some(credential)) => credential,
                Ok(None) => continue,
                Err(error) => {
                    metrics.retry("store");
                    last_error = Some(error);
                    break;
                }
            };
            let target = target(route, &credential, store, client_database);
            match backend::login(
                &target,
                &credential,
                client_parameters,
                settings.connect_timeout,
            )
            .await
            {
                Ok(session) => {
                    if stage != STAGES[0] {
                        tracing::info!(route = %route.database, stage, "logged in with a non-CURRENT credential during a rotation");
                    }
                    return Ok(session);
                }
                Err(error) if error.retryable() => {
                    metrics.retry(match error {
                        ProxyError::LoginRefused { .. } => "refused",
                        _ => "unreachable",
                    });
                    credentials.invalidate_if_used(&route.secret, &credential);
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        if Instant::now() + delay > deadline {
            return Err(last_error.unwrap_or_else(|| ProxyError::Store {
                secret: route.secret.clone(),
                reason: "the secret has no CURRENT, PENDING or PREVIOUS version".into(),
            }));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}
