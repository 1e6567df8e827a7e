//! Writing WebDataset shards, like Python `webdataset.ShardWriter`.
//!
//! Shards are named `{out_dir}/{prefix}-{000000}.tar`. A new shard starts after `max_count` samples, or when the
//! next sample would push the current shard past `max_size` bytes (a sample bigger than `max_size` gets a shard
//! of its own). Output is reproducible: members are written in the given order with mtime 0, mode 0o644 and
//! uid/gid 0, so the same input gives byte-identical shards. Long member paths use the GNU long-name extension.
//!
//! # No half shards
//! A shard is written under a temporary name (`.NAME.partial`) and renamed into place when it is complete, so a
//! reader (or a scheduler that re-runs a task) never sees half a shard. For an object-store destination
//! ([`ShardWriter::to_url`]) the shard is staged in a local temporary file and uploaded when complete: one PUT,
//! or a multipart upload for large shards, which the store makes visible only when it completes.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::tar::split_member_path;
use crate::error::{Error, Result};

/// Size of the end-of-archive marker (two zero blocks).
const TRAILER: u64 = 1024;

/// The shard being written.
struct OpenShard {
    /// Final local path (the file is written at [`partial`] of it).
    path: PathBuf,
    out: BufWriter<File>,
    count: usize,
    /// Bytes written so far, trailer excluded.
    size: u64,
}

/// The temporary name a shard is written under until it is complete.
fn partial(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.partial"))
}

/// Where finished shards go.
enum Destination {
    /// Stay in `out_dir`.
    Local,
    /// Uploaded to `{base}/{name}`; `out_dir` is a private staging folder, removed at the end.
    Object { base: String, opts: super::ReadOptions },
}

/// Writes samples into a numbered series of WebDataset tar shards.
pub struct ShardWriter {
    destination: Destination,
    out_dir: PathBuf,
    prefix: String,
    max_count: usize,
    max_size: u64,
    current: Option<OpenShard>,
    /// Every closed shard: path, samples, bytes.
    written: Vec<(PathBuf, u64, u64)>,
}

