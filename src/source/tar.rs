//! WebDataset tar reading: a streaming tar header walker and the sample grouper on top of it.
//!
//! The walker parses 512-byte tar headers itself (with [`::tar::Header`] for the field layout) instead of using
//! `tar::Archive`, for three reasons: the reader must own its input (`tar::Entries` borrows the archive), member
//! data must be skipped without reading it (seek on a local file), and a member cut short must be an error (the
//! `tar` crate returns short data without one). GNU long names (`L`) and PAX `path`/`size` records are honoured,
//! as Python's `tarfile` does.
//!
//! Grouping follows Python `webdataset` exactly: a member path splits at the first dot of its file name into key
//! and extension, a sample is a run of consecutive members with the same key, and non-regular entries, names
//! whose file part has no dot or starts with a dot, and `__*__` meta names are skipped.
//!
//! Failure rules (stricter than `tarfile`, so that a cut shard never yields a silently incomplete sample): a member
//! or its padding cut short, a corrupt or cut header, a read error, or input that ends without the end-of-archive
//! marker make the sample in progress one `Truncated` item (key `"<shard>#<index>"` when no sample was in
//! progress), after which the reader ends. Input whose very first block is not a tar header (random bytes, an
//! HTML page, a corrupt gzip stream, an empty file) is one `UnreadableShard` item keyed by the shard's name
//! instead: the shard is not a tar archive at all, nothing in it was cut.

use std::fs::File;
use std::io::{self, BufReader, Read};

use bytes::Bytes;

use super::limits::{ReadLimits, Role};
use crate::error::{DropReason, SampleError};
use crate::sample::RawSample;

/// Size of a tar block.
const BLOCK: u64 = 512;
/// Largest GNU long name / PAX header accepted; bigger ones are treated as a corrupt header.
const MAX_META_ENTRY: u64 = 1 << 20;
/// Largest initial allocation for one member's data (the vector grows past it if the member is bigger).
const MAX_PREALLOC: u64 = 64 << 20;
/// Extensions (last component, lower-case) that mark the image member.
pub(crate) const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A byte source a tar shard is read from: a `Read` that can also skip bytes cheaply where the medium allows.
pub(crate) trait Medium: Read + Send {
    /// Skips up to `n` bytes and returns how many were skipped; fewer than `n` means the input ended.
    fn skip(&mut self, n: u64) -> io::Result<u64>;
}

impl<M: Medium + ?Sized> Medium for Box<M> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        (**self).skip(n)
    }
}

/// A local file: skipping seeks, and the file length tells how much can be skipped.
pub(crate) struct LocalMedium {
    reader: BufReader<File>,
    pos: u64,
    len: u64,
}

impl LocalMedium {
    /// Wraps an open file whose read position is at byte `pos`.
    pub(crate) fn new(file: File, pos: u64) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { reader: BufReader::with_capacity(256 << 10, file), pos, len })
    }
}

impl Read for LocalMedium {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Medium for LocalMedium {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let k = n.min(self.len.saturating_sub(self.pos));
        let step = i64::try_from(k).map_err(io::Error::other)?;
        self.reader.seek_relative(step)?;
        self.pos += k;
        Ok(k)
    }
}

/// Any stream (HTTP body, in-memory bytes): skipping reads and discards.
pub(crate) struct StreamMedium<R> {
    reader: R,
}

impl<R: Read + Send> StreamMedium<R> {
    /// Wraps a reader.
    pub(crate) fn new(reader: R) -> Self {
        Self { reader }
    }
}

impl<R: Read + Send> Read for StreamMedium<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl<R: Read + Send> Medium for StreamMedium<R> {
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        io::copy(&mut (&mut self.reader).take(n), &mut io::sink())
    }
}

/// A regular-file member that passed the WebDataset filters.
#[derive(Debug, Clone)]
struct Member {
    /// Full member path as stored.
    path: String,
    /// Sample key (path up to the first dot of the file name).
    key: String,
    /// Extension after that dot, lower-cased (as `webdataset` does).
    ext: String,
    /// Data size in bytes.
    size: u64,
    /// Byte offset of the member's first header (its PAX or GNU long-name header, when it has one).
    start: u64,
}

/// Splits a member path into `(key, extension)` the way `webdataset.base_plus_ext` does, or `None` when the
/// member must be skipped (no dot in the file name, a hidden file, or a `__*__` meta name).
pub(crate) fn split_member_path(path: &str) -> Option<(String, String)> {
    let (dir, file) = match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    };
    let first = path.split('/').next().unwrap_or(path);
    if first.len() >= 4 && first.starts_with("__") && first.ends_with("__") {
        return None;
    }
    if file.starts_with('.') {
        return None;
    }
    let dot = file.find('.')?;
    Some((format!("{dir}{}", &file[..dot]), file[dot + 1..].to_string()))
}

