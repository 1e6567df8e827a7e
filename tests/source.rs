//! Integration tests for `juicer::source`: WebDataset grouping, bad input, skip/count, shard specs, HTTP
//! streaming with resume, the shard writer and the folder source.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use juicer::sample::RawSample;
use juicer::source::{ReadOptions, Shard, ShardWriter, expand_braces, resolve};
use juicer::{DropReason, Error, SampleError};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------------

/// A tar entry for hand-built shards.
enum Entry<'a> {
    /// Regular file.
    File(&'a str, &'a [u8]),
    /// Directory.
    Dir(&'a str),
    /// Symbolic link.
    Link(&'a str, &'a str),
}

/// Serialises entries into tar bytes (GNU headers, end marker included).
fn tar_bytes(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_mtime(0);
        match entry {
            Entry::File(path, data) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, *data).unwrap();
            }
            Entry::Dir(path) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, path, &[][..]).unwrap();
            }
            Entry::Link(path, target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

/// Writes entries as a tar file and returns its shard.
fn write_tar(path: &Path, entries: &[Entry<'_>]) -> Shard {
    std::fs::write(path, tar_bytes(entries)).unwrap();
    Shard::Tar(path.to_string_lossy().into_owned())
}

fn opts() -> ReadOptions {
    ReadOptions { http_retries: 2, http_timeout: Duration::from_secs(5), ..ReadOptions::default() }
}

fn read(shard: &Shard, skip: usize) -> Vec<Result<RawSample, SampleError>> {
    shard.open(skip, &opts()).unwrap().collect()
}

/// Compact view of an item for comparisons: key plus either the image bytes or the drop reason.
#[derive(Debug, Clone, PartialEq, Eq)]
enum View {
    Ok { key: String, image: Vec<u8>, ext: String, caption: Option<String> },
    Err { key: String, reason: DropReason },
}

fn view(item: &Result<RawSample, SampleError>) -> View {
    match item {
        Ok(s) => View::Ok {
            key: s.key.clone(),
            image: s.image.to_vec(),
            ext: s.image_ext.clone(),
            caption: s.caption.clone(),
        },
        Err(e) => View::Err { key: e.key.clone(), reason: e.reason },
    }
}

fn views(items: &[Result<RawSample, SampleError>]) -> Vec<View> {
    items.iter().map(view).collect()
}

/// A shard with five good samples, each with a ~1.5 KiB image, a caption and metadata.
fn five_samples() -> Vec<u8> {
    let images: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1500 + usize::from(i)]).collect();
    let caps: Vec<String> = (0..5).map(|i| format!("caption {i}")).collect();
    let keys: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let mut paths = Vec::new();
    for k in &keys {
        paths.push((format!("{k}.jpg"), format!("{k}.txt"), format!("{k}.json")));
    }
    let mut entries = Vec::new();
    for i in 0..5 {
        entries.push(Entry::File(&paths[i].0, &images[i]));
        entries.push(Entry::File(&paths[i].1, caps[i].as_bytes()));
        entries.push(Entry::File(&paths[i].2, b"{\"i\": 1}"));
    }
    tar_bytes(&entries)
}

// ---------------------------------------------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn grouping_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let shard = write_tar(
        &dir.path().join("g.tar"),
        &[
            Entry::Dir("a.b/"),
            Entry::Dir("a.b/c/"),
            Entry::File("a.b/c/k1.seg.png", b"SEG"),
            Entry::File("a.b/c/k1.png", b"PNG"),
            Entry::File("a.b/c/k1.txt", b"first"),
            Entry::File("a.b/c/noext", b"skipped"),
            Entry::File("a.b/c/.hidden.jpg", b"skipped"),
            Entry::File("__index__", b"skipped"),
            Entry::Link("link.jpg", "K2.JPG"),
            Entry::File("K2.JPG", b"UPPER"),
            Entry::File("K2.TXT", b"upper caption"),
            Entry::File("K2.cls", b"7"),
            Entry::File("m.seg.txt", b"not an image"),
            Entry::File("m.webp", b"WEBP"),
            // Same key again after another key: a new sample, as in webdataset.
            Entry::File("K2.png", b"AGAIN"),
        ],
    );
    let items = read(&shard, 0);
    assert_eq!(
        views(&items),
        vec![
            View::Ok {
                key: "a.b/c/k1".into(),
                image: b"SEG".to_vec(),
                ext: "png".into(),
                caption: Some("first".into())
            },
            View::Ok {
                key: "K2".into(),
                image: b"UPPER".to_vec(),
                ext: "jpg".into(),
                caption: Some("upper caption".into())
            },
            View::Ok { key: "m".into(), image: b"WEBP".to_vec(), ext: "webp".into(), caption: None },
            View::Ok { key: "K2".into(), image: b"AGAIN".to_vec(), ext: "png".into(), caption: None },
        ]
    );
    assert_eq!(shard.count_samples(&opts()).unwrap(), items.len());
}

