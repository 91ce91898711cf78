//! The command line: `serve` (default), `check-config`, `healthcheck`, `sign`.
//!
//! `main.rs` only parses arguments and calls [`main`]; everything it does is
//! here so that the subcommands can be tested.

mod activation;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::telemetry::{LogFormat, init_logging};

/// Receives, verifies and normalizes presence webhooks and serves current presence.
#[derive(Debug, Parser)]
#[command(name = "presence-gateway", version, about)]
pub struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH, env = "PRESENCE_GATEWAY_CONFIG")]
    pub config: PathBuf,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the config file and print every problem with its key or line.
    CheckConfig,
    /// Exit 0 when the local gateway answers /healthz (for container health checks).
    Healthcheck {
        /// Address to probe; default: `server.listen` of the config, with
        /// 0.0.0.0 / :: replaced by loopback.
        #[arg(long)]
        addr: Option<String>,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
    /// Sign a file (or stdin) for trying the gateway with curl: by default
    /// the hex HMAC-SHA256 Mitel sends in `x-notify-signature`; with
    /// `--standard` the three Standard Webhooks headers, one `name: value`
    /// per line (for `curl -H @file`).
    Sign {
        /// The signing key: Mitel's applicationId, or with `--standard` a
        /// `whsec_...` secret.
        #[arg(long, env = "PRESENCE_GATEWAY_SIGN_KEY", hide_env_values = true)]
        key: String,
        /// Sign the Standard Webhooks way (`webhook-id`,
        /// `webhook-timestamp`, `webhook-signature`).
        #[arg(long)]
        standard: bool,
        /// With `--standard`: the message id (default: a new random `msg_` id).
        #[arg(long, requires = "standard")]
        id: Option<String>,
        /// With `--standard`: the Unix time to sign (default: now).
        #[arg(long, requires = "standard")]
        timestamp: Option<i64>,
        /// The body to sign; stdin when absent.
        file: Option<PathBuf>,
    },
}

/// Runs the parsed command line. Call it from the binary's `main` before
/// any other thread starts: `serve` takes the socket-activation variables
/// out of the environment, which is sound only while no other thread runs.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config, cli.log_format),
        Command::CheckConfig => check_config(&cli.config),
        Command::Healthcheck { addr, timeout } => {
            healthcheck(&cli.config, addr, Duration::from_secs(timeout))
        }
        Command::Sign {
            key,
            standard,
            id,
            timestamp,
            file,
        } => {
            let how = if standard {
                Signing::Standard { id, timestamp }
            } else {
                Signing::Mitel
            };
            sign(&key, how, file.as_deref())
        }
    }
}