/// Last component of an extension (`seg.png` -> `png`).
fn last_ext(ext: &str) -> &str {
    ext.rsplit('.').next().unwrap_or(ext)
}

/// Whether an extension's last component names an image format.
pub(crate) fn is_image_ext(ext: &str) -> bool {
    let last = last_ext(ext);
    IMAGE_EXTS.iter().any(|e| last.eq_ignore_ascii_case(e))
}

/// Walks the headers of a tar stream and hands out WebDataset members.
struct Walker<M> {
    medium: M,
    shard: String,
    /// Bytes consumed from the start of the stream.
    pos: u64,
    /// Set once the end of the archive has been seen.
    ended: bool,
    /// Byte offset of the end-of-archive marker, once seen.
    end_at: Option<u64>,
    /// Whether a valid tar header (or the end-of-archive marker) has been read: until then, a failure means the
    /// input is not a tar archive at all rather than one cut short.
    seen_header: bool,
    /// Whether reading the medium failed (an I/O error, a corrupt gzip stream), as opposed to bytes that do not
    /// parse as tar.
    read_failed: bool,
}

impl<M: Medium> Walker<M> {
    /// Reads as many bytes as possible into `buf`, stopping only at the end of input.
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.medium.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.read_failed = true;
                    return Err(e);
                }
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    /// Skips `n` bytes; returns how many were skipped.
    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let k = self.medium.skip(n)?;
        self.pos += k;
        Ok(k)
    }

    /// Skips the padding after the data of member `path` of `size` bytes; a cut inside it is an error too.
    fn skip_padding(&mut self, path: &str, size: u64) -> Result<(), String> {
        let pad = (BLOCK - size % BLOCK) % BLOCK;
        let at = self.pos;
        match self.skip(pad) {
            Ok(k) if k == pad => Ok(()),
            Ok(k) => Err(format!("shard cut in the padding after member `{path}` at byte {} ({k} of {pad})", at + k)),
            Err(e) => Err(format!("read error in the padding after member `{path}` at byte {at}: {e}")),
        }
    }

    /// Reads the whole data of a metadata entry (long name, PAX records).
    fn read_meta_entry(&mut self, size: u64, what: &str, at: u64) -> Result<Vec<u8>, String> {
        if size > MAX_META_ENTRY {
            return Err(format!("corrupt tar header at byte {at}: {what} of {size} bytes"));
        }
        let mut buf = vec![0u8; size as usize];
        let got = self.read_full(&mut buf).map_err(|e| format!("read error in {what} at byte {at}: {e}"))?;
        if (got as u64) < size {
            return Err(format!("shard cut inside {what} at byte {at} ({got} of {size} bytes)"));
        }
        self.skip_padding(what, size)?;
        Ok(buf)
    }

    /// Returns the next member that passes the WebDataset filters, `Ok(None)` at the end of the archive, or an
    /// error detail (without the shard name) for a corrupt or cut header.
    fn next_member(&mut self) -> Result<Option<Member>, String> {
        let mut long_name: Option<String> = None;
        let mut pax_path: Option<String> = None;
        let mut pax_size: Option<u64> = None;
        // Where the headers of the member being parsed began (extension headers precede its own header).
        let mut start = self.pos;
        loop {
            if self.ended {
                return Ok(None);
            }
            let at = self.pos;
            let mut block = [0u8; BLOCK as usize];
            let got = self.read_full(&mut block).map_err(|e| format!("read error at byte {at}: {e}"))?;
            if got == 0 {
                // Python's tarfile tolerates this, but a shard cut at a block boundary looks exactly the same:
                // the last sample may be incomplete, so it is not trusted.
                return Err(format!("shard ends at byte {at} without the end-of-archive marker"));
            }
            if got < block.len() {
                return Err(format!("shard cut inside a tar header at byte {at} ({got} of 512 bytes)"));
            }
            if block.iter().all(|&b| b == 0) {
                self.seen_header = true;
                self.ended = true;
                self.end_at = Some(at);
                return Ok(None);
            }
            let header = ::tar::Header::from_byte_slice(&block);
            let stored = header.cksum().map_err(|e| format!("corrupt tar header at byte {at}: {e}"))?;
            let computed: u32 = block
                .iter()
                .enumerate()
                .map(|(i, &b)| if (148..156).contains(&i) { u32::from(b' ') } else { u32::from(b) })
                .sum();
            if stored != computed {
                return Err(format!("corrupt tar header at byte {at}: checksum mismatch"));
            }
            self.seen_header = true;
            let header_size = header.entry_size().map_err(|e| format!("corrupt tar header at byte {at}: {e}"))?;
            let size = pax_size.take().unwrap_or(header_size);
            let kind = header.entry_type().as_byte();
            match kind {
                b'L' => {
                    let data = self.read_meta_entry(size, "GNU long name", at)?;
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    long_name = Some(String::from_utf8_lossy(&data[..end]).into_owned());
                    continue;
                }
                b'x' => {
                    let data = self.read_meta_entry(size, "PAX header", at)?;
                    for ext in ::tar::PaxExtensions::new(&data) {
                        let ext = ext.map_err(|e| format!("corrupt PAX header at byte {at}: {e}"))?;
                        match ext.key() {
                            Ok("path") => pax_path = Some(String::from_utf8_lossy(ext.value_bytes()).into_owned()),
                            Ok("size") => {
                                let v = ext.value().ok().and_then(|v| v.parse::<u64>().ok());
                                pax_size = Some(v.ok_or_else(|| format!("corrupt PAX size at byte {at}"))?);
                            }
                            _ => {}
                        }
                    }
                    continue;
                }
                _ => {}
            }
            let path = pax_path
                .take()
                .or_else(|| long_name.take())
                .unwrap_or_else(|| String::from_utf8_lossy(&header.path_bytes()).into_owned());
            long_name = None;
            // Regular files: '0', '\0' (old tar, unless the name ends in '/': a directory) and '7' (contiguous).
            let regular = matches!(kind, b'0' | b'7') || (kind == 0 && !path.ends_with('/'));
            let split = if regular { split_member_path(&path) } else { None };
            match split {
                Some((key, ext)) => {
                    return Ok(Some(Member { path, key, ext: ext.to_lowercase(), size, start }));
                }
                None => {
                    self.skip_data(&path, size)?;
                    start = self.pos;
                }
            }
        }
    }

    /// Skips a member's data (and padding), checking that all of it is there.
    fn skip_data(&mut self, path: &str, size: u64) -> Result<(), String> {
        let at = self.pos;
        let k = self.skip(size).map_err(|e| format!("member `{path}`: read error at byte {at}: {e}"))?;
        if k < size {
            return Err(format!("member `{path}` cut short: {k} of {size} bytes"));
        }
        self.skip_padding(path, size)?;
        Ok(())
    }

    /// Reads a member's data whole (and skips its padding).
    fn read_data(&mut self, member: &Member) -> Result<Vec<u8>, String> {
        let size = member.size;
        let mut data = Vec::with_capacity(size.min(MAX_PREALLOC) as usize);
        let res = (&mut self.medium).take(size).read_to_end(&mut data);
        self.pos += data.len() as u64;
        if let Err(e) = res {
            return Err(format!("member `{}` cut short: {} of {size} bytes: {e}", member.path, data.len()));
        }
        if (data.len() as u64) < size {
            return Err(format!("member `{}` cut short: {} of {size} bytes", member.path, data.len()));
        }
        self.skip_padding(&member.path, size)?;
        Ok(data)
    }
}