#[test]
fn key_split_by_shard_boundary_gives_two_samples() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = write_tar(&dir.path().join("1.tar"), &[Entry::File("a.jpg", b"A"), Entry::File("x.jpg", b"X")]);
    let s2 = write_tar(&dir.path().join("2.tar"), &[Entry::File("x.txt", b"cap"), Entry::File("b.jpg", b"B")]);
    let mut all = read(&s1, 0);
    all.extend(read(&s2, 0));
    assert_eq!(
        views(&all),
        vec![
            View::Ok { key: "a".into(), image: b"A".to_vec(), ext: "jpg".into(), caption: None },
            View::Ok { key: "x".into(), image: b"X".to_vec(), ext: "jpg".into(), caption: None },
            View::Err { key: "x".into(), reason: DropReason::MissingImage },
            View::Ok { key: "b".into(), image: b"B".to_vec(), ext: "jpg".into(), caption: None },
        ]
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input, skip and count
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn truncated_shard_names_key_and_shard() {
    let dir = tempfile::tempdir().unwrap();
    let full = five_samples();
    // Cut inside s3's image: each sample is 3 members; s3's image header starts at the offset of member 9.
    let cut_at = {
        let mut archive = tar::Archive::new(&full[..]);
        let entry = archive.entries().unwrap().nth(9).unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("s3.jpg"));
        entry.raw_file_position() as usize + 700
    };
    let path = dir.path().join("cut.tar");
    std::fs::write(&path, &full[..cut_at]).unwrap();
    let shard = Shard::Tar(path.to_string_lossy().into_owned());
    let items = read(&shard, 0);
    assert_eq!(items.len(), 4, "{:?}", views(&items));
    assert!(items[..3].iter().all(Result::is_ok));
    let err = items[3].as_ref().unwrap_err();
    assert_eq!((err.key.as_str(), err.reason), ("s3", DropReason::Truncated));
    assert!(err.detail.contains(&shard.name()) && err.detail.contains("s3.jpg"), "{}", err.detail);
    assert_eq!(shard.count_samples(&opts()).unwrap(), 4);
    for skip in 0..6 {
        assert_eq!(views(&read(&shard, skip)), views(&items[skip.min(4)..]), "skip {skip}");
    }
}

#[test]
fn truncated_inside_last_member_is_never_a_short_sample() {
    let full = five_samples();
    let dir = tempfile::tempdir().unwrap();
    // Cut the file at every 97th byte: no cut may give an `Ok` sample whose data differs from the full read.
    let whole = {
        let path = dir.path().join("whole.tar");
        std::fs::write(&path, &full).unwrap();
        views(&read(&Shard::Tar(path.to_string_lossy().into_owned()), 0))
    };
    for cut in (0..full.len()).step_by(97) {
        let path = dir.path().join("cut.tar");
        std::fs::write(&path, &full[..cut]).unwrap();
        let shard = Shard::Tar(path.to_string_lossy().into_owned());
        let items = read(&shard, 0);
        for (i, item) in items.iter().enumerate() {
            match item {
                Ok(_) => assert_eq!(view(item), whole[i], "cut {cut}"),
                Err(e) => {
                    // Cut inside the first header: nothing in the file is a tar header, so the shard is unreadable.
                    let expected = if cut < 512 { DropReason::UnreadableShard } else { DropReason::Truncated };
                    assert_eq!(e.reason, expected, "cut {cut}");
                    assert_eq!(i, items.len() - 1, "the reader ends after a truncated item");
                }
            }
        }
        assert_eq!(shard.count_samples(&opts()).unwrap(), items.len(), "cut {cut}");
    }
}

