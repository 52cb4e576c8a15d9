//! The client side of SCRAM-SHA-256 (RFC 5802, RFC 7677) for server logins, with the costly
//! part cached.
//!
//! The server's SCRAM secret fixes the salt and iteration count, so every login with one
//! password derives the same keys: PBKDF2 with 4096 HMAC rounds, most of a login's CPU in the
//! proxy. The cache keeps the derived client and server keys per (salt, iterations, password),
//! the password being represented by an HMAC under a key that exists only in this process's
//! memory. A rotated password is a new cache key; old entries are simply never asked for again
//! and leave with the bound on the cache's size. A derivation runs on a blocking thread, once
//! for all the logins that need it at the same moment (after a rotation, every reconnecting
//! client): PBKDF2 takes milliseconds, which on a runtime thread would stall every session it
//! relays.

use crate::metrics::Metrics;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The server chooses the iteration count; one far above PostgreSQL's default (4096) would
/// let a hostile server make the proxy burn CPU.
const MAX_ITERATIONS: u32 = 100_000;
/// Entries kept; a deployment has a few passwords per route, and a full cache starts over.
const MAX_ENTRIES: usize = 4096;
const NONCE_LENGTH: usize = 24;
/// PostgreSQL's salts are 16 bytes; a longer one would only make cache keys big.
const MAX_SALT_BYTES: usize = 64;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// What PBKDF2 yields for one (password, salt, iterations).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct DerivedKeys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl DerivedKeys {
    fn derive(password: &[u8], salt: &[u8], iterations: u32) -> DerivedKeys {
        let mut salted = [0u8; 32];
        let normalized = zeroize::Zeroizing::new(normalize(password));
        pbkdf2::pbkdf2_hmac::<Sha256>(&normalized, salt, iterations, &mut salted);
        let keys = DerivedKeys {
            client_key: hmac(&salted, b"Client Key"),
            server_key: hmac(&salted, b"Server Key"),
        };
        salted.zeroize();
        keys
    }
}

/// SASLprep, as the server applies it; a password it rejects is used as raw bytes, as
/// PostgreSQL does.
fn normalize(password: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(password).map(stringprep::saslprep) {
        Ok(Ok(prepared)) => prepared.into_owned().into_bytes(),
        _ => password.to_vec(),
    }
}

#[derive(PartialEq, Eq, Hash)]
struct CacheKey {
    salt: Vec<u8>,
    iterations: u32,
    password_tag: [u8; 32],
}

pub struct ScramCache {
    /// Turns a password into a cache key without keeping anything that could be tested
    /// against guesses outside this process.
    tag_key: [u8; 32],
    /// Each entry is set once; logins that find it unset wait for the one deriving it.
    entries: Mutex<HashMap<CacheKey, Arc<OnceCell<DerivedKeys>>>>,
    metrics: Arc<Metrics>,
}

impl Drop for ScramCache {
    fn drop(&mut self) {
        self.tag_key.zeroize();
    }
}

impl ScramCache {
    pub fn new(metrics: Arc<Metrics>) -> ScramCache {
        ScramCache {
            tag_key: rand::thread_rng().gen(),
            entries: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    async fn keys(
        &self,
        password: &[u8],
        salt: &[u8],
        iterations: u32,
    ) -> Result<DerivedKeys, String> {
        let key = CacheKey {
            salt: salt.to_vec(),
            iterations,
            password_tag: hmac(&self.tag_key, password),
        };
        let entry = {
            let mut entries = self.entries.lock().expect("scram cache lock");
            if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
                entries.clear();
            }
            Arc::clone(entries.entry(key).or_default())
        };
        if let Some(keys) = entry.get() {
            Metrics::count(&self.metrics.scram_cache_hits, 1);
            return Ok(keys.clone());
        }
        let keys = entry
            .get_or_try_init(|| async {
                let (password, salt) = (Zeroizing::new(password.to_vec()), salt.to_vec());
                let keys = tokio::task::spawn_blocking(move || {
                    DerivedKeys::derive(&password, &salt, iterations)
                })
                .await
                .map_err(|_| "the SCRAM key derivation did not finish".to_string())?;
                Metrics::count(&self.metrics.scram_derivations, 1);
                Ok::<_, String>(keys)
            })
            .await?;
        Ok(keys.clone())
    }
}

/// One login's exchange: `client_first`, then `client_final` for the server's first message,
/// then `verify_server_final`.
pub struct ScramExchange {
    client_first_bare: String,
    nonce: String,
    binding: ChannelBinding,
    /// Set by `client_final`: the server's signature to expect.
    expected_server_signature: Option<[u8; 32]>,
    /// Set when the server's signature matched.
    verified: bool,
}

/// What the client says about channel binding (RFC 5802, section 6; RFC 5929).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Not over TLS: "n".
    Unsupported,
    /// Over TLS, but the server offered no SCRAM-SHA-256-PLUS: "y". A server that does
    /// support it refuses the login, so someone in the middle cannot strip the offer.
    NotOffered,
    /// `tls-server-end-point`: the hash of the server's certificate, binding the login to this
    /// TLS session, so it cannot be relayed through another.
    ServerEndPoint(Vec<u8>),
}

