//! A network partition between one relay and PostgreSQL: a TCP forwarder the relay connects
//! through, which can be cut (nothing passes either way, connections stay open, as when packets
//! are dropped) and healed (what was held back is delivered).
//!
//! A cut relay cannot learn that the server ended its sessions, so only its lease tells it that
//! it lost the leader lock ([`crate::scenario::Fault::PausedAtProduce`]).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The forwarder; stops accepting when dropped.
#[derive(Debug)]
pub struct Partition {
    local: SocketAddr,
    authority: String,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Partition {
    /// Forwards a new local port to the server of `url` (`postgres://…@host:port/…`).
    pub async fn start(url: &str) -> Result<Self> {
        let authority = authority(url).context("no host:port in the database URL")?;
        let target = authority.to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let (cut, watch) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pipe(cr, sw, watch.clone()), pipe(sr, cw, watch));
                });
            }
        });
        Ok(Self {
            local,
            authority: authority.to_owned(),
            cut,
            accept,
        })
    }

    /// `url` with its server replaced by this forwarder.
    pub fn url(&self, url: &str) -> String {
        url.replacen(&self.authority, &self.local.to_string(), 1)
    }

    /// Nothing passes until [`Partition::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Delivers what was held back and forwards again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
        self.accept.abort();
    }
}

/// `host:port` of a `scheme://[user[:password]@]host:port/…` URL.
fn authority(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let rest = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    Some(rest.rsplit_once('@').map_or(rest, |(_, a)| a))
}

/// Copies one direction; bytes read while cut are held until healed.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while *cut.borrow_and_update() {
            if cut.changed().await.is_err() {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // A close is held back like data.
    while *cut.borrow_and_update() {
        if cut.changed().await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::authority;

    #[test]
    fn authority_of_urls() {
        assert_eq!(
            authority("postgres://u:p@127.0.0.1:5432/db?sslmode=disable"),
            Some("127.0.0.1:5432")
        );
        assert_eq!(authority("postgres://localhost:1/x"), Some("localhost:1"));
        assert_eq!(authority("nothing"), None);
    }
}