#[test]
fn bad_samples_are_one_error_each_and_skip_matches() {
    let dir = tempfile::tempdir().unwrap();
    let shard = write_tar(
        &dir.path().join("bad.tar"),
        &[
            Entry::File("ok1.jpg", b"1"),
            Entry::File("noimg.txt", b"caption only"),
            Entry::File("noimg.gif", b"GIF"),
            Entry::File("badcap.png", b"2"),
            Entry::File("badcap.txt", &[0xff, 0xfe, b'x']),
            Entry::File("badjson.webp", b"3"),
            Entry::File("badjson.json", b"{not json"),
            Entry::File("ok2.jpeg", b"4"),
        ],
    );
    let items = read(&shard, 0);
    let expect = vec![
        View::Ok { key: "ok1".into(), image: b"1".to_vec(), ext: "jpg".into(), caption: None },
        View::Err { key: "noimg".into(), reason: DropReason::MissingImage },
        View::Err { key: "badcap".into(), reason: DropReason::InvalidCaption },
        View::Err { key: "badjson".into(), reason: DropReason::InvalidMeta },
        View::Ok { key: "ok2".into(), image: b"4".to_vec(), ext: "jpeg".into(), caption: None },
    ];
    assert_eq!(views(&items), expect);
    for item in &items {
        if let Err(e) = item {
            assert!(e.detail.contains(&shard.name()), "detail must name the shard: {}", e.detail);
        }
    }
    assert_eq!(shard.count_samples(&opts()).unwrap(), expect.len());
    for skip in 0..=expect.len() + 1 {
        assert_eq!(views(&read(&shard, skip)), expect[skip.min(expect.len())..].to_vec(), "skip {skip}");
    }
}

#[test]
fn missing_shard_is_an_open_error() {
    let shard = Shard::Tar("/definitely/not/here.tar".into());
    assert!(matches!(shard.open(0, &opts()), Err(Error::Shard { .. })));
}

// ---------------------------------------------------------------------------------------------------------------
// Shard specs
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn brace_expansion() {
    assert_eq!(
        expand_braces("shards-{000008..000010}.tar").unwrap(),
        ["shards-000008.tar", "shards-000009.tar", "shards-000010.tar"]
    );
    assert_eq!(
        expand_braces("{a,b}/{0..1}-{x,y}").unwrap(),
        ["a/0-x", "a/0-y", "a/1-x", "a/1-y", "b/0-x", "b/0-y", "b/1-x", "b/1-y"]
    );
    assert_eq!(expand_braces("{98..101}").unwrap(), ["98", "99", "100", "101"]);
    assert!(matches!(expand_braces("x-{5..1}.tar"), Err(Error::ShardSpec { .. })));
    assert!(matches!(expand_braces("x-{1..5.tar"), Err(Error::ShardSpec { .. })));
}