/// A member's data as the sample uses it: decompressed for a `.gz` member, or why it cannot be used.
type Used = Result<Vec<u8>, Unusable>;

/// Why a member's data cannot be used (the sample is dropped; the shard goes on).
#[derive(Debug)]
enum Unusable {
    /// Larger than its role's limit (announced by the header, or inflated past it): `member_too_large`.
    TooLarge(String),
    /// Corrupt (not valid gzip): the role's own reason.
    Corrupt(String),
}

/// Decompresses a `.gz` member in `role`, at most the role's limit of bytes (the rest is never inflated).
fn gunzip(path: &str, data: &[u8], limits: &ReadLimits, role: Role) -> Used {
    let (limit, _) = limits.bytes(role);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).min(limit as usize).min(MAX_PREALLOC as usize));
    let mut decoder = flate2::read::MultiGzDecoder::new(data).take(limit.saturating_add(1));
    decoder.read_to_end(&mut out).map_err(|e| Unusable::Corrupt(format!("member `{path}` is not valid gzip: {e}")))?;
    if out.len() as u64 > limit {
        let what = || format!("member `{path}`");
        return Err(Unusable::TooLarge(limits.too_large(role, what, None).unwrap_or_else(what)));
    }
    Ok(out)
}

/// Iterator over the samples of one tar shard; see the module docs for the grouping rules.
pub(crate) struct TarSamples<M> {
    walker: Walker<M>,
    /// Header of the first member of the next sample, already read (its data is not).
    pending: Option<Member>,
    /// Index in the shard of the next sample to be yielded.
    index: usize,
    done: bool,
    /// Whether byte offsets in the stream are offsets in the shard (not for a decompressed gzip stream).
    offsets: bool,
    /// Byte offset in the shard where the next sample starts, when known.
    next_offset: Option<u64>,
    /// What one sample may hold in memory.
    limits: ReadLimits,
}

/// Outcome of walking over samples without reading their data.
struct SkipOutcome {
    /// Samples whose first member header was seen.
    started: usize,
    /// Whether the walk ended on a failure before any sample started (that failure is then one item itself).
    failed_before_first: bool,
}

