//! How many connections a relay process holds to a broker, for the tests of one connection per
//! broker shared by many tables (`tests/tests/multi_table_sinks.rs`).
//!
//! Redis names the relay's connections `outbox-relay-<pid>`, so the server's `CLIENT LIST` counts
//! them. The NATS server here runs without its monitoring port and RabbitMQ without its
//! management plugin, so for those the count is the process's established TCP connections to the
//! broker's port, read from `/proc` (Linux only).

use std::collections::BTreeSet;

use anyhow::{Context, Result};

/// The port of a broker URL (`nats://127.0.0.1:4222`, `amqp://u:p@host:5672/%2f`).
pub fn port_of(url: &str) -> Result<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.split('/').next().unwrap_or(rest);
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let port = host_port
        .rsplit_once(':')
        .map(|(_, p)| p)
        .with_context(|| format!("no port in the broker URL {url}"))?;
    Ok(port.parse()?)
}

/// The established TCP connections of process `pid` to remote port `port` (IPv4 and IPv6).
pub fn tcp_connections(pid: u32, port: u16) -> Result<usize> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_owned());
        }
    }
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, queues, tr, retrnsmt, uid, timeout, inode
            let (Some(remote), Some(state), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // 01: ESTABLISHED.
            if remote_port == Some(port) && *state == "01" && inodes.contains(*inode) {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// The connections named `outbox-relay-<pid>` in the Redis server's `CLIENT LIST`, by id.
pub async fn redis_client_ids(pid: u32) -> Result<Vec<String>> {
    let mut conn = crate::sinks::redis::connection().await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await?;
    let name = format!("name=outbox-relay-{pid} ");
    Ok(list
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect())
}

/// Closes the Redis connection `id` from the server side (`CLIENT KILL ID`); whether it existed.
pub async fn redis_kill(id: &str) -> Result<bool> {
    let mut conn = crate::sinks::redis::connection().await?;
    let n: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut conn)
        .await?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::port_of;

    #[test]
    fn ports_come_out_of_broker_urls() {
        assert_eq!(port_of("nats://127.0.0.1:4222").unwrap(), 4222);
        assert_eq!(
            port_of("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(),
            5672
        );
        assert_eq!(port_of("redis://:pw@localhost:6380").unwrap(), 6380);
    }
}
