//! `herald healthcheck`: a tiny HTTP GET for container health checks, so a
//! `FROM scratch` image needs no curl.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("only http:// URLs are supported: {0}")]
    Url(String),
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no answer: {0}")]
    Io(#[from] std::io::Error),
    #[error("answered {0}")]
    Status(String),
}

/// The default URL: `/healthz` on the configured admin address, so a
/// container that moves the admin port needs no HEALTHCHECK override.
pub fn default_url(admin_listen: Option<&str>) -> String {
    let addr = admin_listen
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|mut addr| {
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            addr
        })
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 7480)));
    format!("http://{addr}/healthz")
}

/// GETs `url` and succeeds on a 200 answer.
pub fn run(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let deadline = Instant::now() + timeout;
    let addr = authority
        .to_socket_addrs()
        .map_err(|source| HealthcheckError::Connect {
            addr: authority.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| HealthcheckError::Url(url.to_owned()))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| HealthcheckError::Connect {
            addr: authority.to_owned(),
            source,
        })?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        let n = stream.read(&mut head[read..])?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    if status_line.starts_with("HTTP/1.1 200") || status_line.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        let status = status_line.lines().next().unwrap_or("nothing").to_owned();
        Err(HealthcheckError::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_follows_the_admin_address() {
        assert_eq!(default_url(None), "http://127.0.0.1:7480/healthz");
        assert_eq!(
            default_url(Some("0.0.0.0:9000")),
            "http://127.0.0.1:9000/healthz"
        );
        assert_eq!(default_url(Some("[::]:9000")), "http://[::1]:9000/healthz");
        assert_eq!(
            default_url(Some("10.0.0.5:7480")),
            "http://10.0.0.5:7480/healthz"
        );
        assert_eq!(default_url(Some("junk")), "http://127.0.0.1:7480/healthz");
    }

    #[test]
    fn a_closed_port_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port");
        let url = format!("http://127.0.0.1:{port}/healthz");
        assert!(run(&url, Duration::from_millis(500)).is_err());
        assert!(run("https://x/healthz", Duration::from_millis(500)).is_err());
    }
}