impl<M: Medium> TarSamples<M> {
    /// Starts reading `medium` (named `shard` in every error), skipping the first `skip` samples without reading
    /// their member data.
    pub(crate) fn new(medium: M, shard: String, skip: usize) -> Self {
        let mut samples = Self::bare(medium, shard, 0, true);
        if skip > 0 {
            let outcome = samples.walk(skip);
            samples.index = skip;
            if outcome.started < skip || samples.pending.is_none() {
                // The shard has at most `skip` samples (or failed inside a skipped one): nothing left to yield.
                samples.done = true;
            }
        }
        samples.next_offset = samples.pending_offset();
        samples
    }

    /// Starts reading `medium`, positioned at byte `offset` of the shard where sample number `index` starts
    /// (a checkpointed offset), so that item `i` is sample `index + i`. The header there is read at once: when
    /// it is not a tar header (the shard changed since the offset was taken), the error detail comes back
    /// instead of a reader that would yield garbage.
    pub(crate) fn at_offset(medium: M, shard: String, index: usize, offset: u64) -> Result<Self, String> {
        let mut samples = Self::bare(medium, shard, offset, true);
        samples.index = index;
        match samples.walker.next_member() {
            Ok(Some(member)) => samples.pending = Some(member),
            Ok(None) => samples.done = true,
            Err(detail) => return Err(detail),
        }
        samples.next_offset = samples.pending_offset();
        Ok(samples)
    }

    /// A stream whose bytes are not the shard's (a decompressed gzip stream): no byte offsets are reported.
    pub(crate) fn without_offsets(mut self) -> Self {
        self.offsets = false;
        self.next_offset = None;
        self
    }

    fn bare(medium: M, shard: String, pos: u64, offsets: bool) -> Self {
        Self {
            walker: Walker { medium, shard, pos, ended: false, end_at: None, seen_header: false, read_failed: false },
            pending: None,
            index: 0,
            done: false,
            offsets,
            next_offset: None,
            limits: ReadLimits::default(),
        }
    }

    /// Applies `limits` to the samples read from now on (default [`ReadLimits::default`]).
    pub(crate) fn with_limits(mut self, limits: ReadLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Where the next sample starts: the first header of the pending member, or the end-of-archive marker.
    fn pending_offset(&self) -> Option<u64> {
        if !self.offsets {
            return None;
        }
        match &self.pending {
            Some(m) => Some(m.start),
            None if self.walker.ended => self.walker.end_at,
            None if !self.done => Some(self.walker.pos),
            None => None,
        }
    }

    /// Byte offset in the shard where the next sample (after the last item yielded) starts: a shard opened
    /// there with [`TarSamples::at_offset`] continues with it. `None` for a decompressed stream or after the
    /// shard ended on a failure.
    pub(crate) fn next_offset(&self) -> Option<u64> {
        self.next_offset
    }

    /// Counts the samples (items) of the shard, reading headers only.
    pub(crate) fn count(medium: M, shard: String) -> usize {
        let mut samples = Self::bare(medium, shard, 0, true);
        let outcome = samples.walk(usize::MAX);
        outcome.started + usize::from(outcome.failed_before_first)
    }

    /// Walks headers, skipping data, until the header of sample number `stop` is seen (kept in `pending`) or
    /// the archive ends or fails.
    fn walk(&mut self, stop: usize) -> SkipOutcome {
        let mut started = 0usize;
        let mut current: Option<String> = None;
        loop {
            let member = match self.walker.next_member() {
                Ok(Some(m)) => m,
                Ok(None) => return SkipOutcome { started, failed_before_first: false },
                Err(_) => return SkipOutcome { started, failed_before_first: started == 0 },
            };
            if current.as_deref() != Some(member.key.as_str()) {
                if started == stop {
                    self.pending = Some(member);
                    return SkipOutcome { started, failed_before_first: false };
                }
                started += 1;
                current = Some(member.key.clone());
            }
            if self.walker.skip_data(&member.path, member.size).is_err() {
                return SkipOutcome { started, failed_before_first: false };
            }
        }
    }

    /// A `Truncated` sample error; the detail is prefixed with the shard name.
    fn truncated(&self, key: String, detail: &str) -> SampleError {
        SampleError::new(key, DropReason::Truncated, format!("shard `{}`: {detail}", self.walker.shard))
    }

    /// Builds a sample from its used members, or the sample error explaining why it cannot be used.
    fn assemble(
        &self,
        key: String,
        image: Option<(String, Used)>,
        caption: Option<Used>,
        meta: Option<Used>,
    ) -> Result<RawSample, SampleError> {
        let shard = &self.walker.shard;
        let Some((image_ext, image)) = image else {
            let detail = format!("shard `{shard}`: sample has no jpg/jpeg/png/webp member");
            return Err(SampleError::new(key, DropReason::MissingImage, detail));
        };
        let used = |m: Option<Used>, reason| {
            m.transpose().map_err(|e| match e {
                Unusable::TooLarge(d) => {
                    SampleError::new(key.clone(), DropReason::MemberTooLarge, format!("shard `{shard}`: {d}"))
                }
                Unusable::Corrupt(d) => SampleError::new(key.clone(), reason, format!("shard `{shard}`: {d}")),
            })
        };
        let image = used(Some(image), DropReason::UndecodableImage)?.unwrap_or_default();
        let caption = used(caption, DropReason::InvalidCaption)?;
        let meta = used(meta, DropReason::InvalidMeta)?;
        let caption = match caption.map(String::from_utf8).transpose() {
            Ok(c) => c,
            Err(e) => {
                let detail = format!("shard `{shard}`: caption is not UTF-8: {e}");
                return Err(SampleError::new(key, DropReason::InvalidCaption, detail));
            }
        };
        let meta = match meta.map(|m| self.limits.parse_meta(&m)).transpose() {
            Ok(m) => m,
            Err(e) => {
                let detail = format!("shard `{shard}`: json member: {e}");
                return Err(SampleError::new(key, DropReason::InvalidMeta, detail));
            }
        };
        Ok(RawSample { key, image: Bytes::from(image), image_ext, caption, meta })
    }
}

impl<M: Medium> Iterator for TarSamples<M> {
    type Item = Result<RawSample, SampleError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.next_item();
        self.next_offset = if self.done && !self.walker.ended { None } else { self.pending_offset() };
        item
    }
}

