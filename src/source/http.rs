//! HTTP(S) shard streaming with resume: a `Read` over a response body that reconnects with a `Range` request
//! when the connection breaks.
//!
//! The shard is streamed while it is read (never downloaded whole first). The reader tracks its byte offset;
//! on a connection error or an early end of the body (checked against `Content-Length` when known) it
//! reconnects with `Range: bytes=<offset>-` and requires a `206 Partial Content` answer that starts at that
//! offset. Up to `http_retries` consecutive failures without progress are retried (the count resets whenever
//! bytes arrive); after that the read fails, which the tar reader reports as a `Truncated` sample naming the
//! shard. Timeouts on connect, on the response headers and on every socket read keep a dead server from
//! hanging the reader.

use std::io::{self, Read};
use std::thread;
use std::time::Duration;

use super::ReadOptions;

/// Pause before the first retry; doubled on each further retry up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A resumable reader over an HTTP(S) response body.
pub(crate) struct HttpReader {
    url: String,
    agent: ureq::Agent,
    body: Option<ureq::BodyReader<'static>>,
    /// Bytes of the shard delivered so far.
    offset: u64,
    /// Total shard length, when the server told it.
    total: Option<u64>,
    /// Consecutive failed attempts since the last byte arrived.
    failures: u32,
    retries: u32,
    stats: super::IoStats,
}

/// Why a request did not give a usable body.
enum ConnectError {
    /// Worth retrying (connection refused or reset, timeout, 5xx).
    Transient(String),
    /// Retrying cannot help (4xx, a server that ignores `Range`).
    Fatal(io::Error),
}

/// Pause before retry number `attempt` (1-based), for every remote medium (HTTP and object storage).
pub(super) fn backoff(attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(8);
    BASE_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF)
}

impl HttpReader {
    /// Connects to `url` for the bytes from `offset` on, retrying transient failures up to `opts.http_retries`
    /// times. A non-zero `offset` (a checkpointed sample's start) makes the first request a
    /// `Range: bytes=OFFSET-` request, which must be answered `206 Partial Content` starting there, as for a
    /// reconnect.
    pub(crate) fn open(url: &str, opts: &ReadOptions, offset: u64) -> io::Result<Self> {
        let timeout = Some(opts.http_timeout);
        let config = ureq::Agent::config_builder()
            .timeout_connect(timeout)
            .timeout_recv_response(timeout)
            .timeout_per_read(timeout)
            .build();
        let mut reader = Self {
            url: url.to_string(),
            agent: ureq::Agent::new_with_config(config),
            body: None,
            offset,
            total: None,
            failures: 0,
            retries: opts.http_retries,
            stats: opts.stats.clone(),
        };
        let mut attempt = 0;
        loop {
            match reader.connect() {
                Ok(()) => return Ok(reader),
                Err(ConnectError::Fatal(e)) => {
                    reader.stats.count_failure();
                    return Err(e);
                }
                Err(ConnectError::Transient(msg)) => {
                    if attempt >= reader.retries {
                        reader.stats.count_failure();
                        let msg = format!("cannot connect after {} attempts: {msg}", attempt + 1);
                        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, msg));
                    }
                    attempt += 1;
                    reader.stats.count_retry();
                    thread::sleep(backoff(attempt));
                }
            }
        }
    }

    /// Sends one request for the bytes from `self.offset` on and installs its body.
    fn connect(&mut self) -> Result<(), ConnectError> {
        self.stats.count_request();
        let mut request = self.agent.get(&self.url);
        if self.offset > 0 {
            request = request.header("Range", format!("bytes={}-", self.offset));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::StatusCode(416)) => {
                let msg = format!("HTTP status 416: byte {} is past the end of the shard", self.offset);
                return Err(ConnectError::Fatal(io::Error::new(io::ErrorKind::UnexpectedEof, msg)));
            }
            Err(ureq::Error::StatusCode(code)) if (400..500).contains(&code) => {
                let kind = if code == 404 { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
                return Err(ConnectError::Fatal(io::Error::new(kind, format!("HTTP status {code}"))));
            }
            Err(e) => return Err(ConnectError::Transient(e.to_string())),
        };
        let status = response.status().as_u16();
        let content_length = response.body().content_length();
        if self.offset == 0 {
            if status != 200 {
                return Err(ConnectError::Fatal(io::Error::other(format!("unexpected HTTP status {status}"))));
            }
            self.total = content_length;
        } else {
            if status != 206 {
                let msg = format!(
                    "server answered {status} instead of 206 to a range request from byte {} (no Range support?)",
                    self.offset
                );
                return Err(ConnectError::Fatal(io::Error::other(msg)));
            }
            let start = response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if let Some(start) = start
                && start != self.offset
            {
                let msg = format!("server resumed at byte {start} instead of {}", self.offset);
                return Err(ConnectError::Fatal(io::Error::other(msg)));
            }
            if self.total.is_none() {
                self.total = content_length.map(|n| n + self.offset);
            }
        }
        self.body = Some(response.into_body().into_reader());
        Ok(())
    }
}

impl Read for HttpReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.total.is_some_and(|t| self.offset >= t) {
                return Ok(0);
            }
            let failure = match self.body.as_mut() {
                Some(body) => match body.read(buf) {
                    Ok(0) => match self.total {
                        Some(total) => format!("connection closed at byte {} of {total}", self.offset),
                        None => return Ok(0),
                    },
                    Ok(n) => {
                        self.stats.count_bytes(n as u64);
                        self.offset += n as u64;
                        self.failures = 0;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => format!("read error at byte {}: {e}", self.offset),
                },
                None => format!("no connection at byte {}", self.offset),
            };
            self.body = None;
            let mut last = failure;
            loop {
                if self.failures >= self.retries {
                    self.stats.count_failure();
                    let msg = format!("{last}; giving up after {} reconnect attempts", self.failures);
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, msg));
                }
                self.failures += 1;
                self.stats.count_retry();
                thread::sleep(backoff(self.failures));
                match self.connect() {
                    Ok(()) => break,
                    Err(ConnectError::Fatal(e)) => {
                        self.stats.count_failure();
                        self.failures = self.retries;
                        return Err(io::Error::new(e.kind(), format!("{last}; reconnect failed: {e}")));
                    }
                    Err(ConnectError::Transient(msg)) => last = format!("{last}; reconnect failed: {msg}"),
                }
            }
        }
    }
}

/// `Content-Length` and version tag (`ETag`, else `Last-Modified`) of `url`, from one `HEAD` request.
pub(crate) fn head(url: &str, opts: &ReadOptions) -> io::Result<(Option<u64>, Option<String>)> {
    let timeout = Some(opts.http_timeout);
    let config = ureq::Agent::config_builder().timeout_connect(timeout).timeout_recv_response(timeout).build();
    opts.stats.count_request();
    let response = ureq::Agent::new_with_config(config).head(url).call().map_err(|e| {
        opts.stats.count_failure();
        io::Error::other(format!("HEAD: {e}"))
    })?;
    let header = |k: &str| response.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let size = header("content-length").and_then(|v| v.trim().parse().ok());
    Ok((size, header("etag").or_else(|| header("last-modified"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }

    #[test]
    fn refused_connection_fails_after_retries() {
        // Bind then drop a listener: the port is (very likely) closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let opts = ReadOptions { http_retries: 1, http_timeout: Duration::from_secs(2), ..ReadOptions::default() };
        let err = HttpReader::open(&format!("http://127.0.0.1:{port}/x.tar"), &opts, 0).err().unwrap();
        assert!(err.to_string().contains("cannot connect after 2 attempts"), "{err}");
    }
}
