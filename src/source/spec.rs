//! Shard specifications: brace expansion, globs, URLs and folder sources, resolved into [`Shard`]s.
//!
//! Brace syntax (as in bash and `braceexpand`): `{000..099}` is an inclusive numeric range that keeps the zero
//! padding of its bounds, `{a,b,c}` a list; several braces in one spec expand to their product in order, and
//! braces nest. A reversed range (`{5..1}`), an unbalanced brace, or a brace with neither `,` nor `..` is an
//! error. Glob patterns (`*`, `?`, `[`) are expanded after braces for local paths only; URLs are only
//! brace-expanded.

use std::path::{Path, PathBuf};

use super::folder::load_folder;
use super::http::is_url;
use super::manifest::{Manifest, is_manifest};
use super::{ReadOptions, Shard};
use crate::error::{Error, Result};

/// Most names one spec may expand to (guards against `{0..999999999}` by mistake).
const MAX_EXPANSION: usize = 1_000_000;
/// Name of the captions file looked for in a folder source.
pub const CAPTIONS_FILE: &str = "captions.jsonl";

fn spec_error(spec: &str, detail: impl Into<String>) -> Error {
    Error::ShardSpec { spec: spec.to_string(), detail: detail.into() }
}

/// Expands the braces of `spec` (see the module docs); a spec without braces expands to itself.
pub fn expand_braces(spec: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    expand_into(spec, spec, &mut out)?;
    Ok(out)
}