impl<M: Medium> TarSamples<M> {
    fn next_item(&mut self) -> Option<Result<RawSample, SampleError>> {
        if self.done {
            return None;
        }
        let index = self.index;
        self.index += 1;
        let mut member = match self.pending.take() {
            Some(m) => m,
            None => match self.walker.next_member() {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(detail) if !self.walker.seen_header => {
                    // Nothing at the start of the input parses as tar: the whole shard is unreadable (random
                    // bytes, an HTML error page, a corrupt gzip stream), not a sample cut short.
                    self.done = true;
                    let shard = self.walker.shard.clone();
                    let what = match (self.walker.read_failed, self.offsets) {
                        // A decompressed stream that fails to read before its first header: the gzip layer.
                        (true, false) => "gzip stream corrupt",
                        (true, true) => "unreadable",
                        (false, _) => "not a tar archive",
                    };
                    return Some(Err(SampleError::new(
                        shard,
                        DropReason::UnreadableShard,
                        format!("{what}: {detail}"),
                    )));
                }
                Err(detail) => {
                    self.done = true;
                    let key = format!("{}#{index}", self.walker.shard);
                    return Some(Err(self.truncated(key, &detail)));
                }
            },
        };
        let key = member.key.clone();
        let mut image: Option<(String, Used)> = None;
        let mut caption: Option<Used> = None;
        let mut meta: Option<Used> = None;
        loop {
            // `KEY.txt.gz` plays the role of `KEY.txt` once decompressed.
            let (role, gz) = match member.ext.strip_suffix(".gz") {
                Some(role) => (role.to_string(), true),
                None => (member.ext.clone(), false),
            };
            let wanted = if image.is_none() && is_image_ext(&role) {
                Some(Role::Image)
            } else if caption.is_none() && role == "txt" {
                Some(Role::Caption)
            } else if meta.is_none() && role == "json" {
                Some(Role::Meta)
            } else {
                None
            };
            let res = if let Some(r) = wanted {
                // The size the header announces is checked before a byte is allocated; a member above its
                // limit is skipped (sought over locally) and drops the sample.
                let what = || format!("member `{}`", member.path);
                let data = match self.limits.too_large(if gz { Role::Image } else { r }, what, Some(member.size)) {
                    Some(detail) => {
                        self.walker.skip_data(&member.path, member.size).map(|()| Err(Unusable::TooLarge(detail)))
                    }
                    None => self
                        .walker
                        .read_data(&member)
                        .map(|data| if gz { gunzip(&member.path, &data, &self.limits, r) } else { Ok(data) }),
                };
                data.map(|data| match r {
                    Role::Image => image = Some((last_ext(&role).to_string(), data)),
                    Role::Caption => caption = Some(data),
                    Role::Meta => meta = Some(data),
                })
            } else {
                self.walker.skip_data(&member.path, member.size)
            };
            if let Err(detail) = res {
                self.done = true;
                return Some(Err(self.truncated(key, &detail)));
            }
            match self.walker.next_member() {
                Ok(Some(next)) if next.key == key => member = next,
                Ok(Some(next)) => {
                    self.pending = Some(next);
                    break;
                }
                Ok(None) => {
                    self.done = true;
                    break;
                }
                Err(detail) => {
                    // The sample may have had more members: it cannot be trusted.
                    self.done = true;
                    return Some(Err(self.truncated(key, &detail)));
                }
            }
        }
        Some(self.assemble(key, image, caption, meta))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    /// Builds an in-memory tar with the given `(path, data)` regular members.
    fn tar_bytes(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = ::tar::Builder::new(Vec::new());
        for (path, data) in members {
            let mut header = ::tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(::tar::EntryType::Regular);
            builder.append_data(&mut header, path, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn read_all(bytes: Vec<u8>, skip: usize) -> Vec<Result<RawSample, SampleError>> {
        TarSamples::new(StreamMedium::new(Cursor::new(bytes)), "mem.tar".into(), skip).collect()
    }

    fn count(bytes: Vec<u8>) -> usize {
        TarSamples::count(StreamMedium::new(Cursor::new(bytes)), "mem.tar".into())
    }

    fn read_limited(bytes: Vec<u8>, limits: ReadLimits) -> Vec<Result<RawSample, SampleError>> {
        TarSamples::new(StreamMedium::new(Cursor::new(bytes)), "mem.tar".into(), 0).with_limits(limits).collect()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn members_above_their_limits_drop_their_sample_and_the_shard_goes_on() {
        let deep = format!("{}1{}", "[".repeat(9), "]".repeat(9));
        let bomb = gzip(&vec![b'a'; 10_000]);
        let bytes = tar_bytes(&[
            ("big.jpg", &[7u8; 100]),
            ("cap.jpg", b"C"),
            ("cap.txt", b"eleven char"),
            ("meta.jpg", b"M"),
            ("meta.json", b"{\"pad\": \"0123456789012345678901234567890123456789\"}"),
            ("deep.jpg", b"D"),
            ("deep.json", deep.as_bytes()),
            ("gz.jpg", b"G"),
            ("gz.txt.gz", &bomb),
            ("ok.jpg", b"O"),
            ("ok.txt", b"fine"),
            ("ok.json", b"[[1]]"),
        ]);
        let limits = ReadLimits { max_member_bytes: 99, max_caption_bytes: 10, max_meta_bytes: 40, max_json_depth: 8 };
        let items = read_limited(bytes, limits);
        assert_eq!(items.len(), 6, "one item per sample");
        let expect = [
            (
                "big",
                DropReason::MemberTooLarge,
                "member `big.jpg` has 100 bytes, above the limit of 99 (max_member_bytes)",
            ),
            (
                "cap",
                DropReason::MemberTooLarge,
                "member `cap.txt` has 11 bytes, above the limit of 10 (max_caption_bytes)",
            ),
            (
                "meta",
                DropReason::MemberTooLarge,
                "member `meta.json` has 51 bytes, above the limit of 40 (max_meta_bytes)",
            ),
            ("deep", DropReason::InvalidMeta, "JSON nests 9 levels deep, above the limit of 8 (max_json_depth)"),
            (
                "gz",
                DropReason::MemberTooLarge,
                "member `gz.txt.gz` decompresses to more than 10 bytes (max_caption_bytes)",
            ),
        ];
        for (item, (key, reason, detail)) in items.iter().zip(expect) {
            let e = item.as_ref().unwrap_err();
            assert_eq!((e.key.as_str(), e.reason), (key, reason));
            assert!(e.detail.contains(detail) && e.detail.contains("shard `mem.tar`"), "{}", e.detail);
        }
        let ok = items[5].as_ref().unwrap();
        assert_eq!((ok.key.as_str(), ok.caption.as_deref()), ("ok", Some("fine")));
    }

    #[test]
    fn a_header_announcing_50_gb_is_sought_over_not_allocated() {
        // A sparse local file: the 50 GB member is a hole, so the test writes a few KB. Reading the member would
        // need 50 GB of memory; the limit check comes first and the walker seeks over it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.tar");
        let size: u64 = 50 << 30;
        let mut header = ::tar::Header::new_gnu();
        header.set_path("huge.jpg").unwrap();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_entry_type(::tar::EntryType::Regular);
        header.set_cksum();
        let tail = tar_bytes(&[("next.jpg", b"N"), ("next.txt", b"after the hole")]);
        {
            use std::io::{Seek, SeekFrom, Write};
            let mut f = File::create(&path).unwrap();
            f.write_all(header.as_bytes()).unwrap();
            f.seek(SeekFrom::Start(BLOCK + size)).unwrap();
            f.write_all(&tail).unwrap();
        }
        let medium = LocalMedium::new(File::open(&path).unwrap(), 0).unwrap();
        let items: Vec<_> = TarSamples::new(medium, "huge.tar".into(), 0).collect();
        assert_eq!(items.len(), 2);
        let e = items[0].as_ref().unwrap_err();
        assert_eq!((e.key.as_str(), e.reason), ("huge", DropReason::MemberTooLarge));
        assert!(e.detail.contains(&format!("{size} bytes, above the limit of {}", 256u64 << 20)), "{}", e.detail);
        assert_eq!(items[1].as_ref().unwrap().caption.as_deref(), Some("after the hole"));
    }

    #[test]
    fn split_rules() {
        assert_eq!(split_member_path("a.b/c/k1.seg.png"), Some(("a.b/c/k1".into(), "seg.png".into())));
        assert_eq!(split_member_path("k.jpg"), Some(("k".into(), "jpg".into())));
        assert_eq!(split_member_path("dir/noext"), None);
        assert_eq!(split_member_path("dir/.hidden.jpg"), None);
        assert_eq!(split_member_path("__meta__"), None);
        assert_eq!(split_member_path("__meta__/x.txt"), None);
        assert_eq!(split_member_path("k."), Some(("k".into(), String::new())));
    }

    #[test]
    fn image_ext_rules() {
        assert!(is_image_ext("JPG"));
        assert!(is_image_ext("seg.png"));
        assert!(!is_image_ext("png.txt"));
        assert!(!is_image_ext("gif"));
    }

    #[test]
    fn groups_and_reads() {
        let bytes = tar_bytes(&[
            ("a.jpg", b"A"),
            ("a.txt", b"cap a"),
            ("a.json", b"{\"x\":1}"),
            ("b.seg.png", b"SEG"),
            ("b.png", b"B"),
            ("b.cls", b"3"),
        ]);
        let items = read_all(bytes.clone(), 0);
        assert_eq!(items.len(), 2);
        let a = items[0].as_ref().unwrap();
        assert_eq!((a.key.as_str(), &a.image[..], a.image_ext.as_str()), ("a", &b"A"[..], "jpg"));
        assert_eq!(a.caption.as_deref(), Some("cap a"));
        assert_eq!(a.meta, Some(serde_json::json!({"x": 1})));
        let b = items[1].as_ref().unwrap();
        assert_eq!((&b.image[..], b.image_ext.as_str()), (&b"SEG"[..], "png"));
        assert_eq!(count(bytes), 2);
    }

    #[test]
    fn cut_member_is_truncated() {
        let mut bytes = tar_bytes(&[("a.jpg", &[1u8; 600]), ("b.jpg", &[2u8; 2000])]);
        // a: header 0..512, data 512..1112, pad to 1536; b: header 1536..2048, data 2048..4048.
        bytes.truncate(3000);
        let items = read_all(bytes.clone(), 0);
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        let err = items[1].as_ref().unwrap_err();
        assert_eq!(err.reason, DropReason::Truncated);
        assert_eq!(err.key, "b");
        assert!(err.detail.contains("mem.tar") && err.detail.contains("b.jpg"), "{}", err.detail);
        assert_eq!(count(bytes.clone()), 2);
        assert_eq!(read_all(bytes.clone(), 1).len(), 1);
        assert_eq!(read_all(bytes, 2).len(), 0);
    }

    #[test]
    fn corrupt_header_is_one_truncated_item() {
        let mut bytes = tar_bytes(&[("a.jpg", b"A"), ("b.jpg", b"B"), ("c.jpg", b"C")]);
        bytes[1024 + 10] ^= 0x55; // b's header
        // `a` may have had more members after the corrupt header: it is the one Truncated item.
        let items = read_all(bytes.clone(), 0);
        assert_eq!(items.len(), 1);
        let err = items[0].as_ref().unwrap_err();
        assert_eq!((err.key.as_str(), err.reason), ("a", DropReason::Truncated));
        assert!(err.detail.contains("mem.tar") && err.detail.contains("checksum"), "{}", err.detail);
        assert_eq!(count(bytes.clone()), 1);
        assert_eq!(read_all(bytes, 1).len(), 0);
        // Corrupt first header: nothing parses as tar, so the whole shard is unreadable, keyed by its name.
        let mut bytes = tar_bytes(&[("a.jpg", b"A")]);
        bytes[3] ^= 0x55;
        let items = read_all(bytes.clone(), 0);
        assert_eq!(items.len(), 1);
        let err = items[0].as_ref().unwrap_err();
        assert_eq!((err.key.as_str(), err.reason), ("mem.tar", DropReason::UnreadableShard));
        assert!(err.detail.starts_with("not a tar archive: ") && err.detail.contains("checksum"), "{}", err.detail);
        assert_eq!(count(bytes), 1);
    }

    #[test]
    fn cut_header_is_truncated() {
        let mut bytes = tar_bytes(&[("a.jpg", b"A"), ("b.jpg", b"B")]);
        bytes.truncate(1024 + 100);
        let items = read_all(bytes.clone(), 0);
        assert_eq!(items.len(), 1);
        let err = items[0].as_ref().unwrap_err();
        assert_eq!((err.key.as_str(), err.reason), ("a", DropReason::Truncated));
        assert_eq!(count(bytes), 1);
    }

    #[test]
    fn missing_end_marker_or_cut_padding_is_truncated() {
        let bytes = tar_bytes(&[("a.jpg", b"A"), ("a.txt", b"T")]);
        // Cut right after a.jpg's padding (a header boundary) and inside a.txt's padding.
        for cut in [1024, 1024 + 512 + 100] {
            let items = read_all(bytes[..cut].to_vec(), 0);
            assert_eq!(items.len(), 1, "cut {cut}");
            let err = items[0].as_ref().unwrap_err();
            assert_eq!((err.key.as_str(), err.reason), ("a", DropReason::Truncated), "cut {cut}");
            assert_eq!(count(bytes[..cut].to_vec()), 1);
        }
        // Without the end marker but otherwise whole: still not trusted.
        let whole = bytes.len() - 1024;
        assert!(read_all(bytes[..whole].to_vec(), 0)[0].is_err());
        // An empty file, or one shorter than a header, is an unreadable shard named after the shard.
        for short in [Vec::new(), bytes[..300].to_vec()] {
            let items = read_all(short, 0);
            let err = items[0].as_ref().unwrap_err();
            assert_eq!((err.key.as_str(), err.reason), ("mem.tar", DropReason::UnreadableShard));
        }
        // The full archive reads fine.
        assert!(read_all(bytes, 0)[0].is_ok());
    }

    #[test]
    fn long_names_are_read() {
        let long = format!("{}/key.jpg", "d".repeat(150));
        let bytes = tar_bytes(&[(long.as_str(), b"X")]);
        let items = read_all(bytes, 0);
        assert_eq!(items[0].as_ref().unwrap().key, format!("{}/key", "d".repeat(150)));
    }

    #[test]
    fn pax_path_is_honoured() {
        let mut builder = ::tar::Builder::new(Vec::new());
        builder.append_pax_extensions([("path", &b"pax/name.jpg"[..])]).unwrap();
        let mut header = ::tar::Header::new_ustar();
        header.set_size(1);
        header.set_entry_type(::tar::EntryType::Regular);
        builder.append_data(&mut header, "short.jpg", &b"P"[..]).unwrap();
        let items = read_all(builder.into_inner().unwrap(), 0);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().unwrap().key, "pax/name");
    }

    #[test]
    fn next_offset_points_at_the_next_samples_first_header() {
        let mut builder = ::tar::Builder::new(Vec::new());
        let add = |b: &mut ::tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
            let mut header = ::tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_entry_type(::tar::EntryType::Regular);
            b.append_data(&mut header, path, data).unwrap();
        };
        add(&mut builder, "a.jpg", b"A");
        add(&mut builder, "a.txt", b"T");
        // b's own header is preceded by a PAX header: b starts at the PAX header.
        builder.append_pax_extensions([("path", &b"b.jpg"[..])]).unwrap();
        add(&mut builder, "short.jpg", b"B");
        add(&mut builder, "c.jpg", b"C");
        let bytes = builder.into_inner().unwrap();
        let mut samples = TarSamples::new(StreamMedium::new(Cursor::new(bytes.clone())), "mem.tar".into(), 0);
        assert_eq!(samples.next_offset(), Some(0));
        assert_eq!(samples.next().unwrap().unwrap().key, "a");
        // a: two members of one header block and one data block each.
        assert_eq!(samples.next_offset(), Some(2048));
        assert_eq!(samples.next().unwrap().unwrap().key, "b");
        let c_at = samples.next_offset().unwrap();
        assert_eq!(samples.next().unwrap().unwrap().key, "c");
        let end = samples.next_offset().unwrap();
        assert!(samples.next().is_none());
        assert_eq!(end, c_at + 1024, "the end marker follows c");
        // Opened at b's offset, the reader continues with b, c, counting from index 1.
        let medium = StreamMedium::new(Cursor::new(bytes[2048..].to_vec()));
        let mut at = TarSamples::at_offset(medium, "mem.tar".into(), 1, 2048).unwrap();
        assert_eq!(at.next().unwrap().unwrap().key, "b");
        assert_eq!(at.next_offset(), Some(c_at));
        assert_eq!(at.next().unwrap().unwrap().key, "c");
        assert!(at.next().is_none());
        // An offset inside a member is refused.
        let medium = StreamMedium::new(Cursor::new(bytes[2048 + 100..].to_vec()));
        let err = TarSamples::at_offset(medium, "mem.tar".into(), 1, 2148).err().unwrap();
        assert!(err.contains("corrupt tar header at byte 2148"), "{err}");
        // A gzip stream reports no offsets.
        let plain = TarSamples::new(StreamMedium::new(Cursor::new(bytes)), "mem.tar".into(), 0).without_offsets();
        assert_eq!(plain.next_offset(), None);
    }
}
