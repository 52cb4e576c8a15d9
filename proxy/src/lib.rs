//! secrets-proxy: applications connect to it as to PostgreSQL, without a password; it logs in
//! to the real server with the current credential from pg_secrets and relays the session,
//! retrying through password rotations so the application never sees one.

pub mod backend;
pub mod cancel;
pub mod config;
pub mod cookies;
pub mod credentials;
pub mod error;
pub mod frontend;
pub mod hang_ups;
pub mod kernel_relay;
pub mod login;
pub mod metrics;
pub mod pending;
pub mod pool;
pub mod relay;
pub mod scram;
pub mod server;
pub mod startup_settings;
pub mod tls;

pub use config::Config;
pub use server::Proxy;

/// The runtime that serves the proxy, with `[listen] threads` (one per core when absent). One
/// thread is a runtime without worker threads, where the listeners' and the sessions' tasks
/// take turns on the calling thread. SCRAM derivations run on blocking threads either way.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        // 0 is refused by `Config::validate`; here it means one rather than a panic.
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(threads) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build(),
        None => tokio::runtime::Runtime::new(),
    }
}

/// A proxy serving on its own thread and runtime, for tests and benchmarks; dropping it shuts
/// the proxy down.
pub struct RunningProxy {
    pub tcp_address: Option<std::net::SocketAddr>,
    pub unix_path: Option<std::path::PathBuf>,
    pub admin_address: Option<std::net::SocketAddr>,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningProxy {
    pub fn start(config: Config) -> Result<RunningProxy, String> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            let runtime = runtime(config.listen.threads).expect("a tokio runtime");
            runtime.block_on(async move {
                match Proxy::bind(config, None).await {
                    Ok(proxy) => {
                        let addresses = (
                            proxy.tcp_address(),
                            proxy.unix_path(),
                            proxy.admin_address(),
                        );
                        let _ = ready_tx.send(Ok(addresses));
                        proxy.serve(shutdown_rx).await;
                    }
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                    }
                }
            });
        });
        let (tcp_address, unix_path, admin_address) = ready_rx
            .recv()
            .map_err(|_| "the proxy thread died".to_string())??;
        Ok(RunningProxy {
            tcp_address,
            unix_path,
            admin_address,
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