fn serve(path: &Path, format: LogFormat) -> ExitCode {
    // First of all: descriptor 3 is still the one the service manager
    // passed (nothing has opened a file yet), and no other thread runs.
    // SAFETY: `serve` runs on `main`'s thread before anything else.
    let inherited = unsafe { activation::take() };
    init_logging(format);
    let inherited = match inherited {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("socket activation: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("configuration error:\n{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let Some(listener) = listener(&config, inherited).await else {
            return ExitCode::FAILURE;
        };
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_watcher(shutdown.clone()));
        match crate::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The socket to serve: the one the service manager passed, else
/// `server.listen` bound now. Says which in the log; `None` (logged) when
/// neither can be had.
async fn listener(
    config: &Config,
    inherited: activation::Listener,
) -> Option<tokio::net::TcpListener> {
    let addr = config.server.listen;
    match inherited {
        activation::Listener::Inherited(listener) => {
            let local = listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    tracing::info!(
                        addr = %local,
                        "serving the socket passed by the service manager (LISTEN_FDS); \
                         server.listen is not bound"
                    );
                    return Some(l);
                }
                Err(e) => {
                    tracing::error!(addr = %local, error = %e, "cannot serve the passed socket");
                    return None;
                }
            }
        }
        activation::Listener::OtherProcess(pid) => tracing::info!(
            %addr,
            listen_pid = pid,
            "LISTEN_FDS is meant for another process: binding server.listen"
        ),
        activation::Listener::Bind => tracing::info!(%addr, "binding server.listen"),
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .inspect_err(|e| tracing::error!(%addr, error = %e, "cannot listen"))
        .ok()
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn signal_watcher(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    shutdown.cancel();
}

fn check_config(path: &Path) -> ExitCode {
    let checked = Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        // The people file is part of the configuration: a problem in it is
        // reported (and fails the check) like one in the config file.
        let people = match &c.people {
            Some(people) => {
                let ids: Vec<std::sync::Arc<str>> =
                    c.sources.iter().map(|s| s.id.as_str().into()).collect();
                let mapping = people.load(&ids, 1).map_err(|e| e.to_string())?;
                Some((people.file.clone(), mapping))
            }
            None => None,
        };
        Ok((c, people))
    });
    match checked {
        Ok((c, people)) => {
            println!(
                "{}: ok ({} source{}: {}; listening on {})",
                path.display(),
                c.sources.len(),
                if c.sources.len() == 1 { "" } else { "s" },
                c.sources
                    .iter()
                    .map(|s| format!("{} ({})", s.id, s.kind.as_str()))
                    .collect::<Vec<_>>()
                    .join(", "),
                c.server.listen
            );
            if let Some((file, mapping)) = people {
                println!(
                    "{}: ok ({} {}, {} identit{})",
                    file.display(),
                    mapping.people.len(),
                    if mapping.people.len() == 1 {
                        "person"
                    } else {
                        "people"
                    },
                    mapping.identity_count(),
                    if mapping.identity_count() == 1 {
                        "y"
                    } else {
                        "ies"
                    },
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid configuration\n{e}", path.display());
            ExitCode::from(2)
        }
    }
}

/// The address to probe: `--addr`, else the listen address of the
/// environment override or the config file, else the default port.
fn probe_addr(path: &Path, addr: Option<String>) -> String {
    if let Some(a) = addr {
        return a;
    }
    let listen = std::env::var(format!("{}__SERVER__LISTEN", config::ENV_PREFIX))
        .ok()
        .or_else(|| {
            let text = std::fs::read_to_string(path).ok()?;
            let value: toml::Table = toml::from_str(&text).ok()?;
            value
                .get("server")?
                .get("listen")?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "0.0.0.0:8080".into());
    match listen.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => {
            let ip = if a.is_ipv4() { "127.0.0.1" } else { "[::1]" };
            format!("{ip}:{}", a.port())
        }
        _ => listen,
    }
}

fn healthcheck(path: &Path, addr: Option<String>, timeout: Duration) -> ExitCode {
    let addr = probe_addr(path, addr);
    match probe(&addr, timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("healthcheck {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One plain HTTP/1.1 `GET /healthz`; success is a 200 status line.
fn probe(addr: &str, timeout: Duration) -> Result<(), String> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 32];
    let n = stream.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer: {:?}",
            line.lines().next().unwrap_or("")
        ))
    }
}

/// How `sign` signs.
enum Signing {
    /// Hex HMAC-SHA256 of the body (Mitel's `x-notify-signature`).
    Mitel,
    /// The Standard Webhooks headers.
    Standard {
        id: Option<String>,
        timestamp: Option<i64>,
    },
}

fn sign(key: &str, how: Signing, file: Option<&Path>) -> ExitCode {
    let body = match file {
        Some(p) => std::fs::read(p),
        None => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map(|_| buf)
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            eprintln!("cannot read the body: {e}");
            return ExitCode::FAILURE;
        }
    };
    match how {
        Signing::Mitel => {
            println!(
                "{}",
                crate::verify::hmac_hex::sign_hex(key.as_bytes(), &body)
            );
            ExitCode::SUCCESS
        }
        Signing::Standard { id, timestamp } => match standard_headers(key, id, timestamp, &body) {
            Ok(lines) => {
                print!("{lines}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The three Standard Webhooks header lines for `body`.
fn standard_headers(
    key: &str,
    id: Option<String>,
    timestamp: Option<i64>,
    body: &[u8],
) -> Result<String, String> {
    use crate::verify::standard;
    // The message names what is wrong with the key, never the key.
    let key = standard::decode_secret(key.as_bytes()).map_err(|e| format!("--key: {e}"))?;
    let id = match id {
        Some(id) if standard::message_id(id.as_bytes()).is_some() => id,
        Some(_) => {
            return Err(format!(
                "--id: 1 to {} visible ASCII characters",
                standard::MAX_ID_LEN
            ));
        }
        None => {
            let mut random = [0u8; 12];
            getrandom::fill(&mut random).map_err(|e| format!("no random message id: {e}"))?;
            format!("msg_{}", hex::encode(random))
        }
    };
    let timestamp = timestamp.unwrap_or_else(crate::sources::unix_now);
    let signature = standard::sign(&key, &id, timestamp, body);
    Ok(format!(
        "{}: {id}\n{}: {timestamp}\n{}: {signature}\n",
        standard::ID_HEADER,
        standard::TIMESTAMP_HEADER,
        standard::SIGNATURE_HEADER
    ))
}
