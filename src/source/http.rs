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

use bytes::Bytes;
use futures::StreamExt;

use super::ReadOptions;
use crate::graph::{Prefetch, block_on};

/// Whether a shard location is an `http://` or `https://` URL.
pub(crate) fn is_url(spec: &str) -> bool {
    let lower = spec.get(..8).unwrap_or(spec).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Pause before the first retry; doubled on each further retry up to [`MAX_BACKOFF`].
const BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Body chunks the I/O runtime reads ahead of the tar reader.
const READ_AHEAD: usize = 8;

/// One response body chunk, or why the body broke.
type Chunk = Result<Bytes, String>;

/// A resumable reader over an HTTP(S) response body.
pub(crate) struct HttpReader {
    url: String,
    client: reqwest::Client,
    timeout: Duration,
    body: Option<Prefetch<Chunk>>,
    /// The rest of the chunk being read.
    chunk: Bytes,
    /// Bytes of the shard delivered so far.
    offset: u64,
    /// Total shard length, when the server told it.
    total: Option<u64>,
    /// Consecutive failed attempts since the last byte arrived.
    failures: u32,
    retries: u32,
    stats: super::IoStats,
}

/// The HTTP client of one reader: the same reqwest (rustls on ring) that object storage uses, with a connect
/// timeout and a timeout on every read of the body; the wait for the response headers is bounded separately.
fn client(timeout: Duration) -> io::Result<reqwest::Client> {
    // reqwest's rustls has no provider compiled in; ring is. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .build()
        .map_err(|e| io::Error::other(format!("cannot build the HTTP client: {e}")))
}

/// What one request answered.
struct Answer {
    status: u16,
    content_length: Option<u64>,
    content_range: Option<String>,
    response: reqwest::Response,
}

/// Sends `request` on the I/O runtime and waits at most `timeout` for the response headers.
fn send(request: reqwest::RequestBuilder, timeout: Duration) -> Result<Answer, String> {
    let outcome = block_on(async move {
        match tokio::time::timeout(timeout, request.send()).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no response within {timeout:?}")),
        }
    });
    let response = outcome.map_err(|e| e.to_string())??;
    let header = |k: &str| response.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok(Answer {
        status: response.status().as_u16(),
        content_length: header("content-length").and_then(|v| v.trim().parse().ok()),
        content_range: header("content-range"),
        response,
    })
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
        let mut reader = Self {
            url: url.to_string(),
            client: client(opts.http_timeout)?,
            timeout: opts.http_timeout,
            body: None,
            chunk: Bytes::new(),
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
        let mut request = self.client.get(&self.url);
        if self.offset > 0 {
            request = request.header("Range", format!("bytes={}-", self.offset));
        }
        let answer = send(request, self.timeout).map_err(ConnectError::Transient)?;
        match answer.status {
            416 => {
                let msg = format!("HTTP status 416: byte {} is past the end of the shard", self.offset);
                return Err(ConnectError::Fatal(io::Error::new(io::ErrorKind::UnexpectedEof, msg)));
            }
            code @ 400..=499 => {
                let kind = if code == 404 { io::ErrorKind::NotFound } else { io::ErrorKind::Other };
                return Err(ConnectError::Fatal(io::Error::new(kind, format!("HTTP status {code}"))));
            }
            code @ 500..=599 => return Err(ConnectError::Transient(format!("HTTP status {code}"))),
            _ => {}
        }
        let (status, content_length) = (answer.status, answer.content_length);
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
            let start = answer
                .content_range
                .as_deref()
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
        let stream = answer.response.bytes_stream().map(|chunk| chunk.map_err(|e| e.to_string())).boxed();
        let body =
            Prefetch::new(stream, READ_AHEAD).map_err(|e| ConnectError::Fatal(io::Error::other(e.to_string())))?;
        self.body = Some(body);
        self.chunk = Bytes::new();
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
            if !self.chunk.is_empty() {
                let n = buf.len().min(self.chunk.len());
                buf[..n].copy_from_slice(&self.chunk.split_to(n));
                self.stats.count_bytes(n as u64);
                self.offset += n as u64;
                self.failures = 0;
                return Ok(n);
            }
            let failure = match self.body.as_mut().map(Iterator::next) {
                Some(Some(Ok(bytes))) => {
                    self.chunk = bytes;
                    continue;
                }
                Some(None) => match self.total {
                    Some(total) => format!("connection closed at byte {} of {total}", self.offset),
                    None => return Ok(0),
                },
                Some(Some(Err(e))) => format!("read error at byte {}: {e}", self.offset),
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
    opts.stats.count_request();
    let answer = client(opts.http_timeout)
        .and_then(|c| send(c.head(url), opts.http_timeout).map_err(|e| io::Error::other(format!("HEAD: {e}"))));
    let answer = answer.inspect_err(|_| opts.stats.count_failure())?;
    if answer.status >= 400 {
        opts.stats.count_failure();
        return Err(io::Error::other(format!("HEAD: HTTP status {}", answer.status)));
    }
    let header = |k: &str| answer.response.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok((answer.content_length, header("etag").or_else(|| header("last-modified"))))
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
