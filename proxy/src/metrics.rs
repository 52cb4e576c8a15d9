//! Counters for Prometheus, served as text on the admin port with `/health`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    pub refused_retries: AtomicU64,
    pub unreachable_retries: AtomicU64,
    pub store_retries: AtomicU64,
    pub rejected_clients: AtomicU64,
    pub pool_reuses: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Logins that used a last known credential while the secrets store was away.
    pub stale_credentials: AtomicU64,
    pub bytes_to_server: AtomicU64,
    pub bytes_to_client: AtomicU64,
}

impl Metrics {
    pub fn retry(&self, reason: &str) {
        let counter = match reason {
            "refused" => &self.refused_retries,
            "unreachable" => &self.unreachable_retries,
            _ => &self.store_retries,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }

    pub fn render(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "# TYPE secrets_proxy_connections_total counter\n\
             secrets_proxy_connections_total {}\n\
             # TYPE secrets_proxy_active_clients gauge\n\
             secrets_proxy_active_clients {}\n\
             # TYPE secrets_proxy_logins_total counter\n\
             secrets_proxy_logins_total {}\n\
             # TYPE secrets_proxy_login_failures_total counter\n\
             secrets_proxy_login_failures_total {}\n\
             # TYPE secrets_proxy_login_retries_total counter\n\
             secrets_proxy_login_retries_total{{reason=\"refused\"}} {}\n\
             secrets_proxy_login_retries_total{{reason=\"unreachable\"}} {}\n\
             secrets_proxy_login_retries_total{{reason=\"store\"}} {}\n\
             # TYPE secrets_proxy_rejected_clients_total counter\n\
             secrets_proxy_rejected_clients_total {}\n\
             # TYPE secrets_proxy_pool_reuses_total counter\n\
             secrets_proxy_pool_reuses_total {}\n\
             # TYPE secrets_proxy_stale_credentials_served_total counter\n\
             secrets_proxy_stale_credentials_served_total {}\n\
             # TYPE secrets_proxy_credential_cache_total counter\n\
             secrets_proxy_credential_cache_total{{result=\"hit\"}} {}\n\
             secrets_proxy_credential_cache_total{{result=\"miss\"}} {}\n\
             # TYPE secrets_proxy_relay_bytes_total counter\n\
             secrets_proxy_relay_bytes_total{{direction=\"to_server\"}} {}\n\
             secrets_proxy_relay_bytes_total{{direction=\"to_client\"}} {}\n",
            get(&self.connections),
            get(&self.active),
            get(&self.logins),
            get(&self.login_failures),
            get(&self.refused_retries),
            get(&self.unreachable_retries),
            get(&self.store_retries),
            get(&self.rejected_clients),
            get(&self.pool_reuses),
            get(&self.stale_credentials),
            get(&self.cache_hits),
            get(&self.cache_misses),
            get(&self.bytes_to_server),
            get(&self.bytes_to_client),
        )
    }
}
