//! Clients that have connected but not yet sent their startup packet, counted per source: an
//! IP address, or an operating-system user on the Unix socket. Until then nothing is known of
//! them, and each holds one of `[limits] max_clients` until `client_login_timeout_ms` sends it
//! away; `[limits] max_pending_logins_per_source` caps how many one source may hold, so one
//! host opening silent connections cannot lock every other client out.

use crate::error::ProxyError;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct PendingLogins {
    by_source: Mutex<HashMap<String, usize>>,
}

/// One client's place among its source's pending logins, given back when dropped.
pub struct PendingLogin<'a> {
    logins: &'a PendingLogins,
    source: String,
}

impl PendingLogins {
    /// Counts a client of `source` as pending, unless `limit` of them already are.
    pub fn enter(&self, source: String, limit: usize) -> Result<PendingLogin<'_>, ProxyError> {
        let mut by_source = self.by_source.lock().expect("pending logins lock poisoned");
        let pending = by_source.entry(source.clone()).or_default();
        if *pending >= limit {
            return Err(ProxyError::TooManyPendingLogins {
                from: source,
                limit,
            });
        }
        *pending += 1;
        Ok(PendingLogin {
            logins: self,
            source,
        })
    }
}

impl Drop for PendingLogin<'_> {
    fn drop(&mut self) {
        let mut by_source = self
            .logins
            .by_source
            .lock()
            .expect("pending logins lock poisoned");
        if let Some(pending) = by_source.get_mut(&self.source) {
            *pending -= 1;
            // Sources come and go: keep only those with clients pending.
            if *pending == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_at_its_limit_is_refused_until_one_of_its_logins_ends() {
        let logins = PendingLogins::default();
        let first = logins.enter("10.0.0.1".into(), 2).unwrap();
        let _second = logins.enter("10.0.0.1".into(), 2).unwrap();
        let refused = logins.enter("10.0.0.1".into(), 2).err().unwrap();
        assert_eq!(refused.sqlstate(), "53300");
        // Other sources are not affected.
        let _other = logins.enter("10.0.0.2".into(), 2).unwrap();
        drop(first);
        let _third = logins.enter("10.0.0.1".into(), 2).unwrap();
    }

    #[test]
    fn sources_without_pending_logins_are_forgotten() {
        let logins = PendingLogins::default();
        drop(logins.enter("10.0.0.1".into(), 1).unwrap());
        assert!(logins.by_source.lock().unwrap().is_empty());
    }
}
