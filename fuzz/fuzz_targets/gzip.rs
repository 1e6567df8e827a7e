//! cargo-fuzz target `gzip`: the body is [`juicer::fuzzing::gzip`] (see that module for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| juicer::fuzzing::gzip(data));