#[test]
fn resolve_paths_globs_braces_urls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    for i in 0..4 {
        write_tar(&dir.path().join(format!("shards-{i:06}.tar")), &[Entry::File("a.jpg", b"A")]);
    }
    let names = |shards: Vec<Shard>| shards.iter().map(Shard::name).collect::<Vec<_>>();
    assert_eq!(
        names(resolve(&[format!("{d}/shards-{{000001..000002}}.tar")], 10).unwrap()),
        [format!("{d}/shards-000001.tar"), format!("{d}/shards-000002.tar")]
    );
    assert_eq!(
        names(resolve(&[format!("{d}/shards-00000[23].tar"), format!("{d}/*.tar")], 10).unwrap()),
        [2, 3, 0, 1, 2, 3].map(|i| format!("{d}/shards-{i:06}.tar"))
    );
    assert_eq!(
        names(resolve(&["https://h.example/d/s-{0..1}.tar".to_string()], 10).unwrap()),
        ["https://h.example/d/s-0.tar", "https://h.example/d/s-1.tar"]
    );
    let shards = resolve(&[format!("{d}/shards-000000.tar")], 10).unwrap();
    assert_eq!(shards, vec![Shard::Tar(format!("{d}/shards-000000.tar"))]);
    assert!(!shards[0].is_remote());
    for bad in [format!("{d}/shards-{{000003..000004}}.tar"), format!("{d}/nothing-*.tar"), format!("{d}/missing.tar")]
    {
        match resolve(std::slice::from_ref(&bad), 10) {
            Err(Error::ShardSpec { spec, .. }) => assert_eq!(spec, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Folder source
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn folder_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("img")).unwrap();
    let mut jsonl = String::new();
    for i in 0..5 {
        std::fs::write(dir.path().join(format!("img/{i}.png")), vec![i as u8; 10]).unwrap();
        jsonl.push_str(&format!("{{\"image\": \"img/{i}.png\", \"caption\": \"c{i}\", \"extra\": {i}}}\n"));
    }
    jsonl.push_str("{\"image\": \"img/missing.jpg\", \"key\": \"gone\"}\n");
    std::fs::write(dir.path().join("captions.jsonl"), &jsonl).unwrap();
    let d = dir.path().to_string_lossy().into_owned();

    let shards = resolve(std::slice::from_ref(&d), 4).unwrap();
    assert_eq!(shards.len(), 2);
    assert_eq!(shards[0].name(), format!("{d}/captions.jsonl[0..4]"));
    assert_eq!(shards[1].name(), format!("{d}/captions.jsonl[4..6]"));
    assert_eq!(resolve(&[format!("{d}/captions.jsonl")], 4).unwrap(), shards);
    let mut items = read(&shards[0], 0);
    items.extend(read(&shards[1], 0));
    assert_eq!(items.len(), 6);
    for (i, item) in items.iter().take(5).enumerate() {
        let s = item.as_ref().unwrap();
        assert_eq!(s.key, format!("img/{i}"));
        assert_eq!(&s.image[..], &vec![i as u8; 10][..]);
        assert_eq!(s.image_ext, "png");
        assert_eq!(s.caption.as_deref(), Some(format!("c{i}").as_str()));
        assert_eq!(s.meta.as_ref().unwrap()["extra"], i);
    }
    let err = items[5].as_ref().unwrap_err();
    assert_eq!(err.key, "gone");
    assert!(err.detail.contains(&shards[1].name()), "{}", err.detail);
    assert_eq!(views(&read(&shards[0], 3)), views(&items[3..4]));
    assert_eq!(shards[1].count_samples(&opts()).unwrap(), 2);

    std::fs::write(dir.path().join("bad.jsonl"), "{\"image\": \"a.jpg\"}\n{\"image\": 3}\n").unwrap();
    let err = resolve(&[format!("{d}/bad.jsonl")], 4).unwrap_err().to_string();
    assert!(err.contains("line 2"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Shard writer
// ---------------------------------------------------------------------------------------------------------------

/// Writes `n` samples with an image, a caption and metadata.
fn write_samples(out: &Path, n: usize, max_count: usize, max_size: u64) -> Vec<PathBuf> {
    let mut writer = ShardWriter::new(out, "train", max_count, max_size).unwrap();
    for i in 0..n {
        let image = vec![(i % 251) as u8; 300 + 37 * i];
        let caption = format!("caption {i}");
        let meta = format!("{{\"i\": {i}}}");
        writer
            .write(
                &format!("dir.v1/sample{i:04}"),
                &[("jpg", &image), ("txt", caption.as_bytes()), ("json", meta.as_bytes())],
            )
            .unwrap();
    }
    writer.finish().unwrap()
}

#[test]
fn shard_writer_round_trip_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_samples(&dir.path().join("a"), 10, 3, u64::MAX);
    let names: Vec<_> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-000003.tar"]);
    let mut items = Vec::new();
    for p in &paths {
        items.extend(read(&Shard::Tar(p.to_string_lossy().into_owned()), 0));
    }
    assert_eq!(items.len(), 10);
    for (i, item) in items.iter().enumerate() {
        let s = item.as_ref().unwrap();
        assert_eq!(s.key, format!("dir.v1/sample{i:04}"));
        assert_eq!(&s.image[..], &vec![(i % 251) as u8; 300 + 37 * i][..]);
        assert_eq!(s.caption.as_deref(), Some(format!("caption {i}").as_str()));
        assert_eq!(s.meta, Some(serde_json::json!({ "i": i })));
    }

    // Deterministic output: byte-identical across runs, fixed header fields.
    let again = write_samples(&dir.path().join("b"), 10, 3, u64::MAX);
    for (p, q) in paths.iter().zip(&again) {
        assert_eq!(std::fs::read(p).unwrap(), std::fs::read(q).unwrap());
    }
    let mut archive = tar::Archive::new(std::fs::File::open(&paths[0]).unwrap());
    let mut order = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        let h = entry.header();
        assert_eq!((h.mtime().unwrap(), h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap()), (0, 0o644, 0, 0));
        order.push(entry.path().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(&order[..3], ["dir.v1/sample0000.jpg", "dir.v1/sample0000.txt", "dir.v1/sample0000.json"]);

    // max_size: every shard fits (no single sample is bigger), and shards are as full as the limit allows.
    let max_size = 8 * 1024;
    let sized = write_samples(&dir.path().join("c"), 10, 1000, max_size);
    assert!(sized.len() > 1);
    let mut total = 0;
    for p in &sized {
        let len = std::fs::metadata(p).unwrap().len();
        assert!(len <= max_size, "{} is {len} bytes", p.display());
        total += Shard::Tar(p.to_string_lossy().into_owned()).count_samples(&opts()).unwrap();
    }
    assert_eq!(total, 10);
    // A sample bigger than max_size gets a shard of its own.
    let big = write_samples(&dir.path().join("d"), 3, 1000, 1024);
    assert_eq!(big.len(), 3);
}

// ---------------------------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------------------------

/// How the test server misbehaves.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Serves every request, honouring `Range: bytes=N-` with 206.
    Full,
    /// The first response stops after absolute byte `at` and closes; later ones are complete.
    CutFirst(usize),
    /// Every response stops at absolute byte `at`.
    CutAlways(usize),
    /// The first response stops at `at`; `Range` is ignored (always 200 with the whole body).
    NoRange(usize),
    /// 404 for everything.
    NotFound,
}

/// Answers one connection; returns the requested range start.
fn answer(mut stream: TcpStream, data: &[u8], behaviour: Behaviour, index: usize) -> Option<usize> {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let range = crate::util::read_request(&mut stream).1.map(|r| r as usize);
    let len = data.len();
    let (start, cut) = match behaviour {
        Behaviour::NotFound => {
            let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return range;
        }
        Behaviour::Full => (range, len),
        Behaviour::CutFirst(at) => (range, if index == 0 { at } else { len }),
        Behaviour::CutAlways(at) => (range, at),
        Behaviour::NoRange(at) => (None, if index == 0 { at } else { len }),
    };
    let head = crate::util::response_head(start.map(|s| s as u64), len as u64);
    let s = start.unwrap_or(0);
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(&data[s..cut.max(s)]);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    range
}

/// Serves `data` for exactly `requests` connections (or 20 s), then stops. Returns the URL and a handle whose
/// result lists each request's range start.
fn serve(data: Vec<u8>, behaviour: Behaviour, requests: usize) -> (String, JoinHandle<Vec<Option<usize>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/shard-000000.tar", listener.local_addr().unwrap());
    let handle = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while seen.len() < requests && Instant::now() < deadline {
            match listener.accept() {
                Ok((stream, _)) => {
                    let index = seen.len();
                    seen.push(answer(stream, &data, behaviour, index));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
                Err(_) => break,
            }
        }
        seen
    });
    (url, handle)
}

/// Offset of byte `delta` inside the data of member number `member` of `data`.
fn offset_in_member(data: &[u8], member: usize, delta: u64) -> usize {
    let mut archive = tar::Archive::new(data);
    let entry = archive.entries().unwrap().nth(member).unwrap().unwrap();
    (entry.raw_file_position() + delta) as usize
}

fn local_views(data: &[u8]) -> Vec<View> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.tar");
    std::fs::write(&path, data).unwrap();
    views(&read(&Shard::Tar(path.to_string_lossy().into_owned()), 0))
}

#[test]
fn http_full_shard_streams_and_skips() {
    let data = five_samples();
    let expect = local_views(&data);
    assert_eq!(expect.len(), 5);
    let (url, server) = serve(data, Behaviour::Full, 3);
    let shard = resolve(std::slice::from_ref(&url), 10).unwrap().remove(0);
    assert!(shard.is_remote());
    assert_eq!(views(&read(&shard, 0)), expect);
    assert_eq!(views(&read(&shard, 2)), expect[2..].to_vec());
    assert_eq!(shard.count_samples(&opts()).unwrap(), 5);
    assert_eq!(server.join().unwrap(), [None, None, None]);
}

#[test]
fn http_cut_once_resumes_with_range() {
    let data = five_samples();
    let expect = local_views(&data);
    let at = offset_in_member(&data, 6, 300); // inside s2's image
    let (url, server) = serve(data, Behaviour::CutFirst(at), 2);
    assert_eq!(views(&read(&Shard::Tar(url), 0)), expect);
    assert_eq!(server.join().unwrap(), [None, Some(at)]);
}

#[test]
fn http_cut_every_time_is_truncated() {
    let data = five_samples();
    let expect = local_views(&data);
    let at = offset_in_member(&data, 6, 300); // inside s2's image
    let (url, server) = serve(data, Behaviour::CutAlways(at), 3);
    let items = read(&Shard::Tar(url.clone()), 0);
    assert_eq!(views(&items[..2]), expect[..2].to_vec());
    assert_eq!(items.len(), 3, "{:?}", views(&items));
    let err = items[2].as_ref().unwrap_err();
    assert_eq!((err.key.as_str(), err.reason), ("s2", DropReason::Truncated));
    assert!(err.detail.contains(&url), "{}", err.detail);
    // One request plus `http_retries` reconnects, all from the cut offset.
    assert_eq!(server.join().unwrap(), [None, Some(at), Some(at)]);
}

#[test]
fn http_server_without_range_support_is_truncated() {
    let data = five_samples();
    let at = offset_in_member(&data, 6, 300);
    let (url, server) = serve(data, Behaviour::NoRange(at), 2);
    let items = read(&Shard::Tar(url.clone()), 0);
    assert_eq!(items.len(), 3);
    assert!(items[..2].iter().all(Result::is_ok));
    let err = items[2].as_ref().unwrap_err();
    assert_eq!(err.reason, DropReason::Truncated);
    assert!(err.detail.contains(&url) && err.detail.contains("206"), "{}", err.detail);
    assert_eq!(server.join().unwrap().len(), 2);
}

#[test]
fn http_not_found_is_a_shard_error() {
    let (url, server) = serve(Vec::new(), Behaviour::NotFound, 1);
    match Shard::Tar(url.clone()).open(0, &opts()) {
        Err(Error::Shard { shard, source }) => {
            assert_eq!(shard, url);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected a shard error, got {other:?}"),
    }
    assert_eq!(server.join().unwrap().len(), 1, "a 404 is not retried");
}

// ---------------------------------------------------------------------------------------------------------------
// Property: grouping of random member sequences
// ---------------------------------------------------------------------------------------------------------------

const KEYS: [&str; 4] = ["a", "b", "d.x/a", "d.x/c"];
const EXTS: [&str; 7] = ["jpg", "JPG", "png", "seg.png", "txt", "json", "cls"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn grouping_matches_runs(
        members in prop::collection::vec((0..KEYS.len(), 0..EXTS.len()), 1..40),
        max_count in 1usize..8,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = ShardWriter::new(dir.path(), "p", max_count, u64::MAX).unwrap();
        let data: Vec<Vec<u8>> = (0..members.len()).map(|i| format!("{{\"m\": {i}}}").into_bytes()).collect();
        for (i, &(k, e)) in members.iter().enumerate() {
            writer.write(KEYS[k], &[(EXTS[e], &data[i])]).unwrap();
        }
        let paths = writer.finish().unwrap();
        prop_assert_eq!(paths.len(), members.len().div_ceil(max_count));

        // Expected: runs of equal consecutive keys inside each chunk of `max_count` members (one chunk per
        // shard); the image is the run's first member with an image extension, else MissingImage.
        let mut expect = Vec::new();
        for chunk in members.chunks(max_count).enumerate().map(|(c, ch)| (c * max_count, ch)) {
            let (base, ch) = chunk;
            let mut i = 0;
            while i < ch.len() {
                let mut j = i;
                while j < ch.len() && ch[j].0 == ch[i].0 {
                    j += 1;
                }
                let key = KEYS[ch[i].0].to_string();
                let image = (i..j).find(|&m| ["jpg", "JPG", "png", "seg.png"].contains(&EXTS[ch[m].1]));
                let caption = (i..j).find(|&m| EXTS[ch[m].1] == "txt");
                expect.push(match image {
                    Some(m) => View::Ok {
                        key,
                        image: data[base + m].clone(),
                        ext: EXTS[ch[m].1].rsplit('.').next().unwrap().to_lowercase(),
                        caption: caption.map(|c| String::from_utf8(data[base + c].clone()).unwrap()),
                    },
                    None => View::Err { key, reason: DropReason::MissingImage },
                });
                i = j;
            }
        }
        let mut got = Vec::new();
        for p in &paths {
            let shard = Shard::Tar(p.to_string_lossy().into_owned());
            let items = read(&shard, 0);
            prop_assert_eq!(shard.count_samples(&opts()).unwrap(), items.len());
            got.extend(views(&items));
        }
        prop_assert_eq!(got, expect);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Gzip-compressed shards and members
// ---------------------------------------------------------------------------------------------------------------

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[test]
fn gzip_shards_read_like_their_tar_originals() {
    let data = five_samples();
    let expect = local_views(&data);
    let gz = gzip(&data);
    let dir = tempfile::tempdir().unwrap();
    // By name (.tar.gz, .tgz) and by the gzip magic under a .tar name.
    for name in ["a.tar.gz", "b.tgz", "c.tar"] {
        let path = dir.path().join(name);
        std::fs::write(&path, &gz).unwrap();
        let shard = resolve(&[path.display().to_string()], 10).unwrap().remove(0);
        assert_eq!(views(&read(&shard, 0)), expect, "{name}");
        assert_eq!(views(&read(&shard, 3)), expect[3..].to_vec(), "{name}");
        assert_eq!(shard.count_samples(&opts()).unwrap(), 5, "{name}");
    }
    // Concatenated gzip members are one stream, as gzip tools write them.
    let mut two = gzip(&data[..4096]);
    two.extend(gzip(&data[4096..]));
    let path = dir.path().join("d.tar.gz");
    std::fs::write(&path, &two).unwrap();
    assert_eq!(views(&read(&Shard::Tar(path.display().to_string()), 0)), expect);
    // Over HTTP (the URL ends in .tar: the magic decides).
    let (url, server) = serve(gz, Behaviour::Full, 2);
    let shard = resolve(std::slice::from_ref(&url), 10).unwrap().remove(0);
    assert_eq!(views(&read(&shard, 0)), expect);
    assert_eq!(views(&read(&shard, 1)), expect[1..].to_vec());
    server.join().unwrap();
}

#[test]
fn cut_or_corrupt_gzip_ends_the_shard_with_a_truncated_sample_naming_it() {
    let data = five_samples();
    let gz = gzip(&data);
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in [
        ("cut.tar.gz", gz[..gz.len() / 2].to_vec()),
        ("flipped.tar.gz", {
            let mut b = gz.clone();
            let mid = b.len() / 2;
            b[mid..mid + 16].iter_mut().for_each(|x| *x ^= 0x5a);
            b
        }),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let items = read(&Shard::Tar(path.display().to_string()), 0);
        let last = items.last().unwrap();
        let Err(e) = last else { panic!("{name}: the last item is a sample: {:?}", view(last)) };
        assert_eq!(e.reason, DropReason::Truncated, "{name}");
        assert!(e.detail.contains(name), "{name}: {}", e.detail);
        // Every item before it is a whole, good sample of the original.
        let good = views(&items[..items.len() - 1]);
        assert_eq!(good, local_views(&data)[..good.len()].to_vec(), "{name}");
        assert!(items.len() <= 5);
    }
}

#[test]
fn a_gzip_shard_corrupt_from_its_start_is_one_unreadable_shard_saying_so() {
    let gz = gzip(&five_samples());
    let dir = tempfile::tempdir().unwrap();
    // The gzip magic, then a broken header: nothing decompresses.
    let mut bytes = gz[..2].to_vec();
    bytes.extend_from_slice(&[0x42; 64]);
    let path = dir.path().join("broken.tar.gz");
    std::fs::write(&path, &bytes).unwrap();
    let name = path.display().to_string();
    let items = read(&Shard::Tar(name.clone()), 0);
    assert_eq!(items.len(), 1);
    let Err(e) = &items[0] else { panic!("a sample from a corrupt stream") };
    assert_eq!((e.key.as_str(), e.reason), (name.as_str(), DropReason::UnreadableShard));
    assert!(e.detail.starts_with("gzip stream corrupt: "), "{}", e.detail);
}

#[test]
fn gz_members_are_decompressed_and_a_bad_one_drops_only_its_sample() {
    let image = vec![7u8; 3000];
    let (img_gz, cap_gz) = (gzip(&image), gzip("a gzipped caption".as_bytes()));
    let dir = tempfile::tempdir().unwrap();
    let shard = write_tar(
        &dir.path().join("m.tar"),
        &[
            Entry::File("k1.jpg.gz", &img_gz),
            Entry::File("k1.txt.gz", &cap_gz),
            Entry::File("k2.png", &image),
            Entry::File("k2.txt.gz", b"not gzip at all"),
            Entry::File("k3.webp", &image),
            Entry::File("k3.txt", b"plain"),
        ],
    );
    let items = views(&read(&shard, 0));
    assert_eq!(
        items,
        [
            View::Ok {
                key: "k1".into(),
                image: image.clone(),
                ext: "jpg".into(),
                caption: Some("a gzipped caption".into())
            },
            View::Err { key: "k2".into(), reason: DropReason::InvalidCaption },
            View::Ok { key: "k3".into(), image, ext: "webp".into(), caption: Some("plain".into()) },
        ]
    );
}

#[test]
fn gzip_fixture_shards_give_the_same_samples_through_the_pipeline() {
    use juicer::{DeviceSpec, JuicedBatch, LastStage};
    let dir = tempfile::tempdir().unwrap();
    let mut plain = Vec::new();
    let mut gz = Vec::new();
    for i in 0..3 {
        let src = crate::util::fixtures().join(format!("shards/gcompris-00000{i}.tar"));
        let dst = dir.path().join(format!("gcompris-00000{i}.tar.gz"));
        std::fs::write(&dst, gzip(&std::fs::read(&src).unwrap())).unwrap();
        plain.push(src.display().to_string());
        gz.push(dst.display().to_string());
    }
    let run = |shards: Vec<String>| {
        let loader = JuicedBatch::builder(shards)
            .device(DeviceSpec::Cpu)
            .batch_size(16)
            .shuffle_buffer(20)
            .seed(4)
            .last_stage(LastStage::Decode)
            .build()
            .unwrap();
        let mut out = Vec::new();
        for b in loader.iter().unwrap() {
            let b = b.unwrap();
            out.push((b.keys.clone(), b.patches.into_data().try_to_vec::<f32>().unwrap()));
        }
        out
    };
    let (a, b) = (run(plain), run(gz));
    assert_eq!(a.iter().map(|x| x.0.len()).sum::<usize>(), 73);
    assert!(a == b, "gzip shards give other samples");
}

// ---------------------------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_manifest_gives_the_counts_and_the_loader_never_scans() {
    use juicer::source::{Manifest, resolve_counted};
    use juicer::{DeviceSpec, JuicedBatch};
    let dir = tempfile::tempdir().unwrap();
    let paths = crate::util::make_shards(dir.path(), &[5, 7, 4], |_| crate::util::Fault::None);
    let shards = resolve(&crate::util::specs(&paths), 10).unwrap();
    let m = Manifest::index(&shards, &opts(), 2, &|_| {}).unwrap();
    assert_eq!(m.shards.iter().map(|s| s.nsamples).collect::<Vec<_>>(), [5, 7, 4]);
    assert!(m.shards.iter().all(|s| s.filesize.is_some_and(|f| f > 0)));
    let path = dir.path().join("train.json");
    m.write(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"url\": \"s0-000000.tar\""), "relative URLs: {text}");
    let spec = path.display().to_string();
    let (listed, counts) = resolve_counted(std::slice::from_ref(&spec), 10, &opts()).unwrap();
    assert_eq!(listed, shards);
    assert_eq!(counts, [Some(5), Some(7), Some(4)]);
    let loader =
        |spec: &str| JuicedBatch::builder([spec]).device(DeviceSpec::Cpu).image_size(32).batch_size(4).build().unwrap();
    assert_eq!(loader(&spec).shard_counts().unwrap(), [5, 7, 4]);
    // The counts come from the manifest, not from the shards: a manifest that overstates them is believed.
    let inflated = text.replace("\"nsamples\": 5", "\"nsamples\": 50");
    let fake = dir.path().join("inflated.json");
    std::fs::write(&fake, inflated).unwrap();
    assert_eq!(loader(&fake.display().to_string()).shard_counts().unwrap(), [50, 7, 4]);
    // Mixed sources: manifest counts as given, the other shards scanned (in parallel), in source order.
    let mixed = JuicedBatch::builder([fake.display().to_string(), paths[1].display().to_string(), spec.clone()])
        .device(DeviceSpec::Cpu)
        .build()
        .unwrap();
    assert_eq!(mixed.shard_counts().unwrap(), [50, 7, 4, 7, 5, 7, 4]);
    // The same batches as the shards given directly.
    let keys = |l: juicer::Juicer<JuicedBatch>| l.iter().unwrap().flat_map(|b| b.unwrap().keys).collect::<Vec<_>>();
    let direct = JuicedBatch::builder(crate::util::specs(&paths))
        .device(DeviceSpec::Cpu)
        .image_size(32)
        .batch_size(4)
        .build()
        .unwrap();
    assert_eq!(keys(loader(&spec)), keys(direct));
}

#[test]
fn pack_writes_a_manifest_and_index_merges_parts() {
    let dir = tempfile::tempdir().unwrap();
    let src = crate::util::fixtures().join("gcompris/pairs.jsonl");
    let out = dir.path().join("packed");
    let o = crate::util::juicer(&[
        "pack",
        &src.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--max-count",
        "30",
    ]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    let m = juicer::source::Manifest::read(&out.join("shard.json").display().to_string(), &opts()).unwrap();
    assert_eq!((m.shards.len(), m.total()), (3, 73));
    // `juicer index` over the shards gives the same counts; --merge joins two halves in order.
    let whole = dir.path().join("whole.json");
    let spec = out.join("shard-{000000..000002}.tar").display().to_string();
    let o = crate::util::juicer(&["index", &spec, "--out", &whole.display().to_string()]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    let w = juicer::source::Manifest::read(&whole.display().to_string(), &opts()).unwrap();
    assert_eq!(
        w.shards.iter().map(|s| s.nsamples).collect::<Vec<_>>(),
        m.shards.iter().map(|s| s.nsamples).collect::<Vec<_>>()
    );
    let (a, b) = (dir.path().join("a.json"), dir.path().join("b.json"));
    for (part, range) in [(&a, "{000000..000001}"), (&b, "000002")] {
        let spec = out.join(format!("shard-{range}.tar")).display().to_string();
        assert!(crate::util::juicer(&["index", &spec, "--out", &part.display().to_string()]).status.success());
    }
    let merged = dir.path().join("merged.json");
    let o = crate::util::juicer(&[
        "index",
        "--merge",
        &a.display().to_string(),
        &b.display().to_string(),
        "--out",
        &merged.display().to_string(),
    ]);
    assert!(o.status.success(), "{}", crate::util::stderr(&o));
    let mm = juicer::source::Manifest::read(&merged.display().to_string(), &opts()).unwrap();
    assert_eq!(mm.shards, w.shards);
    // Listing a shard twice is refused.
    let o = crate::util::juicer(&[
        "index",
        "--merge",
        &a.display().to_string(),
        &a.display().to_string(),
        "--out",
        &merged.display().to_string(),
    ]);
    assert!(!o.status.success() && crate::util::stderr(&o).contains("two manifests"));
}
