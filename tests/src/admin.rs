//! The relay's admin endpoint seen from a test: a minimal HTTP client, the address the relay
//! logged, and samples of its Prometheus scrape.

use std::time::{Duration, Instant};

use anyhow::Result;

/// A minimal HTTP/1.1 GET (the tests need no HTTP client dependency): status and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    http_get_with_token(addr, path, None).await
}

/// [`http_get`] with an optional bearer token (`Authorization: Bearer …`).
pub async fn http_get_with_token(
    addr: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// GETs `path` (without a token) until it answers `want` or `timeout` has passed, and returns
/// the last status seen (0 when the endpoint never answered): a probe that turns ready a moment
/// after the relay logged its role is given that moment, and a wrong status is still reported.
pub async fn wait_for_status(addr: &str, path: &str, want: u16, timeout: Duration) -> Result<u16> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = http_get(addr, path).await.map_or(0, |(status, _)| status);
        if status == want || Instant::now() > deadline {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The admin address a relay logged (`admin endpoint listening addr=…`), from a JSON or a
/// pretty log.
pub fn admin_addr(log: &str) -> Option<String> {
    let json = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "admin endpoint listening")
        .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned));
    json.or_else(|| {
        let plain = log
            .replace("\u{1b}[3m", "")
            .replace("\u{1b}[0m", "")
            .replace("\u{1b}[2m", "");
        plain
            .lines()
            .find(|l| l.contains("admin endpoint listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|a| {
                a.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_matches('"')
                    .to_owned()
            })
    })
}

/// The value of an unlabelled sample `name` in a Prometheus scrape.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}