impl ChannelBinding {
    fn gs2_header(&self) -> &'static str {
        match self {
            ChannelBinding::Unsupported => "n,,",
            ChannelBinding::NotOffered => "y,,",
            ChannelBinding::ServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The client-final message's `c` attribute: base64 of the GS2 header and binding data.
    fn c_attribute(&self) -> String {
        let mut input = self.gs2_header().as_bytes().to_vec();
        if let ChannelBinding::ServerEndPoint(data) = self {
            input.extend_from_slice(data);
        }
        STANDARD.encode(input)
    }
}

fn invalid(what: &str) -> String {
    format!("invalid SCRAM message from the server: {what}")
}

impl ScramExchange {
    pub fn start(binding: ChannelBinding) -> ScramExchange {
        let mut rng = rand::thread_rng();
        // Printable ASCII without ',' (RFC 5802's `printable`).
        let nonce = (0..NONCE_LENGTH)
            .map(|_| match rng.gen_range(0x21u8..0x7f) {
                b',' => '~',
                byte => byte as char,
            })
            .collect();
        // PostgreSQL takes the user from the startup message and ignores this one.
        ScramExchange::with_nonce("", nonce, binding)
    }

    fn with_nonce(user: &str, nonce: String, binding: ChannelBinding) -> ScramExchange {
        ScramExchange {
            client_first_bare: format!("n={user},r={nonce}"),
            nonce,
            binding,
            expected_server_signature: None,
            verified: false,
        }
    }

    /// The SASL mechanism this exchange runs.
    pub fn mechanism(&self) -> &'static str {
        match self.binding {
            ChannelBinding::ServerEndPoint(_) => "SCRAM-SHA-256-PLUS",
            _ => "SCRAM-SHA-256",
        }
    }

