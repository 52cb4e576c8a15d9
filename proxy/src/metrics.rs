//! Counters and a latency histogram for Prometheus, served as text on the admin port with
//! `/health`.

use crate::credentials::STAGES;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the login latency buckets, in seconds (Prometheus `le`).
const LOGIN_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A Prometheus histogram of durations: cumulative bucket counts, the sum and the count.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; LOGIN_BUCKETS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in LOGIN_BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str) -> String {
        let mut text = format!("# TYPE {name} histogram\n");
        for (bound, bucket) in LOGIN_BUCKETS.iter().zip(&self.buckets) {
            text += &format!(
                "{name}_bucket{{le=\"{bound}\"}} {}\n",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        text += &format!("{name}_bucket{{le=\"+Inf\"}} {count}\n");
        text += &format!(
            "{name}_sum {}\n{name}_count {count}\n",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        text
    }
}

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
    /// Transactions relayed on a server session lent for that transaction (transaction mode).
    pub pooled_transactions: AtomicU64,
    /// Transaction-mode clients held to one server session because they prepared a named
    /// statement, counted when they prepare it.
    pub pinned_clients: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// 1 while the store connection listening to `pg_secrets_changed` is up: without it a
    /// change reaches the cache only when the TTL runs out.
    pub store_listening: AtomicU64,
    /// Change notifications received from the store, each acted on (cache entries dropped).
    pub store_notifications: AtomicU64,
    /// Logins that used a last known credential while the secrets store was away.
    pub stale_credentials: AtomicU64,
    /// SCRAM logins to servers that derived keys with PBKDF2, and those that found them cached.
    pub scram_derivations: AtomicU64,
    pub scram_cache_hits: AtomicU64,
    /// SCRAM logins to servers bound to their TLS session (`tls-server-end-point`).
    pub scram_channel_bound: AtomicU64,
    /// Server logins by the staging label of the credential that logged in, in `STAGES`
    /// order: PENDING and PREVIOUS show a rotation under way.
    pub server_logins_by_stage: [AtomicU64; 3],
    /// Counted as relayed; for sessions the kernel relays, when they end.
    pub bytes_to_server: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// 1 when the kernel relay's eBPF program is loaded (`[limits] kernel_relay`).
    pub kernel_relay_available: AtomicU64,
    /// Sessions handed over to the kernel relay, and those it relays now.
    pub kernel_relayed_sessions: AtomicU64,
    pub kernel_relay_active: AtomicU64,
    /// Hand-overs called off: bytes arrived while they were made, or a socket could not be
    /// armed (those that had to close the session included); and those that could not start.
    pub kernel_relay_declined: AtomicU64,
    /// From a client's startup to a server connection ready for it (pool or new login,
    /// retries through rotation included).
    pub login_seconds: Histogram,
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

    pub fn server_login(&self, stage: &str) {
        if let Some(at) = STAGES.iter().position(|s| *s == stage) {
            self.server_logins_by_stage[at].fetch_add(1, Ordering::Relaxed);
        }
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
             # TYPE secrets_proxy_pooled_transactions_total counter\n\
             secrets_proxy_pooled_transactions_total {}\n\
             # TYPE secrets_proxy_pinned_clients_total counter\n\
             secrets_proxy_pinned_clients_total {}\n\
             # TYPE secrets_proxy_stale_credentials_served_total counter\n\
             secrets_proxy_stale_credentials_served_total {}\n\
             # TYPE secrets_proxy_credential_cache_total counter\n\
             secrets_proxy_credential_cache_total{{result=\"hit\"}} {}\n\
             secrets_proxy_credential_cache_total{{result=\"miss\"}} {}\n\
             # TYPE secrets_proxy_store_listening gauge\n\
             secrets_proxy_store_listening {}\n\
             # TYPE secrets_proxy_store_notifications_total counter\n\
             secrets_proxy_store_notifications_total {}\n\
             # TYPE secrets_proxy_scram_keys_total counter\n\
             secrets_proxy_scram_keys_total{{result=\"derived\"}} {}\n\
             secrets_proxy_scram_keys_total{{result=\"cached\"}} {}\n\
             # TYPE secrets_proxy_scram_channel_bound_logins_total counter\n\
             secrets_proxy_scram_channel_bound_logins_total {}\n\
             # TYPE secrets_proxy_server_logins_total counter\n\
             secrets_proxy_server_logins_total{{stage=\"CURRENT\"}} {}\n\
             secrets_proxy_server_logins_total{{stage=\"PENDING\"}} {}\n\
             secrets_proxy_server_logins_total{{stage=\"PREVIOUS\"}} {}\n\
             # TYPE secrets_proxy_relay_bytes_total counter\n\
             secrets_proxy_relay_bytes_total{{direction=\"to_server\"}} {}\n\
             secrets_proxy_relay_bytes_total{{direction=\"to_client\"}} {}\n\
             # TYPE secrets_proxy_kernel_relay_available gauge\n\
             secrets_proxy_kernel_relay_available {}\n\
             # TYPE secrets_proxy_kernel_relayed_sessions_total counter\n\
             secrets_proxy_kernel_relayed_sessions_total {}\n\
             # TYPE secrets_proxy_kernel_relay_active_sessions gauge\n\
             secrets_proxy_kernel_relay_active_sessions {}\n\
             # TYPE secrets_proxy_kernel_relay_declined_total counter\n\
             secrets_proxy_kernel_relay_declined_total {}\n",
            get(&self.connections),
            get(&self.active),
            get(&self.logins),
            get(&self.login_failures),
            get(&self.refused_retries),
            get(&self.unreachable_retries),
            get(&self.store_retries),
            get(&self.rejected_clients),
            get(&self.pool_reuses),
            get(&self.pooled_transactions),
            get(&self.pinned_clients),
            get(&self.stale_credentials),
            get(&self.cache_hits),
            get(&self.cache_misses),
            get(&self.store_listening),
            get(&self.store_notifications),
            get(&self.scram_derivations),
            get(&self.scram_cache_hits),
            get(&self.scram_channel_bound),
            get(&self.server_logins_by_stage[0]),
            get(&self.server_logins_by_stage[1]),
            get(&self.server_logins_by_stage[2]),
            get(&self.bytes_to_server),
            get(&self.bytes_to_client),
            get(&self.kernel_relay_available),
            get(&self.kernel_relayed_sessions),
            get(&self.kernel_relay_active),
            get(&self.kernel_relay_declined),
        ) + &self.login_seconds.render("secrets_proxy_login_seconds")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = Histogram::default();
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(30));
        histogram.observe(Duration::from_secs(20));
        let text = histogram.render("x");
        assert!(text.contains("x_bucket{le=\"0.001\"} 1\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("x_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("x_count 3\n"), "{text}");
        assert!(text.contains("x_sum 20.0305\n"), "{text}");
    }
}
