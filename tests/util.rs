//! Shared helpers: synthetic WebDataset shards with real encoded images, fault injection, thread counting.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use juicer::source::ShardWriter;

/// A small PNG whose colour encodes `i`, so every sample has distinct pixels.
pub fn png(i: usize, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(i * 37 % 251) as u8, (i * 11 % 241) as u8 ^ (x as u8), (y as u8).wrapping_add(i as u8)])
    });
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).expect("encode png");
    out
}

/// A JPEG of sample `i`.
pub fn jpeg(i: usize, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(i * 5) as u8, x as u8, y as u8]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Jpeg).expect("encode jpeg");
    out
}

/// A real PNG bomb: a valid 8-bit greyscale PNG of `w`×`h` black pixels, compressed to a few hundred KB
/// (20000 × 20000 decodes to 400 MB of grey, 1.2 GB as RGB). Built streaming: the rows are never held in memory.
pub fn png_bomb(w: u32, h: u32) -> Vec<u8> {
    use std::io::Write;
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8 bits, greyscale, deflate, no filter, no interlace
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let row = vec![0u8; w as usize + 1]; // filter byte 0, then the row
    for _ in 0..h {
        z.write_all(&row).expect("deflate");
    }
    let idat = z.finish().expect("deflate");
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &idat);
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Fault kinds for [`make_shards`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// A healthy sample.
    None,
    /// Image bytes are garbage.
    Corrupt,
    /// The sample has only a caption.
    NoImage,
    /// The caption is not UTF-8.
    BadCaption,
}

/// Writes `per_shard.len()` shards (every fourth image a JPEG, the others PNG) `s-00000i.tar` into `dir`; shard `i` holds `per_shard[i]` samples. Sample keys
/// are `s{shard}/k{global index:05}`; `fault(global index)` chooses a fault. Returns the shard paths.
pub fn make_shards(dir: &Path, per_shard: &[usize], fault: impl Fn(usize) -> Fault) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let mut g = 0usize;
    for (s, &n) in per_shard.iter().enumerate() {
        let mut w = ShardWriter::new(dir, &format!("s{s}"), usize::MAX, u64::MAX).expect("writer");
        for _ in 0..n {
            let key = format!("s{s}/k{g:05}");
            let caption = format!("sample number {g}");
            let (w_px, h_px) = (24 + (g % 5) as u32 * 4, 20 + (g % 3) as u32 * 6);
            let (ext, img) = if g % 4 == 3 { ("jpg", jpeg(g, w_px, h_px)) } else { ("png", png(g, w_px, h_px)) };
            match fault(g) {
                Fault::None => w.write(&key, &[(ext, &img), ("txt", caption.as_bytes())]),
                Fault::Corrupt => w.write(&key, &[("png", b"\x89PNG-not-really"), ("txt", caption.as_bytes())]),
                Fault::NoImage => w.write(&key, &[("txt", caption.as_bytes())]),
                Fault::BadCaption => w.write(&key, &[(ext, &img), ("txt", b"caf\xe9 \xff")]),
            }
            .expect("write sample");
            g += 1;
        }
        paths.extend(w.finish().expect("finish"));
    }
    paths
}

/// Paths as source strings.
pub fn specs(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.display().to_string()).collect()
}

/// Root of the repository's fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The `juicer` binary with `args`, to run from the repository root (so fixture paths are relative, as a user
/// types them), with the rank and backtrace variables of the test environment removed; add to its environment
/// before running it.
pub fn juicer_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_juicer"));
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("SLURM_PROCID")
        .env_remove("SLURM_NTASKS");
    cmd
}

/// Runs [`juicer_command`] to its end.
pub fn juicer(args: &[&str]) -> Output {
    juicer_command(args).output().expect("spawn the juicer binary")
}

/// A finished process's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One request [`FileServer`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// Requested path, without the leading slash.
    pub path: String,
    /// Start of the `Range: bytes=N-` header, if any.
    pub range: Option<u64>,
    /// Body bytes sent.
    pub bytes: u64,
}

/// A small HTTP server over in-memory files that honours `Range: bytes=N-` (206) and logs every request with
/// the bytes it sent. Stops when dropped.
pub struct FileServer {
    base: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<Served>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    /// Serves `files` (name → bytes) on a local port.
    pub fn start(files: Vec<(String, Vec<u8>)>) -> Self {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let files: std::sync::Arc<std::collections::BTreeMap<String, Vec<u8>>> =
            std::sync::Arc::new(files.into_iter().collect());
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (log2, stop2, accepted2) = (log.clone(), stop.clone(), accepted.clone());
        let handle = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        accepted2.fetch_add(1, Ordering::SeqCst);
                        let (files, log) = (files.clone(), log2.clone());
                        workers.push(std::thread::spawn(move || {
                            stream.set_nonblocking(false).unwrap();
                            stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
                            let (path, range) = read_request(&mut stream);
                            let Some(data) = files.get(&path) else {
                                let _ = stream.write_all(
                                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                                );
                                log.lock().unwrap().push(Served { path, range, bytes: 0 });
                                return;
                            };
                            let len = data.len() as u64;
                            let s = range.unwrap_or(0).min(len);
                            let head = response_head(range, len);
                            let _ = stream.write_all(head.as_bytes());
                            let body = &data[s as usize..];
                            let sent = match stream.write_all(body) {
                                Ok(()) => body.len() as u64,
                                Err(_) => 0,
                            };
                            let _ = stream.flush();
                            let _ = stream.shutdown(std::net::Shutdown::Both);
                            log.lock().unwrap().push(Served { path, range, bytes: sent });
                        }));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        Self { base, log, accepted, stop, handle: Some(handle) }
    }

    /// URL of file `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    /// The requests answered since the last call, once every accepted connection has been answered.
    pub fn take_log(&self) -> Vec<Served> {
        for _ in 0..2000 {
            if self.log.lock().unwrap().len() >= self.accepted.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.accepted.store(0, std::sync::atomic::Ordering::SeqCst);
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The head of an HTTP answer with the bytes of a `len`-byte body from `start` on: `206` with `Content-Range`
/// for a range, else `200`; one answer per connection.
pub fn response_head(start: Option<u64>, len: u64) -> String {
    match start {
        Some(s) => format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{}/{len}\r\nConnection: close\r\n\r\n",
            len - s,
            len - 1
        ),
        None => format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"),
    }
}

/// A loader builder for small synthetic shards: 32-px input, 16-px patches, batches of 4, CPU, small edges.
pub fn small_loader(sources: Vec<String>) -> juicer::JuicerBuilder {
    juicer::JuicedBatch::builder(sources)
        .image_size(32)
        .patch_size(16)
        .batch_size(4)
        .device(juicer::DeviceSpec::Cpu)
        .decode_workers(2)
        .capacity(4)
}

/// Reads one HTTP request's head: its path (without the leading `/`) and the start of its `Range: bytes=N-`
/// header, if any.
pub fn read_request(stream: &mut std::net::TcpStream) -> (String, Option<u64>) {
    use std::io::Read;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("/").trim_start_matches('/').to_string();
    let range = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("range") {
            return None;
        }
        value.trim().strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()
    });
    (path, range)
}