    /// The client-first message: the GS2 header, then the bare message.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare).into_bytes()
    }

    /// The client-final message with its proof, for the server-first message.
    pub async fn client_final(
        &mut self,
        server_first: &[u8],
        password: &[u8],
        cache: &ScramCache,
    ) -> Result<Vec<u8>, String> {
        let server_first = std::str::from_utf8(server_first).map_err(|_| invalid("not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attribute in server_first.split(',') {
            match attribute.split_once('=') {
                Some(("r", value)) => nonce = Some(value),
                Some(("s", value)) => salt = Some(value),
                Some(("i", value)) => iterations = Some(value),
                Some(("m", _)) => return Err(invalid("mandatory extension")),
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| invalid("no nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(invalid("the nonce does not extend ours"));
        }
        let salt = STANDARD
            .decode(salt.ok_or_else(|| invalid("no salt"))?)
            .map_err(|_| invalid("salt is not base64"))?;
        if salt.is_empty() || salt.len() > MAX_SALT_BYTES {
            return Err(invalid(&format!(
                "a salt of {} bytes (1 to {MAX_SALT_BYTES})",
                salt.len()
            )));
        }
        let iterations: u32 = iterations
            .ok_or_else(|| invalid("no iteration count"))?
            .parse()
            .map_err(|_| invalid("iteration count"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(invalid(&format!(
                "iteration count {iterations} (at most {MAX_ITERATIONS})"
            )));
        }

        let keys = cache.keys(password, &salt, iterations).await?;
        if matches!(self.binding, ChannelBinding::ServerEndPoint(_)) {
            Metrics::count(&cache.metrics.scram_channel_bound, 1);
        }
        let stored_key: [u8; 32] = Sha256::digest(keys.client_key).into();
        let without_proof = format!("c={},r={nonce}", self.binding.c_attribute());
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = keys.client_key;
        for (proof, signature) in proof.iter_mut().zip(signature) {
            *proof ^= signature;
        }
        self.expected_server_signature = Some(hmac(&keys.server_key, auth_message.as_bytes()));
        let message = format!("{without_proof},p={}", STANDARD.encode(proof));
        proof.zeroize();
        Ok(message.into_bytes())
    }

    /// Whether the server has proved it knows the password.
    pub fn server_verified(&self) -> bool {
        self.verified
    }

    /// The server proves it knew the password too.
    pub fn verify_server_final(&mut self, server_final: &[u8]) -> Result<(), String> {
        let expected = self
            .expected_server_signature
            .ok_or_else(|| invalid("final message before the first"))?;
        let text = std::str::from_utf8(server_final).map_err(|_| invalid("not UTF-8"))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(format!("the server refused the SCRAM exchange: {error}"));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v.split(',').next().unwrap_or(v)).ok())
            .ok_or_else(|| invalid("no verifier"))?;
        if signature != expected {
            return Err(
                "the server's SCRAM signature is wrong: it does not know the password".into(),
            );
        }
        self.verified = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn counted(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// RFC 7677, section 3: user "user", password "pencil".
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    /// The GS2 header and the `c` attribute for each channel-binding answer (RFC 5802 §7).
    #[tokio::test]
    async fn channel_binding_headers() {
        let cache = ScramCache::new(Arc::new(Metrics::default()));
        let cases = [
            (
                ChannelBinding::Unsupported,
                "SCRAM-SHA-256",
                "n,,",
                b"n,,".to_vec(),
            ),
            (
                ChannelBinding::NotOffered,
                "SCRAM-SHA-256",
                "y,,",
                b"y,,".to_vec(),
            ),
            (
                ChannelBinding::ServerEndPoint(vec![0xab; 32]),
                "SCRAM-SHA-256-PLUS",
                "p=tls-server-end-point,,",
                [b"p=tls-server-end-point,,".as_slice(), &[0xab; 32]].concat(),
            ),
        ];
        for (binding, mechanism, header, c_input) in cases {
            let mut exchange = ScramExchange::with_nonce("", CLIENT_NONCE.into(), binding);
            assert_eq!(exchange.mechanism(), mechanism);
            let first = String::from_utf8(exchange.client_first()).unwrap();
            assert_eq!(first, format!("{header}n=,r={CLIENT_NONCE}"));
            let client_final = exchange
                .client_final(SERVER_FIRST.as_bytes(), b"pencil", &cache)
                .await
                .unwrap();
            let expected = format!("c={},", STANDARD.encode(c_input));
            assert!(String::from_utf8(client_final)
                .unwrap()
                .starts_with(&expected));
        }
    }

    #[tokio::test]
    async fn rfc_7677_example_and_the_cache() {
        let metrics = Arc::new(Metrics::default());
        let cache = ScramCache::new(Arc::clone(&metrics));
        for round in 0..2 {
            let mut exchange =
                ScramExchange::with_nonce("user", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
            assert_eq!(exchange.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
            let client_final = exchange
                .client_final(SERVER_FIRST.as_bytes(), b"pencil", &cache)
                .await
                .unwrap();
            assert_eq!(String::from_utf8(client_final).unwrap(), CLIENT_FINAL);
            assert!(!exchange.server_verified());
            exchange
                .verify_server_final(SERVER_FINAL.as_bytes())
                .unwrap();
            assert!(exchange.server_verified());
            assert_eq!(counted(&metrics.scram_derivations), 1);
            assert_eq!(counted(&metrics.scram_cache_hits), round);
        }
        // Another password with the same salt is not served from the cache.
        let mut exchange =
            ScramExchange::with_nonce("user", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
        let other = exchange
            .client_final(SERVER_FIRST.as_bytes(), b"pencil2", &cache)
            .await
            .unwrap();
        assert_ne!(String::from_utf8(other).unwrap(), CLIENT_FINAL);
        assert!(exchange
            .verify_server_final(SERVER_FINAL.as_bytes())
            .is_err());
        assert_eq!(counted(&metrics.scram_derivations), 2);
    }

    #[tokio::test]
    async fn hostile_server_messages_are_refused() {
        let metrics = Arc::new(Metrics::default());
        let cache = ScramCache::new(Arc::clone(&metrics));
        let cases = [
            (
                "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                "does not extend",
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                "does not extend",
            ),
            ("r=rOprNGfwEbeRWgbNEkqOx,s=!!,i=4096", "not base64"),
            (
                "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=100000000",
                "at most",
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
                "iteration count 0",
            ),
            (
                "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==",
                "no iteration count",
            ),
            ("m=ext,r=rOprNGfwEbeRWgbNEkqOx", "mandatory extension"),
            (
                "r=rOprNGfwEbeRWgbNEkqOx,s=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,i=4096",
                "a salt of 66 bytes",
            ),
            ("r=rOprNGfwEbeRWgbNEkqOx,s=,i=4096", "a salt of 0 bytes"),
            ("r=rOprNGfwEbeRWgbNEkqOx,i=4096", "no salt"),
            ("s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "no nonce"),
            (
                "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many",
                "server: iteration count",
            ),
        ];
        for (server_first, words) in cases {
            let mut exchange =
                ScramExchange::with_nonce("", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
            let error = exchange
                .client_final(server_first.as_bytes(), b"pencil", &cache)
                .await
                .unwrap_err();
            assert!(error.contains(words), "{server_first}: {error}");
        }
        let mut exchange =
            ScramExchange::with_nonce("", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
        let error = exchange
            .client_final(b"r=\xff", b"pencil", &cache)
            .await
            .unwrap_err();
        assert!(error.contains("not UTF-8"), "{error}");
        assert_eq!(counted(&metrics.scram_derivations), 0);
        let mut exchange =
            ScramExchange::with_nonce("", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
        assert!(exchange
            .verify_server_final(SERVER_FINAL.as_bytes())
            .is_err());
        assert!(!exchange.server_verified());
        // After a good server-first message, a final message that is not the server's proof.
        for (server_final, words) in [
            (&b"v=\xff"[..], "not UTF-8"),
            (
                b"e=invalid-proof",
                "refused the SCRAM exchange: invalid-proof",
            ),
            (b"x=nothing", "no verifier"),
            (b"v=!!", "no verifier"),
        ] {
            let mut exchange =
                ScramExchange::with_nonce("user", CLIENT_NONCE.into(), ChannelBinding::Unsupported);
            exchange
                .client_final(SERVER_FIRST.as_bytes(), b"pencil", &cache)
                .await
                .unwrap();
            let error = exchange.verify_server_final(server_final).unwrap_err();
            assert!(error.contains(words), "{error}");
            assert!(!exchange.server_verified());
        }
    }

    /// The cache holds at most MAX_ENTRIES keys: a server that hands out a new salt at every
    /// login cannot make it grow without bound; a full cache starts over.
    #[tokio::test]
    async fn the_cache_is_bounded() {
        let metrics = Arc::new(Metrics::default());
        let cache = ScramCache::new(Arc::clone(&metrics));
        for salt in 0..=MAX_ENTRIES as u32 {
            cache.keys(b"pencil", &salt.to_be_bytes(), 1).await.unwrap();
            let held = cache.entries.lock().unwrap().len();
            assert!(held <= MAX_ENTRIES, "{held} entries");
        }
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
        // Each new salt was derived; the one entry left is still served from the cache.
        assert_eq!(counted(&metrics.scram_derivations), MAX_ENTRIES as u64 + 1);
        cache
            .keys(b"pencil", &(MAX_ENTRIES as u32).to_be_bytes(), 1)
            .await
            .unwrap();
        assert_eq!(counted(&metrics.scram_cache_hits), 1);
    }

    /// Logins that need the same keys at the same moment (every client reconnecting after a
    /// rotation) wait for one derivation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_logins_share_one_derivation() {
        let metrics = Arc::new(Metrics::default());
        let cache = Arc::new(ScramCache::new(Arc::clone(&metrics)));
        let logins: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move {
                    let mut exchange = ScramExchange::with_nonce(
                        "user",
                        CLIENT_NONCE.into(),
                        ChannelBinding::Unsupported,
                    );
                    exchange
                        .client_final(SERVER_FIRST.as_bytes(), b"pencil", &cache)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for login in logins {
            assert_eq!(
                String::from_utf8(login.await.unwrap()).unwrap(),
                CLIENT_FINAL
            );
        }
        assert_eq!(counted(&metrics.scram_derivations), 1);
    }
}