impl ShardWriter {
    /// Creates `out_dir` if needed and prepares to write `{prefix}-000000.tar` and on. `max_count` must be at
    /// least 1; `max_size` counts the whole tar file (headers, padding and end marker).
    pub fn new(out_dir: impl AsRef<Path>, prefix: &str, max_count: usize, max_size: u64) -> Result<Self> {
        if max_count == 0 {
            return Err(Error::Config(vec!["shard writer: max_count must be at least 1".into()]));
        }
        if prefix.is_empty() || prefix.contains('/') {
            return Err(Error::Config(vec![format!("shard writer: bad prefix `{prefix}`")]));
        }
        let out_dir = out_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(format!("creating `{}`", out_dir.display()), e))?;
        Ok(Self {
            destination: Destination::Local,
            out_dir,
            prefix: prefix.to_string(),
            max_count,
            max_size,
            current: None,
            written: Vec::new(),
        })
    }

    /// Like [`ShardWriter::new`], but the shards go to the object-store folder `base_url` (`s3://b/out`, ...):
    /// each is staged in a local temporary file and uploaded when complete (module docs).
    pub fn to_url(
        base_url: &str,
        prefix: &str,
        max_count: usize,
        max_size: u64,
        opts: &super::ReadOptions,
    ) -> Result<Self> {
        if !super::object::is_object_url(base_url) {
            return Err(Error::Config(vec![format!("shard writer: `{base_url}` is not an object-store URL")]));
        }
        let staging = std::env::temp_dir().join(format!(
            "juicer-staging-{}-{}",
            std::process::id(),
            STAGING.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut w = Self::new(&staging, prefix, max_count, max_size)?;
        w.destination = Destination::Object { base: base_url.trim_end_matches('/').to_string(), opts: opts.clone() };
        Ok(w)
    }

    /// Serialises one sample's members as tar entries (no end marker).
    fn encode(key: &str, members: &[(&str, &[u8])]) -> Result<Vec<u8>> {
        let invalid = |detail: String| Error::io(format!("writing sample `{key}`"), io::Error::other(detail));
        if members.is_empty() {
            return Err(invalid("a sample needs at least one member".into()));
        }
        let mut builder = ::tar::Builder::new(Vec::new());
        for (ext, data) in members {
            let path = format!("{key}.{ext}");
            match split_member_path(&path) {
                Some((k, e)) if k == key && e == *ext && !ext.is_empty() => {}
                _ => {
                    let why = format!("member `{path}` would not read back as key `{key}`, extension `{ext}`");
                    return Err(invalid(why));
                }
            }
            let mut header = ::tar::Header::new_gnu();
            header.set_entry_type(::tar::EntryType::Regular);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            builder.append_data(&mut header, &path, *data).map_err(|e| invalid(e.to_string()))?;
        }
        let mut bytes = builder.into_inner().map_err(|e| invalid(e.to_string()))?;
        // `into_inner` appended the end-of-archive marker; the shard gets one when it is closed.
        bytes.truncate(bytes.len().saturating_sub(TRAILER as usize));
        Ok(bytes)
    }

    /// Continues a series whose first shards are already complete in the (local) output folder: `closed` lists
    /// them in order as (file name, samples, bytes), as [`ShardWriter::closed`] gave them. Each must exist with
    /// exactly that size, else [`Error::State`] names it (the folder changed since). The next shard written is
    /// number `closed.len()`.
    pub fn continue_after(mut self, closed: &[(String, u64, u64)]) -> Result<Self> {
        if !matches!(self.destination, Destination::Local) {
            return Err(Error::Config(vec!["shard writer: only a local series can be continued".into()]));
        }
        for (i, (name, count, size)) in closed.iter().enumerate() {
            let expected = format!("{}-{i:06}.tar", self.prefix);
            let path = self.out_dir.join(name);
            let on_disk = std::fs::metadata(&path).map(|m| m.len()).ok();
            if *name != expected || on_disk != Some(*size) {
                return Err(Error::State(format!(
                    "shard `{}` should be complete with {size} bytes ({count} samples), found {}",
                    path.display(),
                    on_disk.map_or_else(|| "no file".to_string(), |n| format!("{n} bytes"))
                )));
            }
            self.written.push((path, *count, *size));
        }
        Ok(self)
    }

    /// The shards closed so far, in order, as (file name, samples, bytes): what [`ShardWriter::continue_after`]
    /// takes to continue the series.
    pub fn closed(&self) -> Vec<(String, u64, u64)> {
        let name = |p: &PathBuf| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.written.iter().map(|(p, count, size)| (name(p), *count, *size)).collect()
    }

    /// Appends one sample: `members` are `(extension, data)` pairs written as `{key}.{extension}` in the given
    /// order. The key must not contain a dot in its file part nor start it with a dot (it would not read back).
    /// Returns whether the previous shard was closed (it was full) before this sample started a new one.
    pub fn write(&mut self, key: &str, members: &[(&str, &[u8])]) -> Result<bool> {
        let bytes = Self::encode(key, members)?;
        let len = bytes.len() as u64;
        let full = self.current.as_ref().is_some_and(|s| {
            s.count >= self.max_count || s.size.saturating_add(len).saturating_add(TRAILER) > self.max_size
        });
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            let path = self.out_dir.join(format!("{}-{:06}.tar", self.prefix, self.written.len()));
            let file = File::create(partial(&path))
                .map_err(|e| Error::io(format!("creating `{}`", partial(&path).display()), e))?;
            self.current = Some(OpenShard { path, out: BufWriter::new(file), count: 0, size: 0 });
        }
        if let Some(shard) = self.current.as_mut() {
            shard.out.write_all(&bytes).map_err(|e| Error::io(format!("writing `{}`", shard.path.display()), e))?;
            shard.count += 1;
            shard.size += len;
        }
        Ok(full)
    }

    /// Writes the end marker of the current shard and closes it.
    fn close_current(&mut self) -> Result<()> {
        if let Some(mut shard) = self.current.take() {
            let context = format!("writing `{}`", shard.path.display());
            shard.out.write_all(&[0u8; TRAILER as usize]).map_err(|e| Error::io(context.clone(), e))?;
            let file = shard.out.into_inner().map_err(|e| Error::io(context.clone(), e.into_error()))?;
            file.sync_all().map_err(|e| Error::io(context.clone(), e))?;
            drop(file);
            std::fs::rename(partial(&shard.path), &shard.path).map_err(|e| Error::io(context, e))?;
            let location = match &self.destination {
                Destination::Local => shard.path,
                Destination::Object { base, opts } => {
                    let name = shard.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    let url = format!("{base}/{name}");
                    super::object::upload_file(&url, opts, &shard.path)
                        .map_err(|e| Error::io(format!("uploading `{url}`"), e))?;
                    let _ = std::fs::remove_file(&shard.path);
                    PathBuf::from(url)
                }
            };
            self.written.push((location, shard.count as u64, shard.size + TRAILER));
        }
        Ok(())
    }

    /// Like [`finish`](Self::finish), and also writes the shards' manifest (`wids` format, sample counts and
    /// sizes, URLs relative to the folder) to `OUT_DIR/PREFIX.json`, which a loader takes instead of scanning
    /// the shards. Returns the shard paths and the manifest's path.
    pub fn finish_indexed(mut self) -> Result<(Vec<PathBuf>, PathBuf)> {
        self.close_current()?;
        let manifest = super::Manifest::from_written(&self.written);
        let path = match &self.destination {
            Destination::Local => {
                let path = self.out_dir.join(format!("{}.json", self.prefix));
                manifest.write(&path)?;
                path
            }
            Destination::Object { base, opts } => {
                let url = format!("{base}/{}.json", self.prefix);
                manifest.save(&url, opts)?;
                PathBuf::from(url)
            }
        };
        Ok((self.paths(), path))
    }

    /// Closes the last shard and returns the paths of every shard written, in order.
    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        self.close_current()?;
        Ok(self.paths())
    }

    /// Paths of the shards closed so far, in order.
    fn paths(&self) -> Vec<PathBuf> {
        self.written.iter().map(|(p, ..)| p.clone()).collect()
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        // Best effort: a writer dropped without `finish` still leaves a valid last shard.
        let _ = self.close_current();
        if matches!(self.destination, Destination::Object { .. }) {
            let _ = std::fs::remove_dir_all(&self.out_dir);
        }
    }
}

/// Distinguishes the staging folders of several writers in one process.
static STAGING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_keys_that_do_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), "s", 10, 1 << 20).unwrap();
        assert!(w.write("a.b", &[("jpg", b"x")]).is_err());
        assert!(w.write("d/.hidden", &[("jpg", b"x")]).is_err());
        assert!(w.write("k", &[]).is_err());
        assert!(w.write("k", &[("", b"x")]).is_err());
        w.write("dir.x/k", &[("seg.png", b"x")]).unwrap();
        assert_eq!(w.finish().unwrap().len(), 1);
        assert!(ShardWriter::new(dir.path(), "s", 0, 1).is_err());
    }

    #[test]
    fn empty_writer_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let w = ShardWriter::new(dir.path(), "s", 10, 1 << 20).unwrap();
        assert!(w.finish().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
