//! `secrets-proxy --config proxy.toml` runs the proxy; `secrets-proxy check-config FILE`
//! validates a configuration. SIGHUP reloads routes, SIGTERM drains, SIGINT stops at once.

use clap::{Parser, Subcommand};
use secrets_proxy::{Config, Proxy};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "PostgreSQL proxy that logs in with credentials from pg_secrets"
)]
struct Cli {
    /// The configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a configuration file and exit.
    CheckConfig { file: PathBuf },
}

fn main() -> ExitCode {
    // Logs on stderr (stdout is check-config's answer), colored only on a terminal: a log
    // file or a journal gets plain lines.
    let stderr_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let path = match (cli.command, cli.config) {
        (Some(Command::CheckConfig { file }), _) => {
            let checked = Config::from_file(&file)
                .and_then(|config| Proxy::check_files(&config).map(|()| config));
            return match checked {
                Ok(config) => {
                    println!("{}: ok, {} routes", file.display(), config.routes.len());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("{}: {error}", file.display());
                    ExitCode::FAILURE
                }
            };
        }
        (None, Some(path)) => path,
        (None, None) => {
            eprintln!("usage: secrets-proxy --config proxy.toml | secrets-proxy check-config FILE");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_file(&path) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{}: {error}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let runtime = match secrets_proxy::runtime(config.listen.threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let proxy = match Proxy::bind(config, Some(path)).await {
            Ok(proxy) => proxy,
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(tcp = ?proxy.tcp_address(), unix = ?proxy.unix_path(), "secrets-proxy listening");
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn(proxy.serve(shutdown_rx));
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: draining");
                let _ = shutdown.send(true);
                // SIGINT still stops at once, in the middle of a drain too.
                tokio::select! {
                    _ = serving => {}
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping now"),
                }
            }
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping now"),
        }
        ExitCode::SUCCESS
    })
}
