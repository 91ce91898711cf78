//! The floor the gateway is measured against: bare axum with the same
//! version, runtime and server settings, a `POST /webhooks/{source}` route
//! that reads the body and answers 204, and nothing else.
//!
//! `cargo run --release --example bare_sink -- 127.0.0.1:18081`

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path};
use axum::http::StatusCode;
use axum::routing::post;

async fn sink(
    Path(_source): Path<String>,
    ConnectInfo(_peer): ConnectInfo<SocketAddr>,
    body: Bytes,
) -> StatusCode {
    std::hint::black_box(body);
    StatusCode::NO_CONTENT
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18081".into())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // The same runtime the gateway's binary builds.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let app = Router::new().route("/webhooks/{source}", post(sink));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("bare sink listening on {addr}");
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
    })
}
