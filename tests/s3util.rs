//! A real S3 API for the tests: `moto` in server mode on 127.0.0.1, started once per test binary, and a small
//! fault proxy of our own between juicer and moto (cut connections, `503 SlowDown`, request counting).
//!
//! The moto server is found as `$JUICER_MOTO_SERVER`, else `moto_server` on `PATH`, else `python3 -m
//! moto.server`. Without any Python the tests that need it skip, saying so; with Python but no moto they fail
//! (`.ci/run` installs `moto[server]`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use juicer::source::ReadOptions;

/// Credentials and region moto accepts (it does not check signatures).
pub const KEYS: [(&str, &str); 3] =
    [("aws_access_key_id", "testing"), ("aws_secret_access_key", "testing"), ("aws_region", "us-east-1")];

/// The shared moto server's address, or `None` (after printing why) when Python is absent.
pub fn moto() -> Option<SocketAddr> {
    static MOTO: OnceLock<Option<SocketAddr>> = OnceLock::new();
    *MOTO.get_or_init(start_moto)
}

fn python_present() -> bool {
    Command::new("python3").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn start_moto() -> Option<SocketAddr> {
    if !python_present() && std::env::var_os("JUICER_MOTO_SERVER").is_none() {
        eprintln!("SKIP: python3 is not installed, so the moto S3 server cannot run; object-store tests skip");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The server is spawned from a thread that lives as long as the test process, so that the parent-death
    // signal (which follows the spawning *thread*) stops moto exactly when the tests end.
    std::thread::spawn(move || {
        let mut cmd = match std::env::var("JUICER_MOTO_SERVER") {
            Ok(bin) => Command::new(bin),
            Err(_)
                if Command::new("moto_server")
                    .arg("--help")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success()) =>
            {
                Command::new("moto_server")
            }
            Err(_) => {
                let mut c = Command::new("python3");
                c.args(["-m", "moto.server"]);
                c
            }
        };
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        #[cfg(target_os = "linux")]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start moto_server (pip install 'moto[server]')");
        ready_tx.send(()).unwrap();
        let _keep = child;
        loop {
            std::thread::park();
        }
    });
    ready_rx.recv().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on {addr} within 60 s (is moto[server] installed?)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(addr)
}

/// Read options that talk to the S3 API at `endpoint` with test credentials.
pub fn s3_opts(endpoint: SocketAddr) -> ReadOptions {
    let mut storage_options: Vec<(String, String)> = KEYS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    storage_options.push(("aws_endpoint".into(), format!("http://{endpoint}")));
    ReadOptions { http_retries: 3, http_timeout: Duration::from_secs(10), storage_options, ..ReadOptions::default() }
}

/// A fresh bucket (unique name per call) on the moto server.
pub fn bucket(moto: SocketAddr, tag: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!("juicer-{tag}-{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let status = http_put(moto, &format!("/{name}"), &[], b"");
    assert!((200..300).contains(&status), "create bucket: {status}");
    name
}

/// Uploads local files as `s3://bucket/prefix/<file name>`; returns their URLs in the given order.
pub fn upload(moto: SocketAddr, bucket: &str, prefix: &str, files: &[std::path::PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy();
            put(moto, bucket, &format!("{prefix}/{name}"), &std::fs::read(f).unwrap());
            format!("s3://{bucket}/{prefix}/{name}")
        })
        .collect()
}

/// Writes one object straight to moto (no signing needed there), readable without credentials too (so the same
/// object is also an `http://` shard). The explicit content type keeps moto's web server from parsing the body
/// as a form.
pub fn put(moto: SocketAddr, bucket: &str, key: &str, bytes: &[u8]) {
    let headers = [("Content-Type", "application/octet-stream"), ("x-amz-acl", "public-read")];
    let status = http_put(moto, &format!("/{bucket}/{key}"), &headers, bytes);
    assert!((200..300).contains(&status), "put {key}: {status}");
}

/// One plain HTTP/1.1 `PUT` to moto over a fresh connection; returns the status code.
fn http_put(moto: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(moto).expect("connect to moto");
    let mut head =
        format!("PUT {path} HTTP/1.1\r\nHost: {moto}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).expect("send to moto");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read moto's answer");
    answer.split_whitespace().nth(1).and_then(|code| code.parse().ok()).expect("an HTTP status line")
}

/// What the proxy does to the requests it forwards.
#[derive(Default)]
pub struct Faults {
    /// Answer this many of the next requests with `503 SlowDown` (not forwarded).
    pub slow_down: usize,
    /// Cuts: `(part of the object path, n)`: the next successful GET of an object whose path contains the part
    /// forwards `n` body bytes, then the connection is cut. Each entry is used once, first match first.
    pub cut_after: Vec<(String, usize)>,
    /// Runs once, right after the first cut (e.g. replace the object on the server).
    pub on_cut: Option<Box<dyn FnOnce() + Send>>,
}

/// What the proxy saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Requests by method (`GET`, `HEAD`, `PUT`, ...), including the ones answered with a fault.
    pub methods: BTreeMap<String, usize>,
    /// Object GETs (with a key: not listings) and their `Range` headers, in order.
    pub gets: Vec<(String, Option<String>)>,
    /// Body bytes forwarded to the client for object GETs.
    pub get_bytes: u64,
    /// Faults injected.
    pub slow_downs: usize,
    /// Connections cut.
    pub cuts: usize,
}

