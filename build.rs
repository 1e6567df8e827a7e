//! Link settings for juicer's binaries, examples, tests and benches, and for the Python extension module
//! (`python/Cargo.toml` names this file as its build script). Link arguments change no compiled dependency, so
//! the two README commands still share every artifact.
//!
//! **Identical code folding.** burn and CubeCL instantiate the same code for many element types and backends;
//! much of it compiles to byte-identical functions. rust-lld, the default linker on x86-64 Linux since Rust 1.90,
//! folds them with `--icf=all`, and `--ignore-data-address-equality` lets it fold identical read-only data too.
//! Measured on the `juicer` release binary (2026-12-05): 92.2 MB → 80.5 MB, the `.jsonl` of the main job
//! byte-identical, link time +0.1 s. Rust gives no guarantee that two functions have distinct addresses, so
//! folding them is sound for Rust code.
//!
//! The flags are given only where the linker is known to be rust-lld: target `x86_64-unknown-linux-gnu`, rustc
//! 1.90 or later, no linker set in cargo's configuration, and no `RUSTFLAGS` choosing another linker
//! (`-fuse-ld=`, `-C linker=`, `linker-features=-lld`, `link-self-contained=-linker`); GNU ld rejects `--icf`.
//! `JUICER_LINK_ICF=0` turns it off.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=JUICER_LINK_ICF");
    println!("cargo:rerun-if-env-changed=RUSTC_LINKER");
    if icf_applies() {
        println!("cargo:rustc-link-arg=-Wl,--icf=all");
        println!("cargo:rustc-link-arg=-Wl,--ignore-data-address-equality");
    }
}

fn icf_applies() -> bool {
    if std::env::var("JUICER_LINK_ICF").is_ok_and(|v| v == "0") {
        return false;
    }
    if std::env::var("TARGET").ok().as_deref() != Some("x86_64-unknown-linux-gnu") {
        return false;
    }
    // A linker set in cargo's configuration (`target.<triple>.linker`) reaches build scripts as RUSTC_LINKER.
    if std::env::var_os("RUSTC_LINKER").is_some() {
        return false;
    }
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = ["-fuse-ld=", "linker-features=-lld", "link-self-contained=-linker", "linker="];
    if other_linker.iter().any(|f| flags.contains(f)) {
        return false;
    }
    rustc_minor().is_some_and(|minor| minor >= 90)
}

/// The minor version of the rustc that builds the crate (`1.MINOR.PATCH`), from `rustc -vV`.
fn rustc_minor() -> Option<u32> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out = Command::new(rustc).arg("-vV").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let release = text.lines().find_map(|l| l.strip_prefix("release: "))?;
    let mut parts = release.split('.');
    (parts.next()? == "1").then_some(())?;
    parts.next()?.parse().ok()
}