/// Byte index of the `}` closing the `{` at `open`.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits a brace body at its top-level commas.
fn split_top_level(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// The alternatives of one brace body: a list or a numeric range.
fn alternatives(spec: &str, body: &str) -> Result<Vec<String>> {
    let parts = split_top_level(body);
    if parts.len() > 1 {
        return Ok(parts.into_iter().map(str::to_string).collect());
    }
    let Some((a, b)) = body.split_once("..") else {
        return Err(spec_error(spec, format!("brace `{{{body}}}` is neither a list (a,b) nor a range (0..9)")));
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
    if !numeric(a) || !numeric(b) {
        return Err(spec_error(spec, format!("range `{{{body}}}` needs non-negative integer bounds")));
    }
    let parse = |s: &str| s.parse::<u64>().map_err(|e| spec_error(spec, format!("range bound `{s}`: {e}")));
    let (lo, hi) = (parse(a)?, parse(b)?);
    if lo > hi {
        return Err(spec_error(spec, format!("reversed range `{{{body}}}`")));
    }
    if hi - lo >= MAX_EXPANSION as u64 {
        return Err(spec_error(spec, format!("range `{{{body}}}` expands to more than {MAX_EXPANSION} names")));
    }
    let padded = |s: &str| s.len() > 1 && s.starts_with('0');
    let width = if padded(a) || padded(b) { a.len().max(b.len()) } else { 0 };
    Ok((lo..=hi).map(|n| format!("{n:0width$}")).collect())
}

/// Expands `s` (a suffix of the original `spec`) and appends the results to `out`.
fn expand_into(spec: &str, s: &str, out: &mut Vec<String>) -> Result<()> {
    let Some(open) = s.find('{') else {
        if s.contains('}') {
            return Err(spec_error(spec, "unbalanced `}`"));
        }
        out.push(s.to_string());
        return Ok(());
    };
    let (prefix, after_prefix) = (&s[..open], &s[open..]);
    if prefix.contains('}') {
        return Err(spec_error(spec, "unbalanced `}`"));
    }
    let close = matching_brace(after_prefix, 0).ok_or_else(|| spec_error(spec, "unbalanced `{`"))?;
    let body = &after_prefix[1..close];
    let suffix = &after_prefix[close + 1..];
    for alt in alternatives(spec, body)? {
        let mut rest = Vec::new();
        expand_into(spec, &format!("{alt}{suffix}"), &mut rest)?;
        if out.len() + rest.len() > MAX_EXPANSION {
            return Err(spec_error(spec, format!("expands to more than {MAX_EXPANSION} names")));
        }
        out.extend(rest.into_iter().map(|r| format!("{prefix}{r}")));
    }
    Ok(())
}

/// Turns one existing local path into shards: a tar file, a `.jsonl` captions file, or a directory with a
/// `captions.jsonl`.
fn local_shards(spec: &str, path: &Path, folder_shard_size: usize, out: &mut Vec<Shard>) -> Result<()> {
    if path.is_dir() {
        let jsonl = path.join(CAPTIONS_FILE);
        if !jsonl.is_file() {
            return Err(spec_error(spec, format!("directory `{}` has no {CAPTIONS_FILE}", path.display())));
        }
        out.extend(load_folder(spec, &jsonl, folder_shard_size)?.into_iter().map(Shard::Folder));
    } else if path.is_file() {
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl")) {
            out.extend(load_folder(spec, path, folder_shard_size)?.into_iter().map(Shard::Folder));
        } else {
            out.push(Shard::Tar(path.to_string_lossy().into_owned()));
        }
    } else {
        return Err(spec_error(spec, format!("no such file or directory: `{}`", path.display())));
    }
    Ok(())
}

/// Expands braces and globs (local paths and object-store URLs) into names, in spec order (glob matches sorted),
/// without opening anything: e.g. the manifest parts `juicer index --merge` joins. A glob matching nothing is
/// an error naming it.
pub fn expand_names(specs: &[String], opts: &ReadOptions) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for spec in specs {
        for name in expand_braces(spec)? {
            if !name.contains(['*', '?', '[']) || is_url(&name) {
                out.push(name);
                continue;
            }
            let matched = if super::object::is_object_url(&name) {
                super::object::glob(&name, opts)?
            } else {
                let paths = glob::glob(&name).map_err(|e| spec_error(spec, format!("bad glob `{name}`: {e}")))?;
                let mut m: Vec<String> = paths
                    .map(|p| p.map(|p| p.to_string_lossy().into_owned()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| spec_error(spec, format!("glob `{name}`: {e}")))?;
                m.sort();
                m
            };
            if matched.is_empty() {
                return Err(spec_error(spec, format!("glob `{name}` matches nothing")));
            }
            out.extend(matched);
        }
    }
    Ok(out)
}

/// Expands shard specifications into shards, in spec order (glob matches sorted).
///
/// Accepts local paths, globs (`data/*.tar`), brace ranges (`shards-{000000..000099}.tar`) and lists
/// (`{a,b,c}`, several braces per spec), `http://`/`https://` URLs (brace-expanded, not globbed), object-store
/// URLs (`s3://`, `gs://`, `az://`, `abfs://`, `file://`; brace-expanded and globbed by listing), and folder
/// sources: a directory containing `captions.jsonl` or a path to a `.jsonl` file, split into virtual shards of
/// `folder_shard_size` entries.
///
/// Errors: a spec that matches nothing, a missing local file, a bad brace, a malformed JSONL line ->
/// [`Error::ShardSpec`] naming the spec.
pub fn resolve(specs: &[String], folder_shard_size: usize) -> Result<Vec<Shard>> {
    Ok(resolve_counted(specs, folder_shard_size, &ReadOptions::default())?.0)
}

/// [`resolve`], plus every shard's sample count where it is known without reading the shard: from a manifest
/// (a source ending in `.json`, [`super::manifest`]) or, for a folder source, from its JSONL.
pub fn resolve_counted(
    specs: &[String],
    folder_shard_size: usize,
    opts: &ReadOptions,
) -> Result<(Vec<Shard>, Vec<Option<u64>>)> {
    let mut shards = Vec::new();
    let mut counts = Vec::new();
    for spec in specs {
        let before = shards.len();
        for name in expand_braces(spec)? {
            if is_manifest(&name) {
                let manifest = Manifest::read(&name, opts)?;
                for s in manifest.shards {
                    counts.resize(shards.len(), None);
                    shards.push(Shard::Tar(s.url));
                    counts.push(Some(s.nsamples));
                }
            } else if is_url(&name) {
                shards.push(Shard::Tar(name));
            } else if super::object::is_object_url(&name) {
                if name.contains(['*', '?', '[']) {
                    let matched = super::object::glob(&name, opts)?;
                    if matched.is_empty() {
                        return Err(spec_error(spec, format!("glob `{name}` matches no object")));
                    }
                    shards.extend(matched.into_iter().map(Shard::Tar));
                } else {
                    shards.push(Shard::Tar(name));
                }
            } else if name.contains(['*', '?', '[']) {
                let paths = glob::glob(&name).map_err(|e| spec_error(spec, format!("bad glob `{name}`: {e}")))?;
                let mut matched: Vec<PathBuf> =
                    paths.collect::<Result<_, _>>().map_err(|e| spec_error(spec, format!("glob `{name}`: {e}")))?;
                matched.sort();
                if matched.is_empty() {
                    return Err(spec_error(spec, format!("glob `{name}` matches nothing")));
                }
                for path in matched {
                    local_shards(spec, &path, folder_shard_size, &mut shards)?;
                }
            } else {
                local_shards(spec, Path::new(&name), folder_shard_size, &mut shards)?;
            }
        }
        if shards.len() == before {
            return Err(spec_error(spec, "matches no shard"));
        }
    }
    counts.resize(shards.len(), None);
    for (shard, count) in shards.iter().zip(counts.iter_mut()) {
        if let Shard::Folder(f) = shard {
            *count = Some(f.len() as u64);
        }
    }
    Ok((shards, counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_lists_and_products() {
        assert_eq!(expand_braces("a-{08..11}.tar").unwrap(), ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]);
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(expand_braces("{x,y}{0..1}").unwrap(), ["x0", "x1", "y0", "y1"]);
        assert_eq!(expand_braces("{a,{b,c}d}").unwrap(), ["a", "bd", "cd"]);
        assert_eq!(expand_braces("plain").unwrap(), ["plain"]);
        assert_eq!(expand_braces("{a,}").unwrap(), ["a", ""]);
    }

    #[test]
    fn brace_errors() {
        for bad in ["{5..1}", "{a", "a}", "{abc}", "{a..c}", "{0..99999999}", "x}{"] {
            assert!(matches!(expand_braces(bad), Err(Error::ShardSpec { .. })), "{bad}");
        }
    }

    #[test]
    fn url_detection() {
        assert!(is_url("http://h/x.tar"));
        assert!(is_url("HTTPS://h/x.tar"));
        assert!(!is_url("data/http.tar"));
    }
}