/// The fault proxy: listens on 127.0.0.1 and forwards to `upstream`, one request per connection.
pub struct Proxy {
    /// The proxy's address (use it as the S3 endpoint).
    pub addr: SocketAddr,
    /// Faults to inject, changeable while it runs.
    pub faults: Arc<Mutex<Faults>>,
    /// What it saw.
    pub seen: Arc<Mutex<Seen>>,
}

impl Proxy {
    /// Starts a proxy in front of `upstream`; it runs until the test process ends.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (f, s) = (faults.clone(), seen.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (f, s) = (f.clone(), s.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &f, &s);
                });
            }
        });
        Proxy { addr, faults, seen }
    }

    /// A copy of the counters.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }

    /// Resets the counters.
    pub fn reset(&self) {
        *self.seen.lock().unwrap() = Seen::default();
    }
}

/// Reads an HTTP message head (through the blank line) from `r`; returns head and any body bytes read past it.
fn read_head(r: &mut TcpStream) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end + 4]).into_owned();
            return Ok(Some((head, buf[end + 4..].to_vec())));
        }
        let n = r.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Head with `Connection` headers replaced by `Connection: close`.
fn closing(head: &str) -> String {
    let mut out: Vec<&str> = head
        .trim_end_matches("\r\n")
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    out.push("Connection: close");
    format!("{}\r\n\r\n", out.join("\r\n"))
}

fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    faults: &Mutex<Faults>,
    seen: &Mutex<Seen>,
) -> std::io::Result<()> {
    let Some((head, mut body)) = read_head(&mut client)? else { return Ok(()) };
    let len: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while body.len() < len {
        let mut chunk = vec![0u8; len - body.len()];
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let target = words.next().unwrap_or("").to_string();
    *seen.lock().unwrap().methods.entry(method.clone()).or_default() += 1;
    let object_get =
        method == "GET" && target.trim_start_matches('/').split('?').next().is_some_and(|p| p.contains('/'));
    {
        let mut f = faults.lock().unwrap();
        if f.slow_down > 0 {
            f.slow_down -= 1;
            seen.lock().unwrap().slow_downs += 1;
            let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                xml.len()
            )?;
            return Ok(());
        }
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(closing(&head).as_bytes())?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |p| p + 4);
    let (rhead, rbody) = response.split_at(split);
    let rhead = closing(&String::from_utf8_lossy(rhead));
    let ok = rhead.split_whitespace().nth(1).is_some_and(|s| s.starts_with('2'));
    let mut cut = None;
    if object_get && ok {
        let mut f = faults.lock().unwrap();
        if let Some(i) = f.cut_after.iter().position(|(part, _)| target.contains(part.as_str())) {
            cut = Some(f.cut_after.remove(i).1.min(rbody.len()));
        }
        let mut s = seen.lock().unwrap();
        s.gets.push((target.clone(), header(&head, "range").map(str::to_string)));
        s.get_bytes += cut.unwrap_or(rbody.len()) as u64;
    }
    client.write_all(rhead.as_bytes())?;
    match cut {
        Some(n) => {
            client.write_all(&rbody[..n])?;
            client.flush()?;
            seen.lock().unwrap().cuts += 1;
            // The hook runs before the cut, so the client's reconnect sees what it did.
            let hook = faults.lock().unwrap().on_cut.take();
            if let Some(hook) = hook {
                hook();
            }
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
        None => client.write_all(rbody)?,
    }
    Ok(())
}
