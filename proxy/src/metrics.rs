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

    /// `stale_served`: logins that used a last known credential while the store was away.
    pub fn render(&self, stale_served: u64) -> String {
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
             secrets_proxy_stale_credentials_served_total {}\n",
            get(&self.connections),
            get(&self.active),
            get(&self.logins),
            get(&self.login_failures),
            get(&self.refused_retries),
            get(&self.unreachable_retries),
            get(&self.store_retries),
            get(&self.rejected_clients),
            get(&self.pool_reuses),
            stale_served,
        )
    }
}
